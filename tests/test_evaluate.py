"""`python -m trainer eval` end to end on a tiny synthetic dataset: files, metrics, exactness,
errors, and a 2-process run whose follower works in an empty directory."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from flax import nnx

from trainer.data import readers as dt
from trainer.data import synthetic
from trainer.data import tokenizer as tk
from trainer.data.batching import left_pad
from trainer.model.checkpoint import save_params
from trainer.cli import main as cli_main
from trainer.decode.beam import sequence_logprobs
from trainer.eval.evaluate import evaluate_examples
from trainer.io_utils import md5_file
from trainer.eval.metrics import compute_metrics, load_predictions, load_valid_sids
from trainer.model.qwen2 import ModelConfig, build_model, params_dict
from trainer.data.prompts import sequential_prompt

REPO = Path(__file__).resolve().parents[1]
MODEL = dict(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2)
ROWS = 12


def random_model(vocab: int):
    model = build_model(ModelConfig(vocab_size=vocab, **MODEL), seed=0)
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    nnx.update(model, jax.tree.unflatten(treedef, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]))
    return model


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    synthetic.generate(root / "data", num_items=40, num_users=30, num_groups=4, seed=0)
    catalog = dt.load_catalog(root / "data")
    train = dt.read_split(root / "data", "train", catalog, 10)
    tok = tk.train_bpe_tokenizer([sequential_prompt(e.history_sids).text for e in train], catalog.sids, 300)
    tk.save_tokenizer(tok, root / "tok")
    model = random_model(len(tok))
    save_params(root / "ck.msgpack", params_dict(model))
    config = root / "eval.yaml"
    config.write_text(yaml.safe_dump({"model": MODEL, "eval": {"max_samples": ROWS, "batch_size": 5}}))
    return {"root": root, "catalog": catalog, "tok": tok, "model": model, "config": config}


def eval_argv(b, out, *sets):
    r = b["root"]
    argv = ["eval", "--config", str(b["config"]), "--data", str(r / "data"), "--checkpoint", str(r / "ck.msgpack"),
            "--tokenizer", str(r / "tok"), "--out", str(out)]
    for s in sets:
        argv += ["--set", s]
    return argv


@pytest.fixture(scope="module")
def full_run(bundle):
    """One CLI run with as many beams as SIDs (40): every prediction list is a full ranking."""
    out = bundle["root"] / "out"
    assert cli_main(eval_argv(bundle, out, f"eval.num_beams={len(bundle['catalog'])}")) == 0
    return out


def test_eval_writes_calc_compatible_files(bundle, full_run):
    catalog, n_sids = bundle["catalog"], len(bundle["catalog"])
    records = load_predictions(full_run / "eval_predictions.json")
    test = dt.read_split(bundle["root"] / "data", "test", catalog, 10)[:ROWS]
    assert len(records) == ROWS
    for rec, ex in zip(records, test):  # split order, MiniOneRec fields
        assert rec["input"] == sequential_prompt(ex.history_sids, "minionerec").text  # eval.prompt default
        assert rec["output"] == ex.target_sid + "\n"
        assert len(rec["predict"]) == n_sids and set(rec["predict"]) == set(catalog.sids)
    summary = json.loads((full_run / "run_summary.json").read_text())
    valid = load_valid_sids(bundle["root"] / "data" / "info.txt")
    expect = compute_metrics(records, valid)
    assert {k: summary[k] for k in expect} == expect
    assert [k for k in summary if k.startswith("eval/hr@")] == ["eval/hr@1", "eval/hr@3", "eval/hr@5",
                                                                 "eval/hr@10", "eval/hr@20"]
    assert summary["eval/hr@20"] > 0 and summary["eval/invalid_prediction_count"] == 0
    assert summary["num_beams"] == n_sids and summary["n"] == ROWS and summary["process_count"] == 1
    assert summary["checkpoint_md5"] == md5_file(bundle["root"] / "ck.msgpack")
    assert summary["samples_per_s"] > 0 and summary["config"]["eval"]["num_beams"] == n_sids
    assert sum(summary["decode_length_buckets"].values()) == ROWS
    assert summary["decode_compiles"] <= len(summary["decode_length_buckets"])
    assert not list(full_run.glob(".*tmp"))  # atomic writes leave no temporaries


def test_eval_ranking_is_exact(bundle, full_run):
    """With beams = SIDs the predictions are every SID sorted by teacher-forced log-prob."""
    tok, catalog = bundle["tok"], bundle["catalog"]
    records = load_predictions(full_run / "eval_predictions.json")[:2]
    test = dt.read_split(bundle["root"] / "data", "test", catalog, 10)[:2]
    prompts = [sequential_prompt(ex.history_sids, "minionerec") for ex in test]
    ids, mask = left_pad([tk.encode_prompt(tok, p, 128) for p in prompts], tok.pad_token_id)
    table = tk.sid_token_table(tok, catalog.sids)
    scores = np.asarray(sequence_logprobs(bundle["model"], ids, mask, table, tk.newline_id(tok),
                                         tok.eos_token_id)).sum(-1)
    for rec, row in zip(records, scores):
        assert rec["predict"] == [catalog.sids[j] for j in np.argsort(-row, kind="stable")]


def test_evaluate_examples_matches_cli(bundle):
    test = dt.read_split(bundle["root"] / "data", "test", bundle["catalog"], 10)[:ROWS]
    records, metrics = evaluate_examples(bundle["model"], bundle["tok"], bundle["catalog"], test, num_beams=5,
                                         batch_size=5, max_prompt_len=128, wording="minionerec")
    out = bundle["root"] / "out5"
    assert cli_main(eval_argv(bundle, out, "eval.num_beams=5")) == 0
    assert records == load_predictions(out / "eval_predictions.json")
    assert metrics["eval/hr@5"] == json.loads((out / "run_summary.json").read_text())["eval/hr@5"]
    assert all(len(set(r["predict"])) == 5 for r in records)


def test_eval_errors_name_the_problem(bundle, tmp_path, capsys):
    assert cli_main(eval_argv(bundle, tmp_path / "o", "eval.num_beams=41")) == 2
    assert "eval.num_beams=41 but the catalog has only 40 distinct SIDs" in capsys.readouterr().err
    argv = eval_argv(bundle, tmp_path / "o", "eval.num_beams=5")
    argv[argv.index("--checkpoint") + 1] = str(tmp_path / "missing.msgpack")
    assert cli_main(argv) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_follower_in_empty_dir(bundle, tmp_path):
    """2 processes x 2 local CPU devices: rows split over processes, batches over devices."""
    out = tmp_path / "out"
    env = {**os.environ, "TRAINER_COORDINATOR": f"127.0.0.1:{_free_port()}", "TRAINER_NUM_PROCESSES": "2",
           "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    empty = tmp_path / "follower"
    empty.mkdir()
    follower = subprocess.Popen([sys.executable, "-m", "trainer", "follow"], cwd=empty,
                                env={**env, "TRAINER_PROCESS_ID": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    main = subprocess.run([sys.executable, "-m", "trainer"] + eval_argv(bundle, out, "eval.num_beams=5"),
                          cwd=REPO, env={**env, "TRAINER_PROCESS_ID": "0"}, capture_output=True, text=True, timeout=120)
    follower_log = follower.communicate(timeout=60)[0].decode()
    assert main.returncode == 0, main.stderr[-2000:]
    assert follower.returncode == 0, follower_log[-2000:]
    assert list(empty.iterdir()) == []  # the follower read and wrote nothing
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["process_count"] == 2 and summary["device_count"] == 4
    single = bundle["root"] / "out5"
    if not single.exists():
        assert cli_main(eval_argv(bundle, single, "eval.num_beams=5")) == 0
    assert load_predictions(out / "eval_predictions.json") == load_predictions(single / "eval_predictions.json")


def test_length_buckets_keep_prompt_order_and_compile_once_per_bucket(bundle):
    """Prompts of 3 lengths land in 2 buckets (16, 48) of the fixed ladder; results come back in
    prompt order and equal decoding each prompt alone."""
    from trainer.data.batching import length_bucket
    from trainer.decode.trie import build_trie
    from trainer.eval.evaluate import predict_sid_rows

    tok, catalog = bundle["tok"], bundle["catalog"]
    assert [length_bucket(n) for n in (1, 16, 17, 33, 100, 160)] == [16, 16, 24, 48, 128, 192]
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, 200, size=n).tolist() for n in (40, 9, 12, 45, 10)]
    trie = build_trie(tk.sid_token_table(tok, catalog.sids))
    args = (tok.pad_token_id, trie, 5, tk.newline_id(tok), tok.eos_token_id)
    stats: dict = {}
    rows, scores = predict_sid_rows(bundle["model"], prompts, *args, batch_size=2, stats=stats)
    assert stats["length_buckets"] == {16: 3, 48: 2} and stats["compiles"] <= 2
    for i, p in enumerate(prompts):
        alone_rows, alone_scores = predict_sid_rows(bundle["model"], [p], *args, batch_size=2)
        np.testing.assert_array_equal(rows[i], alone_rows[0])
        np.testing.assert_allclose(scores[i], alone_scores[0], atol=1e-5)
