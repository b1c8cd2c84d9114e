"""TPU VM lifecycle (`provision:`) and operator fixes of the tpu-vm backend, against the fake gcloud.

The fake is scripted like the runbook's day: the first zone has no capacity, the second no quota,
the VM is created in the third; mid-job it is preempted; the executor recreates it and the job
completes; `delete_after` deletes the VM it created and never the one that existed before.
"""
import hashlib
import json
import textwrap
from pathlib import Path

from tests.test_executor_tpuvm import calls, git, run

ZONES = ["us-east1-d", "us-central2-b", "europe-west4-a"]


def _setup(tmp_path: Path, snakefile: str, slices: str, files: dict = {}) -> tuple[Path, Path]:
    root = tmp_path / "tpus"
    root.mkdir()
    wd = tmp_path / "repo"
    wd.mkdir()
    (wd / "Snakefile").write_text(textwrap.dedent(snakefile))
    for name, text in files.items():
        (wd / name).write_text(textwrap.dedent(text))
    (wd / "slices.yaml").write_text(textwrap.dedent(slices))
    git(wd, "init", "-q")
    git(wd, "add", "-A")
    git(wd, "commit", "-qm", "workflow")
    return wd, root


def _existing_vm(root: Path, name: str, zone: str, env_file: bytes | None = None) -> None:
    (root / name / "worker0").mkdir(parents=True)
    (root / name / "tpu.json").write_text(json.dumps({"zone": zone, "hosts": 1, "accelerator": "v6e-8"}))
    if env_file is not None:
        (root / name / "worker0" / ".env").write_bytes(env_file)


COMMON = """
    hosts: 1
    backend: tpu-vm
    python: {python}
    workdir: sidrl
    transfer_files: true
    poll_interval_s: 0.3
    setup_command: "echo setup >> ../setup_count"
"""


def test_provision_zone_fallback_preemption_and_delete_after(tmp_path):
    import sys

    common = textwrap.indent(textwrap.dedent(COMMON.format(python=sys.executable)), "    ")
    provision = f"""    provision: {{zones: {json.dumps(ZONES)}, spot: true, runtime_version: v2-alpha-tpuv6e,
                 delete_after: true}}\n"""
    wd, root = _setup(tmp_path, """
        rule all:
            input: "out/train.txt", "out/eval.txt"
        rule train:
            output: "out/train.txt"
            resources: tpu="train"
            shell: "touch started; sleep 3; cat ../setup_count > {output}"
        rule evaluate:
            output: "out/eval.txt"
            resources: tpu="eval"
            shell: "echo evaluated > {output}"
        """, "slices:\n  train:\n    accelerator: v6e-8\n    name: new-tpu\n" + common + provision
        + "  eval:\n    accelerator: v6e-8\n    name: user-tpu\n    zone: europe-west4-a\n" + common + provision)
    _existing_vm(root, "user-tpu", "europe-west4-a")  # someone else's VM: used, never deleted
    (root / "create_errors.json").write_text(json.dumps({ZONES[0]: "capacity", ZONES[1]: "quota"}))
    (root / "preempt.json").write_text(json.dumps({"new-tpu": "worker0/sidrl/started"}))

    r = run(wd, root)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert f"zone {ZONES[0]}: no capacity (ERROR: (gcloud.compute.tpus.tpu-vm.create) There is no more capacity" in out
    assert f"zone {ZONES[1]}: quota (ERROR: (gcloud.compute.tpus.tpu-vm.create) Quota limit" in out
    assert f"TPU VM new-tpu in {ZONES[2]} is PREEMPTED; recreating it and running the job again (1/3)" in out
    # the job ran to completion on the recreated VM, whose setup ran once (a new VM: a new disk)
    assert (wd / "out/train.txt").read_text() == "setup\n" and (wd / "out/eval.txt").exists()

    argvs = calls(root)
    creates = [(c[4], c[6]) for c in argvs if c[3] == "create"]
    assert creates == [("new-tpu", z) for z in ZONES] * 2  # first creation, then the recreation
    create = next(c for c in argvs if c[3] == "create")
    assert create[7:] == ["--accelerator-type=v6e-8", "--version=v2-alpha-tpuv6e", "--spot",
                          "--labels=created-by=sidrl-executor", "--quiet"]
    deletes = [c[4] for c in argvs if c[3] == "delete"]
    assert deletes == ["new-tpu", "new-tpu"]  # the preempted VM, then delete_after; never user-tpu
    assert not (root / "new-tpu").exists() and (root / "user-tpu/tpu.json").exists()
    assert "user-tpu in europe-west4-a was not created by this executor; delete_after leaves it running" in out

    # every gcloud command of a job is in its command log, as an operator would type it
    logs = sorted((wd / ".snakemake/tpu/logs").glob("sidrl-*-train-*.gcloud.log"))
    assert len(logs) == 1
    text = logs[0].read_text()
    for z in ZONES:
        assert f"$ gcloud compute tpus tpu-vm create new-tpu --zone {z} --accelerator-type=v6e-8" in text
    assert "$ gcloud compute tpus tpu-vm ssh new-tpu --zone europe-west4-a --worker=0 --command" in text
    assert "# exit 255" in text and "tpu-vm delete new-tpu --zone europe-west4-a --quiet" in text


