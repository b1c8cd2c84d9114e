"""The cross-check's row check: predictions must be the eval of the split, row for row.

Metrics recomputed on 390 of 400 rows (or on shuffled rows) agree with a summary computed on the
same rows, so the metric comparison alone cannot see them. `check_rows` compares the predictions
with the split CSV the summary names: the record count (the whole split, or its first `eval.max_samples`
rows as the summary's config says), and each record's target against the split row at the same
position. `invalid_beams` locates SIDs outside the info file by record and beam.
"""
from __future__ import annotations

from pathlib import Path

from trainer.eval.metrics import normalize_prediction, target_of

SHOWN = 3  # mismatching rows quoted in a message


def check_rows(records: list[dict], predictions: str, data_dir: str | Path, summary: dict | None) -> list[str]:
    """Problems (empty when none) of `records` read from `predictions` against the split of
    `data_dir` the run summary names (its `split`, default test)."""
    from trainer.data import readers

    split = (summary or {}).get("split") or "test"
    if split not in readers.SPLITS:
        return [f"the run summary names split {split!r}, not one of {', '.join(readers.SPLITS)}"]
    split_csv = Path(data_dir) / f"{split}.csv"
    rows = readers.read_split_file(split_csv, readers.load_catalog(data_dir))
    problems = []
    max_samples = ((summary or {}).get("config") or {}).get("eval", {}).get("max_samples")
    expected = len(rows) if max_samples is None else min(len(rows), int(max_samples))
    if len(records) != expected:
        limit = f" (eval.max_samples={max_samples}: its first {expected})" if max_samples is not None else ""
        problems.append(f"{predictions} has {len(records)} records but {split_csv} has {len(rows)} rows{limit}; "
                        "the predictions are not the eval of this split: rerun the eval")
    wrong = [i for i, (rec, row) in enumerate(zip(records, rows)) if target_of(rec) != row.target_sid]
    if wrong:
        shown = "; ".join(f"record {i}: target {target_of(records[i])!r}, {split_csv} row {i + 1}: "
                          f"{rows[i].target_sid!r}" for i in wrong[:SHOWN])
        problems.append(f"{len(wrong)} record(s) of {predictions} disagree with {split_csv} on the target ({shown}); "
                        "the predictions are out of order or from another split: rerun the eval")
    return problems


def invalid_beams(records: list[dict], valid_sids: set[str], limit: int = SHOWN) -> list[str]:
    """'record I beam J: SID' for the first `limit` predicted SIDs not in the info file."""
    found = []
    for i, rec in enumerate(records):
        for j, sid in enumerate(rec["predict"]):
            if normalize_prediction(sid) not in valid_sids:
                found.append(f"record {i} beam {j}: {sid!r}")
                if len(found) == limit:
                    return found
    return found
