"""`python -m trainer prepare-data`: build a dataset directory (docs/internals.md) from the
synthetic generator or from MiniOneRec's released files, and validate it by loading it.

    python -m trainer prepare-data --out data/demo --synthetic [--set synthetic.num_items=200]
    python -m trainer prepare-data --out data/office --minionerec-root ../shared/minionerec-data/data/Amazon \\
        --name Office_Products [--train-from valid] \\
        [--download-commit SHA --download-repo https://github.com/AkaliKong/MiniOneRec \\
         --pins config/minionerec_pins.yaml]

With --download-commit, MiniOneRec files missing under --minionerec-root are fetched from the
repository at that exact commit (raw GitHub URLs) into --cache-dir/COMMIT/data/Amazon/ and kept
only when their git blob id equals the pin in --pins (trainer/data/pinned.py).
"""
from __future__ import annotations

import json
from pathlib import Path

from trainer.data import pinned
from trainer.data import readers as data
from trainer.data import synthetic
from trainer.cli import base_parser
from trainer.config import load_config
from trainer.errors import DataError
from trainer.io_utils import atomic_write_bytes, atomic_write_text, setup_logging

# Short dataset names used by the workflow's {ds} wildcard -> MiniOneRec category names.
SHORT_NAMES = {"office": "Office_Products", "industrial": "Industrial_and_Scientific"}
MINIONEREC_PERIOD = "5_2016-10-2018-11"  # suffix of MiniOneRec's split and info file names


def minionerec_sources(root: str | Path, name: str) -> dict[str, Path]:
    """Where MiniOneRec keeps each file of category `name` under `root` (its data/Amazon dir)."""
    root = Path(root)
    stem = f"{name}_{MINIONEREC_PERIOD}"
    return {
        "train": root / "train" / f"{stem}.csv",
        "valid": root / "valid" / f"{stem}.csv",
        "test": root / "test" / f"{stem}.csv",
        "info": root / "info" / f"{stem}.txt",
        "index": root / "index" / f"{name}.index.json",
        "item": root / "index" / f"{name}.item.json",
    }


# ------------------------------------------------------------------ pinned MiniOneRec download

MINIONEREC_DATA_PATH = "data/Amazon"  # where the files live inside the MiniOneRec repository


def download_minionerec(root: str | Path, rels: list[str], repo: str, commit: str, pins: dict[str, str],
                        fetch=None, log=None) -> list[Path]:
    """Fetch each `rel` (relative to data/Amazon) that is missing under `root`, verified by its
    git blob id (trainer.data.pinned); returns the files written."""
    written = []
    for rel in rels:
        dest = Path(root) / rel
        if not dest.is_file():
            kw = {"fetch": fetch} if fetch else {}
            written.append(pinned.fetch_pinned(f"{MINIONEREC_DATA_PATH}/{rel}", dest, repo, commit, pins, log=log, **kw))
    return written


def needed_files(root: str | Path, name: str, train_from: str = "train") -> dict[str, Path]:
    """The MiniOneRec files import_minionerec reads for category `name`."""
    src = minionerec_sources(root, SHORT_NAMES.get(name, name))
    keys = ["valid", "test", "info", "index", "item"] + (["train"] if train_from == "train" else [])
    return {k: src[k] for k in keys}


