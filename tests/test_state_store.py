"""Durable train-state stores: local and GCS (fake-gcs-server) behave alike; saves are scheduled by
steps and by time, written in the background, and a failed save fails the training loop."""
import time

import numpy as np
import pytest

from trainer.errors import CheckpointError
from trainer.model import checkpoint
from trainer.train.state_store import STATE, AsyncWriter, Schedule, open_store


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_store_round_trip_and_clear(where, tmp_path, gcs_emulator, gcs_uri, monkeypatch):
    for k, v in gcs_emulator.env.items():
        monkeypatch.setenv(k, v)
    location = tmp_path / "state" if where == "local" else f"{gcs_uri}/train_state"
    store, other = open_store(location, "digest1"), open_store(location, "digest2")
    assert store.read(STATE) is None
    state = {"params": {"w": np.arange(6, dtype=np.float32)}, "step": np.int64(4)}
    writer = AsyncWriter(store)
    writer.submit([(STATE, lambda: checkpoint.train_state_bytes(state))], "state of step 4")
    writer.wait()
    other.write(STATE, b"x")
    template = {"params": {"w": np.zeros(6, np.float32)}, "step": np.int64(0)}
    back = checkpoint.train_state_from_bytes(store.read(STATE), template, store.where)
    assert int(back["step"]) == 4 and np.array_equal(back["params"]["w"], state["params"]["w"])
    store.clear()  # every configuration's states under the location
    assert store.read(STATE) is None and other.read(STATE) is None


def test_a_failed_background_save_fails_the_next_call(tmp_path):
    writer = AsyncWriter(open_store(tmp_path, "d"))

    def broken():
        raise OSError("disk full")

    writer.submit([(STATE, broken)], "state")
    with pytest.raises(OSError, match="disk full"):
        writer.wait()
    writer.wait()  # reported once


def test_schedule_by_steps_and_by_time():
    by_steps = Schedule(every_steps=3, every_minutes=0)
    assert [d for d in range(1, 10) if by_steps.due(d, steps=9)] == [3, 6]  # never at the last step
    by_time = Schedule(every_steps=0, every_minutes=0.5 / 60)  # half a second
    assert not by_time.due(1, steps=100)
    time.sleep(0.6)
    assert by_time.due(2, steps=100) and not by_time.due(3, steps=100)


def test_gcs_location_needs_a_prefix():
    with pytest.raises(CheckpointError, match="give a prefix inside the bucket"):
        open_store("gs://bucket-only", "d")
