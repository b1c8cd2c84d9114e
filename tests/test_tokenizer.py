"""Tokenizer: SID codes as whole tokens, save/load round trip, chat template, prompt format."""
from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from trainer.data import readers as data
from trainer.data import prompts
from trainer.data import synthetic
from trainer.data import tokenizer as T
from trainer.errors import CheckpointError


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("syn")
    synthetic.generate(d, num_items=40, num_users=40, num_groups=4, seed=0)
    cat = data.load_catalog(d)
    rows = data.read_split(d, "train", cat, max_history=10)
    texts = [prompts.sequential_prompt(r.history_sids).text + prompts.response_text(r.target_sid) for r in rows]
    texts += [prompts.alignment_prompt(t).text + prompts.response_text(s) for t, s in data.load_alignment_pairs(cat)]
    return cat, rows, texts


@pytest.fixture(scope="module")
def saved(corpus, tmp_path_factory):
    cat, _, texts = corpus
    tok = T.train_bpe_tokenizer(texts, cat.sids, vocab_size=320)
    out = tmp_path_factory.mktemp("tok")
    T.save_tokenizer(tok, out)
    return tok, out


def test_prompt_wording_matches_minionerec():
    header = ("Below is an instruction that describes a task, paired with an input that provides further "
              "context. Write a response that appropriately completes the request. \n\n")
    instruction = header + "### Instruction:\nCan you predict the next possible item that the user may expect?\n\n"
    history = ["<a_1><b_2><c_3>", "<a_4><b_5><c_6>"]
    assert prompts.sequential_prompt(history) == (
        instruction, "### User Input: \nThe user has interacted with items <a_1><b_2><c_3>, <a_4><b_5><c_6> in "
        "chronological order. Can you predict the next possible item that the user may expect?\n\n"
        "### Response:\n")
    assert prompts.sequential_prompt(history, "minionerec") == (
        instruction, "### User Input: \nCan you predict the next possible item the user may expect, given the "
        "following chronological interaction history: <a_1><b_2><c_3>, <a_4><b_5><c_6>\n\n### Response:\n")
    assert prompts.alignment_prompt("Red pen").text == (
        header + "### Instruction:\nAnswer the question about item identification.\n\n"
        "### User Input: \nWhich item has the title: Red pen?\n\n### Response:\n")
    with pytest.raises(ValueError, match="prompt wording 'upstream'"):
        prompts.sequential_prompt(history, "upstream")
    assert prompts.response_text("<a_1><b_2><c_3>") == "<a_1><b_2><c_3>\n"


def test_round_trip_through_auto_tokenizer(corpus, saved):
    cat, rows, texts = corpus
    tok, out = saved
    assert sorted(p.name for p in out.iterdir()) == sorted(T.TOKENIZER_FILES)  # no staging dir left
    loaded = AutoTokenizer.from_pretrained(str(out))
    for text in texts[:20]:
        assert loaded.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
    assert loaded.eos_token == loaded.pad_token == "<|endoftext|>"
    assert loaded.decode(loaded.encode(texts[0], add_special_tokens=False)) == texts[0]
    assert len(loaded) == len(tok) == 320 + len(data.code_tokens(cat.sids))


def test_sid_plus_newline_is_four_tokens(corpus, saved):
    cat, _, _ = corpus
    tok = T.load_tokenizer(saved[1])
    nl = T.newline_id(tok)
    table = T.sid_token_table(tok, cat.sids)
    assert table.dtype == np.int32 and table.shape == (len(cat.sids), 3)
    for row, sid in zip(table, cat.sids):
        assert tok.encode(prompts.response_text(sid), add_special_tokens=False) == [*row.tolist(), nl]
        assert tok.convert_ids_to_tokens(row.tolist()) == data.split_sid(sid)
    # The response follows the prompt without merging across the boundary.
    prompt = prompts.sequential_prompt(cat.sids[:2]).text
    ids = tok.encode(prompt + prompts.response_text(cat.sids[5]), add_special_tokens=False)
    assert ids[-4:] == [*table[5].tolist(), nl]
    assert ids[:-4] == tok.encode(prompt, add_special_tokens=False)
    assert len(set(table[:, 0].tolist())) == len({s[: s.index("<b_")] for s in cat.sids})


def test_sid_token_table_names_unknown_sid(saved):
    with pytest.raises(CheckpointError, match=r"SID <a_999><b_0><c_0>: the tokenizer lacks 1 of the catalog's \d+ SID code tokens: <a_999>\. Add them"):
        T.sid_token_table(saved[0], ["<a_0><b_0><c_0>", "<a_999><b_0><c_0>"])


