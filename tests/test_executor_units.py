"""Unit tests of the TPU executor's pure parts: slice config, gcloud command lines, host scripts."""
import os
import re
import shlex
import subprocess
import time

import pytest

from snakemake_executor_plugin_tpu import gcloud as gc
from snakemake_executor_plugin_tpu.runner import JobRun, SlicePool
from snakemake_executor_plugin_tpu.slices import (
    SliceConfigError, load_slices_file, parse_slice, parse_slices, placement, requested_slice,
)

TRAIN = {"accelerator": "v6e-16", "hosts": 4, "backend": "tpu-vm", "name": "my-tpu", "zone": "us-east5-b"}


# ------------------------------------------------------------------ slices
def test_parse_slices_defaults_and_describe():
    s = parse_slices({"train": TRAIN, "eval": {"accelerator": "v6e-8", "hosts": 1}}, "cfg.yaml")
    assert s["train"].hosts == 4 and s["train"].backend == "tpu-vm" and s["train"].python_exe == "python3"
    assert s["train"].poll_s == 15.0 and s["eval"].poll_s == 0.2
    assert s["train"].follower_cmd() == "python3 -m trainer follow"
    assert s["train"].describe() == "slice 'train': v6e-16, 4 hosts, TPU VM my-tpu in us-east5-b"
    assert s["eval"].describe() == "slice 'eval': v6e-8, 1 host, local processes"


@pytest.mark.parametrize("raw, needle", [
    ({**TRAIN, "hots": 4}, "unknown key(s) hots"),
    ({"accelerator": "v6e-16"}, "missing required key(s) hosts"),
    ({**TRAIN, "zone": None}, "slices.train.zone: required for backend tpu-vm"),
    ({**TRAIN, "backend": "gke"}, "slices.train.backend: unknown 'gke'"),
    ({**TRAIN, "hosts": 0}, "slices.train.hosts: must be >= 1"),
    ({**TRAIN, "hosts": "four"}, "hosts/coordinator_port must be integers"),
    ({**TRAIN, "busy_cleanup": "yes"}, "slices.train.busy_cleanup: expected true or false"),
    ({**TRAIN, "coordinator": "10.0.0.1"}, "expected internal-ip, auto or HOST:PORT"),
    ({**TRAIN, "code_sync": "rsync"}, "slices.train.code_sync: unknown 'rsync'"),
])
def test_parse_slices_errors_name_the_key(raw, needle):
    with pytest.raises(SliceConfigError) as e:
        parse_slices({"train": raw}, "cfg.yaml")
    assert needle in str(e.value) and "cfg.yaml" in str(e.value)


def test_unknown_slice_names_rule_and_known_slices():
    slices = parse_slices({"train": TRAIN, "eval": {"accelerator": "v6e-8", "hosts": 1}}, "c")
    assert requested_slice("prep", {"mem_mb": 10}, slices) is None
    assert requested_slice("rl", {"tpu": "train"}, slices).slice_id == "train"
    with pytest.raises(SliceConfigError) as e:
        requested_slice("rl_train", {"tpu": "trian"}, slices)
    msg = str(e.value)
    assert "rule rl_train" in msg and '"trian"' in msg and "known slices: eval, train" in msg


def test_load_slices_file_and_placement(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("other: 1\n")
    with pytest.raises(SliceConfigError, match="no top-level `slices:` key"):
        load_slices_file(p)
    with pytest.raises(SliceConfigError, match="file not found"):
        load_slices_file(tmp_path / "missing.yaml")
    p.write_text("slices:\n  train: {accelerator: v6e-16 (simulated), hosts: 4, backend: local}\n")
    assert load_slices_file(p)["train"].hosts == 4
    assert placement({"train": TRAIN}, "train") == "runs on slice 'train': v6e-16, 4 hosts, TPU VM my-tpu in us-east5-b"
    assert placement({"train": TRAIN}, None) == "runs locally"
    with pytest.raises(SliceConfigError, match="known slices: train"):
        placement({"train": TRAIN}, "eval")


# ------------------------------------------------------------------ gcloud command lines
def test_ssh_argv_zone_project_worker_and_quoting():
    cmd = "cd 'my dir' && echo \"$HOME\"; python -c 'print(1)'"
    argv = gc.ssh_argv("tpu-a", "us-east5-b", 3, cmd, project="proj-1", extra=["--tunnel-through-iap"])
    assert argv == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "tpu-a", "--zone", "us-east5-b",
                    "--project", "proj-1", "--worker=3", "--command", cmd, "--tunnel-through-iap"]
    # what a user would paste parses back to exactly the same argv
    assert shlex.split(gc.display(argv)) == argv
    no_project = gc.ssh_argv("tpu-a", "europe-west4-a", "all", "true")
    assert "--project" not in no_project and "--worker=all" in no_project


