"""`python -m trainer.ops.calc --path PREDICTIONS --item_path INFO`: MiniOneRec calc.py, re-implemented.

The cross-check's built-in second opinion on the eval's metrics. It deliberately shares no code
with `trainer.eval.metrics` (two independent implementations catch each other's bugs) and reads only
the predictions file and the info file.

What upstream calc.py does, and this tool reproduces (stdout is line-for-line the same):
- `--item_path`: a trailing ".txt" is removed and ".txt" appended again, so `info` and `info.txt`
  both open `info.txt`. Every line's first tab column, stripped, is a known SID (colliding items
  share one entry).
- predictions: `.strip('"\\n').strip()`; target: string `output` -> `.strip(' \\n"')`, list
  `output` -> `output[0].strip('"').strip(' ')`.
- n_beam is len(predict) of the FIRST record; K in [1, 3, 5, 10, 20, 50] with K <= n_beam. A later
  record with more beams can only hit within n_beam for the metrics, but all its beams are still
  walked for the invalid count.
- walking the beams best-first: an unknown SID adds 1 to the invalid count and prints two lines
  (the prediction, then the target); the walk stops at the first exact match of the target (the
  matching beam itself is checked for validity first).
- NDCG sums 1/ln(rank+2) per K, then divides by the number of records and by 1/ln(2); HR sums hits
  and divides by the number of records. Same operation order here, so the printed digits match.
- final lines: n_beam, the K list (Python list), `NDCG:\\t<numpy array>`, `HR\\t<numpy array>`,
  the invalid count. Arrays use numpy's default str (8 digits, wraps at 75 columns).
Upstream crashes on an empty file or a non-list `predict`; here those are clear errors (exit 2).
"""
from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np

CUTOFFS = [1, 3, 5, 10, 20, 50]


class CalcError(Exception):
    pass


def read_item_sids(item_path: str) -> set[str]:
    base = item_path[:-4] if item_path.endswith(".txt") else item_path
    try:
        with open(base + ".txt", "r", encoding="utf-8") as f:
            return {line.split("\t")[0].strip() for line in f}
    except FileNotFoundError:
        raise CalcError(f"info file not found: {base}.txt") from None


def read_samples(path: str) -> list:
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CalcError(f"predictions file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise CalcError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, list) or not data:
        raise CalcError(f"{path}: expected a non-empty JSON list of prediction records")
    for i, sample in enumerate(data):
        if not isinstance(sample, dict) or "predict" not in sample or "output" not in sample:
            raise CalcError(f"{path}: record {i}: needs keys 'output' and 'predict'")
        if not isinstance(sample["predict"], list) or not all(isinstance(s, str) for s in sample["predict"]):
            raise CalcError(f"{path}: record {i}: 'predict' must be a list of strings")
        out = sample["output"]
        if not (isinstance(out, str) or (isinstance(out, list) and out and isinstance(out[0], str))):
            raise CalcError(f"{path}: record {i}: 'output' must be a string or a list of strings")
    return data


def target_sid(output) -> str:
    if type(output) is list:
        return output[0].strip('"').strip(" ")
    return output.strip(' \n"')


def calc(path: str, item_path: str, out=sys.stdout) -> dict:
    """Print upstream's report for one predictions file; also return the numbers."""
    known = read_item_sids(item_path)
    samples = read_samples(path)
    beams = [[s.strip('"\n').strip() for s in sample["predict"]] for sample in samples]
    n_beam = len(beams[0])
    ks = [k for k in CUTOFFS if k <= n_beam]
    ndcg_sum = [0.0] * len(ks)
    hit_sum = [0.0] * len(ks)
    invalid = 0
    for sample, predicted in zip(samples, beams):
        target = target_sid(sample["output"])
        first_hit = None
        for pos, sid in enumerate(predicted):
            if sid not in known:
                invalid += 1
                print(sid, file=out)
                print(target, file=out)
            if sid == target:
                first_hit = pos
                break
        if first_hit is None:
            continue
        for j, k in enumerate(ks):
            if first_hit < k:
                ndcg_sum[j] += 1 / math.log(first_hit + 2)
                hit_sum[j] += 1
    n = len(samples)
    ndcg = np.array(ndcg_sum, dtype=np.float64) / n / (1.0 / math.log(2))
    hr = np.array(hit_sum, dtype=np.float64) / n
    print(n_beam, file=out)
    print(ks, file=out)
    print(f"NDCG:\t{ndcg}", file=out)
    print(f"HR\t{hr}", file=out)
    print(invalid, file=out)
    return {"n_beam": n_beam, "topk": ks, "ndcg": ndcg.tolist(), "hr": hr.tolist(), "invalid": invalid, "n": n}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.ops.calc",
        description="MiniOneRec calc.py metrics (HR@K, NDCG@K, invalid predictions) of a predictions file")
    parser.add_argument("--path", required=True, help="predictions JSON (list of {input, output, predict})")
    parser.add_argument("--item_path", required=True, help="info file: SID<TAB>title<TAB>item_id per line")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        calc(args.path, args.item_path)
    except CalcError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
