"""`python -m trainer <command> ...`: dispatch to the module that implements each command."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from trainer.errors import UserError

# command -> module with `main(argv) -> int`; imported lazily so `--help` and light commands stay fast.
COMMANDS = {
    "prepare-data": "trainer.data.prepare_data",
    "import-hf": "trainer.model.sft_import",
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


def rule_argv(command: str, trainer_args=(), *args, **flags) -> list[str]:
    """COMMAND, the rule's trainer config layers, ARGS, then each flag as `--name value...`
    (underscores as dashes; None, False and empty lists left out; True as a bare flag)."""
    argv = [command, *map(str, trainer_args), *map(str, args)]
    for name, value in flags.items():
        if value is None or value is False or (isinstance(value, (list, tuple)) and not value):
            continue
        argv.append("--" + name.replace("_", "-"))
        if value is not True:
            argv.extend(map(str, value) if isinstance(value, (list, tuple)) else [str(value)])
    return argv


def run_rule(smk, command: str, *args, **flags) -> None:
    """Entry of every workflow/scripts/*.py: run `python -m trainer COMMAND ...` in this process.

    The rule's `params.trainer_args` (its --config/--set layers, when it has them) come first; stdout
    and stderr (JAX's C++ logs included) go to the rule's log; a non-zero exit fails the job.
    """
    if smk.log:
        sys.stdout.flush(), sys.stderr.flush()
        fd = os.open(str(smk.log[0]), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1), os.dup2(fd, 2)
    code = main(rule_argv(command, smk.params.get("trainer_args", []), *args, **flags))
    sys.stdout.flush(), sys.stderr.flush()
    if code:
        sys.exit(code)
