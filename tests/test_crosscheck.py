"""trainer.ops.calc (independent calc.py) and `python -m trainer crosscheck` against hand-built files."""
from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trainer.ops import calc as calc_mod
from trainer.cli import main as cli_main
from trainer.config import load_config
from trainer.ops.crosscheck import PRINT_RESOLUTION, CrosscheckError, parse_calc_output, run_crosscheck
from trainer.eval.metrics import compute_metrics, load_predictions, load_valid_sids

REPO = Path(__file__).resolve().parent.parent
REFERENCE = REPO / "tests" / "fixtures" / "calc_reference.py"
AMAZON_INFO = Path("/work/shared/minionerec-data/data/Amazon/info/Office_Products_5_2016-10-2018-11.txt")


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


def run_builtin(predictions, info) -> str:
    buf = io.StringIO()
    calc_mod.calc(str(predictions), str(info), out=buf)
    return buf.getvalue()


def run_reference(predictions, info) -> str:
    proc = subprocess.run([sys.executable, str(REFERENCE), "--path", str(predictions), "--item_path", str(info)],
                          capture_output=True, text=True, check=True)
    return proc.stdout


def cfg(*overrides):
    return load_config(None, list(overrides))


# ------------------------------------------------------------------ the calc tool

def test_builtin_calc_prints_exactly_what_upstream_prints(tmp_path):
    records = mixed_records() + [rec(sid(4), [BAD, sid(4)] + [sid(i) for i in range(40, 48)])]
    predictions, info = write_case(tmp_path, records)
    out = run_builtin(predictions, info)
    assert out == run_reference(predictions, info)
    lines = out.splitlines()
    # the invalid beam and its target are echoed first, then the report
    assert lines[:2] == [BAD, sid(4)]
    assert lines[2:4] == ["10", "[1, 3, 5, 10]"]
    assert lines[4].startswith("NDCG:\t[") and lines[5].startswith("HR\t[")
    assert lines[-1] == "1"


