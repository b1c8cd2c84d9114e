"""jax.distributed start-up: a follower waits for a late host 0 (whose Snakemake job fetches inputs
first), learns the command through the public broadcast API, and names host 0 if it never comes."""
import subprocess
import sys
import time
from pathlib import Path

from tests.rl_helpers import env, free_port

REPO = Path(__file__).resolve().parents[1]
HOST0 = ("from trainer.train import distributed; distributed.start(['rl', '--x']); "
         "print('host0 sees', distributed.process_count())")
FOLLOWER = ("from trainer.train import distributed; distributed.init_from_env(); "
            "print('follower runs', distributed.exchange_argv(None))")


def _cluster_env(addr: str, pid: int, **extra: str) -> dict:
    return env(TRAINER_COORDINATOR=addr, TRAINER_NUM_PROCESSES="2", TRAINER_PROCESS_ID=str(pid), **extra)


def test_follower_waits_for_a_late_host0_and_gets_its_argv(tmp_path):
    addr = f"127.0.0.1:{free_port()}"
    follower = subprocess.Popen([sys.executable, "-c", FOLLOWER], cwd=tmp_path, env=_cluster_env(addr, 1),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(8)  # longer than nothing: host 0 is still "fetching inputs"
    assert follower.poll() is None
    host0 = subprocess.run([sys.executable, "-c", HOST0], cwd=tmp_path, env=_cluster_env(addr, 0),
                           capture_output=True, text=True, timeout=300)
    out, _ = follower.communicate(timeout=300)
    assert host0.returncode == 0 and "host0 sees 2" in host0.stdout, host0.stderr[-2000:]
    assert follower.returncode == 0 and "follower runs ['rl', '--x']" in out, out[-2000:]
    assert "waiting for host 0 (coordinator " + addr in out


def test_follower_names_the_host_that_never_joined(tmp_path):
    addr = f"127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "trainer", "follow"], cwd=tmp_path,
                       env=_cluster_env(addr, 1, TRAINER_FOLLOWER_TIMEOUT_S="3"), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode != 0 and time.monotonic() - t0 < 120
    assert (f"process 1: host 0 (process 0, the jax.distributed coordinator at {addr}) never joined: nothing "
            "listened there for 3 s") in r.stderr
    assert "TRAINER_FOLLOWER_TIMEOUT_S" in r.stderr and "Traceback" not in r.stderr
