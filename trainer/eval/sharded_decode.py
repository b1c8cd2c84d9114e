"""Constrained beam search with the training mesh's own (possibly FSDP-sharded) params.

In-training validation (SFT and RL) calls this on every process with the same prompts: each batch
is one global array split over the mesh's batch axes and decoded by one SPMD program, so no
process ever holds a gathered copy of the params. The SID rows come back to every process.
"""
from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh

from trainer.data.batching import bucketed_length, left_pad
from trainer.decode.beam import check_num_beams, constrained_beam_search
from trainer.decode.trie import SidTrie
from trainer.train import parallel


def global_trie(trie: SidTrie, mesh: Mesh) -> SidTrie:
    """The trie replicated over the mesh (a global array, as the sharded params are)."""
    rep = parallel.replicated(mesh)
    return jax.tree.map(lambda x: parallel.place(x, rep), trie)


def predict_sid_rows_sharded(model, prompts: list[list[int]], pad_id: int, trie: SidTrie, num_beams: int,
                             newline_id: int, eos_id: int, batch_size: int, mesh: Mesh) -> np.ndarray:
    """int32 [N, num_beams] SID rows, best first, on every process. `trie` from global_trie();
    `batch_size` prompts per call, rounded up to a multiple of the mesh size."""
    check_num_beams(trie, num_beams)
    n = len(prompts)
    per_call = math.ceil(max(1, batch_size) / mesh.size) * mesh.size
    length = bucketed_length(prompts)
    sharding = parallel.batch_sharding(mesh)
    rows = []
    for start in range(0, n, per_call):
        chunk = prompts[start:start + per_call]
        chunk = chunk + [chunk[0]] * (per_call - len(chunk))  # pad the last batch; dropped below
        ids, mask = left_pad(chunk, pad_id, length)
        sid_rows, _ = constrained_beam_search(model, parallel.place(ids, sharding), parallel.place(mask, sharding),
                                              trie, num_beams, newline_id, eos_id)
        rows.append(parallel.to_host(sid_rows))
    return np.concatenate(rows)[:n].astype(np.int32)
