"""bench/scale_plan.py compiles the preset's programs for the 16- and 8-chip meshes, as a user runs it.

The model shape is shrunk (the vocabulary stays the real one: Qwen2.5 + the Office SID tokens, which
does not divide 16), so the compiles take seconds; the 1.5B shape is what the README quotes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "../shared/minionerec-data/data/Amazon"
SMALL = ["model.hidden_size=64", "model.intermediate_size=128", "model.num_layers=2", "model.num_heads=4",
         "model.num_kv_heads=2"]


def test_plan_lines_and_fsdp_splits_the_batch(tmp_path):
    argv = [sys.executable, str(REPO / "bench/scale_plan.py"), "--programs", "rl_update,eval_beam",
            "--data-root", str(DATA.resolve() if DATA.exists() else "/work/shared/minionerec-data/data/Amazon")]
    for s in SMALL:
        argv += ["--set", s]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the script asks for 16 devices itself
    out = subprocess.run(argv, capture_output=True, text=True, timeout=900, env=dict(env, PYTHONPATH=str(REPO)))
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [json.loads(l) for l in out.stdout.splitlines()]
    header, update, beam, proj = lines
    assert header["vocab_size"] % 16 != 0 and header["num_sids"] == 3444
    assert (update["program"], update["devices"], beam["program"], beam["devices"]) == ("rl_update", 16, "eval_beam", 8)
    for line in (update, beam):
        assert line["peak_bytes"] == line["argument_bytes"] + line["output_bytes"] - line["alias_bytes"] + line["temp_bytes"]
        assert line["fits_32gib"] and line["flops"] > 0 and line["bytes_accessed"] > 0 and line["roofline_s"] > 0
        # the cost is the unrolled twin's: both layers counted, where the scanned program counts one
        assert line["cost_from"] == "unrolled" and line["flops"] > line["scan_flops"]
    # Donation: the params and optimizer state come back in the same buffers.
    assert update["alias_bytes"] > 0.9 * update["output_bytes"]
    # FSDP keeps the 512 sequences split 32 per chip: each chip does 1/16 of the model FLOPs
    # (replicating the batch, as the hidden-sharded embedding would make XLA do, is 16x).
    assert 0.5 < update["flops"] / update["analytic_flops"] < 2.0
    assert proj["calls"] == -(-4866 // beam["rows"]) and proj["mllm_jax_measured_s"] == 360.0
