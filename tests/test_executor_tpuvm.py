"""End-to-end tests of the `tpu-vm` backend against tests/fake_gcloud/gcloud.

The fake runs each TPU host's commands in its own home directory ($FAKE_TPU_ROOT/<name>/worker<W>/),
with a fresh environment and no files shared with the workflow directory: code reaches the hosts only
through the git bundle, inputs/outputs only through scp (transfer_files).
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from tests.procs import alive, default_sigint

REPO = Path(__file__).resolve().parents[1]
FAKE_BIN = REPO / "tests" / "fake_gcloud"


def git(wd: Path, *args: str) -> str:
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@x", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@x")
    return subprocess.run(["git", *args], cwd=wd, env=env, check=True, capture_output=True, text=True).stdout


def make_setup(tmp_path: Path, snakefile: str, slice_extra: str = "", hosts: int = 2, zone: str = "us-east5-b"):
    root = tmp_path / "tpus"
    (root / "fake-tpu").mkdir(parents=True)
    (root / "fake-tpu" / "tpu.json").write_text(json.dumps({"zone": "us-east5-b", "hosts": hosts,
                                                            "accelerator": "v6e-8"}))
    wd = tmp_path / "repo"
    wd.mkdir()
    (wd / "Snakefile").write_text(textwrap.dedent(snakefile))
    (wd / "slices.yaml").write_text(textwrap.dedent(f"""
        slices:
          train:
            accelerator: v6e-8
            hosts: {hosts}
            backend: tpu-vm
            name: fake-tpu
            zone: {zone}
            python: {sys.executable}
            workdir: sidrl
            transfer_files: true
            poll_interval_s: 0.3
            coordinator_port: 12345
            setup_command: "echo setup >> ../setup_count"
        """) + textwrap.indent(textwrap.dedent(slice_extra), "    "))
    git(wd, "init", "-q")
    git(wd, "add", "-A")
    git(wd, "commit", "-qm", "workflow")
    return wd, root


def run(wd: Path, root: Path, *args: str, wait=True):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRAINER_", "SNAKEMAKE_PROFILE"))}
    env.update(PYTHONPATH=str(REPO), FAKE_TPU_ROOT=str(root), PATH=f"{FAKE_BIN}{os.pathsep}{env['PATH']}",
               FAKE_TPU_PATH=f"{Path(sys.executable).parent}:/usr/bin:/bin")
    cmd = [sys.executable, "-m", "snakemake", "--executor", "tpu", "-j", "2", "--tpu-slices-config", "slices.yaml",
           "--latency-wait", "1", "--shared-fs-usage", "input-output", "persistence", "software-deployment", *args]
    if not wait:
        return subprocess.Popen(cmd, cwd=wd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                preexec_fn=default_sigint)
    return subprocess.run(cmd, cwd=wd, env=env, capture_output=True, text=True, timeout=180)


def calls(root: Path) -> list[list[str]]:
    return [json.loads(line)["argv"] for line in (root / "calls.jsonl").read_text().splitlines()]


WORKFLOW = """
    rule all:
        input: "out/result.txt"
    rule make_input:
        output: "in.txt"
        shell: "echo hello > {output}"
    rule work:
        input: "in.txt"
        output: "out/result.txt"
        resources: tpu="train"
        shell: "(cat {input}; echo $TRAINER_PROCESS_ID $TRAINER_NUM_PROCESSES $TRAINER_COORDINATOR $TRAINER_EXPECT_BACKEND; pwd) > {output}"
"""

FOLLOWER = """
    follower_command: "echo follower $TRAINER_PROCESS_ID $TRAINER_COORDINATOR; ls; touch follower_was_here"
