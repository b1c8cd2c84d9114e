"""The real path, shrunk: the user brings a transformers-saved bf16 Qwen2 checkpoint with the SID
tokens added the MiniOneRec way (`sft_import: {demo: DIR}`), and the graph runs from it to
results/demo/metrics.json, RL on the 4-process train slice. The trainer configs set no model
shape for RL or eval: the model (untied head, rope_theta 1e6, bf16) flows from the checkpoint.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

pytest.importorskip("torch")

from tests.hf_helpers import save_sid_checkpoint, small_base_tokenizer  # noqa: E402
from tests.workflow_helpers import (EMULATOR_ROOT, SMALL_OVERRIDES, describe, finished_rules, graph_artifacts, make_workflow,  # noqa: E402
                                    output_of, read_json, snakemake, stop_emulator)
from trainer.data.readers import code_tokens, load_catalog  # noqa: E402
from trainer.data.synthetic import generate  # noqa: E402
from trainer.model import checkpoint  # noqa: E402

RULES = ["prepare_data", "sft_import", "evaluate", "crosscheck", "rl_train", "gcs_copy", "eval_copy",
         "evaluate", "crosscheck", "metrics"]


def test_sft_import_of_a_transformers_bf16_checkpoint_to_metrics(tmp_path):
    wd = make_workflow(tmp_path / "wf")
    cfg = read_json_yaml(wd / "config/config.yaml")["datasets"]["demo"]["synthetic"]
    generate(tmp_path / "catalog", cfg["num_items"], cfg["num_users"], cfg["num_groups"], cfg["seed"])  # same SIDs
    codes = code_tokens(load_catalog(tmp_path / "catalog").sids)
    hf = save_sid_checkpoint(tmp_path / "hf", small_base_tokenizer(), codes, hidden=32, intermediate=64,
                             rope_theta=1e6, tied=False, dtype="bfloat16")
    try:
        # the demo's RL and eval shrunk as elsewhere: this test is about the import path, not RL's length
        small = {stage: SMALL_OVERRIDES[stage] for stage in ("rl", "eval")}
        proc = snakemake(wd, "results/demo/metrics.json", overrides=small, config={"sft_import": {"demo": str(hf)}})
        assert proc.returncode == 0, describe(proc, wd)
        missing = [a for a in graph_artifacts("demo") if not (wd / a).is_file()]
        assert not missing, f"missing artifacts {missing}\n{describe(proc, wd)}"
        assert finished_rules(output_of(proc)) == Counter(RULES)
    finally:
        stop_emulator(wd / EMULATOR_ROOT)

    imported = read_json(wd / "runs/demo/sft/run_summary.json")
    assert imported["kind"] == "import" and imported["source"] == str(hf) and imported["dtype"] == "bfloat16"
    assert imported["chat_template_generated"] is True
    model = imported["model"]
    assert (model["hidden_size"], model["tie_word_embeddings"], model["rope_theta"]) == (32, False, 1e6)

    rl = read_json(wd / "runs/demo/rl/run_summary.json")
    assert rl["process_count"] == 4 and rl["model"] == model
    assert {"backend", "device_kind", "device_count"} <= rl.keys()
    tree, stored = checkpoint.read_checkpoint(wd / "runs/demo/rl/sft_state_rl_last.msgpack")
    assert stored == model and str(np.asarray(tree["lm_head"]["kernel"]).dtype) == "bfloat16"
    for which in ("rl", "sft"):
        summary = read_json(wd / f"results/demo/{which}/run_summary.json")
        assert summary["model"] == model and summary["eval/invalid_prediction_count"] == 0
    metrics = read_json(wd / "results/demo/metrics.json")
    assert metrics["crosscheck"]["passed"] is True and metrics["rl_training"]["process_count"] == 4


def read_json_yaml(path):
    import yaml

    return yaml.safe_load(path.read_text())
