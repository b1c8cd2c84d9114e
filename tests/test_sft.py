"""`python -m trainer sft`: learns the synthetic task far beyond popularity, resumes exactly after a
SIGKILL, never resumes another config's state, records the optimizer it built, selects the best
checkpoint by decoded valid HR/NDCG (also across 2 processes), and rejects bad settings clearly."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from flax import serialization

from trainer.data import readers as dt
from trainer.data import synthetic
from trainer.data import tokenizer as tk
from trainer.train import train_state
from trainer.model.checkpoint import load_into_model
from trainer.cli import main as cli_main
from trainer.config import ConfigError, load_config
from trainer.eval.evaluate import evaluate_examples
from trainer.io_utils import md5_file
from trainer.model.qwen2 import ModelConfig, build_model
from trainer.train.optim import build_optimizer

REPO = Path(__file__).resolve().parents[1]
DEMO = [REPO / "config/trainer/demo/base.yaml", REPO / "config/trainer/demo/sft.yaml"]
# Small and fast: a 1-layer model on a 24-item catalog, short prompts, evaluation every 2 steps.
SMALL = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=1", "data.max_prompt_len=48",
         "sft.steps=8", "sft.batch_size=8", "sft.eval_every=2", "sft.checkpoint_every=2", "sft.eval_samples=8",
         "eval.batch_size=8", "tokenizer.bpe_vocab_size=300",
         # Lion with a resolved warmup: the summary must show what was built, not what was typed.
         "train.optimizer.name=lion", "train.optimizer.lr_schedule.peak_value=1e-3",
         "train.optimizer.lr_schedule.warmup_ratio=0.25"]


def sft_argv(data_dir: Path, out: Path, *sets: str, log: Path | None = None) -> list[str]:
    argv = ["sft", "--data", str(data_dir), "--set", f"output_dir={out}"]
    for c in DEMO:
        argv += ["--config", str(c)]
    for s in sets:
        argv += ["--set", s]
    return argv + (["--log", str(log)] if log else [])


def summary_of(out: Path) -> dict:
    return json.loads((out / "run_summary.json").read_text())


def load_cfg(*sets: str) -> dict:
    return load_config(DEMO, list(sets))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft_small")
    synthetic.generate(root / "data", num_items=24, num_users=20, num_groups=4, seed=0)
    return root


@pytest.fixture(scope="module")
def reference(small):
    """One uninterrupted run of the small config."""
    out = small / "ref"
    assert cli_main(sft_argv(small / "data", out, *SMALL)) == 0
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- learning


@pytest.mark.slow  # 800 SFT steps: 2-3 minutes on 2 cores
def test_sft_beats_popularity_threefold_on_valid(tmp_path):
    """The demo's model and optimizer trained for 800 AdamW steps (valid loss at 400 and 800 only;
    the demo itself stops at 450 so that its RL has room) on the demo-sized synthetic data:
    constrained-beam HR@10 of sft_best on the whole valid split is at least 3x popularity's.
    (600 steps are not enough: 0.43 vs the 0.51 bar.) About 1 min on 2 idle cores."""
    data_dir = tmp_path / "data"
    synthetic.generate(data_dir, 120, 400, 8, 0)
    out = tmp_path / "run"
    assert cli_main(sft_argv(data_dir, out, "sft.steps=800", "sft.eval_every=400", "sft.checkpoint_every=1000")) == 0

    catalog = dt.load_catalog(data_dir)
    train = dt.read_split(data_dir, "train", catalog, 10)
    valid = dt.read_split(data_dir, "valid", catalog, 10)
    popularity = dt.popularity_baseline(train, valid, 10)["hr"]
    tok = tk.load_tokenizer(out)
    model = build_model(ModelConfig.from_dict(load_cfg()["model"], vocab_size=len(tok)), 0)
    load_into_model(model, out / "sft_best.msgpack")
    _, metrics = evaluate_examples(model, tok, catalog, valid, num_beams=10, batch_size=100, max_prompt_len=128,
                                   wording="sft")
    assert metrics["eval/invalid_prediction_count_all_beams"] == 0
    assert metrics["eval/hr@10"] >= 3 * popularity, (metrics["eval/hr@10"], popularity)
    assert popularity > 0.1  # the bar is not trivially low


# ----------------------------------------------------------------------------- resume


def _kill_after_checkpoint(data_dir: Path, out: Path, at_step: int, *sets: str) -> None:
    """Run SFT in a child that SIGKILLs itself right after writing the train state of `at_step`."""
    code = (
        "import os, signal, sys\n"
        "from trainer.train import train_state\n"
        "from trainer.cli import main\n"
        "save = train_state.save_async\n"
        "def save_then_die(writer, state, *args):\n"
        "    save(writer, state, *args)\n"
        "    writer.wait()  # the background write is complete\n"
        f"    if int(state['step']) == {at_step}:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "train_state.save_async = save_then_die\n"
        "sys.exit(main(sys.argv[1:]))\n")
    proc = subprocess.run([sys.executable, "-c", code] + sft_argv(data_dir, out, *sets), cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]


@pytest.fixture(scope="module")
def killed(small):
    """The small config killed with SIGKILL right after its step-4 train state (tests copy it)."""
    out = small / "killed"
    _kill_after_checkpoint(small / "data", out, 4, *SMALL)
    assert (train_state.store_for(out, load_cfg(*SMALL)).dir / "train_state.msgpack").is_file()
    assert not (out / "sft_best.msgpack").exists() and not (out / "run_summary.json").exists()
    return out


def test_sigkill_then_rerun_resumes_to_identical_best(small, reference, killed, tmp_path):
    out, other_config = tmp_path / "resumed", tmp_path / "other_config"
    shutil.copytree(killed, out)
    shutil.copytree(killed, other_config)

    log = tmp_path / "resume.log"
    assert cli_main(sft_argv(small / "data", out, *SMALL, log=log)) == 0
    assert "resuming SFT from step 4" in log.read_text()
    assert md5_file(out / "sft_best.msgpack") == md5_file(reference / "sft_best.msgpack")
    resumed, ref = summary_of(out), summary_of(reference)
    assert resumed["curves"] == ref["curves"]  # steps 2-4 kept from before the kill, 6-8 recomputed
    assert resumed["best_step"] == ref["best_step"] and resumed["best_value"] == ref["best_value"]
    assert not (out / "state").exists()  # cleared once the outputs are written

    # Another config (more steps: another LR schedule) must start fresh, not resume the state above.
    log2 = tmp_path / "other.log"
    more = [*SMALL, "sft.steps=10"]
    assert cli_main(sft_argv(small / "data", other_config, *more, log=log2)) == 0
    assert "resuming" not in log2.read_text()
    fresh = tmp_path / "fresh10"
    assert cli_main(sft_argv(small / "data", fresh, *more)) == 0
    assert md5_file(other_config / "sft_best.msgpack") == md5_file(fresh / "sft_best.msgpack")
    assert summary_of(other_config)["curves"] == summary_of(fresh)["curves"]


def test_summary_records_the_optimizer_built(reference, killed):
    cfg = load_cfg(*SMALL)
    summary = summary_of(reference)
    _, schedule, desc = build_optimizer(cfg["train"]["optimizer"], 8)
    assert summary["optimizer"] == json.loads(json.dumps(desc))
    assert summary["optimizer"]["name"] == "lion"
    assert summary["optimizer"]["lr_schedule"]["warmup_steps"] == 2  # 0.25 x 8, resolved
    # The logged learning rate is the schedule's value at each evaluated step (the one that ran).
    assert [c["lr"] for c in summary["curves"]] == pytest.approx([float(schedule(c["step"] - 1))
                                                                  for c in summary["curves"]])
    # The optimizer state that was trained is Lion's (one moment), not the config default's.
    raw = serialization.msgpack_restore(train_state.store_for(killed, cfg).read("train_state.msgpack"))
    text = json.dumps(_key_tree(raw["opt_state"]))
    assert "mu" in text and "nu" not in text


def test_dropout_trains_differently_and_reproducibly(small, reference, tmp_path):
    """sft.dropout reaches the training pass (the curves leave the reference's) and, the masks
    coming from the seed and the step, two runs of the same config write the same best."""
    runs = [tmp_path / "a", tmp_path / "b"]
    for out in runs:
        assert cli_main(sft_argv(small / "data", out, *SMALL, "sft.dropout=0.3")) == 0
    curves = [summary_of(out)["curves"] for out in runs]
    assert curves[0] == curves[1]
    assert md5_file(runs[0] / "sft_best.msgpack") == md5_file(runs[1] / "sft_best.msgpack")
    ref = summary_of(reference)["curves"]
    assert [c["train/loss"] for c in curves[0]] != pytest.approx([c["train/loss"] for c in ref])


def _key_tree(tree) -> list:
    if isinstance(tree, dict):
        return [[k, _key_tree(v)] for k, v in tree.items()]
    return []


# ----------------------------------------------------------------------------- best by decoded metrics


@pytest.mark.parametrize("metric", ["valid/hr@10", "valid/ndcg@5"])
def test_best_checkpoint_selected_by_decoded_metric(small, tmp_path, metric):
    out = tmp_path / "run"
    assert cli_main(sft_argv(small / "data", out, *SMALL, f"sft.best_metric={metric}")) == 0
    summary = summary_of(out)
    values = [c[metric] for c in summary["curves"]]
    k = int(metric.split("@")[1])
    assert all(f"valid/hr@{k}" in c and f"valid/ndcg@{k}" in c and "valid/loss" in c for c in summary["curves"])
    assert summary["best_value"] == max(values)
    assert summary["best_step"] == summary["curves"][values.index(max(values))]["step"]  # first of equals
    # The saved checkpoint decodes to exactly that value (same prompts, beams and batch shape).
    catalog = dt.load_catalog(small / "data")
    valid = dt.read_split(small / "data", "valid", catalog, 10)[:8]
    tok = tk.load_tokenizer(out)
    model = build_model(ModelConfig.from_dict(load_cfg(*SMALL)["model"], vocab_size=len(tok)), 0)
    load_into_model(model, out / "sft_best.msgpack")
    _, m = evaluate_examples(model, tok, catalog, valid, num_beams=k, batch_size=8, max_prompt_len=48,
                             wording="sft")
    assert m[metric.replace("valid/", "eval/")] == summary["best_value"]


def test_decoded_best_metric_two_processes(small, tmp_path):
    """2 processes: every one joins the param gather, process 0 decodes and broadcasts; the follower
    (in an empty directory) finishes too and the best checkpoint matches the broadcast value."""
    out = tmp_path / "out"
    env = {**os.environ, "TRAINER_COORDINATOR": f"127.0.0.1:{_free_port()}", "TRAINER_NUM_PROCESSES": "2",
           "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    empty = tmp_path / "follower"
    empty.mkdir()
    follower = subprocess.Popen([sys.executable, "-m", "trainer", "follow"], cwd=empty,
                                env={**env, "TRAINER_PROCESS_ID": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    # fsdp=2: parameters are sharded across the two processes, so decoding needs the real all-gather.
    argv = sft_argv(small / "data", out, *SMALL, "sft.steps=4", "sft.best_metric=valid/hr@10", "mesh.fsdp=2")
    main = subprocess.run([sys.executable, "-m", "trainer"] + argv, cwd=REPO, env={**env, "TRAINER_PROCESS_ID": "0"},
                          capture_output=True, text=True, timeout=240)
    follower_log = follower.communicate(timeout=60)[0].decode()
    assert main.returncode == 0, main.stderr[-2000:]
    assert follower.returncode == 0, follower_log[-2000:]
    assert list(empty.iterdir()) == []
    summary = summary_of(out)
    assert summary["process_count"] == 2
    values = [c["valid/hr@10"] for c in summary["curves"]]
    assert [c["step"] for c in summary["curves"]] == [2, 4] and summary["best_value"] == max(values)
    catalog = dt.load_catalog(small / "data")
    tok = tk.load_tokenizer(out)
    model = build_model(ModelConfig.from_dict(load_cfg(*SMALL)["model"], vocab_size=len(tok)), 0)
    load_into_model(model, out / "sft_best.msgpack")
    _, m = evaluate_examples(model, tok, catalog, dt.read_split(small / "data", "valid", catalog, 10)[:8],
                             num_beams=10, batch_size=8, max_prompt_len=48, wording="sft")
    assert m["eval/hr@10"] == summary["best_value"]


# ----------------------------------------------------------------------------- errors


def test_batch_larger_than_data_is_a_config_error(small, tmp_path, capsys):
    out = tmp_path / "o"
    with pytest.raises(ConfigError, match=r"sft.batch_size=100000 exceeds the \d+ training sequences"):
        from trainer.train import sft
        sft.run(load_cfg(f"output_dir={out}", *SMALL, "sft.batch_size=100000"), str(small / "data"))
    assert cli_main(sft_argv(small / "data", out, *SMALL, "sft.batch_size=100000")) == 2
    assert "sft.batch_size=100000" in capsys.readouterr().err
    assert not (out / "sft_best.msgpack").exists()


@pytest.mark.parametrize("setting, message", [
    ("sft.best_metric=valid/mrr", r"sft.best_metric: 'valid/mrr' is not supported"),
    ("sft.best_metric=valid/hr@7", r"valid/hr@K or valid/ndcg@K with K in \[1, 3, 5, 10, 20, 50\]"),
    ("sft.best_metric=valid/hr@50", r"sft.best_metric=50 but the catalog has only 24 distinct SIDs"),
    ("sft.eval_every=0", r"'sft.eval_every' must be a number > 0, got 0$"),
    ("sft.dropout=1", r"'sft.dropout' must be a number in \[0, 1\), got 1$"),
])
def test_bad_settings_are_config_errors(small, tmp_path, setting, message):
    from trainer.train import sft

    with pytest.raises(ConfigError, match=message):
        sft.run(load_cfg(f"output_dir={tmp_path / 'o'}", *SMALL, setting), str(small / "data"))
