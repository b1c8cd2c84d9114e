"""`python -m trainer <command> ...`: dispatch to the module that implements each command."""
from __future__ import annotations

import argparse
import importlib
import sys

from trainer.errors import UserError

# command -> module with `main(argv) -> int`; imported lazily so `--help` and light commands stay fast.
COMMANDS = {
    "prepare-data": "trainer.data.prepare_data",
    "import-hf": "trainer.model.hf_io",
    "export-hf": "trainer.model.hf_io",
    "sft": "trainer.train.sft",
    "rl": "trainer.rl.loop",
    "eval": "trainer.eval.evaluate",
    "crosscheck": "trainer.ops.crosscheck",
    "handoff-upload": "trainer.ops.handoff",
    "handoff-download": "trainer.ops.handoff",
    "gcs-emulator": "trainer.ops.gcs_emulator",
    "metrics": "trainer.ops.report",
    "follow": "trainer.train.distributed",
}


def base_parser(command: str, description: str = "") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m trainer {command}", description=description)
    p.add_argument("--config", action="append", default=[],
                   help="YAML config file (keys: trainer/config.py DEFAULTS); repeat to layer files")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set rollout.n=8 (repeatable)")
    p.add_argument("--log", default=None, help="also write the log to this file")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: python -m trainer <command> [options]\ncommands: " + ", ".join(COMMANDS), file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command, rest = argv[0], argv[1:]
    module = importlib.import_module(COMMANDS[command])
    try:
        return int(module.main([command] + rest) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
