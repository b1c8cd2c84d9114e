"""`python -m trainer import-hf HF_DIR --out OUT [--data DIR] [--config C --set k=v]`: the SFT stage for
a Hugging Face Qwen2 checkpoint the user brings (config `sft_import: {ds: DIR}`).

Writes what the trained `sft` stage writes, so every later stage reads it the same way:
`sft_best.msgpack` (the checkpoint's own dtype, with its model config inside), the tokenizer files
(`chat_template.jinja` written when the checkpoint has none) and, last, `run_summary.json`
(source path, sha256 of every source file, model config, vocab size, dtype, devices). It runs
on the train slice like `sft`: every process joins jax.distributed and process 0 alone reads
and writes, so no follower waits for a command that never comes. With `--data`, the tokenizer
must hold every SID code token of the catalog. `model.*` keys in the config may only repeat the
checkpoint's values (trainer.model.resolve).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from trainer.cli import base_parser
from trainer.config import load_config
from trainer.errors import CheckpointError
from trainer.io_utils import atomic_write_json, atomic_write_text, md5_file, setup_logging, sha256_file
from trainer.model import checkpoint, hf_io
from trainer.model.resolve import resolve
from trainer.train import distributed

log = logging.getLogger("trainer")
CHECKPOINT_FILE = "sft_best.msgpack"
REQUIRED_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def check_tokenizer(hf_dir: Path, vocab_size: int, data_dir: str | None):
    """The checkpoint's tokenizer: loadable, within the vocab, and holding the catalog's SID tokens."""
    from trainer.data import tokenizer as tk

    missing = [n for n in REQUIRED_TOKENIZER_FILES if not (hf_dir / n).is_file()]
    if missing:
        raise CheckpointError(f"{hf_dir}: no {', '.join(missing)}; save the tokenizer with the model "
                              "(tokenizer.save_pretrained(DIR))")
    tok = tk.load_tokenizer(hf_dir)
    tk.newline_id(tok)  # the response format needs "\n" as one token
    if data_dir is None:
        return tok, None
    from trainer.data.readers import code_tokens, load_catalog

    catalog = load_catalog(data_dir)
    absent = tk.missing_sid_tokens(tok, catalog.sids)
    if absent:
        raise tk.sid_tokens_error(str(hf_dir), absent, len(code_tokens(catalog.sids)))
    beyond = [c for c in code_tokens(catalog.sids) if tok.convert_tokens_to_ids(c) >= vocab_size]
    if beyond:
        raise CheckpointError(f"{hf_dir}: SID tokens {', '.join(beyond[:5])} have ids beyond the model's vocab_size "
                              f"{vocab_size}; resize the embeddings to len(tokenizer) and save the model again")
    return tok, len(catalog.sids)


def import_checkpoint(hf_dir: str | Path, out: str | Path, cfg: dict, data_dir: str | None) -> dict:
    """Process 0: convert, check and write every output; returns the run summary."""
    from trainer.data.prompts import CHAT_TEMPLATE

    t0 = time.time()
    hf_dir, out = Path(hf_dir).absolute(), Path(out)
    if not hf_dir.is_dir():
        raise CheckpointError(f"sft_import: {hf_dir} is not a directory; point sft_import.<dataset> at a Hugging "
                              "Face checkpoint directory (config.json, safetensors, tokenizer files)")
    model_cfg, params = hf_io.import_hf(hf_dir)
    tok, num_sids = check_tokenizer(hf_dir, model_cfg.vocab_size, data_dir)
    model_cfg = resolve(cfg["model"], model_cfg.to_dict(), hf_dir, tokenizer_size=len(tok))
    out.mkdir(parents=True, exist_ok=True)
    checkpoint.save_params(out / CHECKPOINT_FILE, params, model_cfg.to_dict())
    del params
    tokenizer_files = hf_io.copy_tokenizer_files(hf_dir, out)
    generated = "chat_template.jinja" not in tokenizer_files
    if generated:  # the graph declares it; MiniOneRec's prompts are plain text, so this is the project's own
        atomic_write_text(out / "chat_template.jinja", CHAT_TEMPLATE)
        tokenizer_files.append("chat_template.jinja")
    summary = {
        "kind": "import", "source": str(hf_dir),
        "source_sha256": {p.name: sha256_file(p) for p in sorted(hf_dir.iterdir()) if p.is_file()},
        "model": model_cfg.to_dict(), "vocab_size": model_cfg.vocab_size, "tokenizer_size": len(tok),
        "dtype": model_cfg.param_dtype, "num_sids": num_sids, "tokenizer_files": sorted(tokenizer_files),
        "chat_template_generated": generated, **distributed.device_info(), "seconds": time.time() - t0,
        "sft_best_md5": md5_file(out / CHECKPOINT_FILE), "config": cfg,
    }
    atomic_write_json(out / "run_summary.json", summary)  # last: the stage is complete
    log.info("imported %s -> %s (vocab %d, %d layers, %s; tokenizer files: %s%s)", hf_dir, out,
             model_cfg.vocab_size, model_cfg.num_layers, model_cfg.param_dtype, ", ".join(sorted(tokenizer_files)),
             "; chat_template.jinja generated" if generated else "")
    return summary


def main(argv: list[str]) -> int:
    p = base_parser("import-hf", "the SFT stage for a Hugging Face Qwen2 checkpoint: sft_best.msgpack, "
                                 "run_summary.json and the tokenizer files")
    p.add_argument("hf_dir", help="directory with config.json, model.safetensors (or a sharded index), tokenizer")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--data", default=None, help="dataset directory: check its SID tokens against the tokenizer")
    args = p.parse_args(argv[1:])
    distributed.start(argv)
    if distributed.is_main():
        setup_logging(args.log)
    distributed.on_main(lambda: import_checkpoint(args.hf_dir, args.out, load_config(args.config, args.overrides),
                                                  args.data) and None)
    return 0
