"""`python -m trainer crosscheck`: check the eval's metrics against MiniOneRec's calc.py.

Which calc runs: `crosscheck.calc_script` when set (with `crosscheck.python`); otherwise upstream's
own calc.py at the pinned commit (trainer/ops/upstream_calc.py: a verified local copy, or a
verified download); offline with no copy, the package's metrics (trainer.eval.metrics) recomputed
from the files, and the report says so (`tool`, `fallback_reason`): that checks the files against
the summary, it is not a second opinion. calc's printed report is parsed, and every HR@K, NDCG@K
and the invalid count is compared with run_summary.json. calc_crosscheck.json is always written;
on failure a copy also goes to `--failed-report` (Snakemake deletes a failed job's outputs), and
any difference beyond tolerance, any invalid prediction or a failing script stops with a table.

Precision: calc.py prints numpy arrays with numpy's default 8 fractional digits (scientific
notation, also with 8 mantissa digits, when values span orders of magnitude). Every metric lies in
[0, 1], so a printed value is within PRINT_RESOLUTION = 5e-9 of the true one. A metric passes when
|eval - calc| <= tolerance + PRINT_RESOLUTION: with tolerance 0 the two must agree to the printed
digits; the default 1e-6 is far below one test row's weight (1/n) for any n < 10^6, so a single
row scored differently still fails.
"""
from __future__ import annotations

import ast
import logging
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from trainer.cli import base_parser
from trainer.config import ConfigError, load_config
from trainer.errors import UserError
from trainer.data.pinned import DEFAULT_REPO
from trainer.io_utils import atomic_write_json, read_json, setup_logging
from trainer.ops.upstream_calc import Located, UpstreamSource, locate_calc

log = logging.getLogger("trainer")

PRINT_RESOLUTION = 5e-9
ALL_K = (1, 3, 5, 10, 20, 50)
STDERR_TAIL_LINES = 20
PACKAGE_TOOL = "package:trainer.eval.metrics"


class CrosscheckError(UserError):
    """The eval's metrics disagree with calc.py, a prediction is invalid, or calc.py failed."""


@dataclass
class CalcOutput:
    n_beam: int
    topk: list[int]
    ndcg: list[float]
    hr: list[float]
    invalid: int
    echoed: list[str]  # lines before the report: upstream prints each invalid SID, then its target


# ---------------------------------------------------------------------------- running calc.py

def calc_tool(cfg: dict, predictions: str, info: str, upstream: UpstreamSource | None) -> dict:
    """Which calc runs: report fields `tool`, `command` (None: the package's metrics in-process), ..."""
    cc = cfg["crosscheck"]
    python = cc.get("python") or sys.executable
    script = cc.get("calc_script")
    if script:
        return {"tool": f"external:{script}",
                "command": [str(python), str(script), "--path", predictions, "--item_path", info]}
    located = locate_calc(upstream) if upstream else Located(None, "no upstream commit given (--download-commit)")
    if located.path is None:
        log.warning("upstream calc.py unavailable (%s): falling back to the package's metrics", located.how)
        return {"tool": PACKAGE_TOOL, "command": None, "fallback_reason": located.how}
    return {"tool": f"upstream:calc.py@{upstream.commit}", "upstream_commit": upstream.commit,
            "calc_source": located.how,
            "command": [str(python), str(located.path), "--path", predictions, "--item_path", info]}


def package_calc(predictions: str, info: str) -> CalcOutput:
    """The package's metrics of the files, in calc.py's report shape (the offline fallback)."""
    from trainer.eval.metrics import compute_metrics, load_predictions, load_valid_sids

    m = compute_metrics(load_predictions(predictions), load_valid_sids(info))
    topk = [k for k in ALL_K if f"eval/hr@{k}" in m]
    return CalcOutput(n_beam=m["num_beams"], topk=topk, ndcg=[m[f"eval/ndcg@{k}"] for k in topk],
                      hr=[m[f"eval/hr@{k}"] for k in topk], invalid=m["eval/invalid_prediction_count"], echoed=[])