def test_add_sid_tokens_to_base_tokenizer(corpus, tmp_path):
    cat, _, texts = corpus
    base = T.train_bpe_tokenizer(texts[:50], [], vocab_size=300)  # a "base" model's tokenizer: no SIDs
    T.save_tokenizer(base, tmp_path / "base")
    tok = T.load_tokenizer(tmp_path / "base")
    with pytest.raises(CheckpointError, match=rf"SID {cat.sids[0]}"):
        T.sid_token_table(tok, cat.sids)
    before = len(tok)
    added = T.add_sid_tokens(tok, cat.sids)
    assert added == len(data.code_tokens(cat.sids)) and len(tok) == before + added
    assert T.add_sid_tokens(tok, cat.sids) == 0  # idempotent
    table = T.sid_token_table(tok, cat.sids)
    assert table.min() >= before
    T.save_tokenizer(tok, tmp_path / "with_sids")
    again = AutoTokenizer.from_pretrained(str(tmp_path / "with_sids"))
    assert np.array_equal(T.sid_token_table(again, cat.sids), table)


def test_chat_template_renders_the_prompts(saved):
    tok, out = saved
    assert (out / "chat_template.jinja").read_text() == prompts.CHAT_TEMPLATE
    loaded = AutoTokenizer.from_pretrained(str(out))
    history = ["<a_0><b_1><c_2>", "<a_1><b_0><c_0>"]
    render = lambda msgs, **kw: loaded.apply_chat_template(msgs, tokenize=False, **kw)  # noqa: E731
    assert render(prompts.sequential_messages(history), add_generation_prompt=True) == \
        prompts.sequential_prompt(history).text
    assert render(prompts.alignment_messages("Group0 gadget 2"), add_generation_prompt=True) == \
        prompts.alignment_prompt("Group0 gadget 2").text
    sft = prompts.sequential_messages(history) + [{"role": "assistant", "content": prompts.response_text(history[0])}]
    assert render(sft) == prompts.sequential_prompt(history).text + history[0] + "\n<|endoftext|>"


def test_encode_prompt_keeps_the_end(saved):
    tok = saved[0]
    prompt = prompts.sequential_prompt(["<a_0><b_0><c_0>"] * 10)
    full = T.encode_prompt(tok, prompt, 10_000)
    # Blocks encoded apart, ids concatenated (upstream data.py): no merge across the boundary.
    assert full == sum((tok.encode(b, add_special_tokens=False) for b in prompt), []) and len(full) > 16
    tail = T.encode_prompt(tok, prompt, 16)
    assert tail == full[-16:]
    assert tok.decode(tail).endswith("### Response:\n")


def test_newline_must_be_one_token():
    # A whitespace-splitting word-level tokenizer drops "\n" entirely: unusable for the format.
    wl = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    wl.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=wl, unk_token="[UNK]")
    with pytest.raises(CheckpointError, match=r"splits '\\n' into 0 tokens"):
        T.newline_id(tok)


def test_load_tokenizer_missing_dir(tmp_path):
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        T.load_tokenizer(tmp_path)


def test_merge_across_spaces_shortens_prompts_and_keeps_the_format(corpus, tmp_path):
    cat, rows, texts = corpus
    words = T.train_bpe_tokenizer(texts, cat.sids, vocab_size=600)
    tok = T.train_bpe_tokenizer(texts, cat.sids, vocab_size=600, merge_across_spaces=True)
    T.save_tokenizer(tok, tmp_path)
    loaded = T.load_tokenizer(tmp_path)  # the saved pre-tokenizer keeps merging across spaces
    prompt = prompts.sequential_prompt(rows[0].history_sids)
    ids = T.encode_prompt(loaded, prompt, 10_000)
    assert ids == T.encode_prompt(tok, prompt, 10_000)
    # The fixed wording shrinks to a few tokens; every history SID is still three code tokens.
    assert len(ids) * 2 < len(T.encode_prompt(words, prompt, 10_000))
    assert loaded.decode(ids) == prompt.text
    codes = [t for t in loaded.convert_ids_to_tokens(ids) if t.startswith("<")]
    assert codes == [c for s in rows[0].history_sids for c in data.split_sid(s)]
    table, nl = T.sid_token_table(loaded, cat.sids), T.newline_id(loaded)
    both = loaded.encode(prompt.text + prompts.response_text(cat.sids[3]), add_special_tokens=False)
    assert both[-4:] == [*table[3].tolist(), nl]
