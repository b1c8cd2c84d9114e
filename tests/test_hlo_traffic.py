"""bench/hlo_traffic.py: the HBM traffic the scale plan's roofline uses, read from compiled HLO."""
from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from hlo_traffic import hbm_bytes, ranked_bytes  # noqa: E402

X = jax.ShapeDtypeStruct((64, 256), jnp.float32)
KB = 1024


def xla_bytes(compiled) -> float:
    cost = compiled.cost_analysis()
    return (cost[0] if isinstance(cost, (list, tuple)) else cost)["bytes accessed"]


def scan_program(layers: int):
    def layer_stack(x, ws):  # a layer scan over stacked weights, as Qwen2ForCausalLM._scan runs
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)[0]
    return jax.jit(layer_stack).lower(X, jax.ShapeDtypeStruct((layers, 256, 256), jnp.float32)).compile()


def test_loop_free_program_counts_what_xla_counts():
    compiled = jax.jit(lambda x, w: jnp.tanh(x @ w)).lower(X, jax.ShapeDtypeStruct((256, 256), jnp.float32)).compile()
    assert ranked_bytes(compiled.as_text())[1] == xla_bytes(compiled)


def test_scan_counts_every_trip_and_only_the_layer_it_reads():
    two, eight = (ranked_bytes(scan_program(n).as_text())[1] for n in (2, 8))
    # XLA's own count is the same for 2 and 8 layers (the loop body once); the walk scales with depth
    assert xla_bytes(scan_program(2)) == xla_bytes(scan_program(8))
    assert 3.8 < eight / two <= 4.0
    # each trip reads its 256 KB layer, never the whole 2 MB stack
    per_trip = eight / 8
    assert 256 * KB < per_trip < 2 * 1024 * KB


def test_vmem_arrays_are_not_hbm_traffic():
    assert hbm_bytes("f32[8,128]{1,0:T(8,128)}") == 4096
    assert hbm_bytes("f32[8,128]{1,0:T(8,128)S(1)}") == 0
    assert hbm_bytes("(bf16[4]{0}, s32[2]{0:S(1)})") == 8
