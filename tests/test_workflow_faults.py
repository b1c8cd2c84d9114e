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
from trainer.data import prepare_data
from trainer.data import synthetic
from trainer.errors import DataError

PINNED = "e88ba913b1534ac034d37f2153bd691dc1c13b1e"
AMAZON = Path("/work/shared/minionerec-data/data/Amazon")


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


def test_raw_github_url_at_pinned_commit():
    url = prepare_data.raw_url("https://github.com/AkaliKong/MiniOneRec", PINNED,
                               "valid/Office_Products_5_2016-10-2018-11.csv")
    assert url == (f"https://raw.githubusercontent.com/AkaliKong/MiniOneRec/{PINNED}/data/Amazon/"
                   "valid/Office_Products_5_2016-10-2018-11.csv")
    assert prepare_data.raw_url("https://github.com/AkaliKong/MiniOneRec.git/", PINNED, "x") == url.rsplit(
        "/data/Amazon/", 1)[0] + "/data/Amazon/x"
    assert prepare_data.raw_url("file:///mirror", PINNED, "info/a.txt") == f"file:///mirror/{PINNED}/data/Amazon/info/a.txt"
    with pytest.raises(DataError, match="OWNER/REPO"):
        prepare_data.raw_url("https://github.com/AkaliKong", PINNED, "x")


def test_pinned_checksums_match_the_reference_copy():
    """config/minionerec_sha256.yaml pins the shared (upstream) files and the configured commit."""
    repo = Path(__file__).resolve().parents[1]
    pins = prepare_data.load_sha256_pins(repo / "config/minionerec_sha256.yaml", PINNED)
    assert yaml.safe_load((repo / "config/config.yaml").read_text())["minionerec_download"]["commit"] == PINNED
    for name in ("Office_Products", "Industrial_and_Scientific"):
        for f in prepare_data.needed_files(AMAZON, name, "valid").values():
            assert str(f.relative_to(AMAZON)) in pins
    if not AMAZON.is_dir():
        pytest.skip("MiniOneRec reference data not present")
    for rel, sha in pins.items():
        assert hashlib.sha256((AMAZON / rel).read_bytes()).hexdigest() == sha, rel


def _mirror(tmp_path: Path, name: str = "Office_Products") -> tuple[str, Path, dict[str, str]]:
    """A file:// mirror laid out like raw GitHub (BASE/COMMIT/data/Amazon/...) holding a small
    synthetic dataset in MiniOneRec's file names, and a pin file for it."""
    gen = tmp_path / "gen"
    synthetic.generate(gen, 40, 60, 4, 0)
    src = {"valid": "valid.csv", "test": "test.csv", "info": "info.txt", "index": "index.json", "item": "item.json"}
    base = tmp_path / "mirror"
    amazon = base / PINNED / "data/Amazon"
    pins = {}
    for key, path in prepare_data.needed_files(amazon, name, "valid").items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes((gen / src[key]).read_bytes())
        pins[str(path.relative_to(amazon))] = hashlib.sha256(path.read_bytes()).hexdigest()
    pin_file = tmp_path / "pins.yaml"
    pin_file.write_text(yaml.safe_dump({"commit": PINNED, "files": pins}))
    return base.as_uri(), pin_file, pins


def test_download_verifies_sha256_and_writes_only_verified_files(tmp_path):
    base, pin_file, pins = _mirror(tmp_path)
    root = tmp_path / "Amazon"
    rels = sorted(pins)
    written = prepare_data.download_minionerec(root, rels, base, PINNED, prepare_data.load_sha256_pins(pin_file, PINNED))
    assert sorted(str(p.relative_to(root)) for p in written) == rels
    assert all(hashlib.sha256((root / r).read_bytes()).hexdigest() == pins[r] for r in rels)
    # Present files are not fetched again.
    calls = []
    assert prepare_data.download_minionerec(root, rels, base, PINNED, pins, fetch=calls.append) == []
    assert calls == []

    # A tampered file upstream: the error names both checksums and the URL; nothing is written.
    tampered = tmp_path / "tampered"
    rel = rels[0]
    served = b"not the pinned bytes"
    with pytest.raises(DataError) as err:
        prepare_data.download_minionerec(tampered, rels, base, PINNED, pins, fetch=lambda url: served)
    msg = str(err.value)
    assert hashlib.sha256(served).hexdigest() in msg and pins[rel] in msg and f"{PINNED}/data/Amazon/{rel}" in msg
    assert not tampered.exists() or not any(p.is_file() for p in tampered.rglob("*"))


def test_download_errors_name_what_to_fix(tmp_path):
    base, pin_file, pins = _mirror(tmp_path)
    with pytest.raises(DataError, match="no pinned sha256 for 'train/x.csv'"):
        prepare_data.download_minionerec(tmp_path / "r", ["train/x.csv"], base, PINNED, pins)
    with pytest.raises(DataError, match=r"pins are for commit .* asks for commit 0{40}"):
        prepare_data.load_sha256_pins(pin_file, "0" * 40)
    with pytest.raises(DataError, match="downloading file://.*failed"):
        prepare_data.download_minionerec(tmp_path / "r", sorted(pins), base, "1" * 40, pins)


def test_prepare_data_rule_downloads_when_data_root_is_absent(tmp_path):
    """The workflow's prepare_data with data_root missing fetches the pinned files (file:// mirror)."""
    base, pin_file, pins = _mirror(tmp_path)
    wd = make_workflow(tmp_path / "wf")
    data_root = tmp_path / "absent/Amazon"
    proc = snakemake(wd, "data/office/test.csv", config={
        "data_root": str(data_root), "train_from": "valid",
        "minionerec_download": {"repo": base, "commit": PINNED, "sha256": str(pin_file)}})
    assert proc.returncode == 0, describe(proc, wd)
    assert finished_rules(output_of(proc)) == Counter(["prepare_data"])
    for rel, sha in pins.items():
        assert hashlib.sha256((data_root / rel).read_bytes()).hexdigest() == sha
    assert (wd / "data/office/test.csv").read_bytes() == (data_root / "test/Office_Products_5_2016-10-2018-11.csv").read_bytes()
    log = (wd / "logs/prepare_data/office.log").read_text()
    assert len(re.findall(r"downloaded file://\S+ -> \S+ \(sha256 [0-9a-f]{64} verified\)", log)) == len(pins)
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
