"""Constrained decoding: the on-device SID trie, beam search, sampling, sequence scoring."""
