"""The Snakemake workflow end to end, in scratch copies of the repository, with the default profile.

One shrunk demo run (synthetic data, tiny model, 4-process rl_train/sft through the TPU executor's
local backend, the local GCS emulator) is shared by the session (tests/workflow_helpers.py); tests
that rerun something work on clones of it. The real-data run uses the Office files in
/work/shared/minionerec-data when present and is skipped otherwise.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from tests.workflow_helpers import (EMULATOR_ROOT, SMALL_OVERRIDES, clone_run, describe, finished_rules,
                                    graph_artifacts, make_workflow, output_of, planned_rules, read_json,
                                    shared_demo_run, snakemake, snakemake_env, stop_emulator)
from tests.upstream_oracle import UPSTREAM_CALC
from trainer.ops import gcs_emulator

ALL_RULES = ["prepare_data", "sft", "rl_train", "gcs_copy", "eval_copy", "evaluate", "evaluate", "crosscheck",
             "crosscheck", "metrics"]
AMAZON = Path("/work/shared/minionerec-data/data/Amazon")
PIN = "81b4ba9811cfb152cf161f1c486fe516510d081e"  # config/config.yaml minionerec_download.commit
OFFICE_VALID = AMAZON / "valid" / "Office_Products_5_2016-10-2018-11.csv"


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, request):
    return shared_demo_run(tmp_path_factory, request)


@pytest.fixture
def demo_clone(demo_run, tmp_path):
    """A private copy of the completed demo run, with its own GCS emulator (stopped afterwards)."""
    wd = clone_run(demo_run[0], tmp_path / "wf")
    yield wd
    stop_emulator(wd / EMULATOR_ROOT)


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def mtimes(wd: Path, pattern: str) -> dict[str, int]:
    return {str(p.relative_to(wd)): p.stat().st_mtime_ns for p in sorted(wd.glob(pattern)) if p.is_file()}


def popularity_hr10_by_hand(wd: Path, ds: str) -> float:
    """HR@10 of the 10 most frequent train.csv targets on the evaluated rows, counted here."""
    top10 = {sid for sid, _ in Counter(pd.read_csv(wd / f"data/{ds}/train.csv")["item_sid"]).most_common(10)}
    rows = read_json(wd / f"results/{ds}/rl/eval_predictions.json")
    return sum(r["output"].strip() in top10 for r in rows) / len(rows)


def assert_complete_run(wd: Path, ds: str, proc: subprocess.CompletedProcess) -> dict:
    """Every artifact of the graph exists, each rule ran once, the checks passed; returns metrics."""
    missing = [a for a in graph_artifacts(ds) if not (wd / a).is_file()]
    assert not missing, f"missing artifacts {missing}\n{describe(proc, wd)}"
    assert finished_rules(output_of(proc)) == Counter(ALL_RULES)

    rl_run = read_json(wd / f"runs/{ds}/rl/run_summary.json")
    assert rl_run["process_count"] == 4, "rl_train must run as 4 jax processes (default profile: v6e-16 = 4 hosts)"
    assert "runs on slice 'train': v6e-16, 4 hosts" in output_of(proc)

    metrics = read_json(wd / f"results/{ds}/metrics.json")
    assert metrics["dataset"] == ds
    assert metrics["crosscheck"]["passed"] is True
    assert metrics["invalid_prediction_count"] == 0
    assert metrics["sft_best"]["invalid_prediction_count"] == 0
    for model in ("rl", "sft"):
        check = read_json(wd / f"results/{ds}/{model}/calc_crosscheck.json")
        assert check["passed"] is True and check["invalid_count"] == 0, check
    if UPSTREAM_CALC.is_file():  # CI: upstream's own calc.py ran, from the shared copy, verified by blob id
        assert metrics["crosscheck"]["tool"] == f"upstream:calc.py@{PIN}", metrics["crosscheck"]
        assert metrics["crosscheck"]["upstream_commit"] == PIN
        assert check["calc_source"] == f"local copy {UPSTREAM_CALC}"
    assert metrics["rl_training"]["process_count"] == 4
    # every RL - SFT delta with its paired bootstrap interval; the popularity floor on the same rows
    for key, d in metrics["rl_minus_sft"].items():
        assert d["delta"] == pytest.approx(metrics[key] - metrics["sft_best"][key], abs=1e-12)
        assert d["ci95"][0] <= d["delta"] <= d["ci95"][1] and d["excludes_zero"] == (d["ci95"][0] > 0 or d["ci95"][1] < 0)
    assert metrics["bootstrap"]["resamples"] == 1000
    assert metrics["popularity_floor"]["fit_on"] == "train"
    assert metrics["popularity_floor"]["hr@10"] == pytest.approx(popularity_hr10_by_hand(wd, ds), abs=1e-12)
    assert 0.0 <= metrics["hr@10"] <= 1.0 and 0.0 <= metrics["ndcg@10"] <= metrics["hr@10"]

    # The checkpoint evaluated is byte-for-byte the uploaded rl_last, via GCS and the eval copy.
    receipt = read_json(wd / f"handoff/{ds}/gcs_copy.json")
    by_name = {f["name"]: f for f in receipt["files"]}
    ckpt_md5 = md5(wd / f"runs/{ds}/rl/sft_state_rl_last.msgpack")
    assert by_name["sft_state_rl_last.msgpack"]["md5"] == ckpt_md5
    assert md5(wd / f"workdir/checkpoints/{ds}/sft_state_rl_last.msgpack") == ckpt_md5
    assert read_json(wd / f"results/{ds}/rl/run_summary.json")["checkpoint_md5"] == ckpt_md5
    assert metrics["provenance"]["eval_checkpoint_md5"] == ckpt_md5
    for png in ("rl_curves.png", "rl_vs_sft.png"):
        assert (wd / f"results/{ds}/plots/{png}").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return metrics


def gcloud_ls(wd: Path, uri: str) -> str:
    """`gcloud storage ls URI` against the run's GCS emulator."""
    if not shutil.which("gcloud"):
        pytest.skip("gcloud CLI not installed")
    with gcs_emulator.serving(wd / EMULATOR_ROOT) as endpoint:  # held for the listing, then stopped
        env = {**snakemake_env(), **gcs_emulator.client_env(endpoint), "CLOUDSDK_CONFIG": str(wd / ".gcloud")}
        proc = subprocess.run(["gcloud", "storage", "ls", uri], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


# ------------------------------------------------------------------------------------ end to end


def test_demo_end_to_end_with_default_profile(demo_run):
    wd, proc = demo_run
    metrics = assert_complete_run(wd, "demo", proc)
    assert metrics["n"] == 12 and metrics["num_beams"] == 10  # the shrunk eval overrides reached eval

    receipt = read_json(wd / "handoff/demo/gcs_copy.json")
    assert receipt["emulator"] is True and receipt["uri"] == "gs://sidrl-artifacts/rl_from_sft_best/demo"
    listed = gcloud_ls(wd, receipt["uri"] + "/").split()
    assert sorted(listed) == sorted(f["uri"] for f in receipt["files"])
    assert {u.rsplit("/", 1)[1] for u in listed} == {"sft_state_rl_last.msgpack", "run_summary.json", "tokenizer.json",
                                                      "tokenizer_config.json", "chat_template.jinja"}


@pytest.mark.skipif(not OFFICE_VALID.is_file(), reason="MiniOneRec Office data not present")
def test_office_real_data_end_to_end(tmp_path):
    """The real Office files (valid split standing in for train), tiny model and sizes."""
    wd = make_workflow(tmp_path / "wf")
    shrink = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=1", "tokenizer.bpe_vocab_size=512"]
    overrides = {"sft": shrink + SMALL_OVERRIDES["sft"], "rl": shrink + SMALL_OVERRIDES["rl"],
                 "eval": shrink + SMALL_OVERRIDES["eval"]}
    try:
        proc = snakemake(wd, "results/office/metrics.json", overrides=overrides,
                         config={"data_root": str(AMAZON), "train_from": "valid"})
        assert proc.returncode == 0, describe(proc, wd)
        metrics = assert_complete_run(wd, "office", proc)
        assert metrics["n"] == 12
        # The data are MiniOneRec's own files, byte for byte (calc.py compares against them).
        assert (wd / "data/office/test.csv").read_bytes() == (AMAZON / "test/Office_Products_5_2016-10-2018-11.csv").read_bytes()
        assert (wd / "data/office/train.csv").read_bytes() == OFFICE_VALID.read_bytes()
        receipt = read_json(wd / "handoff/office/gcs_copy.json")
        assert sorted(gcloud_ls(wd, receipt["uri"] + "/").split()) == sorted(f["uri"] for f in receipt["files"])
    finally:
        stop_emulator(wd / EMULATOR_ROOT)


# ------------------------------------------------------------------------------------ reruns


def test_immediate_rerun_does_nothing(demo_run):
    wd, _ = demo_run
    before = {a: (wd / a).stat().st_mtime_ns for a in graph_artifacts("demo")}
    proc = snakemake(wd, "results/demo/metrics.json")
    assert proc.returncode == 0, describe(proc)
    assert "Nothing to be done" in output_of(proc)
    assert not finished_rules(output_of(proc))
    assert {a: (wd / a).stat().st_mtime_ns for a in graph_artifacts("demo")} == before


def test_num_beams_change_reruns_only_evaluation(demo_run):
    wd, _ = demo_run
    changed = {**SMALL_OVERRIDES, "eval": [*SMALL_OVERRIDES["eval"], "eval.num_beams=5"]}
    proc = snakemake(wd, "-n", "results/demo/metrics.json", overrides=changed)
    assert proc.returncode == 0, describe(proc)
    assert planned_rules(output_of(proc)) == Counter(
        ["evaluate", "evaluate", "crosscheck", "crosscheck", "metrics"])
    reasons = re.findall(r"Job \d+: evaluate demo/(\w+).*\nReason: (.*)", output_of(proc))
    assert sorted(m for m, _ in reasons) == ["rl", "sft"]
    assert all(why.startswith("Params have changed") and "eval.num_beams=5" in why for _, why in reasons)


def test_rl_option_change_reruns_rl_and_downstream_only(demo_clone):
    wd = demo_clone
    changed = {**SMALL_OVERRIDES, "rl": [*SMALL_OVERRIDES["rl"], "rl.kl_coef=0.1"]}
    downstream = Counter(["rl_train", "gcs_copy", "eval_copy", "evaluate", "crosscheck", "metrics"])
    plan = snakemake(wd, "-n", "results/demo/metrics.json", overrides=changed)
    assert plan.returncode == 0, describe(plan)
    assert planned_rules(output_of(plan)) == downstream

    untouched = mtimes(wd, "data/demo/*") | mtimes(wd, "runs/demo/sft/*") | mtimes(wd, "results/demo/sft/*")
    # A new rl_last must not silently replace the uploaded one: gcs_copy refuses to clobber it...
    first = snakemake(wd, "results/demo/metrics.json", overrides=changed)
    assert first.returncode != 0
    text = describe(first, wd)
    assert finished_rules(output_of(first)) == Counter(["rl_train"]), text
    # The new run_summary.json (it records the option) differs always; the weights only when the
    # tiny demo's rollouts earned a reward, so the refusal may name either file.
    assert re.search(r"gs://sidrl-artifacts/rl_from_sft_best/demo/\S+ already exists with different content", text), text
    assert "handoff.overwrite: true" in text
    assert read_json(wd / "runs/demo/rl/run_summary.json")["config"]["rl"]["kl_coef"] == 0.1
    # ...until the user allows it; then only what follows rl_train runs.
    second = snakemake(wd, "results/demo/metrics.json", overrides=changed, config={"handoff": {"overwrite": True}})
    assert second.returncode == 0, describe(second, wd)
    ran = finished_rules(output_of(first)) + finished_rules(output_of(second))
    assert ran == downstream
    assert (mtimes(wd, "data/demo/*") | mtimes(wd, "runs/demo/sft/*") | mtimes(wd, "results/demo/sft/*")) == untouched
    new_ckpt = md5(wd / "runs/demo/rl/sft_state_rl_last.msgpack")
    assert md5(wd / "workdir/checkpoints/demo/sft_state_rl_last.msgpack") == new_ckpt
    assert read_json(wd / "results/demo/metrics.json")["provenance"]["eval_checkpoint_md5"] == new_ckpt
    assert read_json(wd / "runs/demo/rl/run_summary.json")["config"]["rl"]["kl_coef"] == 0.1


def test_deleted_eval_copy_is_downloaded_again_without_retraining(demo_clone):
    """Snakemake (>= 7.7) does not rebuild a deleted intermediate while everything after it is up
    to date: the results stay valid. Asking for the copy downloads it again: only eval_copy runs."""
    wd = demo_clone
    copy = wd / "workdir/checkpoints/demo/sft_state_rl_last.msgpack"
    copy.unlink()
    plan = snakemake(wd, "-n", "results/demo/metrics.json")
    assert plan.returncode == 0, describe(plan)
    assert "Nothing to be done" in output_of(plan)

    trained = mtimes(wd, "runs/demo/**/*") | mtimes(wd, "handoff/demo/*") | mtimes(wd, "data/demo/*") | \
        mtimes(wd, "results/demo/**/*")
    proc = snakemake(wd, str(copy.relative_to(wd)))
    assert proc.returncode == 0, describe(proc, wd)
    assert finished_rules(output_of(proc)) == Counter(["eval_copy"])
    assert "downloaded:" in (wd / "logs/eval_copy/demo.log").read_text()
    receipt = read_json(wd / "handoff/demo/gcs_copy.json")
    ckpt = next(f for f in receipt["files"] if f["name"] == copy.name)
    assert md5(copy) == ckpt["md5"]
    assert (mtimes(wd, "runs/demo/**/*") | mtimes(wd, "handoff/demo/*") | mtimes(wd, "data/demo/*") |
            mtimes(wd, "results/demo/**/*")) == trained


def test_dry_run_plans_office_with_placement(tmp_path):
    """`snakemake -n` plans the real-data graph (nothing exists yet) and says where each job runs."""
    wd = make_workflow(tmp_path / "wf")
    proc = snakemake(wd, "-n", "results/office/metrics.json")
    assert proc.returncode == 0, describe(proc)
    text = output_of(proc)
    assert planned_rules(text) == Counter(ALL_RULES)
    assert "rl_train office: runs on slice 'train': v6e-16, 4 hosts" in text
    assert "evaluate office/rl: runs on slice 'eval': v6e-8, 1 host" in text
    assert "evaluate office/sft: runs on slice 'eval': v6e-8, 1 host" in text
    assert not (wd / "data").exists() and not (wd / "runs").exists()
    assert os.listdir(wd / "config")  # the copy itself is intact
