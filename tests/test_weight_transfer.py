"""Weights cross processes array by array into their sharding (distributed.broadcast_arrays) and
come back to process 0 alone (checkpoint.host_tree_on_main): 4 jax.distributed processes on
loopback, 2 CPU devices each, params FSDP-sharded over all 8 devices."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent / "scripts" / "weight_transfer.py"
REPO = Path(__file__).resolve().parents[1]


def test_arrays_land_in_their_sharding_and_return_to_process_0_only(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {k: v for k, v in os.environ.items() if not k.startswith("TRAINER_")}
    procs = []
    for i in range(4):
        env = {**base, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "TRAINER_COORDINATOR": f"127.0.0.1:{port}",
               "TRAINER_NUM_PROCESSES": "4", "TRAINER_PROCESS_ID": str(i),
               "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
        procs.append(subprocess.Popen([sys.executable, str(SCRIPT)], cwd=tmp_path, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, "\n".join(err[-2000:] for _, err in outs)
    seen = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    for row in seen:
        assert row["local_shards_match"] is True
        assert row["dtypes"] == ["int32", "bfloat16", "float32", "float32"]  # leaves in key order, dtypes kept
        # the embedding is split over fsdp=8 (what parallel.param_spec decides); scalar and vector replicated
        assert [row["sharded"][i] for i in (0, 1, 3)] == [False, True, False]
    assert seen[0]["back"] is True and all(r["back"] is None for r in seen[1:])
