"""Eval oracle: `python -m trainer eval` against upstream MiniOneRec's own evaluation procedure.

The checkpoint is made the way a MiniOneRec user has one: a Qwen2 saved by `transformers`, whose
tokenizer got the SID code tokens with `add_tokens` and whose embeddings were grown with
`resize_token_embeddings` (upstream sft.py). The tokenizer is a byte-level BPE with Qwen2's
pre-tokenizer split (so "### Response:\\n" is 3 tokens, the hash key upstream's processor starts
from), trained here because no hub download is possible.

Upstream side, step by step as ../shared/minionerec-upstream/evaluate.py does it: its
`EvalSidDataset` encodes the test rows; the constraint table is its hash_dict, built from
`tokenizer("### Response:\\n" + sid + "\\n").input_ids + [eos]` over every info-file line with
prefix_index 3; batches of 8 (evaluate.sh) left padded with EOS; `generate` with
GenerationConfig(num_beams=50, num_return_sequences=50, length_penalty=0.0, max_new_tokens=256,
pad = eos) and upstream's own `ConstrainedLogitsProcessor`. One deviation: the model runs in
float32 (upstream loads bfloat16), so both sides compute the same numbers.

Ours: `import-hf` of that directory, then `python -m trainer eval` on the same rows. The top-50
lists must be equal for every prompt and the scores (upstream's `sequences_scores`) within 1e-4.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

UPSTREAM = Path("/work/shared/minionerec-upstream")
AMAZON = Path("/work/shared/minionerec-data/data/Amazon")
NAME = "Office_Products"
TEST_CSV = AMAZON / "test" / f"{NAME}_5_2016-10-2018-11.csv"
INFO = AMAZON / "info" / f"{NAME}_5_2016-10-2018-11.txt"
pytestmark = pytest.mark.skipif(not (UPSTREAM / "evaluate.py").is_file() or not TEST_CSV.is_file(),
                                reason="../shared/minionerec-upstream or the MiniOneRec Office data is absent")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROWS, BEAMS, UPSTREAM_BATCH = 32, 50, 8
# Qwen2's pre-tokenizer split (its tokenizer.json): ":\n" stays one pre-token, as in Qwen2.5.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")


def _upstream(module: str):
    sys.path.insert(0, str(UPSTREAM))
    try:
        return __import__(module)
    finally:
        sys.path.remove(str(UPSTREAM))


def _base_tokenizer(texts: list[str]):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                                pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A transformers-saved Qwen2 + tokenizer with the SID tokens added as MiniOneRec adds them."""
    from trainer.data.readers import code_tokens

    root = tmp_path_factory.mktemp("oracle")
    rows = pd.read_csv(TEST_CSV).head(ROWS)
    rows.to_csv(root / "test.csv", index=False)
    sids = [line.split("\t")[0].strip() for line in INFO.read_text().splitlines() if line.strip()]
    # Train the BPE on the wording the prompts use, SIDs blanked (they become added tokens).
    data = _upstream("data")
    texts = []
    for i in range(ROWS):
        history = data.EvalSidDataset.get_history(None, rows.iloc[i].copy())
        texts.append("### Instruction:\nCan you predict the next possible item that the user may expect?\n\n"
                     + data.EvalSidDataset.generate_prompt(None, {**history, "output": ""}))
    texts = [re.sub(r"<[abc]_\d+>", " ", t) for t in texts] * 4 + ["### Response:\n"] * 50
    tok = _base_tokenizer(texts)
    base_vocab = len(tok)
    tok.add_tokens(code_tokens(sids))  # upstream sft.py: tokenizer.add_tokens(new_tokens)
    cfg = transformers.Qwen2Config(vocab_size=base_vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    torch.manual_seed(1)
    model = transformers.Qwen2ForCausalLM(cfg)
    model.resize_token_embeddings(len(tok))  # upstream sft.py, after add_tokens
    with torch.no_grad():  # large weights: well separated scores, so rankings have no near-ties
        for name, p in model.named_parameters():
            p.copy_((1.0 + 0.3 * torch.randn_like(p)) if name.endswith("norm.weight") else 0.5 * torch.randn_like(p))
    model.save_pretrained(root / "hf")
    tok.save_pretrained(root / "hf")
    return {"root": root, "hf": root / "hf", "sids": sids}


def _upstream_predictions(ck):
    """upstream evaluate.py's evaluate(), fp32: (SID strings [N][50], sequences_scores [N, 50])."""
    data, lp = _upstream("data"), _upstream("LogitProcessor")
    tokenizer = transformers.AutoTokenizer.from_pretrained(ck["hf"])
    model = transformers.AutoModelForCausalLM.from_pretrained(ck["hf"], dtype=torch.float32).eval()
    prefix_ids = [tokenizer(f"### Response:\n{sid}\n").input_ids + [tokenizer.eos_token_id] for sid in ck["sids"]]
    hash_dict: dict[str, set] = {}
    for ids in prefix_ids:
        for i in range(3, len(ids)):
            key = "-".join(str(t) for t in (ids[:i] if i == 3 else ids[3:i]))
            hash_dict.setdefault(key, set()).add(ids[i])
    allowed = {k: list(v) for k, v in hash_dict.items()}
    header = tokenizer("### Response:\n").input_ids
    assert len(header) == 3, f"'### Response:\\n' is {len(header)} tokens; upstream's hash key needs 3"

    def prefix_allowed_tokens_fn(batch_id, input_ids):
        return allowed.get("-".join(str(t) for t in input_ids), [])

    tokenizer.pad_token_id = tokenizer.eos_token_id
    dataset = data.EvalSidDataset(train_file=str(ck["root"] / "test.csv"), tokenizer=tokenizer, max_len=2560,
                                  category="office products", test=True, K=0, seed=42)
    encodings = [dataset[i] for i in range(len(dataset))]
    assert all(e["input_ids"][-3:] == header for e in encodings)  # the processor's first key exists
    model.config.pad_token_id = model.config.eos_token_id = tokenizer.eos_token_id
    config = transformers.GenerationConfig(num_beams=BEAMS, length_penalty=0.0, num_return_sequences=BEAMS,
                                           pad_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                                           max_new_tokens=256)
    outputs, scores = [], []
    for start in range(0, len(encodings), UPSTREAM_BATCH):
        batch = encodings[start:start + UPSTREAM_BATCH]
        width = max(len(e["input_ids"]) for e in batch)
        ids = [[tokenizer.pad_token_id] * (width - len(e["input_ids"])) + e["input_ids"] for e in batch]
        mask = [[0] * (width - len(e["input_ids"])) + [1] * len(e["input_ids"]) for e in batch]
        with torch.no_grad():
            clp = lp.ConstrainedLogitsProcessor(prefix_allowed_tokens_fn=prefix_allowed_tokens_fn, num_beams=BEAMS,
                                                base_model=str(ck["hf"]))
            out = model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), generation_config=config,
                                 return_dict_in_generate=True, output_scores=True,
                                 logits_processor=transformers.LogitsProcessorList([clp]))
        text = tokenizer.batch_decode(out.sequences[:, width:], skip_special_tokens=True)
        text = [t.split("Response:\n")[-1].strip() for t in text]
        outputs += [text[i * BEAMS:(i + 1) * BEAMS] for i in range(len(batch))]
        scores.append(out.sequences_scores.numpy().reshape(len(batch), BEAMS))
    return outputs, np.concatenate(scores)


