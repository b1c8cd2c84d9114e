"""Readers for a dataset directory in MiniOneRec's formats (see docs/internals.md).

    info.txt    SID<TAB>title<TAB>item_id, one item a line
    index.json  {"item_id": ["<a_i>", "<b_j>", "<c_k>"]}
    {split}.csv user_id,history_item_title,item_title,history_item_id,item_id,history_item_sid,item_sid
                (list columns hold Python-literal lists)

Every problem a user can hit is a DataError naming the file, line/row/key and column.
"""
from __future__ import annotations

import ast
import json
import math
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from trainer.errors import DataError

SPLITS = ("train", "valid", "test")
INFO_FILE = "info.txt"
INDEX_FILE = "index.json"
ITEM_FILE = "item.json"
CSV_COLUMNS = ("user_id", "history_item_title", "item_title", "history_item_id", "item_id",
               "history_item_sid", "item_sid")
LIST_COLUMNS = ("history_item_title", "history_item_id", "history_item_sid")

BOM = "\ufeff"
SID_RE = re.compile(r"<a_\d+><b_\d+><c_\d+>")
CODE_RES = (re.compile(r"<a_\d+>"), re.compile(r"<b_\d+>"), re.compile(r"<c_\d+>"))


def split_sid(sid: str) -> list[str]:
    """'<a_1><b_2><c_3>' -> ['<a_1>', '<b_2>', '<c_3>'] (the SID must already be valid)."""
    return [part + ">" for part in sid.split(">")[:-1]]


def code_tokens(sids: Iterable[str]) -> list[str]:
    """Distinct code tokens of the SIDs: all `<a_*>`, then `<b_*>`, then `<c_*>`, numerically sorted."""
    levels: list[set[str]] = [set(), set(), set()]
    for sid in sids:
        if not SID_RE.fullmatch(sid):
            raise DataError(f"SID {sid!r} does not match <a_N><b_N><c_N>")
        for level, code in zip(levels, split_sid(sid)):
            level.add(code)
    return [c for level in levels for c in sorted(level, key=lambda c: int(c[3:-1]))]


@dataclass
class Catalog:
    """The item universe: which SIDs exist and which items/titles they stand for."""

    sids: list[str]  # distinct SIDs, first-appearance order in info.txt
    sid_to_items: dict[str, list[str]]  # several items may share one SID
    item_to_sid: dict[str, str]
    titles: dict[str, str]  # item_id -> title
    sid_index: dict[str, int] = field(default_factory=dict)  # SID -> position in `sids`

    def __post_init__(self) -> None:
        if not self.sid_index:
            self.sid_index = {sid: i for i, sid in enumerate(self.sids)}

    def __contains__(self, sid: object) -> bool:
        return sid in self.sid_index

    def __len__(self) -> int:
        return len(self.sids)

    def sid_title(self, sid: str) -> str:
        """Title of the first item carrying this SID (for logs and alignment prompts)."""
        return self.titles[self.sid_to_items[sid][0]]


@dataclass
class Example:
    user_id: str
    history_sids: list[str]
    target_sid: str
    history_titles: list[str]
    target_title: str


# ---------------------------------------------------------------------------------------------
# Catalog


def _require_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise DataError(f"{path}: {what} not found; run `python -m trainer prepare-data` to create "
                        "the dataset directory, or point data.dir at one that has it")


