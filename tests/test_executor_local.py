"""End-to-end tests of the TPU executor's `local` backend: real Snakemake runs in throwaway workflows.

A multi-host slice is simulated with local processes: host 0 runs the Snakemake job in the workflow
directory, followers run in empty scratch directories. The JAX test proves that 4 processes join one
jax.distributed cluster through trainer.train.distributed.
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


def run_snakemake(workdir: Path, *args: str, timeout: float = 180, extra_path: str = "", wait=True):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRAINER_", "SNAKEMAKE_PROFILE"))}
    # the plugin is found on sys.path by its module name (an editable install may not expose it)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), extra_path) if p)
    cmd = [sys.executable, "-m", "snakemake", "--executor", "tpu", "-j", "4", "--tpu-slices-config", "slices.yaml",
           "--latency-wait", "1", *args]
    if not wait:
        return subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                preexec_fn=default_sigint)
    return subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)


def write_workflow(tmp_path: Path, snakefile: str, slices: str) -> Path:
    wd = tmp_path / "wf"
    wd.mkdir()
    (wd / "Snakefile").write_text(textwrap.dedent(snakefile))
    (wd / "slices.yaml").write_text(textwrap.dedent(slices))
    return wd


PROBE = '''
"""Runs like a trainer command: every process joins the cluster; process 0 alone writes the output."""
import json, os, sys
from trainer.train import distributed

def main(argv):
    distributed.start(argv)
    import jax
    payload = distributed.broadcast_object({"from": "process 0"} if distributed.is_main() else None)
    facts = {"process": jax.process_index(), "count": jax.process_count(), "cwd": os.getcwd(),
             "cwd_files": sorted(os.listdir(".")), "payload": payload}
    print("PROBE", json.dumps(facts), flush=True)
    if distributed.is_main():
        with open(argv[1], "w") as f:
            json.dump(facts, f)
    distributed.sync("probe-done")
    return 0

if __name__ == "__main__":
    if sys.argv[1] == "follow":  # what `python -m trainer follow` does, for this module's command
        distributed.init_from_env()
        sys.exit(main(distributed.exchange_argv(None)))
    sys.exit(main(sys.argv[1:]))
'''


def test_four_jax_processes_join_and_only_host0_writes(tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    (code / "probe.py").write_text(PROBE)
    wd = write_workflow(tmp_path, """
        rule all:
            input: "out/probe.json", "local.txt"
        rule probe:
            output: "out/probe.json"
            resources: tpu="train"
            shell: "python -m probe probe {output}"
        rule plain:
            output: "local.txt"
            shell: "echo ${{TRAINER_PROCESS_ID:-unset}} $(pwd) > {output}"
        """, f"""
        slices:
          train:
            accelerator: v6e-16 (simulated)
            hosts: 4
            backend: local
            python: {sys.executable}
            follower_command: "{{python}} -m probe follow"
            timeout_s: 170
        """)
    r = run_snakemake(wd, extra_path=str(code))
    assert r.returncode == 0, r.stdout + r.stderr
    facts = json.loads((wd / "out/probe.json").read_text())
    assert facts["count"] == 4 and facts["process"] == 0 and facts["cwd"] == str(wd)
    jobdir = next(d for d in (wd / ".snakemake/tpu").iterdir() if (d / "worker3.log").exists())
    followers = []
    for w in range(4):
        assert (jobdir / f"worker{w}.exit").read_text().strip() == "0"
        line = next(x for x in (jobdir / f"worker{w}.log").read_text().splitlines() if x.startswith("PROBE"))
        followers.append(json.loads(line[len("PROBE "):]))
    for w, f in enumerate(followers[1:], start=1):
        assert f["process"] == w and f["count"] == 4 and f["payload"] == {"from": "process 0"}
        assert f["cwd"] != str(wd) and f["cwd_files"] == [], f  # followers ran in empty directories
        assert not os.path.exists(f["cwd"])  # scratch directories are removed afterwards
    # a job without the tpu resource ran as a plain local job, outside the cluster protocol
    assert (wd / "local.txt").read_text().split() == ["unset", str(wd)]
    assert "job 1 (probe) -> slice 'train'" in r.stderr or "(probe) -> slice 'train'" in r.stderr


WAIT_HOST0 = "while [ ! -s {}/wf/host0.pid ]; do sleep 0.1; done"
FAILING = """
    rule work:
        output: "out.txt"
        resources: tpu="train"
        shell: "echo $$ > host0.pid; sleep 60; touch {output}"