def test_preempted_vm_not_created_here_is_not_deleted(tmp_path):
    import sys

    common = textwrap.indent(textwrap.dedent(COMMON.format(python=sys.executable)), "    ")
    wd, root = _setup(tmp_path, """
        rule train:
            output: "out.txt"
            resources: tpu="train"
            shell: "touch {output}"
        """, "slices:\n  train:\n    accelerator: v6e-8\n    name: user-tpu\n" + common
        + f"    provision: {{zones: [{ZONES[2]}], runtime_version: v2-alpha-tpuv6e}}\n")
    _existing_vm(root, "user-tpu", ZONES[2])
    info = json.loads((root / "user-tpu/tpu.json").read_text())
    (root / "user-tpu/tpu.json").write_text(json.dumps(dict(info, state="PREEMPTED")))
    r = run(wd, root)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert (f"TPU VM user-tpu in {ZONES[2]} is PREEMPTED, and it was not created by this executor, so it is not "
            "deleted. Delete it (`gcloud compute tpus tpu-vm delete user-tpu --zone europe-west4-a --quiet`)") in out
    assert not [c for c in calls(root) if c[3] in ("delete", "create")]


def test_crlf_env_file_reaches_the_job_and_the_key_is_never_written(tmp_path):
    import sys

    key = "wandb-secret-" + hashlib.sha256(str(tmp_path).encode()).hexdigest()[:20]
    digest = hashlib.sha256(key.encode()).hexdigest()
    common = textwrap.indent(textwrap.dedent(COMMON.format(python=sys.executable)), "    ")
    wd, root = _setup(tmp_path, """
        rule train:
            output: "out.json"
            resources: tpu="train"
            shell: "python3 check_env.py {output}"
        """, "slices:\n  train:\n    accelerator: v6e-8\n    name: user-tpu\n    zone: europe-west4-a\n"
        "    env_file: ~/.env\n    env: {HF_TOKEN: hf-" + key + "}\n" + common, {"check_env.py": f"""
        import hashlib, json, os, sys
        key = os.environ["WANDB_API_KEY"]
        json.dump({{"ok": hashlib.sha256(key.encode()).hexdigest() == "{digest}", "mode": os.environ["WANDB_MODE"]}},
                  open(sys.argv[1], "w"))
        """})
    # as operators' env files come: CRLF, blanks around lines and around `=`
    _existing_vm(root, "user-tpu", "europe-west4-a",
                 f"  WANDB_API_KEY = {key}  \r\nexport WANDB_MODE=disabled\r\n\r\n".encode())
    r = run(wd, root)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert json.loads((wd / "out.json").read_text()) == {"ok": True, "mode": "disabled"}
    assert key not in out
    leaks = [str(p) for p in tmp_path.rglob("*") if p.is_file() and p.name != ".env" and ".git" not in p.parts
             # slices.yaml holds HF_TOKEN; calls.jsonl is the fake's raw argv record (gcloud's own logs)
             and p.name not in ("slices.yaml", "calls.jsonl") and key.encode() in p.read_bytes()]
    assert leaks == []  # no log, command log, exit file or output holds it (HF_TOKEN from env: masked)
    assert "export HF_TOKEN=***" in next((wd / ".snakemake/tpu/logs").glob("*.gcloud.log")).read_text()
