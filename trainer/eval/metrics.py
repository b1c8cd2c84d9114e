"""Ranking metrics of a predictions file, with MiniOneRec `calc.py` semantics.

The package's one implementation (`python -m trainer eval` writes its numbers into
run_summary.json). The cross-check compares them with upstream's own calc.py
(trainer/ops/crosscheck.py); offline with no copy of it, with these again, and says so.

Upstream `calc.py` behaviour reproduced here (read from MiniOneRec's calc.py):
- info file: every line's first tab-separated column, stripped, is a known SID; several items may
  share one SID (a collision), which is still one valid SID.
- each prediction is normalised with `.strip('"\\n').strip()`.
- target: a string `output` is normalised with `.strip(' \\n"')`; a list `output` uses its first
  element with `.strip('"').strip(' ')` (upstream does NOT strip a newline there).
- num_beams = len(predict) of the first record; K in {1, 3, 5, 10, 20, 50} with K <= num_beams.
- rank = index of the first exact match of the target in `predict` (no match: no rank).
  HR@K = mean(rank < K); NDCG@K = mean(1 / log2(rank + 2) if rank < K else 0).
- invalid predictions: upstream walks `predict` from the best beam and stops at the first hit, so it
  counts invalid SIDs up to and including the hit position, not after it. `eval/invalid_prediction_count`
  uses that rule so it is comparable with calc.py; `eval/invalid_prediction_count_all_beams` counts
  every invalid beam (what constrained decoding must keep at zero).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

from trainer.errors import PredictionError
from trainer.io_utils import read_json

TOPK = (1, 3, 5, 10, 20, 50)
REQUIRED_KEYS = ("input", "output", "predict")


def topk_list(num_beams: int) -> list[int]:
    """The cut-offs upstream reports for this many beams."""
    return [k for k in TOPK if k <= num_beams]


def normalize_prediction(sid: str) -> str:
    return sid.strip('"\n').strip()


def target_of(record: dict) -> str:
    """The target SID of one record; `output` is a string ("<a_1><b_2><c_3>\\n") or a list."""
    output = record["output"]
    if isinstance(output, list):
        return output[0].strip('"').strip(" ")
    return output.strip(' \n"')


def rank_of(target: str, predict: Iterable[str]) -> int | None:
    """0-based position of the first prediction equal to `target`, or None when it is absent.

    Predictions are normalised like upstream (once: the normalisation is not idempotent)."""
    return _first_match(target, [normalize_prediction(s) for s in predict])


def _first_match(target: str, normalized: list[str]) -> int | None:
    for i, sid in enumerate(normalized):
        if sid == target:
            return i
    return None


def load_valid_sids(path: str | Path) -> set[str]:
    """SIDs of an info file (`SID<TAB>title<TAB>item_id`); blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise PredictionError(f"info file not found: {path} (expected SID<TAB>title<TAB>item_id lines)")
    sids = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        sid = line.split("\t")[0].strip()
        if sid:
            sids.add(sid)
    if not sids:
        raise PredictionError(f"{path}: no SIDs found (expected SID<TAB>title<TAB>item_id lines)")
    return sids


def _check_record(path: str, index: int, record: Any) -> None:
    where = f"{path}: record {index}"
    if not isinstance(record, dict):
        raise PredictionError(f"{where}: expected an object with keys {list(REQUIRED_KEYS)}, got {type(record).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:
        raise PredictionError(f"{where}: missing key(s) {missing}; each record needs {list(REQUIRED_KEYS)}")
    output = record["output"]
    if isinstance(output, list):
        if not output or not isinstance(output[0], str):
            raise PredictionError(f"{where}: key 'output' is a list; its first element must be the target SID string")
    elif not isinstance(output, str):
        raise PredictionError(f"{where}: key 'output' must be a SID string or a list of them, got {type(output).__name__}")
    predict = record["predict"]
    if not isinstance(predict, list) or not all(isinstance(s, str) for s in predict):
        raise PredictionError(f"{where}: key 'predict' must be a list of SID strings (one per beam, best first)")
    if not predict:
        raise PredictionError(f"{where}: key 'predict' is empty; expected num_beams SID strings")


def validate_records(records: Any, path: str = "<predictions>") -> list[dict]:
    if not isinstance(records, list):
        raise PredictionError(f"{path}: expected a JSON list of prediction records, got {type(records).__name__}")
    if not records:
        raise PredictionError(f"{path}: holds no prediction records; rerun the eval")
    for i, record in enumerate(records):
        _check_record(path, i, record)
    num_beams = len(records[0]["predict"])
    for i, record in enumerate(records):
        if len(record["predict"]) != num_beams:
            raise PredictionError(
                f"{path}: record {i}: key 'predict' has {len(record['predict'])} beams but record 0 has "
                f"{num_beams}; every record must have the same number of beams (rerun the eval)")
    return records


def load_predictions(path: str | Path) -> list[dict]:
    """Read and validate a predictions file (JSON list of {input, output, predict})."""
    path = Path(path)
    records = read_json(path, PredictionError, "the predictions file is missing or truncated, rerun the eval")
    return validate_records(records, str(path))


def compute_metrics(records: list[dict], valid_sids: set[str]) -> dict:
    """HR@K / NDCG@K / invalid counts of validated records (float64, pure Python)."""
    if not records:
        raise PredictionError("no prediction records to score")
    num_beams = len(records[0]["predict"])
    ks = topk_list(num_beams)
    hits = {k: 0 for k in ks}
    gains = {k: 0.0 for k in ks}
    invalid_to_hit = 0
    invalid_all = 0
    for record in records:
        predict = [normalize_prediction(s) for s in record["predict"]]
        rank = _first_match(target_of(record), predict)
        invalid = [sid not in valid_sids for sid in predict]
        invalid_all += sum(invalid)
        invalid_to_hit += sum(invalid if rank is None else invalid[: rank + 1])
        if rank is None:
            continue
        gain = 1.0 / math.log2(rank + 2)
        for k in ks:
            if rank < k:
                hits[k] += 1
                gains[k] += gain
    n = len(records)
    out: dict[str, Any] = {}
    for k in ks:
        out[f"eval/hr@{k}"] = hits[k] / n
    for k in ks:
        out[f"eval/ndcg@{k}"] = gains[k] / n
    out["eval/invalid_prediction_count"] = invalid_to_hit
    out["eval/invalid_prediction_count_all_beams"] = invalid_all
    out["n"] = n
    out["num_beams"] = num_beams
    return out