"""


def test_failing_follower_stops_the_others_and_shows_its_log(tmp_path):
    # the failing follower first waits until host 0 is really running (test synchronisation only)
    wd = write_workflow(tmp_path, FAILING, f"""
        slices:
          train:
            accelerator: v6e-16 (simulated)
            hosts: 3
            follower_command: "echo follower $TRAINER_PROCESS_ID starting; if [ $TRAINER_PROCESS_ID = 2 ]; then
              {WAIT_HOST0.format(tmp_path)}; echo 'RESOURCE_EXHAUSTED on worker two' >&2; exit 3; fi; sleep 60"
        """)
    t0 = time.monotonic()
    r = run_snakemake(wd)
    elapsed = time.monotonic() - t0
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert elapsed < 40, f"the failure was not noticed promptly ({elapsed:.0f} s)"
    assert "worker 2 exited with code 3; stopped worker(s) 0, 1" in out
    assert "--- worker 2 log (.snakemake/tpu/" in out and "RESOURCE_EXHAUSTED on worker two" in out
    host0 = int((wd / "host0.pid").read_text())
    assert not alive(host0) and not (wd / "out.txt").exists()


def test_hung_worker_hits_the_slice_timeout(tmp_path):
    wd = write_workflow(tmp_path, FAILING, f"""
        slices:
          train: {{accelerator: v6e-8, hosts: 2, timeout_s: 5,
                  follower_command: "{WAIT_HOST0.format(tmp_path)}; echo hanging; sleep 60"}}
        """)
    t0 = time.monotonic()
    r = run_snakemake(wd)
    out = r.stdout + r.stderr
    assert r.returncode != 0 and time.monotonic() - t0 < 40
    assert "timed out after 5 s (slice timeout_s); worker(s) 0, 1 still running were stopped" in out
    assert "hanging" in out  # the hung worker's log tail
    assert not alive(int((wd / "host0.pid").read_text()))


def test_followers_left_running_after_host0_fail_after_grace(tmp_path):
    wd = write_workflow(tmp_path, """
        rule work:
            output: "out.txt"
            resources: tpu="train"
            shell: "touch {output}"
        """, """
        slices:
          train: {accelerator: v6e-8, hosts: 2, follower_grace_s: 1, follower_command: "sleep 60"}
        """)
    r = run_snakemake(wd)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert "host 0 finished but worker(s) 1 were still running 1 s later (follower_grace_s)" in out
    assert not (wd / "out.txt").exists()  # a failed job's output is removed by Snakemake


def test_unknown_slice_is_a_clear_error(tmp_path):
    wd = write_workflow(tmp_path, """
        rule rl_train:
            output: "out.txt"
            resources: tpu="trian"
            shell: "touch {output}"
        """, """
        slices:
          train: {accelerator: v6e-16, hosts: 4}
          eval: {accelerator: v6e-8, hosts: 1}
        """)
    r = run_snakemake(wd)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert 'rule rl_train: resources: tpu="trian" names an unknown slice; known slices: eval, train' in out


def test_cancel_stops_every_worker(tmp_path):
    wd = write_workflow(tmp_path, """
        rule work:
            output: "out.txt"
            resources: tpu="train"
            shell: "echo $$ > pids/host0; sleep 120; touch {output}"
        """, f"""
        slices:
          train:
            accelerator: v6e-16 (simulated)
            hosts: 3
            follower_command: "echo $$ > {tmp_path}/wf/pids/host$TRAINER_PROCESS_ID; sleep 120"
        """)
    (wd / "pids").mkdir()
    proc = run_snakemake(wd, wait=False)
    deadline = time.monotonic() + 60
    # `echo $$ > f` creates f before writing it: wait for three non-empty pid files
    while len([p for p in (wd / "pids").iterdir() if p.read_text().strip()]) < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    pids = {p.name: int(p.read_text()) for p in (wd / "pids").iterdir()}
    assert len(pids) == 3 and all(alive(p) for p in pids.values())
    proc.send_signal(signal.SIGINT)  # what Ctrl-C does: Snakemake calls the executor's cancel
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [name for name, p in pids.items() if alive(p)], out