@pytest.mark.parametrize("worker, expected", [(0, "0"), ("all", "all"), ([0, 1, 3], "0,1,3"), ("2,3", "2,3")])
def test_format_workers(worker, expected):
    assert gc.format_workers(worker) == expected


@pytest.mark.parametrize("bad", [-1, [], [0, -2], "0;rm -rf /", "some", [True]])
def test_format_workers_rejects(bad):
    with pytest.raises(ValueError):
        gc.format_workers(bad)


def test_scp_and_describe_argv():
    to = gc.scp_to_argv("/tmp/x.bundle", "sidrl-abc.bundle", "tpu-a", "z1", [0, 1], project="p")
    assert to == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "/tmp/x.bundle", "tpu-a:sidrl-abc.bundle",
                  "--zone", "z1", "--project", "p", "--worker=0,1"]
    frm = gc.scp_from_argv("sidrl/out", "out/", "tpu-a", "z1", 0, recurse=True)
    assert frm[4:7] == ["scp", "--recurse", "tpu-a:sidrl/out"] and frm[7] == "out/"
    assert gc.describe_argv("tpu-a", "z1") == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "tpu-a",
                                                "--zone", "z1", "--format=json"]


def test_paths_and_env_quoting():
    assert gc.qpath("~/my repo") == '"$HOME"/\'my repo\''
    assert gc.qpath("/root/x") == "/root/x"
    assert gc.home_relative("~/sidrl") == "sidrl"
    assert gc.join_path("sidrl", "") == "sidrl" and gc.join_path("/root/r", "sub/dir") == "/root/r/sub/dir"
    out = subprocess.run(["bash", "-c", gc.env_exports({"A": "x y", "B": "$(touch /nope)'"}) + '; echo "$A|$B"'],
                         capture_output=True, text=True).stdout
    assert out == "x y|$(touch /nope)'\n"


def test_parse_state():
    assert gc.parse_state("noise\nstate exit 3\n") == ("exit", 3)
    assert gc.parse_state("state running") == ("running", None)
    assert gc.parse_state("state lost\n") == ("lost", None)
    with pytest.raises(ValueError):
        gc.parse_state("Connection closed by remote host")


def test_prepare_script_contents():
    s = gc.prepare_script("~/sidrl", "a" * 40, "bundle", "sidrl-aaa.bundle", "/root/.env", "pip install -e .",
                          busy_cleanup=True)
    assert "rm -f /tmp/libtpu_lockfile" in s and "fuser -k /dev/vfio/*" in s
    assert f"git checkout -q --detach {'a' * 40}" in s and 'git fetch -q "$B" HEAD' in s
    assert ".sidrl_setup_" + "a" * 40 in s and f"set -a; eval \"$({gc.NORMALISE_ENV} /root/.env)\"; set +a" in s
    assert "rm -f /tmp/libtpu_lockfile" not in gc.prepare_script("w", "b" * 40, "none")
    assert "git" not in gc.prepare_script("w", "b" * 40, "none")


# ------------------------------------------------------------------ host scripts, run for real with bash
def _bash(script, cwd):
    return subprocess.run(["bash", "-c", script], cwd=cwd, capture_output=True, text=True, timeout=30)


def _poll(tmp_path, worker):
    return gc.parse_state(_bash(gc.poll_script("run", "tag1", worker), tmp_path).stdout)


