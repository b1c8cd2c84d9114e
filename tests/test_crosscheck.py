"""`python -m trainer crosscheck` with upstream MiniOneRec's calc.py (../shared) on hand-built files:
which calc runs (a verified local copy, a verified download, the offline fallback), the parser, and
every way the check fails."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.upstream_oracle import AMAZON, UPSTREAM, UPSTREAM_CALC
from trainer.cli import main as cli_main
from trainer.config import load_config
from trainer.data.pinned import git_blob_id
from trainer.eval.metrics import compute_metrics, load_predictions, load_valid_sids
from trainer.ops.crosscheck import PACKAGE_TOOL, PRINT_RESOLUTION, CrosscheckError, parse_calc_output, run_crosscheck
from trainer.ops.upstream_calc import UpstreamSource

REPO = Path(__file__).resolve().parent.parent
PINS = str(REPO / "config" / "minionerec_pins.yaml")
PIN = "81b4ba9811cfb152cf161f1c486fe516510d081e"
AMAZON_INFO = AMAZON / "info" / "Office_Products_5_2016-10-2018-11.txt"
needs_upstream = pytest.mark.skipif(not UPSTREAM_CALC.is_file(), reason=f"{UPSTREAM_CALC} not present")


def sid(i: int) -> str:
    return f"<a_{i}><b_{i}><c_{i}>"


BAD = "<a_999><b_1><c_1>"


def rec(target, predict, as_list=False):
    return {"input": "history ...", "output": [target] if as_list else target + "\n", "predict": list(predict)}


def write_case(tmp_path, records, n_items=60, name="case"):
    d = tmp_path / name
    d.mkdir()
    lines = [f"{sid(i)}\titem {i}\t{i}" for i in range(n_items)] + [f"{sid(7)}\tcollides with 7\t{n_items}"]
    (d / "info.txt").write_text("\n".join(lines) + "\n")
    (d / "eval_predictions.json").write_text(json.dumps(records))
    return d / "eval_predictions.json", d / "info.txt"


def write_summary(path, predictions, info, **changes):
    summary = compute_metrics(load_predictions(predictions), load_valid_sids(info))
    summary.update(changes)
    path.write_text(json.dumps(summary))
    return path


def mixed_records():
    """Hits at ranks 0, 2, 4 (list output), 9, a miss, a colliding SID; 10 beams, all valid."""
    beams = [sid(i) for i in range(20, 30)]
    return [
        rec(sid(20), beams),
        rec(sid(22), beams),
        rec(sid(24), beams, as_list=True),
        rec(sid(29), beams),
        rec(sid(1), beams),
        rec(sid(7), [sid(7)] + beams[:9]),
    ]


def run_upstream(predictions, info) -> str:
    proc = subprocess.run([sys.executable, str(UPSTREAM_CALC), "--path", str(predictions), "--item_path", str(info)],
                          capture_output=True, text=True, check=True)
    return proc.stdout


def upstream(tmp_path=None, **kw) -> UpstreamSource | None:
    """Upstream's calc.py from ../shared (checked against the pin), or None (package fallback) without it."""
    if not UPSTREAM_CALC.is_file() and not kw:
        return None
    kw.setdefault("root", str(UPSTREAM))
    return UpstreamSource(PIN, PINS, cache_dir=str((tmp_path or Path("/nonexistent")) / "cache"), **kw)


def cfg(*overrides):
    return load_config(None, list(overrides))


# ------------------------------------------------------------------ upstream calc.py vs the package's metrics

@needs_upstream
def test_upstream_calc_report_shape(tmp_path):
    records = mixed_records() + [rec(sid(4), [BAD, sid(4)] + [sid(i) for i in range(40, 48)])]
    predictions, info = write_case(tmp_path, records)
    lines = run_upstream(predictions, info).splitlines()
    # the invalid beam and its target are echoed first, then the report
    assert [line for line in lines if "it/s" not in line][:4] == [BAD, sid(4), "10", "[1, 3, 5, 10]"]
    parsed = parse_calc_output("\n".join(lines))
    assert parsed.echoed[:2] == [BAD, sid(4)] and parsed.invalid == 1


