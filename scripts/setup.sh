#!/usr/bin/env bash
# Create .venv with the project and its test dependencies (torch only for HF parity tests).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# compat mode: Snakemake finds executor plugins by scanning sys.path for module names
python -m pip install -q -e '.[test]' --config-settings editable_mode=compat
