"""Hugging Face checkpoints saved by `transformers`, shaped like MiniOneRec's SFT checkpoints.

MiniOneRec starts from a Qwen2.5 base, adds the SID code tokens to its tokenizer with
`tokenizer.add_tokens(codes)` and grows the model with `model.resize_token_embeddings(len(tokenizer))`,
then saves both with `save_pretrained`. `save_sid_checkpoint` does the same with a random-weight
Qwen2ForCausalLM. There is no HF hub here, so the base tokenizer is built locally: a small
byte-level BPE trained on prompt-like text (`small_base_tokenizer`) or one with Qwen2.5's exact
size (`qwen25_sized_tokenizer`: 151,643 BPE tokens + 22 special tokens = 151,665, the length of
the real Qwen2.5 tokenizer, whose added tokens then start at id 151,665).
"""
from __future__ import annotations

from pathlib import Path

QWEN25_BPE_TOKENS = 151_643  # Qwen2TokenizerFast vocab_size (hiyouga/LlamaFactory#8255)
QWEN25_LEN = 151_665  # len(tokenizer): new tokens get ids from 151,665 on (QwenLM/Qwen3-VL#1455)
EOS = "<|endoftext|>"
TEXTS = ["The user has interacted with items <a_1><b_2><c_3> in chronological order. Can you predict the next "
         "possible item that the user may expect?\n### Response:\n", "Below is an instruction that describes a "
         "task. Write a response that appropriately completes the request.\n\n### Instruction:\n"] * 8


def _fast(tok, eos: str = EOS):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=eos)


def small_base_tokenizer(vocab_size: int = 300):
    """A byte-level BPE without any SID code token (a stand-in for a base LM's tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS, trainer=trainer)
    return _fast(tok)


def qwen25_sized_tokenizer():
    """Byte-level BPE with exactly Qwen2.5's 151,643 tokens (256 bytes, then every byte pair, then
    byte triples, as merges) plus 22 special tokens: len() == 151,665 like the real one."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    merges = []
    for a in alphabet:
        for b in alphabet:
            merges.append((a, b))
            vocab[a + b] = len(vocab)
    pairs = [a + b for a in alphabet for b in alphabet]
    for ab in pairs:
        for c in alphabet:
            if len(vocab) == QWEN25_BPE_TOKENS:
                break
            merges.append((ab, c))
            vocab[ab + c] = len(vocab)
        if len(vocab) == QWEN25_BPE_TOKENS:
            break
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    specials = [EOS, "<|im_start|>", "<|im_end|>"] + [f"<|reserved_{i}|>" for i in range(19)]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    fast = _fast(tok)
    assert len(fast) == QWEN25_LEN, len(fast)
    return fast


def save_sid_checkpoint(out: Path, base_tok, codes: list[str], *, hidden: int = 32, intermediate: int = 64,
                        layers: int = 2, heads: int = 4, kv_heads: int = 2, rope_theta: float = 1e6,
                        tied: bool = False, dtype: str = "bfloat16", max_shard_size: str | None = None,
                        seed: int = 0) -> Path:
    """A transformers-saved Qwen2 checkpoint with `codes` added the MiniOneRec way; returns `out`."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(vocab_size=len(base_tok), hidden_size=hidden, intermediate_size=intermediate,
                                   num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                   rope_theta=rope_theta, tie_word_embeddings=tied, max_position_embeddings=512,
                                   eos_token_id=base_tok.eos_token_id, pad_token_id=base_tok.pad_token_id)
    model = transformers.Qwen2ForCausalLM(cfg)
    added = base_tok.add_tokens(list(codes))
    assert added == len(codes), f"{len(codes) - added} codes were already tokens"
    model.resize_token_embeddings(len(base_tok))
    model.to(getattr(torch, dtype)).save_pretrained(out, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    base_tok.save_pretrained(out)
    return Path(out)