@needs_upstream
def test_upstream_calc_agrees_with_eval_metrics(tmp_path):
    records = mixed_records()
    predictions, info = write_case(tmp_path, records)
    parsed = parse_calc_output(run_upstream(predictions, info))
    m = compute_metrics(records, load_valid_sids(info))
    assert parsed.n_beam == m["num_beams"] == 10 and parsed.topk == [1, 3, 5, 10]
    n = 6
    for k, hr, ndcg in zip(parsed.topk, parsed.hr, parsed.ndcg):
        assert abs(hr - m[f"eval/hr@{k}"]) <= PRINT_RESOLUTION
        assert abs(ndcg - m[f"eval/ndcg@{k}"]) <= PRINT_RESOLUTION
    assert parsed.hr == pytest.approx([2 / n, 3 / n, 4 / n, 5 / n], abs=PRINT_RESOLUTION)
    assert parsed.ndcg[-1] == pytest.approx((2 + 1 / math.log2(4) + 1 / math.log2(6) + 1 / math.log2(11)) / n,
                                            abs=PRINT_RESOLUTION)
    assert parsed.invalid == m["eval/invalid_prediction_count"] == 0


@needs_upstream
def test_list_output_with_newline_never_matches_like_upstream(tmp_path):
    records = [rec(sid(1), [sid(1), sid(2)]), {"input": "", "output": [sid(1) + "\n"], "predict": [sid(1), sid(2)]}]
    predictions, info = write_case(tmp_path, records)
    assert parse_calc_output(run_upstream(predictions, info)).hr == [0.5]
    assert compute_metrics(records, load_valid_sids(info))["eval/hr@1"] == 0.5


# ------------------------------------------------------------------ parsing calc output

def test_parse_wrapped_scientific_arrays_after_invalid_echoes():
    ndcg = np.array([1 / 1500, 0.2, 1 / 3, 0.5, 0.7, 1.0])
    hr = np.array([0.5, 1 / 3, 0.25, 0.0, 1.0, 1.0])
    text = f"{BAD}\n{sid(1)}\n50\n[1, 3, 5, 10, 20, 50]\nNDCG:\t{ndcg}\nHR\t{hr}\n3\n"
    assert "e-01\n 7.00000000e-01" in text  # the NDCG array wrapped onto a second line
    parsed = parse_calc_output(text)
    assert parsed.n_beam == 50 and parsed.topk == [1, 3, 5, 10, 20, 50] and parsed.invalid == 3
    assert parsed.echoed == [BAD, sid(1)]
    assert np.max(np.abs(np.array(parsed.ndcg) - ndcg)) <= PRINT_RESOLUTION
    assert np.max(np.abs(np.array(parsed.hr) - hr)) <= PRINT_RESOLUTION


@pytest.mark.parametrize("text, needle", [
    ("hello\n", "no 'NDCG:' line"),
    ("5\n[1, 3, 5]\nNDCG:\t[0.1 0.2 0.3]\n0\n", "no 'HR' line"),
    ("5\n[1, 3, 5]\nNDCG:\t[0.1 0.2\n", "not closed"),
    ("5\n[1, 3, 5]\nNDCG:\t[0.1 0.2 0.3]\nHR\t[0.1 0.2 0.3]\n", "invalid-prediction count"),
    ("[1, 3, 5]\nNDCG:\t[0.1 0.2 0.3]\nHR\t[0.1 0.2 0.3]\n0\n", "beam count and the K list"),
    ("5\n[1, 3]\nNDCG:\t[0.1 0.2 0.3]\nHR\t[0.1 0.2 0.3]\n0\n", "K list [1, 3] has 2"),
    ("5\n[1, 3, 5]\nNDCG:\t[0.1 x 0.3]\nHR\t[0.1 0.2 0.3]\n0\n", "not a number"),
])
def test_parse_rejects_unexpected_output(text, needle):
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        parse_calc_output(text)


