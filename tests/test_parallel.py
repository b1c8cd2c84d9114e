"""Data parallel and FSDP meshes compute the same training steps as one device."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trainer.config import ConfigError
from trainer.train.parallel import param_spec

SCRIPT = Path(__file__).parent / "scripts" / "mesh_equivalence.py"


def run_on_mesh(devices: int, data: int, fsdp: int, dropout: float = 0.0) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, str(SCRIPT), str(data), str(fsdp), str(dropout)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_fsdp_and_data_parallel_match_a_single_device():
    single = run_on_mesh(1, 1, 1)
    dp = run_on_mesh(4, 4, 1)
    fsdp = run_on_mesh(4, 2, 2)
    assert fsdp["emb_spec"] == "P('fsdp', None)"  # params really are sharded
    for other in (dp, fsdp):
        np.testing.assert_allclose(other["sums"], single["sums"], rtol=1e-4, atol=1e-5)  # reduction order only
        assert other["loss"] == pytest.approx(single["loss"], rel=1e-5)


def test_dropout_masks_do_not_depend_on_the_mesh():
    """sft.dropout on the workflow's sharded slice trains what it trains on one device: the masks
    come from the key and the global shape, not from how the rows are split."""
    single = run_on_mesh(1, 1, 1, dropout=0.2)
    assert single["loss"] != pytest.approx(run_on_mesh(1, 1, 1)["loss"], rel=1e-3)  # dropout is on
    for other in (run_on_mesh(4, 4, 1, dropout=0.2), run_on_mesh(4, 2, 2, dropout=0.2)):
        np.testing.assert_allclose(other["sums"], single["sums"], rtol=1e-4, atol=1e-5)
        assert other["loss"] == pytest.approx(single["loss"], rel=1e-5)


def test_param_spec_shards_the_first_divisible_dimension():
    assert param_spec((64, 32), 2) == param_spec((64, 33), 2)  # dim 0 divides
    assert str(param_spec((63, 32), 2)) == "P(None, 'fsdp')"
    assert str(param_spec((7,), 2)) == "P()"  # vectors stay replicated


def test_mesh_must_cover_the_devices():
    from trainer.train.parallel import make_mesh

    with pytest.raises(ConfigError, match="mesh.data=3"):
        make_mesh({"data": 3, "fsdp": 1})


def test_fsdp_minus_one_shards_over_every_device():
    from trainer.train.parallel import make_mesh

    mesh = make_mesh({"data": 1, "fsdp": -1})
    assert mesh.shape == {"data": 1, "fsdp": len(__import__("jax").devices())}
    with pytest.raises(ConfigError, match="both -1"):
        make_mesh({"data": -1, "fsdp": -1})