def _normalised_items(item_path: Path, catalog: data.Catalog) -> str:
    """item.json reduced to {item_id: {"title": ..., "description": ...}} for the catalog's items
    (the description, when the item has one, feeds the RL task rl_title2sid)."""
    try:
        items = json.loads(item_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{item_path}: not valid JSON ({e})") from e
    if not isinstance(items, dict):
        raise DataError(f"{item_path}: top level must be an object {{item_id: {{\"title\": ...}}}}")
    out = {}
    for item_id in catalog.item_to_sid:
        entry = items.get(item_id)
        # Prefer the item file's title; fall back to the info file's when it has none.
        title = entry.get("title") if isinstance(entry, dict) else None
        out[item_id] = {"title": title if isinstance(title, str) else catalog.titles[item_id]}
        description = entry.get("description") if isinstance(entry, dict) else None
        if isinstance(description, str):
            out[item_id]["description"] = description
    return json.dumps(out, indent=2, ensure_ascii=False) + "\n"


def import_minionerec(out_dir: str | Path, root: str | Path, name: str, train_from: str = "train",
                      log=None, downloaded: str | Path | None = None) -> dict:
    """Validate MiniOneRec's files for `name`, then copy them into out_dir under our names.

    Each file is taken from `root`, else from `downloaded` (the data/Amazon dir of the pinned
    download). `train_from="valid"` uses the valid split as train.csv too (for copies that lack
    the train split); the model then trains on the rows it is validated on.
    """
    name = SHORT_NAMES.get(name, name)
    src = minionerec_sources(root, name)
    if downloaded is not None:
        src = {k: p if p.is_file() else minionerec_sources(downloaded, name)[k] for k, p in src.items()}
    for key in needed_files(root, name, train_from):
        if not src[key].is_file():
            hint = (" (no train split here? pass --train-from valid to let valid stand in)"
                    if key == "train" else "")
            raise DataError(f"{src[key]}: MiniOneRec {key} file for {name} not found{hint}; check "
                            "--minionerec-root (the data/Amazon directory) and --name")
    # Validate everything before writing anything, so a bad source leaves no half-made dataset.
    catalog = data.load_catalog_files(src["info"], src["index"])
    split_src = {"train": src[train_from], "valid": src["valid"], "test": src["test"]}
    counts = {split: len(data.read_split_file(path, catalog)) for split, path in split_src.items()}
    items_text = _normalised_items(src["item"], catalog)

    out_dir = Path(out_dir)
    atomic_write_bytes(out_dir / data.INFO_FILE, src["info"].read_bytes())
    atomic_write_bytes(out_dir / data.INDEX_FILE, src["index"].read_bytes())
    atomic_write_text(out_dir / data.ITEM_FILE, items_text)
    for split, path in split_src.items():  # CSVs byte-for-byte: calc.py compares against them
        atomic_write_bytes(out_dir / f"{split}.csv", path.read_bytes())
    if log and train_from != "train":
        log.warning("train.csv is a copy of %s (--train-from %s): validation is not held out",
                    split_src["train"], train_from)
    return {"name": name, "num_items": len(catalog.item_to_sid), "num_sids": len(catalog),
            **{f"{split}_rows": n for split, n in counts.items()}}


def validate_dataset(data_dir: str | Path, max_history: int | None = None) -> dict:
    """Load every file of a dataset directory; returns row counts and the popularity bar."""
    if not (Path(data_dir) / data.ITEM_FILE).is_file():
        raise DataError(f"{Path(data_dir) / data.ITEM_FILE}: item file not found; rerun prepare-data")
    catalog = data.load_catalog(data_dir)
    splits = {s: data.read_split(data_dir, s, catalog, max_history) for s in data.SPLITS}
    summary = {"num_items": len(catalog.item_to_sid), "num_sids": len(catalog),
               **{f"{s}_rows": len(rows) for s, rows in splits.items()}}
    if splits["train"] and splits["valid"]:
        pop = data.popularity_baseline(splits["train"], splits["valid"], 10)
        summary.update({"popularity_valid_hr@10": pop["hr"], "popularity_valid_ndcg@10": pop["ndcg"]})
    return summary


def main(argv: list[str]) -> int:
    p = base_parser("prepare-data", "Write a dataset directory (train/valid/test.csv, info.txt, "
                                    "index.json, item.json) and validate it.")
    p.add_argument("--out", default=None, help="dataset directory to write (default: config data.dir)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--synthetic", action="store_true",
                        help="generate the synthetic dataset (sizes: synthetic.* config keys)")
    source.add_argument("--minionerec-root", default=None,
                        help="MiniOneRec's data/Amazon directory (holds train/ valid/ test/ info/ index/)")
    p.add_argument("--name", default=None,
                   help="MiniOneRec category, e.g. Office_Products (or office, industrial)")
    p.add_argument("--train-from", choices=("train", "valid"), default="train",
                   help="split that becomes train.csv; 'valid' when the train split is not available")
    dl = p.add_argument_group("download of missing MiniOneRec files (pinned, git blob ids verified)")
    dl.add_argument("--download-commit", default=None, metavar="SHA",
                    help="fetch missing files from the repository at this commit")
    dl.add_argument("--download-repo", default=pinned.DEFAULT_REPO,
                    help="repository URL (GitHub), or a base URL laid out as BASE/COMMIT/data/Amazon/...")
    dl.add_argument("--pins", default="config/minionerec_pins.yaml",
                    help="YAML with 'commit' and 'files' ({path in the repository: git blob id})")
    dl.add_argument("--cache-dir", default="workdir/minionerec",
                    help="downloads go to CACHE/COMMIT/data/Amazon/... (laid out like the repository)")
    args = p.parse_args(argv[1:])
    cfg = load_config(args.config, args.overrides)
    log = setup_logging(args.log)
    out = Path(args.out or cfg["data"]["dir"])

    if args.synthetic:
        if args.name or args.train_from != "train":
            p.error("--name and --train-from apply to --minionerec-root only")
        s = cfg["synthetic"]
        info = synthetic.generate(out, s["num_items"], s["num_users"], s["num_groups"], s["seed"])
    else:
        if not args.name:
            p.error("--minionerec-root needs --name (e.g. Office_Products)")
        downloaded = None
        if args.download_commit:  # missing files come from the pinned download (never written into the root)
            root = Path(args.minionerec_root)
            downloaded = Path(args.cache_dir) / args.download_commit / MINIONEREC_DATA_PATH
            rels = [str(f.relative_to(root)) for f in needed_files(root, args.name, args.train_from).values()]
            missing = [r for r in rels if not (root / r).is_file()]
            if missing:
                pins = pinned.load_pins(args.pins, args.download_commit)
                download_minionerec(downloaded, missing, args.download_repo, args.download_commit, pins, log=log)
        info = import_minionerec(out, args.minionerec_root, args.name, args.train_from, log, downloaded)
    log.info("wrote %s: %s", out, info)
    summary = validate_dataset(out)
    log.info("validated %s: %s", out, summary)
    return 0