def _run_calc(report: dict, predictions: str, info: str) -> CalcOutput | None:
    """Run the chosen calc; its output parsed, or None with the reason added to report['problems']."""
    problems, cmd = report["problems"], report["command"]
    if cmd is None:
        try:
            return package_calc(predictions, info)
        except UserError as e:
            problems.append(str(e))
            return None
    if not Path(cmd[1]).is_file():
        problems.append(f"calc script not found: {cmd[1]} (set crosscheck.calc_script to MiniOneRec's "
                        "calc.py, or null for upstream's at the pinned commit)")
        return None
    log.info("crosscheck: %s", shlex.join(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        problems.append(f"could not start {cmd[0]!r}: {e} (check crosscheck.python)")
        return None
    report["returncode"] = proc.returncode
    if proc.returncode != 0:
        report["stderr_tail"] = _tail(proc.stderr)
        problems.append(f"calc script exited with {proc.returncode}; stderr tail:\n{report['stderr_tail']}")
        return None
    try:
        return parse_calc_output(proc.stdout)
    except ValueError as e:
        report["stdout_tail"] = _tail(proc.stdout)
        problems.append(f"cannot read calc output ({e}); stdout tail:\n{report['stdout_tail']}")
        return None


def _tail(text: str, lines: int = STDERR_TAIL_LINES) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


# ---------------------------------------------------------------------------- parsing its output

def _parse_array(text: str, what: str) -> list[float]:
    text = text.strip()
    if not (text.startswith("[") and text.endswith("]")):
        raise ValueError(f"{what} is not a printed array: {text!r}")
    try:
        return [float(tok) for tok in text[1:-1].split()]
    except ValueError:
        raise ValueError(f"{what} holds a value that is not a number: {text!r}") from None


def _collect_array(lines: list[str], start: int, prefix: str) -> tuple[str, int]:
    """Text of a numpy array printed after `prefix` on lines[start], possibly wrapped; (text, last line)."""
    text = lines[start][len(prefix):]
    end = start
    while "]" not in text:
        end += 1
        if end >= len(lines):
            raise ValueError(f"the array after {prefix.strip()!r} is not closed with ']'")
        text += " " + lines[end]
    return text, end


def _prev_nonempty(lines: list[str], i: int) -> int:
    i -= 1
    while i >= 0 and not lines[i].strip():
        i -= 1
    return i


def parse_calc_output(stdout: str) -> CalcOutput:
    """Parse upstream calc.py's report: n_beam, K list, `NDCG:\\t[...]`, `HR\\t[...]`, invalid count.

    Lines printed before n_beam (upstream echoes each invalid prediction and its target) are
    skipped; the last `NDCG:` line anchors the report.
    """
    lines = stdout.splitlines()
    ndcg_at = max((i for i, line in enumerate(lines) if line.startswith("NDCG:")), default=None)
    if ndcg_at is None:
        raise ValueError("no 'NDCG:' line in its output")
    ndcg_text, end = _collect_array(lines, ndcg_at, "NDCG:")
    hr_at = end + 1
    if hr_at >= len(lines) or not re.match(r"HR\s", lines[hr_at]):
        raise ValueError("no 'HR' line right after the NDCG array")
    hr_text, end = _collect_array(lines, hr_at, "HR")
    inv_at = end + 1
    while inv_at < len(lines) and not lines[inv_at].strip():
        inv_at += 1
    m = re.search(r"(\d+)\s*$", lines[inv_at]) if inv_at < len(lines) else None
    if m is None:
        raise ValueError("no invalid-prediction count after the HR array")
    k_at = _prev_nonempty(lines, ndcg_at)
    beam_at = _prev_nonempty(lines, k_at)
    try:
        topk = ast.literal_eval(lines[k_at].strip()) if k_at >= 0 else None
        n_beam = int(lines[beam_at].strip()) if beam_at >= 0 else None
    except (ValueError, SyntaxError):
        topk = n_beam = None
    if not isinstance(topk, list) or not all(isinstance(k, int) for k in topk) or n_beam is None:
        raise ValueError("expected the beam count and the K list on the two lines before 'NDCG:'")
    ndcg, hr = _parse_array(ndcg_text, "NDCG"), _parse_array(hr_text, "HR")
    if len(ndcg) != len(topk) or len(hr) != len(topk):
        raise ValueError(f"K list {topk} has {len(topk)} cut-offs but NDCG has {len(ndcg)} and HR {len(hr)} values")
    echoed = [line.strip() for line in lines[:beam_at] if line.strip()]
    return CalcOutput(n_beam=n_beam, topk=topk, ndcg=ndcg, hr=hr, invalid=int(m.group(1)), echoed=echoed)


# ---------------------------------------------------------------------------- comparing

def _load_summary(path: str) -> dict:
    p = Path(path)
    summary = read_json(p, CrosscheckError, "run the eval (again) to write the run summary")
    if not isinstance(summary, dict):
        raise CrosscheckError(f"{p}: expected a JSON object with eval/hr@K, eval/ndcg@K keys")
    return summary


def compare(calc: CalcOutput, summary: dict, summary_path: str, tolerance: float) -> tuple[dict, list[str]]:
    """Per-metric comparison rows and the problems found."""
    rows: dict[str, dict] = {}
    problems: list[str] = []
    slack = tolerance + PRINT_RESOLUTION + 1e-12  # 1e-12: decimal parsing of the printed digits
    calc_values = {}
    for k, hr, ndcg in zip(calc.topk, calc.hr, calc.ndcg):
        calc_values[f"eval/hr@{k}"] = hr
        calc_values[f"eval/ndcg@{k}"] = ndcg
    ordered = [f"eval/hr@{k}" for k in calc.topk] + [f"eval/ndcg@{k}" for k in calc.topk]
    for key in ordered:
        calc_v = calc_values[key]
        eval_v = summary.get(key)
        if not isinstance(eval_v, (int, float)) or isinstance(eval_v, bool):
            rows[key] = {"eval": eval_v, "calc": calc_v, "abs_diff": None, "passed": False}
            problems.append(f"{summary_path} has no numeric '{key}' (calc.py reports it)")
            continue
        diff = abs(float(eval_v) - calc_v)
        ok = diff <= slack
        rows[key] = {"eval": float(eval_v), "calc": calc_v, "abs_diff": diff, "passed": ok}
        if not ok:
            problems.append(f"{key}: eval {eval_v!r} vs calc {calc_v!r} (|diff| {diff:.3g} > tolerance {tolerance:g})")
    for k in ALL_K:
        if k in calc.topk:
            continue
        for name in (f"eval/hr@{k}", f"eval/ndcg@{k}"):
            if name in summary:
                problems.append(f"{summary_path} has '{name}' but calc.py saw only {calc.n_beam} beams "
                                f"(K <= {calc.n_beam}); were they run on the same predictions file?")
    if "num_beams" in summary and summary["num_beams"] != calc.n_beam:
        problems.append(f"{summary_path} says num_beams={summary['num_beams']} but calc.py saw {calc.n_beam}")
    return rows, problems


def _check_predictions(predictions: str, info: str, data_dir: str | None, summary: dict | None,
                       report: dict) -> list[str]:
    """Invalid SIDs over every beam (calc.py stops counting at the hit), located by record and
    beam; with `data_dir`, the row check against its split CSV (trainer/ops/rowcheck.py)."""
    from trainer.eval.metrics import compute_metrics, load_predictions, load_valid_sids
    from trainer.ops.rowcheck import check_rows, invalid_beams

    records, valid = load_predictions(predictions), load_valid_sids(info)
    n = int(compute_metrics(records, valid)["eval/invalid_prediction_count_all_beams"])
    report["invalid_count_all_beams"] = n
    problems = [f"{n} predicted SID(s) over all beams are not in {info}; first: "
                + ", ".join(invalid_beams(records, valid))] if n else []
    if data_dir:
        problems += check_rows(records, predictions, data_dir, summary)
    return problems


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.10g}"
    return str(value)


def format_table(report: dict) -> str:
    header = f"{'metric':<34} {'eval (run_summary)':>20} {'calc':>16} {'abs diff':>10}  status"
    lines = [header, "-" * len(header)]
    for key, row in report["metrics"].items():
        diff = "-" if row["abs_diff"] is None else f"{row['abs_diff']:.2e}"
        lines.append(f"{key:<34} {_fmt(row['eval']):>20} {_fmt(row['calc']):>16} {diff:>10}  "
                     f"{'ok' if row['passed'] else 'MISMATCH'}")
    inv_ok = report["invalid_count"] == 0 and report["summary_invalid_count"] == 0
    lines.append(f"{'eval/invalid_prediction_count':<34} {_fmt(report['summary_invalid_count']):>20} "
                 f"{_fmt(report['invalid_count']):>16} {'':>10}  {'ok' if inv_ok else 'INVALID'}")
    if report.get("invalid_count_all_beams") is not None:
        n = report["invalid_count_all_beams"]
        lines.append(f"{'invalid SIDs over all beams':<34} {'':>20} {n:>16} {'':>10}  {'ok' if n == 0 else 'INVALID'}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- the command

def run_crosscheck(predictions: str, summary_path: str, info: str, out: str, cfg: dict,
                   upstream: UpstreamSource | None = None, failed_report: str | None = None,
                   data_dir: str | None = None) -> dict:
    """Run calc, compare, write `out` (always; also `failed_report` on failure, else it is removed);
    raise CrosscheckError when anything disagrees. With `data_dir` (the dataset the eval read), the
    predictions are also checked row by row against the split the summary names."""
    tolerance = cfg["crosscheck"].get("tolerance")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or tolerance < 0:
        raise ConfigError(f"crosscheck.tolerance must be a number >= 0, got {tolerance!r}")
    report = {
        "tool": None, "command": None, "predictions": predictions, "summary": summary_path, "info": info,
        "data_dir": data_dir,
        "returncode": None, "n_beam": None, "topk": None, "metrics": {}, "max_abs_diff": None,
        "invalid_count": None, "summary_invalid_count": None, "invalid_count_all_beams": None,
        "tolerance": float(tolerance), "print_resolution": PRINT_RESOLUTION, "passed": False, "problems": [],
    }
    problems: list[str] = report["problems"]
    calc = None
    try:
        report.update(calc_tool(cfg, predictions, info, upstream))
    except UserError as e:  # a copy of calc.py that is not upstream's, or a bad pin file
        report["tool"] = "upstream:calc.py"
        problems.append(str(e))
    else:
        calc = _run_calc(report, predictions, info)

    summary = None
    try:
        summary = _load_summary(summary_path)
    except CrosscheckError as e:
        problems.append(str(e))
    if summary is not None:
        inv = summary.get("eval/invalid_prediction_count")
        report["summary_invalid_count"] = inv
        if not isinstance(inv, int) or isinstance(inv, bool):
            problems.append(f"{summary_path} has no integer 'eval/invalid_prediction_count'")
    if calc is not None:
        report.update(n_beam=calc.n_beam, topk=calc.topk, invalid_count=calc.invalid)
        if summary is not None:
            rows, found = compare(calc, summary, summary_path, float(tolerance))
            report["metrics"] = rows
            problems.extend(found)
            diffs = [r["abs_diff"] for r in rows.values() if r["abs_diff"] is not None]
            report["max_abs_diff"] = max(diffs) if diffs else None
            if isinstance(report["summary_invalid_count"], int) and report["summary_invalid_count"] != calc.invalid:
                problems.append(f"invalid count: eval {report['summary_invalid_count']} vs calc {calc.invalid}")
        if calc.invalid:
            pairs = list(zip(calc.echoed[0::2], calc.echoed[1::2]))[:5]
            report["invalid_examples"] = [{"predicted": p, "target": t} for p, t in pairs]
            shown = ", ".join(f"{p!r} (target {t!r})" for p, t in pairs)
            problems.append(f"calc.py found {calc.invalid} invalid prediction(s): SIDs not in {info}"
                            + (f"; first: {shown}" if shown else ""))
    if isinstance(report["summary_invalid_count"], int) and report["summary_invalid_count"] > 0:
        problems.append(f"{summary_path} reports {report['summary_invalid_count']} invalid prediction(s)")
    try:
        problems.extend(_check_predictions(predictions, info, data_dir, summary, report))
    except UserError as e:
        problems.append(str(e))

    report["passed"] = not problems
    atomic_write_json(out, report)
    if failed_report:
        if problems:
            atomic_write_json(failed_report, report)
        else:
            Path(failed_report).unlink(missing_ok=True)
    table = format_table(report)
    how = report["tool"] + (f" ({report['fallback_reason']})" if "fallback_reason" in report else "")
    if problems:
        any_invalid = bool(report["invalid_count"] or report["invalid_count_all_beams"]
                           or (isinstance(report["summary_invalid_count"], int) and report["summary_invalid_count"] > 0))
        extra = ("\nAn invalid prediction means constrained decoding produced a SID outside the item set, "
                 "or the info file is not the one the eval used.") if any_invalid else ""
        cmd = shlex.join(report["command"]) if report["command"] else "in-process"
        raise CrosscheckError(
            f"calc cross-check FAILED ({how}; {cmd}):\n{table}\nproblems:\n"
            + "\n".join(f"  - {p}" for p in problems) + extra + f"\ndetails: {failed_report or out}")
    print(f"calc cross-check passed ({how}), max |diff| {_fmt(report['max_abs_diff'])}:\n{table}")
    return report


def main(argv: list[str]) -> int:
    argv = list(argv)
    if argv and argv[0] == "crosscheck":
        argv = argv[1:]
    p = base_parser("crosscheck", "compare run_summary.json metrics with MiniOneRec calc.py output")
    p.add_argument("--predictions", required=True, help="eval_predictions.json")
    p.add_argument("--summary", required=True, help="run_summary.json of the same eval")
    p.add_argument("--info", required=True, help="info file (SID<TAB>title<TAB>item_id) the eval used")
    p.add_argument("--out", required=True, help="where to write calc_crosscheck.json")
    p.add_argument("--data", default=None, help="dataset directory the eval read (e.g. data/office): predictions "
                                               "must match its split CSV in count, order and targets")
    p.add_argument("--failed-report", default=None,
                   help="also write the report here when the check fails (survives Snakemake removing --out)")
    up = p.add_argument_group("upstream calc.py (used when crosscheck.calc_script is null)")
    up.add_argument("--download-commit", default=None, metavar="SHA", help="MiniOneRec commit whose calc.py runs")
    up.add_argument("--download-repo", default=DEFAULT_REPO, help="repository URL, or a BASE laid out as BASE/COMMIT/...")
    up.add_argument("--pins", default="config/minionerec_pins.yaml", help="pin file (git blob ids at the commit)")
    up.add_argument("--upstream-root", default=None, help="local copy of the repository's files (checked by blob id)")
    up.add_argument("--cache-dir", default="workdir/minionerec", help="where a downloaded calc.py is kept")
    args = p.parse_args(argv)
    setup_logging(args.log)
    cfg = load_config(args.config, args.overrides)
    upstream = (UpstreamSource(args.download_commit, args.pins, args.download_repo, args.upstream_root, args.cache_dir)
                if args.download_commit else None)
    run_crosscheck(args.predictions, args.summary, args.info, args.out, cfg, upstream, args.failed_report,
                   args.data)
    return 0
