"""The Qwen2.5-1.5B preset (config/trainer/qwen2.5-1.5b) runs on the 4-process slice.

Smoke settings: the preset's files as a user passes them, with only the model shape overridden to
the tiny test model (and small batches), so the preset's code paths run on 2 CPU cores: bf16
compute over fp32 master weights, FSDP over every device, donated train state, and with kl_coef 0
no reference model. The 1.5B shape itself is compiled without weights by bench/scale_plan.py.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from tests.rl_helpers import REPO, launch, load_params, max_param_diff, rl_base, summary, wait_all  # noqa: F401

pytestmark = pytest.mark.skipif(os.environ.get("SKIP_MULTIPROCESS") == "1", reason="SKIP_MULTIPROCESS=1")

PRESET = REPO / "config/trainer/qwen2.5-1.5b"
TINY = ("model.hidden_size=64", "model.intermediate_size=128", "model.num_layers=2", "model.num_heads=4",
        "model.num_kv_heads=2", "model.rope_theta=10000.0",
        "model.max_position_embeddings=512")  # the rl_base SFT checkpoint's model (RL checks it)
TIMEOUT_S = 600
DONATION_FAILED = "donated buffers were not usable"  # JAX's warning when a donation is refused


def _argv(stage: str, data, *sets: str) -> list[str]:
    argv = [stage, "--config", str(PRESET / "base.yaml"), "--config", str(PRESET / f"{stage}.yaml"),
            "--data", str(data)]
    for s in TINY + sets:
        argv += ["--set", s]
    return argv


def _run4(tmp_path, argv) -> str:
    followers = [tmp_path / f"f{i}" for i in range(1, 4)]
    for d in followers:
        d.mkdir()
    logs = tmp_path / "logs"
    wait_all(launch(argv, tmp_path, followers, logs), TIMEOUT_S, logs)
    return "\n".join((logs / f"p{i}.log").read_text() for i in range(4))


def test_preset_shape_is_qwen25_1p5b():
    from trainer.config import load_config
    from trainer.model.qwen2 import ModelConfig

    cfg = load_config([PRESET / "base.yaml", PRESET / "rl.yaml"], stage="rl")
    m = ModelConfig.from_dict(cfg["model"], vocab_size=151_665 + 3 * 256)
    assert (m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim, m.intermediate_size) == \
        (1536, 28, 12, 2, 128, 8960)
    assert m.rope_theta == 1e6 and m.tie_word_embeddings and (m.dtype, m.param_dtype) == ("bfloat16", "float32")
    # upstream's update batches: rl.sh 64 completions x 8 processes x 2 accumulated / 16 beams = 64
    # prompts; sft.sh --batch_size 1024 (tests/test_recipes.py parses both scripts)
    assert (cfg["rollout"]["batch_size"], cfg["rollout"]["n"], cfg["eval"]["num_beams"]) == (64, 16, 50)
    sft_cfg = load_config([PRESET / "base.yaml", PRESET / "sft.yaml"], stage="sft")
    assert sft_cfg["sft"]["batch_size"] == 1024
    assert cfg["mesh"] == {"data": 1, "fsdp": -1}
    assert cfg["recipe"] == "minionerec" and cfg["rl"]["kl_coef"] == 1e-3  # upstream's RL recipe (rl.sh)


def test_preset_rl_runs_on_four_processes(tmp_path, rl_base):  # noqa: F811
    out = tmp_path / "out"
    log = _run4(tmp_path, _argv("rl", rl_base["data"], "epochs=null", "steps=2", "rollout.batch_size=4", "rollout.n=4",
                                "rl.kl_coef=0.0", "checkpoint_every_steps=0", "eval_every_steps=0",
                                f"output_dir={out}", f"init.checkpoint={rl_base['checkpoint']}",
                                f"tokenizer.path={rl_base['sft']}"))
    s = summary(out)
    assert s["process_count"] == 4 and s["mesh"] == {"data": 1, "fsdp": 4}
    assert s["params_sharded"] > s["params_replicated"]  # every matrix sharded; only norms/biases replicated
    assert s["config"]["model"]["dtype"] == "bfloat16"
    assert s["reference_model"] is False and s["old_logprob_pass"] is False  # kl 0, on-policy
    assert DONATION_FAILED not in log
    final, init = load_params(out / "sft_state_rl_last.msgpack"), load_params(rl_base["checkpoint"])
    assert all(v.dtype == np.float32 for v in final.values())  # master weights stay fp32
    assert max_param_diff(final, init) > 0  # the 2 updates moved them
    assert "kl" not in s["curves"][-1]


def test_preset_sft_runs_on_four_processes(tmp_path, rl_base):  # noqa: F811
    out = tmp_path / "out"
    log = _run4(tmp_path, _argv("sft", rl_base["data"], "sft.epochs=null", "data.category=office products", "sft.steps=2", "sft.batch_size=8", "sft.eval_every=2",
                                "sft.checkpoint_every=2", "sft.eval_samples=8", f"output_dir={out}"))
    s = summary(out)
    assert s["process_count"] == 4 and s["mesh"] == {"data": 1, "fsdp": 4} and s["params_sharded"] > 0
    assert s["config"]["model"]["dtype"] == "bfloat16" and np.isfinite(s["best_value"])
    assert DONATION_FAILED not in log
