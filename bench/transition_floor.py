"""Reference point: how far plain item-to-item transitions get on a prepared dataset.

    python bench/transition_floor.py data/office [data/industrial ...] [--window 3] [--k 10]

Counts, over every train.csv history extended by its target, how often item y follows item x
within `window` steps (weight 1 / distance); a test row's candidates are the successors of its last
`window` history items (weight 1 / recency) with popularity breaking ties. Prints one JSON line per
dataset with HR@k / NDCG@k beside the popularity ranking (trainer.data.readers.popularity_baseline).
Not part of the workflow: it says what a model that only learned transitions would score, next to
the README's 2x-the-floor goal.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.data import readers  # noqa: E402
from trainer.eval.metrics import compute_metrics  # noqa: E402


def transition_scores(train: list[readers.Example], window: int) -> dict[str, collections.Counter]:
    follows: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for ex in train:
        seq = list(ex.history_sids) + [ex.target_sid]
        for i, y in enumerate(seq):
            for j in range(max(0, i - window), i):
                follows[seq[j]][y] += 1.0 / (i - j)
    return follows


def ranked(history: list[str], follows, popular: list[str], window: int, k: int) -> list[str]:
    score: collections.Counter = collections.Counter()
    for d, x in enumerate(reversed(history[-window:])):
        for y, c in follows.get(x, {}).items():
            score[y] += c / (d + 1)
    for r, y in enumerate(popular[:k]):  # ties and empty histories: the bestsellers
        score[y] += 1e-6 * (k - r)
    return [y for y, _ in score.most_common(k)]


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data_dirs", nargs="+")
    p.add_argument("--window", type=int, default=3)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--max-history", type=int, default=10, help="as data.max_history")
    args = p.parse_args(argv)
    lines = []
    for d in args.data_dirs:
        catalog = readers.load_catalog(d)
        train = readers.read_split(d, "train", catalog, args.max_history)
        test = readers.read_split(d, "test", catalog, args.max_history)
        follows, popular = transition_scores(train, args.window), readers.popularity_ranking(train)
        records = [{"predict": ranked(list(ex.history_sids), follows, popular, args.window, args.k),
                    "output": ex.target_sid} for ex in test]
        scores = compute_metrics(records, set(catalog.sids))  # the workflow's own HR@K / NDCG@K
        pop = readers.popularity_baseline(train, test, args.k)
        line = {"bench": "transition_floor", "data": d, "test_rows": len(test), "window": args.window,
                f"hr@{args.k}": scores[f"eval/hr@{args.k}"], f"ndcg@{args.k}": scores[f"eval/ndcg@{args.k}"],
                f"popularity_hr@{args.k}": pop["hr"], f"popularity_ndcg@{args.k}": pop["ndcg"]}
        lines.append(line)
        print(json.dumps(line), flush=True)
    return lines


if __name__ == "__main__":
    main()
