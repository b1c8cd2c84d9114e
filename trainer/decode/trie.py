"""The SID trie as device arrays, so constrained decoding never leaves the jitted loop.

A SID is three code tokens (a, b, c). The trie has three levels of nodes:
    level 0: the root (one node); its children are the distinct first tokens `a`
    level 1: one node per distinct `a`; children are the `b` tokens seen after it
    level 2: one node per distinct (a, b) prefix; children are the `c` tokens, i.e. the SIDs
Each level is stored CSR-style: for node n, its children are entries
`start[n] .. start[n] + count[n] - 1` of the level's `token` (child token id) and `child` (node id
at the next level; at level 2 the SID's row in the catalog) arrays.

A beam only ever needs the children of its own node, so decoding gathers a fixed-width window of
`widths[level]` (the level's largest branching factor) entries per beam. That is bounded by the
codebook size (e.g. 256), not by the number of SIDs, so the per-step cost stays flat as the
catalog grows.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import jax.numpy as jnp
import numpy as np
from flax import struct

from trainer.errors import DataError

LEVELS = 3


@struct.dataclass
class SidTrie:
    start: tuple  # per level: int32 [num_nodes] offset of the node's first child
    count: tuple  # per level: int32 [num_nodes] number of children
    token: tuple  # per level: int32 [num_children] token id of each child
    child: tuple  # per level: int32 [num_children] next-level node id (level 2: SID row)
    widths: tuple = struct.field(pytree_node=False)  # max branching factor per level
    num_sids: int = struct.field(pytree_node=False)


def _check_table(sid_tokens: np.ndarray) -> np.ndarray:
    table = np.asarray(sid_tokens)
    if table.ndim != 2 or table.shape[1] != LEVELS or table.shape[0] == 0:
        raise DataError(f"SID token table must be a non-empty int array [num_sids, 3], got shape {table.shape}")
    if not np.issubdtype(table.dtype, np.integer) or (table < 0).any():
        raise DataError("SID token table must hold non-negative integer token ids")
    return table.astype(np.int64)


def build_trie_arrays(sid_tokens: np.ndarray) -> dict:
    """Host-side construction (numpy). Returns the CSR arrays per level and the widths."""
    table = _check_table(sid_tokens)
    order = np.lexsort((table[:, 2], table[:, 1], table[:, 0]))
    s = table[order]
    same = np.all(s[1:] == s[:-1], axis=1)
    if same.any():
        i = int(np.argmax(same))
        raise DataError(f"SID token rows {int(order[i])} and {int(order[i + 1])} are the same SID "
                        f"(token ids {s[i].tolist()}); pass distinct SIDs (Catalog.sids)")

    # Level 2: one node per distinct (a, b) prefix, children are the sorted rows.
    pairs, pair_first, pair_count = np.unique(s[:, :2], axis=0, return_index=True, return_counts=True)
    # Level 1: one node per distinct a, children are its (a, b) prefixes (pairs are sorted by a).
    a_vals, a_first, a_count = np.unique(pairs[:, 0], return_index=True, return_counts=True)

    levels = [
        (np.array([0]), np.array([len(a_vals)]), a_vals, np.arange(len(a_vals))),
        (a_first, a_count, pairs[:, 1], np.arange(len(pairs))),
        (pair_first, pair_count, s[:, 2], order),
    ]
    arrays = {k: [np.asarray(lv[i], np.int32) for lv in levels]
              for i, k in enumerate(("start", "count", "token", "child"))}
    arrays["widths"] = tuple(int(lv[1].max()) for lv in levels)
    arrays["num_sids"] = int(table.shape[0])
    return arrays


def build_trie(sid_tokens: np.ndarray) -> SidTrie:
    """Compile distinct SIDs (token-id triples [num_sids, 3], catalog order) into a device trie."""
    a = build_trie_arrays(sid_tokens)
    return SidTrie(
        start=tuple(jnp.asarray(x) for x in a["start"]),
        count=tuple(jnp.asarray(x) for x in a["count"]),
        token=tuple(jnp.asarray(x) for x in a["token"]),
        child=tuple(jnp.asarray(x) for x in a["child"]),
        widths=a["widths"],
        num_sids=a["num_sids"],
    )


def children(trie: SidTrie, level: int, node: jnp.ndarray):
    """Fixed-width children window of `node` (any int shape S) at `level`.

    Returns (tokens, next_nodes, valid), each of shape S + [widths[level]]; entries past the node's
    child count are marked invalid (their token/next ids point at a harmless real entry).
    """
    width = trie.widths[level]
    slot = jnp.arange(width, dtype=jnp.int32)
    valid = slot < trie.count[level][node][..., None]
    pos = jnp.where(valid, trie.start[level][node][..., None] + slot, 0)
    return trie.token[level][pos], trie.child[level][pos], valid


def hf_prefix_allowed_tokens_fn(sid_tokens: np.ndarray, prompt_len: int, newline_id: int,
                                 eos_id: int | None = None) -> Callable[[int, object], list[int]]:
    """A `prefix_allowed_tokens_fn` for transformers' `generate` (reference and benchmarks).

    Same constraint as our decoder: 3 trie-constrained code tokens, then the newline (then EOS,
    or the newline again when there is no EOS). `prompt_len` is the padded prompt length.
    """
    table = _check_table(sid_tokens)
    allowed: dict[tuple, list[int]] = {}
    for row in table.tolist():
        for depth in range(LEVELS):
            allowed.setdefault(tuple(row[:depth]), [])
            if row[depth] not in allowed[tuple(row[:depth])]:
                allowed[tuple(row[:depth])].append(row[depth])
    tail = [newline_id] if eos_id is None else [eos_id]

    def fn(batch_id: int, input_ids) -> list[int]:
        generated = tuple(int(t) for t in input_ids[prompt_len:].tolist())
        if len(generated) < LEVELS:
            return allowed.get(generated, [])
        return [newline_id] if len(generated) == LEVELS else tail

    return fn


def sid_index_lookup(sid_tokens: Sequence[Sequence[int]]) -> dict[tuple, int]:
    """(a, b, c) token ids -> SID row; used to map reference decoders' outputs back to SIDs."""
    return {tuple(int(t) for t in row): i for i, row in enumerate(np.asarray(sid_tokens).tolist())}