# ------------------------------------------------------------------ which calc runs

@needs_upstream
def test_crosscheck_runs_upstream_calc_and_writes_report(tmp_path, capsys):
    predictions, info = write_case(tmp_path, mixed_records())
    summary = write_summary(tmp_path / "run_summary.json", predictions, info)
    out = tmp_path / "res" / "calc_crosscheck.json"
    rc = cli_main(["crosscheck", "--predictions", str(predictions), "--summary", str(summary),
                   "--info", str(info), "--out", str(out), "--set", "crosscheck.tolerance=0",
                   "--download-commit", PIN, "--pins", PINS, "--upstream-root", str(UPSTREAM),
                   "--cache-dir", str(tmp_path / "cache")])
    assert rc == 0, capsys.readouterr().err
    assert "passed (upstream:calc.py@" + PIN in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["passed"] is True and report["problems"] == []
    assert report["tool"] == f"upstream:calc.py@{PIN}" and report["upstream_commit"] == PIN
    assert report["calc_source"] == f"local copy {UPSTREAM_CALC}" and report["command"][1] == str(UPSTREAM_CALC)
    assert report["n_beam"] == 10 and report["topk"] == [1, 3, 5, 10]
    assert set(report["metrics"]) == {f"eval/{m}@{k}" for m in ("hr", "ndcg") for k in (1, 3, 5, 10)}
    assert report["max_abs_diff"] <= PRINT_RESOLUTION
    assert report["invalid_count"] == 0 and report["summary_invalid_count"] == 0
    assert report["invalid_count_all_beams"] == 0 and report["tolerance"] == 0.0
    assert not (tmp_path / "cache").exists()  # the verified local copy needed no download


@needs_upstream
def test_crosscheck_downloads_calc_at_the_pinned_commit(tmp_path):
    """No local copy: calc.py comes from the repository (a file:// mirror) at the commit, verified, cached."""
    mirror = tmp_path / "mirror"
    (mirror / PIN).mkdir(parents=True)
    shutil.copy(UPSTREAM_CALC, mirror / PIN / "calc.py")
    predictions, info = write_case(tmp_path, mixed_records())
    summary = write_summary(tmp_path / "run_summary.json", predictions, info)
    src = upstream(tmp_path, root=str(tmp_path / "no-copy"), repo=mirror.as_uri())
    report = run_crosscheck(str(predictions), str(summary), str(info), str(tmp_path / "cc.json"), cfg(), src)
    cached = tmp_path / "cache" / PIN / "calc.py"
    assert report["passed"] and report["calc_source"] == f"downloaded to {cached}"
    assert git_blob_id(cached.read_bytes()) == "bd91af9d9bcddbd03e018b3c575a1dd51793ba9f"
    shutil.rmtree(mirror)  # offline now: the cached copy serves
    report = run_crosscheck(str(predictions), str(summary), str(info), str(tmp_path / "cc.json"), cfg(), src)
    assert report["passed"] and report["calc_source"] == f"cached download {cached}"


def test_crosscheck_refuses_a_calc_that_is_not_upstreams(tmp_path):
    predictions, info = write_case(tmp_path, mixed_records())
    summary = write_summary(tmp_path / "run_summary.json", predictions, info)
    fake_root = tmp_path / "copy"
    fake_root.mkdir()
    (fake_root / "calc.py").write_text("print('not upstream')\n")
    out = tmp_path / "cc.json"
    with pytest.raises(CrosscheckError) as e:
        run_crosscheck(str(predictions), str(summary), str(info), str(out), cfg(),
                       upstream(tmp_path, root=str(fake_root)))
    got = git_blob_id(b"print('not upstream')\n")
    assert got in str(e.value) and "bd91af9d9bcddbd03e018b3c575a1dd51793ba9f" in str(e.value)
    assert json.loads(out.read_text())["passed"] is False


