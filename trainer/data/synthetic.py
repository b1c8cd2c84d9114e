"""Deterministic synthetic dataset in MiniOneRec's file formats, with structure a model can learn.

Items fall into latent groups. An item's SID spells its place: `<a_g>` its group, `<b_s>` a
sub-cluster inside the group, `<c_k>` its position in the sub-cluster; its title says the same
("Group3 gadget 4" is `<a_3><b_1><c_4>`), so title -> SID alignment is learnable too.

Each user prefers a few groups. Within a group the next item mostly follows a fixed per-group
successor (a Markov chain over the group's items), otherwise a popular item of the group; now and
then the user hops to another preferred group. The next item is therefore well predictable from
the last one, far above what popularity alone gives.

Splits are leave-one-out like MiniOneRec: per user the last item is the test target, the second
last the valid target, and every earlier position a train target; histories hold at most the 10
preceding items. The same arguments always give byte-identical files (Python's `random.Random`,
whose streams are stable across versions).
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from trainer.config import ConfigError
from trainer.data.readers import CSV_COLUMNS, INDEX_FILE, INFO_FILE, ITEM_FILE
from trainer.io_utils import atomic_write_text

MAX_FILE_HISTORY = 10  # MiniOneRec's CSVs keep at most 10 history items
MIN_SEQ_LEN, MAX_SEQ_LEN = 5, 12  # interactions per user: >= 1 train row, then valid and test
P_FOLLOW = 0.75  # within a group, probability the next item is the group chain's successor
P_STAY = 0.85  # probability the next item stays in the current group
NOUNS = ("widget", "gadget", "gizmo", "doohickey", "sprocket", "lever", "bracket", "valve",
         "spindle", "coupler", "grommet", "flange")


@dataclass(frozen=True)
class Item:
    item_id: int
    group: int
    sub: int
    pos: int

    @property
    def codes(self) -> list[str]:
        return [f"<a_{self.group}>", f"<b_{self.sub}>", f"<c_{self.pos}>"]

    @property
    def sid(self) -> str:
        return "".join(self.codes)

    @property
    def title(self) -> str:
        noun = NOUNS[self.sub % len(NOUNS)] + (str(self.sub // len(NOUNS)) if self.sub >= len(NOUNS) else "")
        return f"Group{self.group} {noun} {self.pos}"


def _check_sizes(num_items: int, num_users: int, num_groups: int) -> None:
    if num_groups < 1:
        raise ConfigError(f"synthetic.num_groups must be >= 1, got {num_groups}")
    if num_items < 2 * num_groups:
        raise ConfigError(f"synthetic.num_items must be >= 2 * synthetic.num_groups "
                          f"({2 * num_groups}) so every group has a chain, got {num_items}")
    if num_users < 1:
        raise ConfigError(f"synthetic.num_users must be >= 1, got {num_users}")


def _make_items(num_items: int, num_groups: int) -> list[list[Item]]:
    groups, next_id = [], 0
    for g in range(num_groups):
        size = num_items // num_groups + (1 if g < num_items % num_groups else 0)
        subs = max(1, round(math.sqrt(size)))
        groups.append([Item(next_id + j, g, j % subs, j // subs) for j in range(size)])
        next_id += size
    return groups


def _sequence(rng: random.Random, groups: list[list[Item]], successor: dict[int, Item],
              item_weights: list[list[float]], group_weights: list[float]) -> list[Item]:
    num_prefs = min(len(groups), rng.choice((1, 2, 2, 3)))
    prefs: list[int] = []
    while len(prefs) < num_prefs:  # distinct preferred groups, popular groups more likely
        g = rng.choices(range(len(groups)), weights=group_weights)[0]
        if g not in prefs:
            prefs.append(g)
    group = rng.choice(prefs)
    seq = [rng.choices(groups[group], weights=item_weights[group])[0]]
    for _ in range(rng.randint(MIN_SEQ_LEN, MAX_SEQ_LEN) - 1):
        if rng.random() >= P_STAY and len(prefs) > 1:
            group = rng.choice([g for g in prefs if g != group])
            seq.append(rng.choices(groups[group], weights=item_weights[group])[0])
        elif rng.random() < P_FOLLOW:
            seq.append(successor[seq[-1].item_id])  # seq[-1] is always in the current group
        else:
            seq.append(rng.choices(groups[group], weights=item_weights[group])[0])
    return seq


def _row(user: str, history: list[Item], target: Item) -> dict:
    history = history[-MAX_FILE_HISTORY:]
    return {
        "user_id": user,
        "history_item_title": str([it.title for it in history]),
        "item_title": target.title,
        "history_item_id": str([it.item_id for it in history]),
        "item_id": target.item_id,
        "history_item_sid": str([it.sid for it in history]),
        "item_sid": target.sid,
    }


def generate(out_dir: str | Path, num_items: int, num_users: int, num_groups: int, seed: int) -> dict:
    """Write train/valid/test.csv, info.txt, index.json and item.json into out_dir.

    Returns a small summary (sizes and row counts) for logs.
    """
    _check_sizes(num_items, num_users, num_groups)
    rng = random.Random(seed)
    groups = _make_items(num_items, num_groups)
    items = [it for group in groups for it in group]

    # Per-group chain: a random cycle through the group's items; Zipf-like item popularity.
    successor: dict[int, Item] = {}
    item_weights: list[list[float]] = []
    for group in groups:
        order = list(group)
        rng.shuffle(order)
        for k, it in enumerate(order):
            successor[it.item_id] = order[(k + 1) % len(order)]
        ranks = list(range(len(group)))
        rng.shuffle(ranks)
        item_weights.append([1.0 / (r + 1) ** 0.8 for r in ranks])
    group_weights = [1.0 / (g + 1) ** 0.5 for g in range(num_groups)]

    rows: dict[str, list[dict]] = {"train": [], "valid": [], "test": []}
    for u in range(num_users):
        user = f"U{u}"
        seq = _sequence(rng, groups, successor, item_weights, group_weights)
        n = len(seq)
        for t in range(1, n - 2):
            rows["train"].append(_row(user, seq[:t], seq[t]))
        rows["valid"].append(_row(user, seq[:n - 2], seq[n - 2]))
        rows["test"].append(_row(user, seq[:n - 1], seq[n - 1]))

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / INFO_FILE, "".join(f"{it.sid}\t{it.title}\t{it.item_id}\n" for it in items))
    atomic_write_text(out_dir / INDEX_FILE, json.dumps({str(it.item_id): it.codes for it in items}))
    atomic_write_text(out_dir / ITEM_FILE, json.dumps({str(it.item_id): {"title": it.title} for it in items},
                                                      indent=2) + "\n")
    for split, split_rows in rows.items():
        frame = pd.DataFrame(split_rows, columns=list(CSV_COLUMNS))
        atomic_write_text(out_dir / f"{split}.csv", frame.to_csv(index=False, lineterminator="\n"))
    return {"num_items": len(items), "num_users": num_users, "num_groups": num_groups, "seed": seed,
            **{f"{split}_rows": len(r) for split, r in rows.items()}}
