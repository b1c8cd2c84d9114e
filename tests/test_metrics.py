"""trainer.eval.metrics: MiniOneRec calc.py semantics on hand-built predictions, and input validation."""
from __future__ import annotations

import json
import math

import pytest

from trainer.errors import PredictionError
from trainer.eval.metrics import (compute_metrics, load_predictions, load_valid_sids, rank_of, target_of,
                             topk_list)


def sid(i: int) -> str:
    return f"<a_{i}><b_{i}><c_{i}>"


BAD = "<a_999><b_1><c_1>"  # not in the info file


def write_info(path, n=60, collide=7):
    lines = [f"{sid(i)}\titem {i}\t{i}" for i in range(n)]
    lines.append(f"{sid(collide)}\tanother item sharing SID {collide}\t{n}")  # colliding SID
    path.write_text("\n".join(lines) + "\n")
    return path


def rec(target, predict, as_list=False):
    return {"input": "history ...", "output": [target] if as_list else target + "\n", "predict": list(predict)}


def five_beam_records():
    """Ranks: 0, 2, miss, 4 (list output), 0 (colliding SID), 1 (one invalid beam before the hit, one after)."""
    return [
        rec(sid(0), [sid(0), sid(1), sid(2), sid(3), sid(4)]),
        rec(sid(1), [sid(5), sid(6), sid(1), sid(8), sid(9)]),
        rec(sid(2), [sid(9), sid(10), sid(11), sid(12), sid(13)]),
        rec(sid(3), [sid(10), sid(11), sid(12), sid(13), sid(3)], as_list=True),
        rec(sid(7), [sid(7), sid(8), sid(9), sid(10), sid(11)]),
        rec(sid(4), [BAD, sid(4), "<a_998><b_2><c_2>", sid(1), sid(2)]),
    ]


def test_topk_list_shrinks_with_beams():
    assert topk_list(50) == [1, 3, 5, 10, 20, 50]
    assert topk_list(100) == [1, 3, 5, 10, 20, 50]
    assert topk_list(10) == [1, 3, 5, 10]
    assert topk_list(4) == [1, 3]
    assert topk_list(1) == [1]


def test_target_of_string_and_list_outputs():
    assert target_of({"output": sid(3) + "\n"}) == sid(3)
    assert target_of({"output": f' "{sid(3)}"\n'}) == sid(3)
    assert target_of({"output": [sid(3), sid(4)]}) == sid(3)
    assert target_of({"output": [f'"{sid(3)}"']}) == sid(3)
    assert target_of({"output": [f" {sid(3)} "]}) == sid(3)
    # Upstream strips only quotes and spaces from a list element, never a newline.
    assert target_of({"output": [sid(3) + "\n"]}) == sid(3) + "\n"


def test_rank_of_first_exact_match_after_normalisation():
    assert rank_of(sid(1), [sid(0), sid(1), sid(1)]) == 1
    assert rank_of(sid(1), [sid(0), f'"{sid(1)}"\n']) == 1
    assert rank_of(sid(1), [sid(0), sid(2)]) is None
    assert rank_of(sid(1), [sid(1) + "<a_1>"]) is None  # exact match only, no prefix match


def test_compute_metrics_hand_computed(tmp_path):
    valid = load_valid_sids(write_info(tmp_path / "info.txt"))
    m = compute_metrics(five_beam_records(), valid)
    n = 6
    assert m["n"] == n and m["num_beams"] == 5
    assert sorted(k for k in m if k.startswith("eval/hr@")) == ["eval/hr@1", "eval/hr@3", "eval/hr@5"]
    assert m["eval/hr@1"] == pytest.approx(2 / n, abs=1e-15)
    assert m["eval/hr@3"] == pytest.approx(4 / n, abs=1e-15)
    assert m["eval/hr@5"] == pytest.approx(5 / n, abs=1e-15)
    g = [1.0, 1 / math.log2(3), 1 / math.log2(4), 1 / math.log2(5), 1 / math.log2(6)]
    assert m["eval/ndcg@1"] == pytest.approx(2 * g[0] / n, abs=1e-15)
    assert m["eval/ndcg@3"] == pytest.approx((2 * g[0] + g[1] + g[2]) / n, abs=1e-15)
    assert m["eval/ndcg@5"] == pytest.approx((2 * g[0] + g[1] + g[2] + g[4]) / n, abs=1e-15)
    # calc.py stops at the hit: only the BAD beam before it counts; all beams: two.
    assert m["eval/invalid_prediction_count"] == 1
    assert m["eval/invalid_prediction_count_all_beams"] == 2