def load_catalog_files(info_path: str | Path, index_path: str | Path) -> Catalog:
    """Build the catalog from an info txt and an index json, checking that they agree."""
    info_path, index_path = Path(info_path), Path(index_path)
    _require_file(info_path, "item info file (SID<TAB>title<TAB>item_id)")
    _require_file(index_path, "SID index file")

    sids: list[str] = []
    sid_to_items: dict[str, list[str]] = {}
    item_to_sid: dict[str, str] = {}
    titles: dict[str, str] = {}
    info_line: dict[str, int] = {}
    try:
        with open(info_path, encoding="utf-8") as f:
            for lineno, raw in enumerate(f, start=1):
                line = raw.rstrip("\r\n")
                if lineno == 1 and line.startswith(BOM):
                    raise DataError(f"{info_path}: starts with a UTF-8 byte-order mark (BOM, bytes EF BB BF); "
                                    "MiniOneRec's calc.py would read the first SID with it attached: save the "
                                    "file as UTF-8 without a BOM")
                if not line.strip():
                    continue
                parts = line.split("\t")
                if len(parts) < 3:
                    raise DataError(f"{info_path}: line {lineno}: expected 3 tab-separated fields "
                                    f"SID<TAB>title<TAB>item_id, got {len(parts)}: {line[:120]!r}; "
                                    "fix or regenerate the file")
                # A title could itself contain a tab: the SID is first and the item id last.
                sid, title, item_id = parts[0].strip(), "\t".join(parts[1:-1]), parts[-1].strip()
                if not SID_RE.fullmatch(sid):
                    raise DataError(f"{info_path}: line {lineno}: SID {sid!r} does not match "
                                    "<a_N><b_N><c_N>; fix or regenerate the file")
                if not item_id:
                    raise DataError(f"{info_path}: line {lineno}: empty item_id (third field)")
                if item_id in item_to_sid:
                    raise DataError(f"{info_path}: line {lineno}: item_id {item_id!r} already listed "
                                    f"on line {info_line[item_id]}; each item must appear once")
                info_line[item_id] = lineno
                item_to_sid[item_id] = sid
                titles[item_id] = title
                if sid not in sid_to_items:
                    sids.append(sid)
                    sid_to_items[sid] = []
                sid_to_items[sid].append(item_id)
    except UnicodeDecodeError as e:
        raise DataError(f"{info_path}: not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from None
    if not sids:
        raise DataError(f"{info_path}: no items; the info file is empty")

    try:
        index = json.loads(Path(index_path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{index_path}: not valid JSON ({e}); regenerate the file") from e
    if not isinstance(index, dict):
        raise DataError(f"{index_path}: top level must be an object {{item_id: [3 code tokens]}}")
    for item_id, codes in index.items():
        if (not isinstance(codes, list) or len(codes) != 3
                or not all(isinstance(c, str) and rx.fullmatch(c) for c, rx in zip(codes, CODE_RES))):
            raise DataError(f"{index_path}: key {item_id!r}: expected 3 code tokens "
                            f"[\"<a_N>\", \"<b_N>\", \"<c_N>\"], got {codes!r}")
        if item_id not in item_to_sid:
            raise DataError(f"{index_path}: key {item_id!r} is not an item of {info_path}; "
                            "the two files come from different datasets: regenerate both")
        if "".join(codes) != item_to_sid[item_id]:
            raise DataError(f"{index_path}: key {item_id!r}: SID {''.join(codes)} disagrees with "
                            f"{item_to_sid[item_id]} on {info_path} line {info_line[item_id]}; "
                            "regenerate both files from the same SID assignment")
    missing = [i for i in item_to_sid if i not in index]
    if missing:
        raise DataError(f"{index_path}: no entry for item_id {missing[0]!r} (listed on {info_path} "
                        f"line {info_line[missing[0]]}) and {len(missing) - 1} more; regenerate the index")
    return Catalog(sids=sids, sid_to_items=sid_to_items, item_to_sid=item_to_sid, titles=titles)


def load_catalog(data_dir: str | Path) -> Catalog:
    data_dir = Path(data_dir)
    return load_catalog_files(data_dir / INFO_FILE, data_dir / INDEX_FILE)


# ---------------------------------------------------------------------------------------------
# Splits


def _parse_list(value: str, where: str, column: str) -> list:
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
        raise DataError(f"{where}, column '{column}': not a Python-literal list "
                        f"({type(e).__name__}): {value[:120]!r}") from None
    if not isinstance(parsed, (list, tuple)):
        raise DataError(f"{where}, column '{column}': expected a list like ['a', 'b'], "
                        f"got {value[:120]!r}")
    return list(parsed)


def read_split_file(path: str | Path, catalog: Catalog, max_history: int | None = None) -> list[Example]:
    """Read one MiniOneRec split CSV, validating every row against the catalog."""
    path = Path(path)
    _require_file(path, "split CSV")
    if max_history is not None and max_history < 1:
        raise DataError(f"data.max_history must be >= 1 or null, got {max_history}")
    try:
        # All columns as text: user ids like "007" and titles like "NA" must survive untouched.
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot parse as CSV ({e}); regenerate the file") from e
    missing = [c for c in CSV_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; a split CSV needs the columns "
                        f"{','.join(CSV_COLUMNS)}")

    examples = []
    columns = {c: df[c].tolist() for c in CSV_COLUMNS}
    for i in range(len(df)):
        # Row i is the i-th record after the header (line i+2 when no field spans lines).
        where = f"{path}: row {i + 1} (line {i + 2})"
        lists = {c: _parse_list(columns[c][i], where, c) for c in LIST_COLUMNS}
        n = len(lists["history_item_sid"])
        for c in ("history_item_title", "history_item_id"):
            if len(lists[c]) != n:
                raise DataError(f"{where}, column '{c}': {len(lists[c])} entries but "
                                f"'history_item_sid' has {n}; the history columns must align")
        history = [str(s) for s in lists["history_item_sid"]]
        for s in history:
            if s not in catalog:
                raise DataError(f"{where}, column 'history_item_sid': SID {s!r} is not in the "
                                "catalog (info.txt); the split and catalog come from different "
                                "datasets: regenerate them together")
        target = columns["item_sid"][i].strip()
        if target not in catalog:
            raise DataError(f"{where}, column 'item_sid': SID {target!r} is not in the catalog "
                            "(info.txt); the split and catalog come from different datasets: "
                            "regenerate them together")
        titles = [str(t) for t in lists["history_item_title"]]
        if max_history is not None:
            history, titles = history[-max_history:], titles[-max_history:]
        examples.append(Example(user_id=columns["user_id"][i], history_sids=history,
                                target_sid=target, history_titles=titles,
                                target_title=columns["item_title"][i]))
    return examples


def read_split(data_dir: str | Path, split: str, catalog: Catalog,
               max_history: int | None = None) -> list[Example]:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return read_split_file(Path(data_dir) / f"{split}.csv", catalog, max_history)


# ---------------------------------------------------------------------------------------------
# Tasks and baselines


def load_alignment_pairs(catalog: Catalog) -> list[tuple[str, str]]:
    """(title, SID) pairs for the title -> SID item-alignment task, one per distinct title.

    A title shared by items with different SIDs would make the task ambiguous; like MiniOneRec's
    SidItemFeatDataset (a title -> SID dict) one SID is kept per title: the last item's, at the
    place of the title's first appearance.
    """
    pairs: dict[str, str] = {}
    for item_id, sid in catalog.item_to_sid.items():
        title = catalog.titles[item_id]
        if title.strip():
            pairs[title] = sid
    return list(pairs.items())


def popularity_ranking(train_examples: list[Example]) -> list[str]:
    """Target SIDs of the training rows, most frequent first (ties: first seen first)."""
    counts = Counter(ex.target_sid for ex in train_examples)
    return [sid for sid, _ in counts.most_common()]  # most_common keeps insertion order on ties


def popularity_baseline(train_examples: list[Example], eval_examples: list[Example],
                        k: int) -> dict[str, float]:
    """HR@k and NDCG@k of recommending the k most popular training targets to every user.

    This is the bar a trained model must clear (SFT is expected to beat it 3x).
    """
    if not train_examples or not eval_examples:
        raise DataError("popularity baseline needs non-empty train and eval splits "
                        f"(got {len(train_examples)} train, {len(eval_examples)} eval rows)")
    rank = {sid: r for r, sid in enumerate(popularity_ranking(train_examples)[:k])}
    hits = [rank[ex.target_sid] for ex in eval_examples if ex.target_sid in rank]
    n = len(eval_examples)
    return {"hr": len(hits) / n, "ndcg": sum(1.0 / math.log2(r + 2) for r in hits) / n}
