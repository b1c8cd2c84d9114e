"""Benchmark: how long a train-state save holds up the training loop, against the write itself.

    python bench/train_state_save.py [--mb 64,256] [--repeats 3]

For a state of each size (params + two optimizer moments, float32) it times, on process 0's
training thread, `train_state.save_async` (what the loop waits for: hand-off to the writer) and,
separately, the background write (serialization + upload) until `writer.wait()` returns, to a
local directory and to fake-gcs-server (the GCS API on loopback, trainer.ops.gcs_emulator).
The gather to host that precedes a save (a collective) is not included: it depends on the slice.
Prints one JSON line per (store, size) with best-of-`--repeats` seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np

from trainer.ops import gcs_emulator as emu
from trainer.train import state_store, train_state


def state_of(mb: int) -> dict:
    n = mb * (1 << 20) // 4 // 3  # params, mu, nu
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal(n, dtype=np.float32)}
    return {"params": params, "opt_state": {"mu": params["w"] * 0.1, "nu": params["w"] ** 2}, "step": np.int64(7),
            "extra": {}}


def time_save(store, host_state, repeats: int) -> dict:
    blocked, written = [], []
    for _ in range(repeats):
        writer = state_store.AsyncWriter(store)
        t = time.perf_counter()
        train_state.save_async(writer, host_state, "{}\n")
        blocked.append(time.perf_counter() - t)
        writer.wait()
        written.append(time.perf_counter() - t)
    return {"loop_blocked_s": round(min(blocked), 5), "background_write_s": round(min(written), 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", default="64,256")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.update(emu.client_env(emu.ensure_running(os.path.join(tmp, "gcs"))))
        emu.ensure_bucket(emu.storage_client(), "bench-states")
        try:
            for mb in (int(x) for x in args.mb.split(",")):
                host_state = state_of(mb)
                for name, location in (("local", os.path.join(tmp, "state")), ("gcs-emulator", "gs://bench-states/s")):
                    store = state_store.open_store(location, "bench")
                    print(json.dumps({"store": name, "state_mb": mb, **time_save(store, host_state, args.repeats)}),
                          flush=True)
                    store.clear()
        finally:
            emu.stop(os.path.join(tmp, "gcs"))


if __name__ == "__main__":
    main()