def test_eval_equals_upstream_generate(checkpoint, tmp_path):
    from trainer.cli import main as cli_main
    from trainer.data import readers
    from trainer.data.prepare_data import import_minionerec
    from trainer.data.tokenizer import load_tokenizer, newline_id, sid_token_table
    from trainer.decode.trie import build_trie
    from trainer.eval.evaluate import encode_prompts, predict_sid_rows
    from trainer.model.checkpoint import load_into_model
    from trainer.model.qwen2 import ModelConfig, build_model

    theirs, their_scores = _upstream_predictions(checkpoint)
    gaps = -np.diff(their_scores, axis=1)
    # Adjacent beams at least 10x further apart than float32 noise between the two (about 1e-6).
    assert (gaps >= 0).all() and gaps.min() > 1e-5, "near-tied scores: the ranking comparison would be fragile"

    # Ours, as a user runs it: import the HF directory, then `python -m trainer eval`.
    ours_dir = tmp_path / "ours"
    assert cli_main(["import-hf", str(checkpoint["hf"]), "--out", str(ours_dir)]) == 0
    model_cfg = json.loads((ours_dir / "run_summary.json").read_text())["model"]  # from the checkpoint
    data_dir = tmp_path / "data"
    import_minionerec(data_dir, AMAZON, NAME, train_from="valid")
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump({
        "data": {"max_history": None, "max_prompt_len": 2560},  # the model shape comes from the checkpoint
        "eval": {"num_beams": BEAMS, "max_samples": ROWS, "batch_size": 16, "split": "test"}}))
    out = tmp_path / "out"
    assert cli_main(["eval", "--config", str(tmp_path / "eval.yaml"), "--data", str(data_dir), "--checkpoint",
                     str(ours_dir / "sft_best.msgpack"), "--tokenizer", str(ours_dir), "--out", str(out)]) == 0
    records = json.loads((out / "eval_predictions.json").read_text())
    assert len(records) == ROWS
    for i, (rec, their) in enumerate(zip(records, theirs)):
        assert rec["predict"] == their, f"prompt {i}: top-{BEAMS} differs from upstream's"

    # Scores: the same decoder the CLI ran, on the same prompts, against upstream's sequences_scores.
    tok = load_tokenizer(ours_dir)
    catalog = readers.load_catalog(data_dir)
    examples = readers.read_split(data_dir, "test", catalog, None)[:ROWS]
    _, prompts = encode_prompts(tok, examples, 2560, "minionerec")
    model = build_model(ModelConfig.from_dict(model_cfg))
    load_into_model(model, ours_dir / "sft_best.msgpack")
    trie = build_trie(sid_token_table(tok, catalog.sids))
    rows, scores = predict_sid_rows(model, prompts, tok.pad_token_id, trie, BEAMS, newline_id(tok), tok.eos_token_id,
                                    batch_size=16)
    assert [[catalog.sids[j] for j in r] for r in rows.tolist()] == theirs
    np.testing.assert_allclose(scores, their_scores, atol=1e-4)
