"""The workflow's shape: every rule acts through one thin script, and scripts only wire arguments."""
from __future__ import annotations

import ast
import re
from pathlib import Path

from trainer.cli import rule_argv

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "workflow" / "scripts"


def _rules() -> dict[str, str]:
    """rule name -> its body text, from every rules/*.smk."""
    found = {}
    for smk in sorted((REPO / "rules").glob("*.smk")):
        text = smk.read_text()
        for m in re.finditer(r"^rule (\w+):\n((?:[ \t]+.*\n|\n)+)", text, re.M):
            found[m.group(1)] = m.group(2)
    return found


def test_every_rule_calls_its_own_script():
    rules = _rules()
    assert {"prepare_data", "sft", "sft_import", "rl_train", "gcs_copy", "eval_copy", "evaluate", "crosscheck",
            "metrics"} <= set(rules)
    for name, body in rules.items():
        assert "shell:" not in body and "run:" not in body, f"rule {name} has inline actions"
        script = re.search(r"script:\n\s+\"\.\./workflow/scripts/(\w+\.py)\"", body)
        assert script and script.group(1) == f"{name}.py", f"rule {name} must call workflow/scripts/{name}.py"
    assert {p.name for p in SCRIPTS.glob("*.py")} == {f"{n}.py" for n in rules}


def test_scripts_are_wiring_only():
    """A docstring, imports, at most one alias assignment and a single trainer.cli.run_rule call."""
    for path in SCRIPTS.glob("*.py"):
        tree = ast.parse(path.read_text())
        body = tree.body
        assert ast.get_docstring(tree), path.name
        kinds = [type(node).__name__ for node in body[1:]]
        assert kinds.count("Expr") == 1 and set(kinds) <= {"ImportFrom", "Assign", "Expr"}, (path.name, kinds)
        call = next(n.value for n in body[1:] if isinstance(n, ast.Expr))
        assert isinstance(call, ast.Call) and getattr(call.func, "id", None) == "run_rule", path.name
        assert not any(isinstance(n, (ast.If, ast.For, ast.While, ast.IfExp, ast.comprehension, ast.Lambda))
                       for n in ast.walk(tree)), f"{path.name} has logic"
        assert len(path.read_text().splitlines()) <= 12, path.name


def test_rule_argv_turns_flags_into_trainer_arguments():
    argv = rule_argv("eval", ["--config", "a.yaml", "--set", "eval.num_beams=5"], "--set", "x=1",
                     data="data/demo", receipt=None, overwrite=False, emulator_root="", verbose=True,
                     name=["a.msgpack", "b.json"], files=[], workers=4)
    assert argv == ["eval", "--config", "a.yaml", "--set", "eval.num_beams=5", "--set", "x=1",
                    "--data", "data/demo", "--emulator-root", "", "--verbose", "--name", "a.msgpack", "b.json",
                    "--workers", "4"]
