"""How far to trust an RL - SFT difference: paired bootstrap intervals, and the popularity floor.

Both models are scored on the same test rows, so the bootstrap resamples rows once per draw and
scores both models on that draw (paired): the interval of mean(RL) - mean(SFT) then reflects the
row sample, not two independent ones. Percentile 95% interval over RESAMPLES draws (fixed seed);
`excludes_zero` says whether the interval lies entirely above or below zero.

The floor: recommend the training split's most frequent targets (trainer.data.readers
popularity_ranking), the same list to every row, scored on the same rows as the models with the
package's metrics (trainer.eval.metrics).
"""
from __future__ import annotations

import math

import numpy as np

from trainer.errors import PredictionError
from trainer.eval.metrics import compute_metrics, rank_of, target_of, topk_list

RESAMPLES = 1000
SEED = 0


def per_row(records: list[dict]) -> dict[str, np.ndarray]:
    """{"hr@K": [n], "ndcg@K": [n]}: each row's contribution; their means are compute_metrics's."""
    ranks = [rank_of(target_of(r), r["predict"]) for r in records]
    out = {}
    for k in topk_list(len(records[0]["predict"])):
        out[f"hr@{k}"] = np.array([1.0 if r is not None and r < k else 0.0 for r in ranks])
        out[f"ndcg@{k}"] = np.array([1.0 / math.log2(r + 2) if r is not None and r < k else 0.0 for r in ranks])
    return out


def _check_same_rows(rl: list[dict], sft: list[dict]) -> None:
    if len(rl) != len(sft):
        raise PredictionError(f"RL has {len(rl)} prediction rows but SFT has {len(sft)}: evaluate both on "
                              "the same split and eval.max_samples")
    for i, (a, b) in enumerate(zip(rl, sft)):
        if target_of(a) != target_of(b):
            raise PredictionError(f"row {i}: RL's target {target_of(a)} differs from SFT's {target_of(b)}: the two "
                                  "evaluations are not of the same rows; rerun both")


def paired_bootstrap(rl: list[dict], sft: list[dict], resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """{metric: {delta, ci95: [lo, hi], excludes_zero}} for every metric both evaluations report."""
    _check_same_rows(rl, sft)
    a, b = per_row(rl), per_row(sft)
    n = len(rl)
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n), dtype=np.int32)
    out = {}
    for key in (k for k in a if k in b):
        diff = a[key] - b[key]
        draws = diff[idx].mean(axis=1)
        lo, hi = np.percentile(draws, [2.5, 97.5])
        out[key] = {"delta": float(diff.mean()), "ci95": [float(lo), float(hi)],
                    "excludes_zero": bool(lo > 0 or hi < 0)}
    return out


def popularity_floor(train_examples, records: list[dict], catalog_sids: list[str]) -> dict:
    """HR@K / NDCG@K of the train split's most popular targets (then catalog order) on `records`' rows."""
    from trainer.data.readers import popularity_ranking

    num_beams = len(records[0]["predict"])
    ranking = popularity_ranking(train_examples)
    seen = set(ranking)
    ranking += [s for s in catalog_sids if s not in seen]
    floor = [{"output": r["output"], "predict": ranking[:num_beams]} for r in records]
    m = compute_metrics(floor, set(catalog_sids))
    return {key.split("/", 1)[1]: v for key, v in m.items() if key.startswith(("eval/hr@", "eval/ndcg@"))}
