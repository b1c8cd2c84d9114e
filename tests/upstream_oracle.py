"""Upstream MiniOneRec's files as the test oracle: where they are, and importing them.

Tests that need them skip cleanly when ../shared is absent (`upstream_module` skips, `UPSTREAM`
and `AMAZON` name the shared copies).
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

UPSTREAM = Path("/work/shared/minionerec-upstream")  # unmodified files at the pinned commit
AMAZON = Path("/work/shared/minionerec-data/data/Amazon")  # its valid/test/info/index files
UPSTREAM_CALC = UPSTREAM / "calc.py"


def upstream_module(name: str):
    """Import upstream's `<name>.py` (e.g. data) as `minionerec_<name>`; skip when it is absent."""
    path = UPSTREAM / f"{name}.py"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    for dep in ("torch", "pandas", "tqdm"):
        pytest.importorskip(dep)
    key = f"minionerec_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


def need_amazon(*rels: str) -> None:
    """Skip unless every `rel` (under data/Amazon) is in the shared copy."""
    missing = [r for r in rels if not (AMAZON / r).is_file()]
    if missing:
        pytest.skip(f"MiniOneRec data not present: {missing[0]}")