def test_crosscheck_offline_without_copy_falls_back_and_says_so(tmp_path, capsys):
    predictions, info = write_case(tmp_path, mixed_records())
    summary = write_summary(tmp_path / "run_summary.json", predictions, info)
    src = upstream(tmp_path, root=str(tmp_path / "no-copy"), repo=(tmp_path / "unreachable").as_uri())
    report = run_crosscheck(str(predictions), str(summary), str(info), str(tmp_path / "cc.json"), cfg(), src)
    assert report["passed"] and report["tool"] == PACKAGE_TOOL and report["command"] is None
    assert "downloading file://" in report["fallback_reason"] and "calc.py failed" in report["fallback_reason"]
    assert f"passed ({PACKAGE_TOOL} (downloading" in capsys.readouterr().out


# ------------------------------------------------------------------ the cross-check fails loudly

def test_crosscheck_scientific_print_with_zero_tolerance(tmp_path):
    # 1 hit at rank 0 among 1500 rows, every row hits by rank 49: HR@1 / HR@50 > 1e3, so numpy
    # prints in scientific notation (wrapped); tolerance 0 still passes at the printed precision.
    beams = [sid(i) for i in range(50)]
    records = [rec(sid(0), beams)] + [rec(sid(49 - (i % 30)), beams) for i in range(1499)]
    predictions, info = write_case(tmp_path, records)
    summary = write_summary(tmp_path / "run_summary.json", predictions, info)
    report = run_crosscheck(str(predictions), str(summary), str(info), str(tmp_path / "cc.json"),
                            cfg("crosscheck.tolerance=0"), upstream(tmp_path))
    assert report["passed"] and report["topk"] == [1, 3, 5, 10, 20, 50]
    assert report["metrics"]["eval/hr@1"]["calc"] == pytest.approx(1 / 1500, rel=1e-8)


def test_crosscheck_doctored_summary_fails_with_table_and_keeps_the_report(tmp_path):
    predictions, info = write_case(tmp_path, mixed_records())
    good = compute_metrics(load_predictions(predictions), load_valid_sids(info))
    summary = write_summary(tmp_path / "run_summary.json", predictions, info,
                            **{"eval/hr@3": good["eval/hr@3"] + 0.01})
    out, kept = tmp_path / "calc_crosscheck.json", tmp_path / "logs" / "calc_crosscheck.failed.json"
    with pytest.raises(CrosscheckError) as e:
        run_crosscheck(str(predictions), str(summary), str(info), str(out), cfg(), upstream(tmp_path), str(kept))
    msg = str(e.value)
    assert "calc cross-check FAILED" in msg
    row = next(line for line in msg.splitlines() if line.startswith("eval/hr@3 "))
    assert "MISMATCH" in row and "1.00e-02" in row
    assert next(line for line in msg.splitlines() if line.startswith("eval/hr@1 ")).endswith("ok")
    assert "eval/hr@3: eval" in msg and f"details: {kept}" in msg
    out.unlink()  # what Snakemake does to a failed job's output: the kept copy remains
    report = json.loads(kept.read_text())
    assert report["passed"] is False
    assert report["metrics"]["eval/hr@3"]["passed"] is False
    assert report["metrics"]["eval/hr@3"]["abs_diff"] == pytest.approx(0.01, abs=1e-8)
    assert report["metrics"]["eval/hr@1"]["passed"] is True
    assert report["max_abs_diff"] == pytest.approx(0.01, abs=1e-8)
    write_summary(summary, predictions, info)  # fixed: a passing rerun removes the stale failure report
    assert run_crosscheck(str(predictions), str(summary), str(info), str(out), cfg(), upstream(tmp_path),
                          str(kept))["passed"]
    assert not kept.exists()


