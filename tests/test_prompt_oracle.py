"""The project's SFT and eval prompts equal upstream MiniOneRec's, as token ids.

Oracle: upstream's data.py dataset classes (SidSFTDataset, SidItemFeatDataset, EvalSidDataset),
imported from ../shared and driven with the same tokenizer on the same real Office rows. Three
tokenizers: the project's BPE (what SFT builds), and base checkpoints' tokenizers from its
vocabulary: GPT-2-style byte level, and transformers' Qwen2Tokenizer (Qwen2's pre-tokenizer and
NFC normaliser, as with a real Qwen2.5 checkpoint).
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.upstream_oracle import AMAZON, need_amazon, upstream_module
from trainer.data import readers as dt
from trainer.data.prepare_data import import_minionerec, minionerec_sources
from trainer.data.tokenizer import save_tokenizer
from trainer.config import load_config
from trainer.eval.evaluate import encode_prompts
from trainer.train import sft

ROWS = 48
NAME = "Office_Products"


@pytest.fixture(scope="module")
def upstream():
    return upstream_module("data")


@pytest.fixture(scope="module")
def office(tmp_path_factory):
    """A dataset dir with the first ROWS valid/test rows of the real Office data (full catalog)."""
    import pandas as pd

    src = minionerec_sources(AMAZON, NAME)
    need_amazon(*(str(p.relative_to(AMAZON)) for k, p in src.items() if k != "train"))
    root = tmp_path_factory.mktemp("amazon")
    for key, path in src.items():
        dest = minionerec_sources(root, NAME)[key]
        dest.parent.mkdir(parents=True, exist_ok=True)
        if key in ("valid", "test"):
            pd.read_csv(path).head(ROWS).to_csv(dest, index=False)
        elif key != "train":
            dest.write_bytes(path.read_bytes())
    out = tmp_path_factory.mktemp("office")
    import_minionerec(out, root, NAME, train_from="valid")
    return out


def _cfg(tmp_path, data_dir, tokenizer_path=None) -> dict:
    over = [f"data.dir={data_dir}", "data.max_prompt_len=4096", "tokenizer.bpe_vocab_size=600",
            f"output_dir={tmp_path}"]
    if tokenizer_path:
        over.append(f"tokenizer.path={tokenizer_path}")
    return load_config([], over)


def _base_tokenizer(bpe, kind: str, out_dir):
    """A "base checkpoint" tokenizer from the BPE's vocabulary, without SID tokens (SFT adds them).

    It also gets the "\n\n" merge every pretrained byte-level vocabulary has (Qwen2's id 271):
    a GPT-2-style pre-tokenizer then encodes "...?\n\n" + "### User Input" differently from the
    joined text, so the test sees whether the blocks are encoded apart as upstream does.
    kind: `gpt2` (tokenizers' ByteLevel pre-tokenizer) or `qwen2` (transformers' Qwen2Tokenizer).
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast, Qwen2Tokenizer

    spec = json.loads(bpe.backend_tokenizer.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["special"]]
    vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]
    vocab["\u010a\u010a"] = len(vocab) + len(spec["added_tokens"]) - 1
    merges.append(["\u010a", "\u010a"])
    if kind == "qwen2":
        tok = Qwen2Tokenizer(vocab=vocab, merges=[tuple(m) for m in merges])
    else:
        tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                      eos_token=bpe.eos_token, pad_token=bpe.eos_token)
    save_tokenizer(tok, out_dir)
    return out_dir


def _rows(ids: np.ndarray, mask: np.ndarray) -> list[list[int]]:
    return [r[m.astype(bool)].tolist() for r, m in zip(ids, mask)]


@pytest.fixture(scope="module")
def bpe(office, tmp_path_factory):
    """What `python -m trainer sft` encodes (sft.prepare_data) with the BPE it trains."""
    tmp = tmp_path_factory.mktemp("bpe")
    return sft.prepare_data(_cfg(tmp, office), str(office))


def _from_base(kind, office, bpe, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(kind)
    data = sft.prepare_data(_cfg(tmp, office, _base_tokenizer(bpe["tokenizer"], kind, tmp / "base")), str(office))
    assert data["tokenizer"].convert_ids_to_tokens(data["tokenizer"].encode("\n\n")) == ["\u010a\u010a"]
    return data


@pytest.fixture(scope="module")
def gpt2(office, bpe, tmp_path_factory):
    return _from_base("gpt2", office, bpe, tmp_path_factory)


@pytest.fixture(scope="module")
def qwen2(office, bpe, tmp_path_factory):
    data = _from_base("qwen2", office, bpe, tmp_path_factory)
    assert type(data["tokenizer"]).__name__ == "Qwen2Tokenizer"
    return data


@pytest.fixture(params=["bpe", "gpt2", "qwen2"])
def prepared(request):
    return request.getfixturevalue(request.param)


def test_sft_sequences_equal_upstream(upstream, office, prepared):
    """Sequential rows (SidSFTDataset) then title -> SID rows (SidItemFeatDataset), prompt + response."""
    tok = prepared["tokenizer"]
    ours = _rows(prepared["train_ids"], prepared["train_mask"])
    seq = upstream.SidSFTDataset(str(office / "train.csv"), tok, max_len=4096)
    n_seq = len(seq)
    assert ours[:n_seq] == [r["input_ids"] for r in seq.get_inputs_list()]
    # A seeded sample of upstream's item rows (all 6,886 take seconds to tokenize).
    feat = upstream.SidItemFeatDataset(str(office / "item.json"), str(office / "index.json"), tok,
                                       max_len=4096, sample=600)
    theirs = [r["input_ids"] for r, d in zip(feat.get_inputs_list(), feat.data) if d["task"] == "title2sid"]
    assert len(ours) - n_seq == len(feat.title2sid) > 3000 and len(theirs) > 200
    # Upstream's SidItemFeatDataset.generate_prompt fills `### Response:\n` with the SID too, so its
    # prompt already holds the answer (label -100) before the trained SID + "\n" + EOS. The project
    # leaves the response line open; everything else is identical.
    echoed = {tuple(r[:-5] + r[-5:-2] + r[-5:]) for r in ours[n_seq:]}
    assert all(tuple(r) in echoed for r in theirs)


def test_eval_prompts_equal_upstream(upstream, office, prepared, request):
    tok = prepared["tokenizer"]
    catalog = dt.load_catalog(office)
    examples = dt.read_split(office, "test", catalog, max_history=10)
    texts, ours = encode_prompts(tok, examples, None, "minionerec")
    theirs = upstream.EvalSidDataset(str(office / "test.csv"), tok, test=True)
    assert len(ours) == ROWS and ours == [r["input_ids"] for r in theirs.get_inputs_list()]
    # The SFT wording on the same rows is upstream's SidSFTDataset prompt (its test mode).
    _, ours_sft = encode_prompts(tok, examples, None, "sft")
    sft_theirs = upstream.SidSFTDataset(str(office / "test.csv"), tok, test=True)
    assert ours_sft == [r["input_ids"] for r in sft_theirs.get_inputs_list()]
    assert ours != ours_sft
    joined = [tok.encode(t, add_special_tokens=False) for t in texts]
    assert (joined != ours) == (request.node.callspec.params["prepared"] == "gpt2")  # the test can tell
