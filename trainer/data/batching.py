"""Token arrays for training and decoding: left-padded prompts with the response at the end."""
from __future__ import annotations

import math

import numpy as np

PROMPT_LENGTH_BUCKET = 8  # prompt lengths round up to a multiple of this: fewer shapes to compile


def bucketed_length(seqs: list[list[int]]) -> int:
    """The padded length for a set of prompts: the longest, rounded up to the bucket."""
    return math.ceil(max(len(s) for s in seqs) / PROMPT_LENGTH_BUCKET) * PROMPT_LENGTH_BUCKET


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