def test_crosscheck_tolerance_is_applied(tmp_path):
    predictions, info = write_case(tmp_path, mixed_records())
    good = compute_metrics(load_predictions(predictions), load_valid_sids(info))
    summary = write_summary(tmp_path / "run_summary.json", predictions, info,
                            **{"eval/ndcg@5": good["eval/ndcg@5"] + 1e-7})
    out = str(tmp_path / "cc.json")
    src = upstream(tmp_path)
    assert run_crosscheck(str(predictions), str(summary), str(info), out, cfg(), src)["passed"]  # 1e-7 < 1e-6
    with pytest.raises(CrosscheckError, match="eval/ndcg@5"):
        run_crosscheck(str(predictions), str(summary), str(info), out, cfg("crosscheck.tolerance=1e-8"), src)
    with pytest.raises(Exception, match="crosscheck.tolerance"):
        run_crosscheck(str(predictions), str(summary), str(info), out, cfg("crosscheck.tolerance=-1"), src)


def test_crosscheck_cli_failure_exit_code_and_message(tmp_path, capsys):
    predictions, info = write_case(tmp_path, mixed_records())
    summary = write_summary(tmp_path / "run_summary.json", predictions, info, **{"eval/ndcg@10": 0.0})
    out = tmp_path / "cc.json"
    rc = cli_main(["crosscheck", "--predictions", str(predictions), "--summary", str(summary),
                   "--info", str(info), "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "eval/ndcg@10" in err and "MISMATCH" in err and "Traceback" not in err
    assert json.loads(out.read_text())["passed"] is False


@needs_upstream
def test_crosscheck_invalid_prediction_fails(tmp_path):
    records = mixed_records() + [rec(sid(4), [BAD, sid(4)] + [sid(i) for i in range(40, 48)])]
    predictions, info = write_case(tmp_path, records)
    summary = write_summary(tmp_path / "run_summary.json", predictions, info)  # metrics agree
    out = tmp_path / "cc.json"
    with pytest.raises(CrosscheckError) as e:
        run_crosscheck(str(predictions), str(summary), str(info), str(out), cfg(), upstream(tmp_path))
    msg = str(e.value)
    assert "INVALID" in msg and "calc.py found 1 invalid prediction" in msg and "constrained decoding" in msg
    report = json.loads(out.read_text())
    assert report["passed"] is False and report["invalid_count"] == 1 and report["summary_invalid_count"] == 1
    assert report["invalid_examples"] == [{"predicted": BAD, "target": sid(4)}]
    assert f"first: '{BAD}' (target '{sid(4)}')" in msg
    assert all(row["passed"] for row in report["metrics"].values())


def test_crosscheck_invalid_after_hit_fails_though_calc_misses_it(tmp_path):
    records = mixed_records() + [rec(sid(4), [sid(4), BAD] + [sid(i) for i in range(40, 48)])]
    predictions, info = write_case(tmp_path, records)
    summary = write_summary(tmp_path / "run_summary.json", predictions, info)
    with pytest.raises(CrosscheckError, match="1 predicted SID"):
        run_crosscheck(str(predictions), str(summary), str(info), str(tmp_path / "cc.json"), cfg(), upstream(tmp_path))
    report = json.loads((tmp_path / "cc.json").read_text())
    assert report["invalid_count"] == 0 and report["invalid_count_all_beams"] == 1 and not report["passed"]


@needs_upstream
def test_crosscheck_external_script(tmp_path):
    predictions, info = write_case(tmp_path, mixed_records())
    summary = write_summary(tmp_path / "run_summary.json", predictions, info)
    out = tmp_path / "cc.json"
    report = run_crosscheck(str(predictions), str(summary), str(info), str(out),
                            cfg(f"crosscheck.calc_script={UPSTREAM_CALC}", f"crosscheck.python={sys.executable}"))
    assert report["passed"]
    saved = json.loads(out.read_text())
    assert saved["tool"] == f"external:{UPSTREAM_CALC}"
    assert saved["command"] == [sys.executable, str(UPSTREAM_CALC), "--path", str(predictions), "--item_path", str(info)]


def test_crosscheck_failing_script_shows_stderr(tmp_path):
    predictions, info = write_case(tmp_path, mixed_records())
    summary = write_summary(tmp_path / "run_summary.json", predictions, info)
    script = tmp_path / "broken_calc.py"
    script.write_text("import sys\nprint('Traceback: boom in calc', file=sys.stderr)\nsys.exit(3)\n")
    out = tmp_path / "cc.json"
    with pytest.raises(CrosscheckError) as e:
        run_crosscheck(str(predictions), str(summary), str(info), str(out), cfg(f"crosscheck.calc_script={script}"))
    assert "exited with 3" in str(e.value) and "boom in calc" in str(e.value)
    report = json.loads(out.read_text())
    assert report["passed"] is False and report["returncode"] == 3 and "boom in calc" in report["stderr_tail"]


def test_crosscheck_missing_script_and_summary_key(tmp_path):
    predictions, info = write_case(tmp_path, mixed_records())
    out = tmp_path / "cc.json"
    with pytest.raises(CrosscheckError, match="calc script not found"):
        run_crosscheck(str(predictions), str(tmp_path / "run_summary.json"), str(info), str(out),
                       cfg(f"crosscheck.calc_script={tmp_path / 'nope.py'}"))
    assert json.loads(out.read_text())["passed"] is False
    summary = write_summary(tmp_path / "run_summary.json", predictions, info)
    data = json.loads(summary.read_text())
    del data["eval/hr@5"]
    data["eval/hr@50"] = 0.9  # from an eval with more beams than these predictions
    summary.write_text(json.dumps(data))
    with pytest.raises(CrosscheckError) as e:
        run_crosscheck(str(predictions), str(summary), str(info), str(out), cfg(), upstream(tmp_path))
    assert "no numeric 'eval/hr@5'" in str(e.value) and "'eval/hr@50' but calc.py saw only 10 beams" in str(e.value)


def test_crosscheck_malformed_predictions(tmp_path):
    predictions, info = write_case(tmp_path, mixed_records())
    summary = write_summary(tmp_path / "run_summary.json", predictions, info)
    predictions.write_text(json.dumps([{"input": "", "output": sid(1), "predict": "not a list"}]))
    out = tmp_path / "cc.json"
    with pytest.raises(CrosscheckError) as e:
        run_crosscheck(str(predictions), str(summary), str(info), str(out), cfg(), upstream(tmp_path))
    assert "record 0" in str(e.value) and "'predict'" in str(e.value)
    assert json.loads(out.read_text())["passed"] is False


@needs_upstream
@pytest.mark.skipif(not AMAZON_INFO.is_file(), reason="MiniOneRec Amazon data not available")
def test_real_info_file_upstream_and_package_agree(tmp_path):
    sids = [line.split("\t")[0].strip() for line in AMAZON_INFO.read_text().splitlines()]
    rng = np.random.default_rng(0)
    records = []
    for i in range(200):
        beams = [sids[j] for j in rng.choice(len(sids), size=20, replace=False)]
        k = int(rng.integers(0, 30))  # about a third of the targets are not among the beams
        target = beams[k] if k < 20 else sids[int(rng.integers(len(sids)))]
        records.append(rec(target, beams))
    predictions = tmp_path / "p.json"
    predictions.write_text(json.dumps(records))
    summary = tmp_path / "s.json"
    summary.write_text(json.dumps(compute_metrics(records, load_valid_sids(AMAZON_INFO))))
    report = run_crosscheck(str(predictions), str(summary), str(AMAZON_INFO), str(tmp_path / "cc.json"),
                            cfg("crosscheck.tolerance=0"), upstream(tmp_path))
    assert report["passed"] and report["topk"] == [1, 3, 5, 10, 20] and report["tool"].startswith("upstream:")
