"""Paired bootstrap intervals of RL - SFT deltas and the popularity floor (trainer/eval/significance.py)."""
from __future__ import annotations

import numpy as np
import pytest

from trainer.data.readers import Example
from trainer.errors import PredictionError
from trainer.eval.metrics import compute_metrics
from trainer.eval.significance import paired_bootstrap, per_row, popularity_floor


def sid(i: int) -> str:
    return f"<a_{i}><b_{i}><c_{i}>"


def rec(target: int, predict: list[int]) -> dict:
    return {"input": "", "output": sid(target) + "\n", "predict": [sid(j) for j in predict]}


def test_per_row_averages_to_compute_metrics():
    rng = np.random.default_rng(1)
    records = [rec(int(rng.integers(0, 30)), rng.permutation(30)[:20].tolist()) for _ in range(50)]
    m = compute_metrics(records, {sid(i) for i in range(30)})
    rows = per_row(records)
    assert set(rows) == {f"{n}@{k}" for n in ("hr", "ndcg") for k in (1, 3, 5, 10, 20)}
    for key, values in rows.items():
        assert values.mean() == pytest.approx(m[f"eval/{key}"], abs=1e-12)


def test_paired_resampling_sees_a_small_consistent_gain():
    """Both models hit the same 100 of 200 rows; RL also hits 5 more. +0.025 HR@1 is small next to
    the spread of HR itself, but every row's difference is >= 0: the paired interval excludes zero
    (two independent resamples would not)."""
    hit, miss = list(range(1, 11)), list(range(11, 21))  # target 1 at rank 0, or not predicted
    sft = [rec(1, hit if i < 100 else miss) for i in range(200)]
    rl = [rec(1, hit if i < 105 else miss) for i in range(200)]
    d = paired_bootstrap(rl, sft)
    assert d["hr@1"]["delta"] == pytest.approx(5 / 200)
    lo, hi = d["hr@1"]["ci95"]
    assert 0 < lo < 5 / 200 < hi and d["hr@1"]["excludes_zero"] is True
    same = paired_bootstrap(sft, sft)
    assert all(v == {"delta": 0.0, "ci95": [0.0, 0.0], "excludes_zero": False} for v in same.values())
    assert paired_bootstrap(rl, sft) == d  # fixed seed: the same interval every run


def test_noise_is_not_a_difference():
    """RL and SFT hit different, equally many rows: delta 0, an interval around it."""
    hit, miss = list(range(1, 11)), list(range(11, 21))
    sft = [rec(1, hit if i % 2 else miss) for i in range(400)]
    rl = [rec(1, hit if i % 2 == 0 else miss) for i in range(400)]
    d = paired_bootstrap(rl, sft)["hr@10"]
    assert d["delta"] == 0.0 and d["ci95"][0] < 0 < d["ci95"][1] and not d["excludes_zero"]


def test_bootstrap_needs_the_same_rows():
    a = [rec(1, [1, 2]), rec(2, [1, 2])]
    with pytest.raises(PredictionError, match="row 1: RL's target"):
        paired_bootstrap(a, [rec(1, [1, 2]), rec(3, [1, 2])])
    with pytest.raises(PredictionError, match="RL has 2 prediction rows but SFT has 1"):
        paired_bootstrap(a, a[:1])


def test_popularity_floor_hand_computed():
    train = [Example("u", [sid(0)], sid(t), ["t"], "t") for t in (2, 2, 2, 3, 3, 4)]  # 2 > 3 > 4
    records = [rec(2, [0, 1, 5]), rec(3, [0, 1, 5]), rec(5, [0, 1, 5]), rec(9, [0, 1, 5])]
    floor = popularity_floor(train, records, [sid(i) for i in range(10)])
    # popularity list, 3 beams as the models had: [2, 3, 4]; rows hit at ranks 0, 1, none, none
    assert floor["hr@1"] == pytest.approx(1 / 4) and floor["hr@3"] == pytest.approx(2 / 4)
    assert floor["ndcg@3"] == pytest.approx((1 + 1 / np.log2(3)) / 4)
    # fewer popular targets than beams: the catalog fills the list in its order
    wide = popularity_floor(train, [rec(0, list(range(5)))], [sid(i) for i in range(10)])
    assert wide["hr@5"] == 1.0 and wide["hr@3"] == 0.0  # [2, 3, 4, 0, 1]