def test_start_poll_kill_scripts_on_this_machine(tmp_path):
    (tmp_path / "run").mkdir()
    env = {"TRAINER_PROCESS_ID": "1", "X": "a b"}
    assert "started" in _bash(gc.start_script("run", "tag1", 0, 'echo "id=$TRAINER_PROCESS_ID x=$X"; exit 7', env),
                              tmp_path).stdout
    assert "started" in _bash(gc.start_script("run", "tag1", 1, "sleep 60", {}), tmp_path).stdout
    deadline = time.time() + 10
    while _poll(tmp_path, 0)[0] == "running" and time.time() < deadline:
        time.sleep(0.1)
    assert _poll(tmp_path, 0) == ("exit", 7)
    assert (tmp_path / "run/logs/tag1_worker0.log").read_text() == "id=1 x=a b\n"
    assert _poll(tmp_path, 1) == ("running", None)
    pgid = int((tmp_path / "run/logs/tag1_worker1.pid").read_text())
    assert "killed" in _bash(gc.kill_script("run", "tag1", 1, grace_s=0.2), tmp_path).stdout
    assert _poll(tmp_path, 1) == ("lost", None)  # killed: no exit code was written
    members = [line.split() for line in subprocess.run(["ps", "-e", "-o", "pgid=,stat="], capture_output=True,
                                                         text=True).stdout.splitlines()]
    assert not [m for m in members if int(m[0]) == pgid and not m[1].startswith("Z")]  # none left running
    assert "(no log on this host)" in _bash(gc.tail_script("run", "nosuchtag", 0), tmp_path).stdout


# ------------------------------------------------------------------ queueing
class _FakeBackend:
    hosts = 1

    def __init__(self, seconds):
        self.seconds, self.t0, self.log = seconds, None, []

    def prepare(self): pass
    def start(self): self.t0 = time.monotonic()
    def poll(self): return [("exit", 0)] if time.monotonic() - self.t0 > self.seconds else [("running", None)]
    def kill(self, workers): self.log.append(("kill", workers))
    def tail(self, w, n): return ""
    def log_location(self, w): return "-"
    def finish(self, ok): pass


def test_one_job_per_slice_the_rest_queue():
    spec = parse_slices({"eval": {"accelerator": "v6e-8", "hosts": 1, "poll_interval_s": 0.02}}, "c")["eval"]
    pool = SlicePool()
    runs = [JobRun(f"job {i}", spec, _FakeBackend(0.3)) for i in range(3)]
    waits = [pool.submit(r) for r in runs]
    assert waits == [None, "job 0", "job 0"]
    time.sleep(0.1)
    assert runs[0].backend.t0 is not None and runs[1].backend.t0 is None  # job 1 waits for the slice
    deadline = time.time() + 10
    while not all(r.done for r in runs) and time.time() < deadline:
        time.sleep(0.05)
    assert all(r.outcome.ok for r in runs)
    starts = [r.backend.t0 for r in runs]
    assert starts[0] + 0.3 <= starts[1] and starts[1] + 0.3 <= starts[2]  # strictly one after another


# ------------------------------------------------------------------ profiles
def _dry_run(tmp_path, profile, extra_env=None):
    import shutil
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    wd = tmp_path / "wf"
    shutil.copytree(repo / "profiles", wd / "profiles")
    (wd / "config").mkdir()
    (wd / "config/config.yaml").write_text(
        "slices:\n  train: {accelerator: v6e-16 (simulated), hosts: 4, backend: local}\n"
        "  eval: {accelerator: v6e-8 (simulated), hosts: 1, backend: local}\n")
    (wd / "Snakefile").write_text(
        'from snakemake_executor_plugin_tpu import placement\nconfigfile: "config/config.yaml"\n'
        'rule rl_train:\n    output: "rl.txt"\n    resources: tpu="train"\n'
        '    message: "rl_train " + placement(config["slices"], "train")\n    shell: "touch {output}"\n')
    env = dict(os.environ, PYTHONPATH=str(repo), **(extra_env or {}))
    return subprocess.run([sys.executable, "-m", "snakemake", "--profile", f"profiles/{profile}", "-n"], cwd=wd,
                          env=env, capture_output=True, text=True, timeout=120)


