"""Token arrays for training and decoding: left-padded prompts with the response at the end."""
from __future__ import annotations

import numpy as np

SMALLEST_BUCKET = 16


def length_bucket(n: int) -> int:
    """The padded length for a prompt of n tokens, from one fixed ladder for every run:
    16, 24, 32, 48, 64, 96, 128, 192, 256, ... (padding stays under 50%, and a whole split
    compiles one decode program per rung it uses, a handful at most)."""
    b = SMALLEST_BUCKET
    while b < n:
        b = b * 3 // 2 if b & (b - 1) == 0 else b * 4 // 3
    return b


def bucketed_length(seqs: list[list[int]]) -> int:
    """One padded length for a set of prompts: the rung of the longest."""
    return length_bucket(max(len(s) for s in seqs))


def left_pad(seqs: list[list[int]], pad_id: int, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Stack sequences right-aligned: ids [N, L] int32 and mask [N, L] (1 = real token)."""
    length = length or max(len(s) for s in seqs)
    ids = np.full((len(seqs), length), pad_id, np.int32)
    mask = np.zeros((len(seqs), length), np.int32)
    for i, s in enumerate(seqs):
        s = s[-length:]
        if s:
            ids[i, length - len(s):] = s
            mask[i, length - len(s):] = 1
    return ids, mask


# A SID answer's tokens: a, b, c, newline, EOS. SFT trains all of them and the RL update scores
# all of them, as upstream's completion mask keeps every token through the first EOS.
SID_ANSWER_TOKENS = 5


def response_ids(sid_table: np.ndarray, sid_index: np.ndarray, newline_id: int, eos_id: int | None) -> np.ndarray:
    """[N, 4] (a, b, c, newline) or [N, 5] with EOS appended (SFT trains the stop too)."""
    cols = [sid_table[sid_index], np.full((len(sid_index), 1), newline_id, np.int32)]
    if eos_id is not None:
        cols.append(np.full((len(sid_index), 1), eos_id, np.int32))
    return np.concatenate(cols, axis=1).astype(np.int32)


def prompt_plus_response(prompt_ids: np.ndarray, prompt_mask: np.ndarray, resp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ids = np.concatenate([prompt_ids, resp], axis=1)
    mask = np.concatenate([prompt_mask, np.ones_like(resp)], axis=1)
    return ids, mask
