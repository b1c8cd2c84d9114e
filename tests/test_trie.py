"""SID trie: CSR levels reproduce the catalog exactly; widths are the max branching factors."""
from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from trainer.errors import DataError
from trainer.decode.trie import build_trie, build_trie_arrays, children, hf_prefix_allowed_tokens_fn, sid_index_lookup


def random_table(n: int, seed: int = 0, a=(10, 16), b=(20, 26), c=(30, 40)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows: set[tuple] = set()
    while len(rows) < n:
        rows.add((int(rng.integers(*a)), int(rng.integers(*b)), int(rng.integers(*c))))
    table = np.array(sorted(rows), np.int32)
    rng.shuffle(table)  # catalog order is not sorted order
    return table


def walk(trie) -> dict[tuple, int]:
    """Enumerate every root-to-leaf path through the device arrays: (a, b, c) -> SID row."""
    found = {}
    tok0, nxt0, ok0 = (np.asarray(x) for x in children(trie, 0, jnp.int32(0)))
    for a, n1 in zip(tok0[ok0], nxt0[ok0]):
        tok1, nxt1, ok1 = (np.asarray(x) for x in children(trie, 1, jnp.int32(n1)))
        for b, n2 in zip(tok1[ok1], nxt1[ok1]):
            tok2, nxt2, ok2 = (np.asarray(x) for x in children(trie, 2, jnp.int32(n2)))
            for c, row in zip(tok2[ok2], nxt2[ok2]):
                assert (int(a), int(b), int(c)) not in found
                found[(int(a), int(b), int(c))] = int(row)
    return found


def test_trie_enumerates_exactly_the_catalog():
    table = random_table(60)
    trie = build_trie(table)
    assert trie.num_sids == 60
    assert walk(trie) == {tuple(r): i for i, r in enumerate(table.tolist())}


def test_widths_are_max_branching():
    table = random_table(80, seed=3)
    trie = build_trie(table)
    a_vals = set(table[:, 0].tolist())
    per_a = max(len({tuple(r[:2]) for r in table.tolist() if r[0] == a}) for a in a_vals)
    per_ab = max(sum(1 for r in table.tolist() if tuple(r[:2]) == ab) for ab in {tuple(r[:2]) for r in table.tolist()})
    assert trie.widths == (len(a_vals), per_a, per_ab)


def test_widths_do_not_grow_with_catalog_size():
    # Every (a, b, c) over an 8 x 8 x 8 codebook: widths stay at the codebook size.
    full = np.array(list(itertools.product(range(8), range(8, 16), range(16, 24))), np.int32)
    assert build_trie_arrays(full)["widths"] == (8, 8, 8)
    assert build_trie_arrays(full[:40])["widths"][0] == 1  # the first 40 share a = 0


def test_duplicate_and_malformed_tables_are_rejected():
    table = random_table(10)
    with pytest.raises(DataError, match="same SID"):
        build_trie(np.concatenate([table, table[3:4]]))
    with pytest.raises(DataError, match=r"\[num_sids, 3\]"):
        build_trie(table[:, :2])
    with pytest.raises(DataError, match="non-empty"):
        build_trie(np.zeros((0, 3), np.int32))


def test_hf_prefix_fn_follows_the_trie():
    table = random_table(30, seed=5)
    fn = hf_prefix_allowed_tokens_fn(table, prompt_len=2, newline_id=99, eos_id=98)
    prompt = [1, 2]
    assert sorted(fn(0, torch.tensor(prompt))) == sorted(set(table[:, 0].tolist()))
    a, b, c = table[0].tolist()
    assert sorted(fn(0, torch.tensor(prompt + [a]))) == sorted({r[1] for r in table.tolist() if r[0] == a})
    assert sorted(fn(0, torch.tensor(prompt + [a, b]))) == sorted(
        r[2] for r in table.tolist() if r[:2] == [a, b])
    assert fn(0, torch.tensor(prompt + [a, b, c])) == [99]
    assert fn(0, torch.tensor(prompt + [a, b, c, 99])) == [98]
    assert sid_index_lookup(table)[(a, b, c)] == 0
