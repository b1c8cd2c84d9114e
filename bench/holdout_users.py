"""A tuning split that leaves the real test split alone: hold out a fifth of train.csv's users.

    python bench/holdout_users.py data/industrial /tmp/indtune

Writes OUT with train.csv = valid.csv = the other users' rows, test.csv = the held-out users' rows,
and the catalog files copied. SFT settings for the CPU default were compared on such a split
(README: Real data), then measured once on the real test split by the workflow.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import pandas as pd


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", type=Path, help="a prepared dataset directory (python -m trainer prepare-data)")
    p.add_argument("out", type=Path)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in ("info.txt", "index.json", "item.json"):
        shutil.copy(args.data / name, args.out / name)
    train = pd.read_csv(args.data / "train.csv")
    users = np.array(sorted(train.user_id.unique()))
    np.random.default_rng(args.seed).shuffle(users)
    held = train.user_id.isin(set(users[: len(users) // 5]))
    for name, rows in (("train", train[~held]), ("valid", train[~held]), ("test", train[held])):
        rows.to_csv(args.out / f"{name}.csv", index=False)
    print(f"{args.out}: {int((~held).sum())} training rows, {int(held.sum())} held-out rows")


if __name__ == "__main__":
    main()
