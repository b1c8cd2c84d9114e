"""Tokenizers with one token per SID code, so `sid + "\\n"` is always exactly 4 tokens.

Two sources: a small byte-level BPE trained on the prompt texts (offline default), or a base HF
tokenizer (e.g. Qwen2's) to which the code tokens are added. Either way each `<a_i>`, `<b_j>`,
`<c_k>` seen in the catalog is an added token, matched before the BPE sees the text.
"""
from __future__ import annotations

import re
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from trainer.data import TOKENIZER_FILES
from trainer.data.readers import SID_RE, code_tokens, split_sid
from trainer.errors import CheckpointError, DataError
from trainer.io_utils import atomic_write_bytes, read_json
from trainer.data.prompts import CHAT_TEMPLATE, Prompt

EOS_TOKEN = "<|endoftext|>"
_CODE_RE = re.compile(r"<[abc]_\d+>")


def _code_added_tokens(codes: Sequence[str]) -> list[AddedToken]:
    # normalized=False: match the literal text whatever normalizer the base tokenizer has.
    return [AddedToken(c, single_word=False, lstrip=False, rstrip=False, normalized=False, special=False)
            for c in codes]


def train_bpe_tokenizer(texts: Iterable[str], sids: Iterable[str], vocab_size: int,
                        merge_across_spaces: bool = False) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` and add every SID code as a whole token.

    `vocab_size` counts the BPE vocabulary (256 bytes + EOS + merges); the code tokens come on top.
    `merge_across_spaces` drops the GPT-2 word split, so text repeated in every prompt (the header
    and instructions) is learned as a handful of long tokens: a from-scratch model then spends its
    compute on the history instead of on the fixed wording.
    """
    if vocab_size < 258:
        raise DataError(f"tokenizer.bpe_vocab_size must be >= 258 (256 bytes + EOS + 1 merge), got {vocab_size}")
    codes = code_tokens(sids)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=not merge_across_spaces)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    # Code tokens are added whole, so merges spent on their spelling would be wasted.
    tok.train_from_iterator((_CODE_RE.sub(" ", t) for t in texts), trainer=trainer)
    tok.add_tokens(_code_added_tokens(codes))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN)
    hf.chat_template = CHAT_TEMPLATE
    return hf


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer saved by `save_tokenizer` or shipped with an HF checkpoint directory."""
    path = Path(path)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise CheckpointError(f"{path}: no tokenizer.json or tokenizer_config.json; point tokenizer.path "
                              "at an HF checkpoint directory, or set it to null to train one")
    for name in ("tokenizer.json", "tokenizer_config.json"):  # name the damaged file, if one is
        if (path / name).is_file():
            read_json(path / name, CheckpointError, "the tokenizer file is damaged: copy it again from the "
                                                    "checkpoint directory, or rerun the step that wrote it")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot load tokenizer ({e})") from e


def add_sid_tokens(tok: PreTrainedTokenizerBase, sids: Iterable[str]) -> int:
    """Add the SIDs' code tokens to a base tokenizer (in place); returns how many were new.

    The caller must resize the model's embeddings to `len(tok)` when the count is > 0.
    """
    added = tok.add_tokens(_code_added_tokens(code_tokens(sids)))
    if tok.eos_token is None:
        raise CheckpointError("the base tokenizer has no EOS token; set eos_token in its tokenizer_config.json")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # padding positions are masked out, any id will do
    tok.chat_template = CHAT_TEMPLATE
    return added


def save_tokenizer(tok: PreTrainedTokenizerBase, out_dir: str | Path) -> list[Path]:
    """Write tokenizer.json, tokenizer_config.json and chat_template.jinja (each atomically)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.chat_template = CHAT_TEMPLATE
    written = []
    # save_pretrained writes in place; stage in a scratch dir, then rename each file into out_dir.
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".tokenizer.") as tmp:
        tok.save_pretrained(tmp)
        produced = {p.name: p for p in Path(tmp).iterdir() if p.is_file()}
        for name in TOKENIZER_FILES:
            if name not in produced:
                raise CheckpointError(f"saving the tokenizer produced no {name} (got {sorted(produced)})")
        for name, p in sorted(produced.items()):
            atomic_write_bytes(out_dir / name, p.read_bytes())
            written.append(out_dir / name)
    return written


def newline_id(tok: PreTrainedTokenizerBase) -> int:
    ids = tok.encode("\n", add_special_tokens=False)
    if len(ids) != 1:
        raise CheckpointError(f"the tokenizer splits '\\n' into {len(ids)} tokens {ids}; the response "
                              "format needs it to be one token: use a byte-level BPE tokenizer")
    return ids[0]


def missing_sid_tokens(tok: PreTrainedTokenizerBase, sids: Iterable[str]) -> list[str]:
    """The catalog's code tokens that this tokenizer does not hold as single tokens."""
    vocab = tok.get_vocab()
    return [c for c in code_tokens(sids) if c not in vocab or tok.encode(c, add_special_tokens=False) != [vocab[c]]]


def sid_tokens_error(where: str, missing: list[str], total: int) -> CheckpointError:
    shown = ", ".join(missing[:10]) + (f", ... ({len(missing) - 10} more)" if len(missing) > 10 else "")
    return CheckpointError(
        f"{where}: the tokenizer lacks {len(missing)} of the catalog's {total} SID code tokens: {shown}. "
        "Add them the way MiniOneRec does (tokenizer.add_tokens(codes); model.resize_token_embeddings("
        "len(tokenizer))), fine-tune, and save both again")


def sid_token_table(tok: PreTrainedTokenizerBase, sids: Sequence[str]) -> np.ndarray:
    """int32 [num_sids, 3]: the token ids of each SID's three codes, in `sids` order."""
    table = np.zeros((len(sids), 3), dtype=np.int32)
    for row, sid in enumerate(sids):
        if not SID_RE.fullmatch(sid):
            raise DataError(f"SID {sid!r} does not match <a_N><b_N><c_N>")
        ids = tok.encode(sid, add_special_tokens=False)
        codes = split_sid(sid)
        if len(ids) != 3 or tok.convert_ids_to_tokens(ids) != codes:
            missing = missing_sid_tokens(tok, sids)
            if missing:
                raise sid_tokens_error(f"SID {sid}", missing, len(code_tokens(sids)))
            raise CheckpointError(f"SID {sid}: its codes are not single tokens of this tokenizer "
                                  f"(got {len(ids)} ids {ids}); add them with add_sid_tokens and "
                                  "save the tokenizer again")
        table[row] = ids
    return table


def encode_prompt(tok: PreTrainedTokenizerBase, prompt: Prompt, max_len: int) -> list[int]:
    """Token ids of `prompt` as upstream's data.py builds them, keeping the last `max_len`.

    The instruction block and the user-input block are encoded separately and the ids
    concatenated, so no BPE merge crosses the boundary (upstream's `Tokenizer.encode` per block);
    the tokenizer's BOS comes first when it has one (upstream's bos=True; Qwen2 has none). The
    end holds the question and the `### Response:` line the model must continue.
    """
    if max_len < 1:
        raise DataError(f"data.max_prompt_len must be >= 1, got {max_len}")
    ids = [tok.bos_token_id] if tok.bos_token_id is not None else []
    for block in prompt:
        ids += tok.encode(block, add_special_tokens=False)
    return ids[-max_len:]