def test_colliding_sid_is_valid_and_counted_once(tmp_path):
    info = write_info(tmp_path / "info.txt")
    valid = load_valid_sids(info)
    assert sid(7) in valid and len(valid) == 60  # 61 lines, one SID shared by two items
    m = compute_metrics([rec(sid(7), [sid(7), sid(7), sid(8)])], valid)
    assert m["eval/hr@1"] == 1.0 and m["eval/hr@3"] == 1.0 and m["eval/ndcg@3"] == 1.0
    assert m["eval/invalid_prediction_count_all_beams"] == 0


def test_fifty_beams_late_hit_counts_only_at_50(tmp_path):
    valid = load_valid_sids(write_info(tmp_path / "info.txt"))
    predict = [sid(i) for i in range(10, 60)]  # target sid(40) at rank 30
    m = compute_metrics([rec(sid(40), predict), rec(sid(0), predict)], valid)
    assert m["num_beams"] == 50
    for k in (1, 3, 5, 10, 20):
        assert m[f"eval/hr@{k}"] == 0.0 and m[f"eval/ndcg@{k}"] == 0.0
    assert m["eval/hr@50"] == 0.5
    assert m["eval/ndcg@50"] == pytest.approx(0.5 / math.log2(32), abs=1e-15)


def test_two_beams_only_k1(tmp_path):
    valid = load_valid_sids(write_info(tmp_path / "info.txt"))
    m = compute_metrics([rec(sid(1), [sid(0), sid(1)]), rec(sid(2), [sid(2), sid(0)])], valid)
    assert m["num_beams"] == 2
    assert [k for k in m if k.startswith("eval/")] == [
        "eval/hr@1", "eval/ndcg@1", "eval/invalid_prediction_count", "eval/invalid_prediction_count_all_beams"]
    assert m["eval/hr@1"] == 0.5 and m["eval/ndcg@1"] == 0.5


def test_load_predictions_roundtrip(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(five_beam_records()))
    records = load_predictions(path)
    assert len(records) == 6 and records[3]["output"] == [sid(3)]


@pytest.mark.parametrize("content, needles", [
    ({"a": 1}, ["expected a JSON list"]),
    ([], ["no prediction records"]),
    ([rec(sid(0), [sid(0)]), "oops"], ["record 1", "expected an object"]),
    ([rec(sid(0), [sid(0)]), {"input": "", "predict": [sid(0)]}], ["record 1", "'output'"]),
    ([{"input": "", "output": sid(0)}], ["record 0", "'predict'"]),
    ([{"input": "", "output": sid(0), "predict": sid(0)}], ["record 0", "'predict'", "list of SID strings"]),
    ([{"input": "", "output": sid(0), "predict": [sid(0), 3]}], ["record 0", "'predict'"]),
    ([{"input": "", "output": 5, "predict": [sid(0)]}], ["record 0", "'output'"]),
    ([{"input": "", "output": [], "predict": [sid(0)]}], ["record 0", "'output'"]),
    ([{"input": "", "output": sid(0), "predict": []}], ["record 0", "'predict'", "empty"]),
    ([rec(sid(0), [sid(0), sid(1)]), rec(sid(0), [sid(0), sid(1)]), rec(sid(0), [sid(0)])],
     ["record 2", "'predict'", "1 beams", "record 0 has 2"]),
])
def test_load_predictions_rejects_malformed(tmp_path, content, needles):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(content))
    with pytest.raises(PredictionError) as e:
        load_predictions(path)
    msg = str(e.value)
    assert str(path) in msg
    for needle in needles:
        assert needle in msg


def test_load_predictions_truncated_json_and_missing_file(tmp_path):
    path = tmp_path / "trunc.json"
    path.write_text(json.dumps(five_beam_records())[:-20])
    with pytest.raises(PredictionError, match="not valid JSON"):
        load_predictions(path)
    with pytest.raises(PredictionError, match="not found"):
        load_predictions(tmp_path / "nope.json")
    with pytest.raises(PredictionError, match="info file not found"):
        load_valid_sids(tmp_path / "nope.txt")