def test_default_profile_dry_run_shows_placement(tmp_path):
    r = _dry_run(tmp_path, "default")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "rl_train runs on slice 'train': v6e-16 (simulated), 4 hosts, local processes" in r.stdout + r.stderr


def test_tpu_profile_overlays_tpu_vm_slices(tmp_path, gcs_emulator):
    # a dry run asks the default storage which outputs exist: the local emulator stands in for GCS
    r = _dry_run(tmp_path, "tpu", gcs_emulator.env)
    out = r.stdout + r.stderr
    # every profile key is a valid option; what is missing here is only the GCS storage plugin
    if r.returncode != 0:
        assert "snakemake-storage-plugin-gcs is not installed" in out, out
    else:
        assert "rl_train runs on slice 'train': v6e-16, 4 hosts, TPU VM YOUR-TRAIN-TPU in us-east5-b" in out


def test_dirty_tree_is_refused_unless_allowed():
    from snakemake_executor_plugin_tpu.gitsync import GitState, check_clean

    clean = GitState("/r", "", "a" * 40, [])
    dirty = GitState("/r", "", "a" * 40, ["Snakefile", "trainer/rl/loop.py"])
    assert check_clean(clean, allow_dirty=False) is None
    with pytest.raises(SliceConfigError, match=r"uncommitted changes \(Snakefile, trainer/rl/loop.py\)"):
        check_clean(dirty, allow_dirty=False)
    assert "are NOT shipped; TPU VM hosts run commit aaaaaaaaaaaa" in check_clean(dirty, allow_dirty=True)


def test_env_file_is_normalised_before_it_is_sourced(tmp_path):
    """CRLF, blanks around lines and around `=` (as operators' env files come) do not reach the values."""
    env = tmp_path / "env"
    env.write_bytes(b"  WANDB_API_KEY = k-123  \r\nexport  A=1\r\n\r\n# note\r\nB='x y'\r\n")
    out = subprocess.run(["bash", "-c", gc.source_env_file(str(env)) + '; printf "%s|%s|%s" "$WANDB_API_KEY" "$A" "$B"'],
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout == "k-123|1|x y", out.stderr


def test_secret_values_are_masked_in_displayed_commands():
    argv = gc.ssh_argv("tpu", "z", 0, "export WANDB_API_KEY='s 1'; export HF_TOKEN=t2; export SEED=3; run")
    shown = gc.display(argv)
    assert "s 1" not in shown and "t2" not in shown and "export SEED=3" in shown
    assert "export WANDB_API_KEY=***" in shown and "export HF_TOKEN=***" in shown


def test_provision_config_is_validated():
    spec = parse_slice("t", {"accelerator": "v6e-8", "hosts": 1, "backend": "tpu-vm", "name": "n",
                             "provision": {"zones": ["a-1", "b-2"], "runtime_version": "v2-alpha-tpuv6e", "spot": True}},
                       "cfg")
    assert spec.provision.zones == ("a-1", "b-2") and spec.provision.accelerator == "v6e-8" and spec.zone is None
    assert "TPU VM n in a-1|b-2 (created when missing, spot)" in spec.describe()
    bad = [({"zones": []}, "provision.zones"), ({"zones": ["a"]}, "provision.runtime_version"),
           ({"zones": ["a"], "runtime_version": "v", "spot": "yes"}, "provision.spot"),
           ({"zones": ["a"], "runtime_version": "v", "zone": "a"}, "unknown key(s) zone")]
    for raw, msg in bad:
        with pytest.raises(SliceConfigError, match=re.escape(msg)):
            parse_slice("t", {"accelerator": "v6e-8", "hosts": 1, "backend": "tpu-vm", "name": "n", "provision": raw},
                        "cfg")
    with pytest.raises(SliceConfigError, match="only for backend tpu-vm"):
        parse_slice("t", {"accelerator": "v", "hosts": 1, "provision": {"zones": ["a"], "runtime_version": "v"}}, "cfg")
