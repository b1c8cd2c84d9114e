"""Outputs that cannot lie: `sft` and `rl` SIGKILLed at random points of a rerun, in a directory that
holds an earlier finished run (another seed), never leave that earlier run's outputs looking like the
new one's, lose none of them before the new run is complete, and the rerun ends with exactly the
outputs of an uninterrupted run.

Kill points (each a real SIGKILL the child sends itself, so they land exactly where intended): right
after the first earlier output is moved aside, after three random training steps (before and after
train-state checkpoints), and in the final-write window (checkpoint written, run_summary.json not yet).
Tiny model (1 layer, hidden 32), 10 SFT / 8 RL steps.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.io_utils import md5_file

REPO = Path(__file__).resolve().parents[1]
CONFIGS = [REPO / "config/trainer/demo/base.yaml", REPO / "config/trainer/demo/sft.yaml"]
TINY = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=1", "data.max_prompt_len=48",
        "tokenizer.bpe_vocab_size=300", "eval.batch_size=8", "train.optimizer.name=adamw",
        "train.optimizer.lr_schedule.peak_value=1e-3"]
SFT_STEPS, RL_STEPS = 10, 8
SFT_SETS = [*TINY, f"sft.steps={SFT_STEPS}", "sft.batch_size=8", "sft.eval_every=1", "sft.checkpoint_every=2",
            "sft.eval_samples=8"]
RL_SETS = [*TINY, f"steps={RL_STEPS}", "checkpoint_every_steps=2", "eval_every_steps=0", "rollout.batch_size=4",
           "rollout.n=4"]
FILES = {"sft": ("sft_best.msgpack", "run_summary.json"), "rl": ("sft_state_rl_last.msgpack", "run_summary.json")}

# The child runs the real CLI; KILL_AT chooses where it SIGKILLs itself.
CHILD = r"""
import os, signal, sys
from trainer import runlog
from trainer.cli import main

where, _, arg = os.environ["KILL_AT"].partition(":")
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
if where == "step":  # right after step N is logged
    log = runlog.RunLog.log
    def log_then_die(self, step, metrics):
        log(self, step, metrics)
        if step == int(arg):
            die()
    runlog.RunLog.log = log_then_die
elif where == "retire":  # right after the first earlier output is moved to previous/
    replace = os.replace
    def replace_then_die(src, dst):
        replace(src, dst)
        if "previous" in str(dst):
            die()
    os.replace = replace_then_die
elif where == "final":  # final checkpoint written, run_summary.json not yet
    import importlib
    mod = importlib.import_module(arg)
    write = mod.atomic_write_json
    def write_or_die(path, obj):
        if str(path).endswith("run_summary.json"):
            die()
        write(path, obj)
    mod.atomic_write_json = write_or_die
sys.exit(main(sys.argv[1:]))
"""


def argv(command: str, out: Path, data: Path, sets: list[str]) -> list[str]:
    args = [command, "--data", str(data), "--set", f"output_dir={out}"]
    for c in CONFIGS:
        args += ["--config", str(c)]
    for s in sets:
        args += ["--set", s]
    return args


def run_inprocess(command: str, out: Path, data: Path, sets: list[str]) -> None:
    from trainer.cli import main

    assert main(argv(command, out, data, sets)) == 0


def run_killed(command: str, out: Path, data: Path, sets: list[str], kill_at: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "KILL_AT": kill_at}
    proc = subprocess.run([sys.executable, "-c", CHILD, *argv(command, out, data, sets)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, f"{command} was not killed at {kill_at} (rc {proc.returncode}):\n{proc.stderr[-3000:]}"


def kill_points(steps: int, module: str, seed: int) -> list[str]:
    picked = sorted(random.Random(seed).sample(range(1, steps), 3))
    return ["retire", *(f"step:{s}" for s in picked), f"final:{module}"]


def assert_nothing_stale(out: Path, kind: str, earlier: dict[str, str], seed: int) -> None:
    """A run_summary.json in place describes this run and the checkpoint beside it; no earlier output
    sits beside a summary (outputs without one are not a finished run: the earlier summary moves
    first, and the next start finishes moving the rest); every earlier output is kept, in place or in
    previous/, until the rerun is complete."""
    ckpt, summary = FILES[kind]
    summary_in_place = (out / summary).exists()
    for name, digest in earlier.items():
        in_place = (out / name).is_file() and md5_file(out / name) == digest
        assert not (in_place and summary_in_place), f"earlier {name} looks current"
        aside = out / "previous" / name
        assert in_place or (aside.is_file() and md5_file(aside) == digest), f"earlier {name} lost before the rerun finished"
    if summary_in_place:
        s = json.loads((out / summary).read_text())
        assert s["config"]["seed"] == seed
        assert s["sft_best_md5" if kind == "sft" else "checkpoint_md5"] == md5_file(out / ckpt)


def kill_and_rerun(kind: str, module: str, data: Path, sets: list[str], tmp_path: Path, seed: int) -> tuple[Path, Path]:
    ref, out = tmp_path / f"{kind}_ref", tmp_path / f"{kind}_rerun"
    run_inprocess(kind, ref, data, sets)  # uninterrupted
    run_inprocess(kind, out, data, [*sets, "seed=1"])  # the earlier finished run: another seed
    earlier = {n: md5_file(out / n) for n in FILES[kind]}
    assert earlier[FILES[kind][0]] != md5_file(ref / FILES[kind][0])
    steps = SFT_STEPS if kind == "sft" else RL_STEPS
    for point in kill_points(steps, module, seed=len(kind)):
        run_killed(kind, out, data, sets, point)
        try:
            assert_nothing_stale(out, kind, earlier, seed=0)
        except AssertionError as e:
            raise AssertionError(f"after a kill at {point}: {e}") from None
    run_inprocess(kind, out, data, sets)
    assert not (out / "previous").exists() and not (out / "state").exists()
    return ref, out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from trainer.data import synthetic

    root = tmp_path_factory.mktemp("kill_rerun")
    synthetic.generate(root / "data", num_items=24, num_users=20, num_groups=4, seed=0)
    return root / "data"


def test_sft_killed_reruns_never_show_stale_outputs_and_end_like_an_uninterrupted_run(data, tmp_path):
    ref, out = kill_and_rerun("sft", "trainer.train.sft", data, SFT_SETS, tmp_path, 0)
    assert md5_file(out / "sft_best.msgpack") == md5_file(ref / "sft_best.msgpack")
    got, want = (json.loads((d / "run_summary.json").read_text()) for d in (out, ref))
    assert got["curves"] == want["curves"] and got["best_step"] == want["best_step"]
    assert [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()] == \
        list(range(1, SFT_STEPS + 1))


def test_rl_killed_reruns_never_show_stale_outputs_and_end_like_an_uninterrupted_run(data, tmp_path):
    sft = tmp_path / "sft"
    run_inprocess("sft", sft, data, [*SFT_SETS, "sft.eval_every=10"])
    sets = [*RL_SETS, f"init.checkpoint={sft / 'sft_best.msgpack'}", f"tokenizer.path={sft}"]
    ref, out = kill_and_rerun("rl", "trainer.rl.loop", data, sets, tmp_path, 0)
    assert md5_file(out / "sft_state_rl_last.msgpack") == md5_file(ref / "sft_state_rl_last.msgpack")
    got, want = (json.loads((d / "run_summary.json").read_text()) for d in (out, ref))
    assert got["curves"] == want["curves"]
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert md5_file(out / name) == md5_file(ref / name)