def test_builtin_calc_cli_and_item_path_without_suffix(tmp_path):
    predictions, info = write_case(tmp_path, mixed_records())
    no_suffix = str(info)[:-4]
    proc = subprocess.run([sys.executable, "-m", "trainer.ops.calc", "--path", str(predictions), "--item_path", no_suffix],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == run_reference(predictions, info)


def test_calc_agrees_with_eval_metrics(tmp_path):
    records = mixed_records()
    predictions, info = write_case(tmp_path, records)
    parsed = parse_calc_output(run_builtin(predictions, info))
    m = compute_metrics(records, load_valid_sids(info))
    assert parsed.n_beam == m["num_beams"] == 10 and parsed.topk == [1, 3, 5, 10]
    n = 6
    expected_hr = [2 / n, 3 / n, 4 / n, 5 / n]
    for k, hr, ndcg in zip(parsed.topk, parsed.hr, parsed.ndcg):
        assert abs(hr - m[f"eval/hr@{k}"]) <= PRINT_RESOLUTION
        assert abs(ndcg - m[f"eval/ndcg@{k}"]) <= PRINT_RESOLUTION
    assert parsed.hr == pytest.approx(expected_hr, abs=PRINT_RESOLUTION)
    assert parsed.ndcg[-1] == pytest.approx((2 + 1 / math.log2(4) + 1 / math.log2(6) + 1 / math.log2(11)) / n,
                                            abs=PRINT_RESOLUTION)
    assert parsed.invalid == m["eval/invalid_prediction_count"] == 0


def test_calc_list_output_with_newline_never_matches_like_upstream(tmp_path):
    records = [rec(sid(1), [sid(1), sid(2)]), {"input": "", "output": [sid(1) + "\n"], "predict": [sid(1), sid(2)]}]
    predictions, info = write_case(tmp_path, records)
    out = run_builtin(predictions, info)
    assert out == run_reference(predictions, info)
    assert parse_calc_output(out).hr == [0.5]
    assert compute_metrics(records, load_valid_sids(info))["eval/hr@1"] == 0.5


def test_calc_rejects_malformed_predictions(tmp_path, capsys):
    predictions, info = write_case(tmp_path, [{"input": "", "output": sid(1), "predict": sid(1)}])
    assert calc_mod.main(["--path", str(predictions), "--item_path", str(info)]) == 2
    err = capsys.readouterr().err
    assert "record 0" in err and "'predict'" in err
    assert calc_mod.main(["--path", str(tmp_path / "missing.json"), "--item_path", str(info)]) == 2
    assert "predictions file not found" in capsys.readouterr().err


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


# ------------------------------------------------------------------ the cross-check

def test_crosscheck_builtin_passes_and_writes_report(tmp_path, capsys):
    predictions, info = write_case(tmp_path, mixed_records())
    summary = write_summary(tmp_path / "run_summary.json", predictions, info)
    out = tmp_path / "res" / "calc_crosscheck.json"
    rc = cli_main(["crosscheck", "--predictions", str(predictions), "--summary", str(summary),
                   "--info", str(info), "--out", str(out), "--set", "crosscheck.tolerance=0"])
    assert rc == 0, capsys.readouterr().err
    assert "passed" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["passed"] is True and report["problems"] == []
    assert report["tool"] == "builtin:trainer.ops.calc" and report["command"][1:3] == ["-m", "trainer.ops.calc"]
    assert report["n_beam"] == 10 and report["topk"] == [1, 3, 5, 10]
    assert set(report["metrics"]) == {f"eval/{m}@{k}" for m in ("hr", "ndcg") for k in (1, 3, 5, 10)}
    assert report["max_abs_diff"] <= PRINT_RESOLUTION
    assert report["invalid_count"] == 0 and report["summary_invalid_count"] == 0
    assert report["invalid_count_all_beams"] == 0
    assert report["tolerance"] == 0.0


def test_crosscheck_scientific_print_with_zero_tolerance(tmp_path):
    # 1 hit at rank 0 among 1500 rows, every row hits by rank 49: HR@1 / HR@50 > 1e3, so numpy
    # prints in scientific notation (wrapped); tolerance 0 still passes at the printed precision.
    beams = [sid(i) for i in range(50)]
    records = [rec(sid(0), beams)] + [rec(sid(49 - (i % 30)), beams) for i in range(1499)]
    predictions, info = write_case(tmp_path, records)
    out_text = run_builtin(predictions, info)
    assert "e-04" in out_text
    summary = write_summary(tmp_path / "run_summary.json", predictions, info)
    report = run_crosscheck(str(predictions), str(summary), str(info), str(tmp_path / "cc.json"),
                            cfg("crosscheck.tolerance=0"))
    assert report["passed"] and report["topk"] == [1, 3, 5, 10, 20, 50]
    assert report["metrics"]["eval/hr@1"]["calc"] == pytest.approx(1 / 1500, rel=1e-8)


def test_crosscheck_doctored_summary_fails_with_table(tmp_path):
    predictions, info = write_case(tmp_path, mixed_records())
    good = compute_metrics(load_predictions(predictions), load_valid_sids(info))
    summary = write_summary(tmp_path / "run_summary.json", predictions, info,
                            **{"eval/hr@3": good["eval/hr@3"] + 0.01})
    out = tmp_path / "calc_crosscheck.json"
    with pytest.raises(CrosscheckError) as e:
        run_crosscheck(str(predictions), str(summary), str(info), str(out), cfg())
    msg = str(e.value)
    assert "calc cross-check FAILED" in msg
    row = next(line for line in msg.splitlines() if line.startswith("eval/hr@3 "))
    assert "MISMATCH" in row and "1.00e-02" in row
    assert next(line for line in msg.splitlines() if line.startswith("eval/hr@1 ")).endswith("ok")
    assert "eval/hr@3: eval" in msg and str(out) in msg
    report = json.loads(out.read_text())
    assert report["passed"] is False
    assert report["metrics"]["eval/hr@3"]["passed"] is False
    assert report["metrics"]["eval/hr@3"]["abs_diff"] == pytest.approx(0.01, abs=1e-8)
    assert report["metrics"]["eval/hr@1"]["passed"] is True
    assert report["max_abs_diff"] == pytest.approx(0.01, abs=1e-8)


def test_crosscheck_tolerance_is_applied(tmp_path):
    predictions, info = write_case(tmp_path, mixed_records())
    good = compute_metrics(load_predictions(predictions), load_valid_sids(info))
    summary = write_summary(tmp_path / "run_summary.json", predictions, info,
                            **{"eval/ndcg@5": good["eval/ndcg@5"] + 1e-7})
    out = str(tmp_path / "cc.json")
    assert run_crosscheck(str(predictions), str(summary), str(info), out, cfg())["passed"]  # 1e-7 < 1e-6
    with pytest.raises(CrosscheckError, match="eval/ndcg@5"):
        run_crosscheck(str(predictions), str(summary), str(info), out, cfg("crosscheck.tolerance=1e-8"))
    with pytest.raises(Exception, match="crosscheck.tolerance"):
        run_crosscheck(str(predictions), str(summary), str(info), out, cfg("crosscheck.tolerance=-1"))


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


def test_crosscheck_invalid_prediction_fails(tmp_path):
    records = mixed_records() + [rec(sid(4), [BAD, sid(4)] + [sid(i) for i in range(40, 48)])]
    predictions, info = write_case(tmp_path, records)
    summary = write_summary(tmp_path / "run_summary.json", predictions, info)  # metrics agree
    out = tmp_path / "cc.json"
    with pytest.raises(CrosscheckError) as e:
        run_crosscheck(str(predictions), str(summary), str(info), str(out), cfg())
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
        run_crosscheck(str(predictions), str(summary), str(info), str(tmp_path / "cc.json"), cfg())
    report = json.loads((tmp_path / "cc.json").read_text())
    assert report["invalid_count"] == 0 and report["invalid_count_all_beams"] == 1 and not report["passed"]


def test_crosscheck_external_script(tmp_path):
    predictions, info = write_case(tmp_path, mixed_records())
    summary = write_summary(tmp_path / "run_summary.json", predictions, info)
    out = tmp_path / "cc.json"
    report = run_crosscheck(str(predictions), str(summary), str(info), str(out),
                            cfg(f"crosscheck.calc_script={REFERENCE}", f"crosscheck.python={sys.executable}"))
    assert report["passed"]
    saved = json.loads(out.read_text())
    assert saved["tool"] == f"external:{REFERENCE}"
    assert saved["command"] == [sys.executable, str(REFERENCE), "--path", str(predictions), "--item_path", str(info)]


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
        run_crosscheck(str(predictions), str(summary), str(info), str(out), cfg())
    assert "no numeric 'eval/hr@5'" in str(e.value) and "'eval/hr@50' but calc.py saw only 10 beams" in str(e.value)


def test_crosscheck_malformed_predictions(tmp_path):
    predictions, info = write_case(tmp_path, mixed_records())
    summary = write_summary(tmp_path / "run_summary.json", predictions, info)
    predictions.write_text(json.dumps([{"input": "", "output": sid(1), "predict": "not a list"}]))
    out = tmp_path / "cc.json"
    with pytest.raises(CrosscheckError) as e:
        run_crosscheck(str(predictions), str(summary), str(info), str(out), cfg())
    assert "record 0" in str(e.value) and "'predict'" in str(e.value) and "exited with 2" in str(e.value)
    assert json.loads(out.read_text())["passed"] is False


@pytest.mark.skipif(not AMAZON_INFO.is_file(), reason="MiniOneRec Amazon data not available")
def test_real_info_file_three_implementations_agree(tmp_path):
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
    builtin = run_builtin(predictions, AMAZON_INFO)
    assert builtin == run_reference(predictions, AMAZON_INFO)
    summary = tmp_path / "s.json"
    summary.write_text(json.dumps(compute_metrics(records, load_valid_sids(AMAZON_INFO))))
    report = run_crosscheck(str(predictions), str(summary), str(AMAZON_INFO), str(tmp_path / "cc.json"),
                            cfg("crosscheck.tolerance=0"))
    assert report["passed"] and report["topk"] == [1, 3, 5, 10, 20]
