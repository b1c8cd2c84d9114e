"""The bad-input corpus (tests/corpus/cases.yaml): every input a user hands the project, broken
one way at a time, fed to the CLI as a user would (`python -m trainer ...`, `snakemake -n`).

Each case names a command, the mutations applied to a copy of small demo-like files (dataset,
2-step SFT checkpoint and its eval, HF export, GCS emulator state with a receipt), the exit code
and fragments of the message (which name the file/row/key). Every case also checks that:
- no traceback reaches the user;
- nothing that existed before the command is changed or removed (a file moved to `previous/`
  by a rerun counts as kept);
- no new file looks complete: only logs, emulator bookkeeping and a calc_crosscheck.json that
  says `"passed": false` may appear, and no temporary file is left behind.
The base files are built once per session (about 30 s); a case costs one CLI start.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.workflow_helpers import make_workflow, snakemake_env

REPO = Path(__file__).resolve().parents[1]
CASES_FILE = REPO / "tests/corpus/cases.yaml"
CASES = yaml.safe_load(CASES_FILE.read_text())
DEMO = ["config/trainer/demo/base.yaml", "config/trainer/demo/sft.yaml"]
TINY = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=1", "data.max_prompt_len=48",
        "tokenizer.bpe_vocab_size=300", "sft.steps=2", "sft.batch_size=8", "sft.eval_every=2",
        "sft.checkpoint_every=2", "sft.eval_samples=8", "eval.num_beams=5", "eval.batch_size=8"]
EMU_BUCKET_URI = "gs://corpus-bucket/sft"
# New files a failing command may leave: logs, and the emulator's own bookkeeping.
ALLOWED_NEW = ("emu/emulator.json", "emu/emulator.lock", "emu/emulator.log", "emu/leases/", ".snakemake/",
               "wf/.snakemake/", "__pycache__/")
PARTIAL_SUFFIXES = (".tmp", ".part")


def _cli(*argv: str, cwd: Path) -> None:
    from trainer.cli import main

    old = Path.cwd()
    os.chdir(cwd)
    try:
        assert main(list(argv)) == 0, argv
    finally:
        os.chdir(old)


@pytest.fixture(scope="session")
def base(tmp_path_factory) -> Path:
    """Small demo-like inputs every case starts from (a fresh copy each)."""
    from trainer.data import synthetic
    from trainer.eval.metrics import compute_metrics, load_predictions, load_valid_sids
    from trainer.io_utils import atomic_write_json

    root = tmp_path_factory.mktemp("corpus_base")
    synthetic.generate(root / "data", num_items=24, num_users=20, num_groups=4, seed=0)
    sets = [a for s in TINY for a in ("--set", s)]
    configs = [a for c in DEMO for a in ("--config", str(REPO / c))]
    (root / "config").mkdir()
    for c in DEMO:  # the cases' commands read these copies (config/base.yaml, config/sft.yaml)
        shutil.copy(REPO / c, root / "config" / Path(c).name)
    _cli("sft", *configs, *sets, "--data", "data", "--set", "output_dir=sft", cwd=root)
    _cli("eval", *configs, *sets, "--data", "data", "--checkpoint", "sft/sft_best.msgpack", "--tokenizer", "sft",
         "--out", "eval", cwd=root)
    _cli("export-hf", *configs, *sets, "--checkpoint", "sft/sft_best.msgpack", "--tokenizer", "sft", "--out", "hf",
         cwd=root)
    _cli("handoff-upload", "--files", "sft/sft_best.msgpack", "sft/tokenizer.json", "sft/tokenizer_config.json",
         "sft/chat_template.jinja", "--uri", EMU_BUCKET_URI, "--receipt", "handoff/gcs_copy.json",
         "--emulator-root", "emu", cwd=root)
    _cli("handoff-download", "--receipt", "handoff/gcs_copy.json", "--name", "sft_best.msgpack", "tokenizer.json",
         "tokenizer_config.json", "chat_template.jinja", "--dest", "evalcopy", "--emulator-root", "emu", cwd=root)
    # The case: the last test row dropped and the summary recomputed on the rows left, so the
    # metrics agree with calc.py and only the row check can tell.
    short = root / "eval_short"
    short.mkdir()
    records = load_predictions(root / "eval/eval_predictions.json")[:-1]
    atomic_write_json(short / "eval_predictions.json", records)
    summary = json.loads((root / "eval/run_summary.json").read_text())
    summary.update(compute_metrics(records, load_valid_sids(root / "data/info.txt")))
    atomic_write_json(short / "run_summary.json", summary)
    # MiniOneRec's release layout of the same data (prepare-data --minionerec-root).
    stem = "Demo_5_2016-10-2018-11"
    for split in ("train", "valid", "test"):
        (root / "mor" / split).mkdir(parents=True)
        shutil.copy(root / "data" / f"{split}.csv", root / "mor" / split / f"{stem}.csv")
    (root / "mor/info").mkdir()
    shutil.copy(root / "data/info.txt", root / f"mor/info/{stem}.txt")
    (root / "mor/index").mkdir()
    shutil.copy(root / "data/index.json", root / "mor/index/Demo.index.json")
    shutil.copy(root / "data/item.json", root / "mor/index/Demo.item.json")
    make_workflow(root / "wf")
    for log in root.rglob("*.log"):
        log.unlink()
    return root


# ------------------------------------------------------------------------------ mutations


def _copy_without_xattrs(path: Path) -> None:
    for f in [p for p in path.rglob("*") if p.is_file()]:
        data = f.read_bytes()
        f.unlink()
        f.write_bytes(data)


def _json_set(obj, dotted: str, value):
    *parents, last = dotted.split(".")
    for part in parents:
        obj = obj[int(part)] if isinstance(obj, list) else obj[part]
    key = int(last) if isinstance(obj, list) else last
    if value == "__delete__":
        del obj[key]
    else:
        obj[key] = value


def mutate(root: Path, step: dict) -> None:
    op, path = step["op"], root / step["path"]
    enc = step.get("encoding", "utf-8")
    if op == "write":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(step["text"].encode(enc))
    elif op == "prepend":
        path.write_bytes(step["text"].encode(enc) + path.read_bytes())
    elif op == "append":
        path.write_bytes(path.read_bytes() + step["text"].encode(enc))
    elif op == "replace":
        text = path.read_text(encoding="utf-8")
        assert step["old"] in text, (step, text[:300])
        path.write_text(text.replace(step["old"], step["new"], step.get("count", 1)), encoding="utf-8")
    elif op == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: step["size"]])
    elif op == "delete":
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    elif op == "lines":  # keep a slice of the lines
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        path.write_text("".join(lines[slice(*step["keep"])]), encoding="utf-8")
    elif op == "swap_lines":
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        i, j = step["lines"]
        lines[i], lines[j] = lines[j], lines[i]
        path.write_text("".join(lines), encoding="utf-8")
    elif op == "json":
        obj = json.loads(path.read_text())
        for dotted, value in step["set"].items():
            _json_set(obj, dotted, value)
        path.write_text(json.dumps(obj, indent=1))
    elif op == "json_slice":
        obj = json.loads(path.read_text())
        path.write_text(json.dumps(obj[slice(*step["keep"])], indent=1))
    elif op == "json_swap":
        obj = json.loads(path.read_text())
        i, j = step["items"]
        obj[i], obj[j] = obj[j], obj[i]
        path.write_text(json.dumps(obj, indent=1))
    elif op == "copy_without_xattrs":
        _copy_without_xattrs(path)
    else:
        raise AssertionError(f"unknown mutation op {op!r}")


# ------------------------------------------------------------------------------ checks


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in root.rglob("*") if p.is_file()}


def damage(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """Files changed or gone (a file moved intact to a sibling previous/ directory is kept)."""
    out = []
    for rel, digest in before.items():
        if after.get(rel) == digest:
            continue
        aside = str(Path(rel).parent / "previous" / Path(rel).name)
        if after.get(aside) != digest:
            out.append(f"{rel} {'changed' if rel in after else 'removed'}")
    return out


def looks_complete(root: Path, before: dict[str, str], after: dict[str, str]) -> list[str]:
    """New files that a failed command must not leave: anything but logs and bookkeeping."""
    bad = []
    for rel in sorted(set(after) - set(before)):
        if rel.endswith(PARTIAL_SUFFIXES) or rel.rsplit("/", 1)[-1].startswith("."):
            bad.append(f"{rel} (partial file left behind)")
        elif rel.endswith(".log") or rel.startswith(ALLOWED_NEW) or "/previous/" in f"/{rel}":
            continue
        elif rel.endswith("calc_crosscheck.json"):
            if json.loads((root / rel).read_text()).get("passed") is not False:
                bad.append(f"{rel} does not say passed: false")
        else:
            bad.append(f"{rel} (new output of a failed command)")
    return bad


_CONFIGS = ["--config", "config/base.yaml", "--config", "config/sft.yaml", *(a for s in TINY for a in ("--set", s))]
# Commands as the cases write them: "@name" stands for the command line that works on the base files.
MACROS = {
    "@eval": ["eval", *_CONFIGS, "--data", "data", "--checkpoint", "sft/sft_best.msgpack", "--tokenizer", "sft",
              "--out", "eval"],
    "@sft": ["sft", *_CONFIGS, "--data", "data", "--set", "output_dir=sft2"],
    "@rl": ["rl", *_CONFIGS, "--data", "data", "--set", "output_dir=rl", "--set", "init.checkpoint=sft/sft_best.msgpack",
            "--set", "tokenizer.path=sft", "--set", "steps=2", "--set", "rollout.batch_size=4", "--set", "rollout.n=4"],
    "@crosscheck": ["crosscheck", "--predictions", "eval/eval_predictions.json", "--summary", "eval/run_summary.json",
                    "--info", "data/info.txt", "--data", "data", "--out", "eval/calc_crosscheck.json"],
    "@download": ["handoff-download", "--receipt", "handoff/gcs_copy.json", "--name", "sft_best.msgpack",
                  "--dest", "fresh/sft_best.msgpack", "--emulator-root", "emu"],
    "@evalcopy": ["eval", *_CONFIGS, "--data", "data", "--checkpoint", "evalcopy/sft_best.msgpack",
                  "--tokenizer", "evalcopy", "--out", "eval", "--receipt", "handoff/gcs_copy.json"],
    "@prepare": ["prepare-data", "--minionerec-root", "mor", "--name", "Demo", "--out", "data2"],
    "@import": ["import-hf", "hf", "--out", "imported"],
    "@export": ["export-hf", *_CONFIGS, "--checkpoint", "sft/sft_best.msgpack", "--tokenizer", "sft", "--out", "hf2"],
}


def expand(argv: list[str]) -> list[str]:
    return [a for item in argv for a in (MACROS[item] if item in MACROS else [str(item)])]


def run_command(case: dict, root: Path) -> tuple[int, str]:
    """(exit code, stdout + stderr). `python -m trainer` cases run through the CLI's own entry,
    trainer.cli.main, in this process (a CLI start costs seconds on a busy 2-core machine; any
    exception other than a UserError escapes it and fails the case with its traceback); cases
    with `env`, and `snakemake` cases, run as subprocesses."""
    if "argv" in case and not case.get("env"):
        return _in_process(expand(case["argv"]), root)
    env = {**snakemake_env(), **{k: str(v) for k, v in case.get("env", {}).items()}}
    if "argv" in case:
        cmd, cwd = [sys.executable, "-m", "trainer", *expand(case["argv"])], root
    else:
        cmd, cwd = [sys.executable, "-m", "snakemake", *case["snakemake"]], root / "wf"
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


def _in_process(argv: list[str], root: Path) -> tuple[int, str]:
    from trainer.cli import main

    buf, old = io.StringIO(), Path.cwd()
    os.chdir(root)
    try:
        with contextlib.redirect_stderr(buf), contextlib.redirect_stdout(buf):
            try:
                rc = main(argv)
            except SystemExit as e:  # argparse: usage error, exit 2
                rc = e.code if isinstance(e.code, int) else 2
    finally:
        os.chdir(old)
        logging.getLogger("trainer").handlers.clear()
    return rc, buf.getvalue()


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_bad_input_is_named_and_harmless(case, base, tmp_path):
    root = tmp_path / "case"
    shutil.copytree(base, root, symlinks=True)
    for step in case.get("mutate", []):
        mutate(root, step)
    before = snapshot(root)
    rc, out = run_command(case, root)
    assert rc == case["exit"], f"exit {rc}, expected {case['exit']}:\n{out[-3000:]}"
    assert "Traceback" not in out, out[-4000:]
    for fragment in case["message"] if isinstance(case["message"], list) else [case["message"]]:
        assert fragment in out, f"{fragment!r} not in:\n{out[-3000:]}"
    after = snapshot(root)
    assert not damage(before, after), damage(before, after)
    assert not looks_complete(root, before, after), looks_complete(root, before, after)


def test_corpus_is_well_formed():
    ids = [c["id"] for c in CASES]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    assert len(CASES) >= 60
    for case in CASES:
        assert ("argv" in case) != ("snakemake" in case), case["id"]
        assert {"id", "input", "exit", "message"} <= set(case), case["id"]
