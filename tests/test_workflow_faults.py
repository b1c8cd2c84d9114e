"""What the workflow does when something is wrong: a corrupted eval copy, a bad config, a download
that does not match its pinned checksum. Nothing here needs the internet.

The corrupted-copy test works on a clone of the session's shared demo run
(tests/workflow_helpers.py). An upload killed midway is covered at the unit level by
tests/test_handoff.py::test_killed_upload_leaves_no_object_a_rerun_accepts (the object is only
visible once complete; the receipt is written atomically after every object is verified).
"""
from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import pytest
import yaml

from tests.workflow_helpers import (EMULATOR_ROOT, clone_run, describe, finished_rules, make_workflow, output_of,
                                    read_json, shared_demo_run, snakemake, stop_emulator)
from tests.test_download import PIN, mirror
from trainer.data.pinned import git_blob_id



@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, request):
    return shared_demo_run(tmp_path_factory, request)


# ------------------------------------------------------------------------ corrupted eval copy


def test_corrupted_eval_copy_is_refused_then_recovered(demo_run, tmp_path):
    wd = clone_run(demo_run[0], tmp_path / "wf")
    try:
        copy = wd / "workdir/checkpoints/demo/sft_state_rl_last.msgpack"
        receipt = read_json(wd / "handoff/demo/gcs_copy.json")
        want = next(f for f in receipt["files"] if f["name"] == copy.name)
        data = bytearray(copy.read_bytes())
        data[len(data) // 2] ^= 0xFF  # same size, one byte changed
        copy.write_bytes(bytes(data))
        bad_md5 = hashlib.md5(bytes(data)).hexdigest()

        proc = snakemake(wd, "results/demo/metrics.json")
        assert proc.returncode != 0
        text = describe(proc, wd)
        assert f"md5 {bad_md5} vs {want['md5']}" in text  # both checksums, local first
        assert "crc32c" in text and str(copy.relative_to(wd)) in text
        assert "delete" in text and "rerun" in text
        assert not finished_rules(output_of(proc))["evaluate"]  # the corrupt copy was never evaluated
        assert not finished_rules(output_of(proc))["metrics"]

        # Doing what the message says recovers without retraining or re-uploading.
        assert "--forcerun eval_copy" in text
        copy.unlink()
        again = snakemake(wd, "results/demo/metrics.json", "--forcerun", "eval_copy")
        assert again.returncode == 0, describe(again, wd)
        assert finished_rules(output_of(again)) == Counter(["eval_copy", "evaluate", "crosscheck", "metrics"])
        assert hashlib.md5(copy.read_bytes()).hexdigest() == want["md5"]
        assert read_json(wd / "results/demo/metrics.json")["provenance"]["eval_checkpoint_md5"] == want["md5"]
    finally:
        stop_emulator(wd / EMULATOR_ROOT)


def test_failed_crosscheck_keeps_its_report(demo_run, tmp_path):
    """A summary that disagrees with upstream calc.py: the job fails, Snakemake deletes its output,
    and the report stays in logs/crosscheck/ (nothing downstream runs)."""
    wd = clone_run(demo_run[0], tmp_path / "wf")
    try:
        path = wd / "results/demo/sft/run_summary.json"
        summary = read_json(path)
        summary["eval/hr@10"] += 0.25
        path.write_text(json.dumps(summary))  # newer than the cross-check: it reruns
        proc = snakemake(wd, "results/demo/metrics.json")
        assert proc.returncode != 0
        assert finished_rules(output_of(proc))["metrics"] == 0
        assert not (wd / "results/demo/sft/calc_crosscheck.json").exists()
        kept = read_json(wd / "logs/crosscheck/demo_sft.failed.json")
        assert kept["passed"] is False and kept["metrics"]["eval/hr@10"]["passed"] is False
        assert kept["tool"].startswith("upstream:calc.py@") or kept["tool"].startswith("package:")
        assert "logs/crosscheck/demo_sft.failed.json" in describe(proc, wd)
    finally:
        stop_emulator(wd / EMULATOR_ROOT)


# ------------------------------------------------------------------------ bad configuration


def _break_schema(wd: Path) -> None:
    cfg = yaml.safe_load((wd / "config/config.yaml").read_text())
    cfg["handoff"]["wrokers"] = cfg["handoff"].pop("workers")
    (wd / "config/config.yaml").write_text(yaml.safe_dump(cfg))


BAD_CONFIGS = {
    # case: (how to break the copy, --config overrides, text the error must contain)
    "unknown_trainer_key": (None, {"rl": ["rollout.nn=3"]}, ["rollout.nn", "overrides.rl", "did you mean 'rollout.n'"]),
    "schema_violation": (_break_schema, None, ["wrokers", "handoff"]),
    "missing_trainer_yaml": (lambda wd: (wd / "config/trainer/demo/eval.yaml").unlink(), None,
                             ["config/trainer/demo/eval.yaml", "datasets.demo", "not found"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_fails_before_any_job(case, tmp_path):
    breaker, overrides, expected = BAD_CONFIGS[case]
    wd = make_workflow(tmp_path / "wf")
    if breaker:
        breaker(wd)
    proc = snakemake(wd, "results/demo/metrics.json", overrides=overrides)
    text = output_of(proc)
    assert proc.returncode != 0
    for needle in expected:
        assert needle in text, f"{needle!r} not in:\n{text[-3000:]}"
    assert "Job stats" not in text and not finished_rules(text)
    assert not any((wd / d).exists() for d in ("data", "runs", "logs", "results"))


def test_bad_download_commit_fails_at_validation(tmp_path):
    wd = make_workflow(tmp_path / "wf")
    proc = snakemake(wd, "-n", "results/demo/metrics.json", config={"minionerec_download": {"commit": "main"}})
    assert proc.returncode != 0
    assert "minionerec_download" in output_of(proc) and "'main'" in output_of(proc)


# ------------------------------------------------------------------------ pinned MiniOneRec download
# (the download itself: tests/test_download.py)


def test_prepare_data_rule_downloads_when_data_root_is_absent(tmp_path):
    """The workflow's prepare_data with data_root missing fetches the pinned files, train split
    included, from a file:// mirror laid out like the repository (train_from: train, the default)."""
    base, pin_file, pins = mirror(tmp_path)
    wd = make_workflow(tmp_path / "wf")
    proc = snakemake(wd, "data/office/test.csv", config={
        "data_root": str(tmp_path / "absent/Amazon"),
        "minionerec_download": {"repo": base, "commit": PIN, "pins": str(pin_file)}})
    assert proc.returncode == 0, describe(proc, wd)
    assert finished_rules(output_of(proc)) == Counter(["prepare_data"])
    got = wd / "workdir/minionerec" / PIN
    for rel, blob in pins.items():
        assert git_blob_id((got / rel).read_bytes()) == blob
    amazon = got / "data/Amazon"
    assert (wd / "data/office/train.csv").read_bytes() == (amazon / "train/Office_Products_5_2016-10-2018-11.csv").read_bytes()
    assert (wd / "data/office/test.csv").read_bytes() == (amazon / "test/Office_Products_5_2016-10-2018-11.csv").read_bytes()
    log = (wd / "logs/prepare_data/office.log").read_text()
    assert len(re.findall(r"downloaded file://\S+ -> \S+ \(git blob [0-9a-f]{40} verified\)", log)) == len(pins)
    assert json.loads((wd / "data/office/index.json").read_text())


def test_cli_config_strings_are_typed_by_the_schema():
    """`--config handoff='{overwrite: true}'` reaches Snakemake as the string 'true' (BaseLoader)."""
    from trainer.ops.workflow_config import coerce_cli_scalars

    schema = yaml.safe_load((Path(__file__).resolve().parents[1] / "config/schema.yaml").read_text())
    cfg = {"handoff": {"uri": "gs://b/p", "overwrite": "true", "workers": "2", "emulator_root": "null"},
           "datasets": {"demo": {"source": "synthetic", "trainer": "t", "synthetic": {"num_items": "130"}}},
           "overrides": {"rl": ["steps=3"]}, "crosscheck": {"tolerance": "1e-5"},
           "minionerec_download": {"commit": "1" * 40}}
    out = coerce_cli_scalars(cfg, schema)
    assert out["handoff"] == {"uri": "gs://b/p", "overwrite": True, "workers": 2, "emulator_root": "null"}
    assert out["datasets"]["demo"]["synthetic"]["num_items"] == 130
    assert out["overrides"]["rl"] == ["steps=3"] and out["minionerec_download"]["commit"] == "1" * 40
    assert out["crosscheck"]["tolerance"] == 1e-5
    # Values of the wrong type stay as they are, for validation to name them.
    assert coerce_cli_scalars({"handoff": {"workers": "many", "overwrite": "1"}}, schema)["handoff"] == \
        {"workers": "many", "overwrite": "1"}