"""


def test_tpuvm_job_runs_on_every_host_of_the_fake_slice(tmp_path):
    wd, root = make_setup(tmp_path, WORKFLOW, FOLLOWER)
    r = run(wd, root)
    assert r.returncode == 0, r.stdout + r.stderr
    host0_dir = root / "fake-tpu/worker0/sidrl"
    hello, env_line, cwd = (wd / "out/result.txt").read_text().splitlines()
    # host 0 ran in its own checkout, got the input by scp and the coordinator from `describe`, and
    # was told to find a TPU (trainer.train.distributed.check_backend)
    assert hello == "hello" and env_line == "0 2 127.0.0.1:12345 tpu" and cwd == str(host0_dir)
    w1 = root / "fake-tpu/worker1/sidrl"
    assert (w1 / "follower_was_here").exists() and (w1 / "Snakefile").exists()  # code, ...
    assert not (w1 / "in.txt").exists() and not (w1 / "out").exists()  # ... but never the files
    sha = git(wd, "rev-parse", "HEAD").strip()
    for w in (0, 1):
        checkout = root / f"fake-tpu/worker{w}/sidrl"
        assert git(checkout, "rev-parse", "HEAD").strip() == sha
        exits = list((checkout / "logs").glob("sidrl-*-work-*_worker*.exit"))
        assert [p.read_text().strip() for p in exits] == ["0"]
        assert (checkout / f".sidrl_setup_{sha}").exists()
    assert "follower 1 127.0.0.1:12345" in next((w1 / "logs").glob("*_worker1.log")).read_text()
    first = calls(root)
    assert sum(c[3] == "scp" and c[4].endswith(".bundle") for c in first) == 2  # one per host
    assert ["describe", "fake-tpu", "--zone", "us-east5-b", "--format=json"] == first[
        [c[3] for c in first].index("describe")][3:]
    assert {c[7] for c in first if c[3] == "ssh"} == {"--worker=0", "--worker=1"}

    # a rerun of the same commit ships no code and does not repeat the setup command
    r = run(wd, root, "--forcerun", "work")
    assert r.returncode == 0, r.stdout + r.stderr
    second = calls(root)[len(first):]
    assert not [c for c in second if c[3] == "scp" and c[4].endswith(".bundle")]
    assert (root / "fake-tpu/worker0/setup_count").read_text() == "setup\n"


def test_tpuvm_failing_worker_fails_the_job_with_its_log(tmp_path):
    wd, root = make_setup(tmp_path, """
        rule work:
            output: "out.txt"
            resources: tpu="train"
            shell: "echo $$ > host0.pid; sleep 60; touch {output}"
        """, f"""
        follower_command: "while [ ! -s {tmp_path}/tpus/fake-tpu/worker0/sidrl/host0.pid ]; do sleep 0.1; done;
          echo 'worker one: Check failed' >&2; exit 3"
        """)
    t0 = time.monotonic()
    r = run(wd, root)
    out = r.stdout + r.stderr
    assert r.returncode != 0 and time.monotonic() - t0 < 60
    assert "worker 1 exited with code 3; stopped worker(s) 0" in out
    assert "--- worker 1 log (fake-tpu worker 1:sidrl/logs/sidrl-" in out and "worker one: Check failed" in out
    assert not alive(int((root / "fake-tpu/worker0/sidrl/host0.pid").read_text()))


def test_tpuvm_refuses_a_dirty_tree(tmp_path):
    wd, root = make_setup(tmp_path, WORKFLOW, FOLLOWER)
    (wd / "Snakefile").write_text((wd / "Snakefile").read_text() + "\n# edited\n")
    r = run(wd, root)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert "has uncommitted changes (Snakefile)" in out and "--tpu-allow-dirty" in out
    assert not (root / "calls.jsonl").exists()  # refused before touching any host


def test_tpuvm_wrong_zone_names_the_step_and_gcloud_error(tmp_path):
    wd, root = make_setup(tmp_path, WORKFLOW, FOLLOWER, zone="europe-west4-a")
    r = run(wd, root)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert "checking the code version failed on TPU VM fake-tpu worker(s) 0, 1" in out
    assert "NOT_FOUND: Resource 'projects/fake-project/locations/europe-west4-a/nodes/fake-tpu' was not found" in out


def test_tpuvm_cancel_kills_every_worker(tmp_path):
    wd, root = make_setup(tmp_path, """
        rule work:
            output: "out.txt"
            resources: tpu="train"
            shell: "echo $$ > pid; sleep 120; touch {output}"
        """, """
        follower_command: "echo $$ > pid; sleep 120"
        """)
    proc = run(wd, root, wait=False)
    pid_files = [root / f"fake-tpu/worker{w}/sidrl/pid" for w in (0, 1)]
    deadline = time.monotonic() + 60
    while not all(p.exists() and p.read_text().strip() for p in pid_files) and time.monotonic() < deadline:
        time.sleep(0.2)
    pids = [int(p.read_text()) for p in pid_files]
    assert all(alive(p) for p in pids)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=90)
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in pids if alive(p)], out
