"""Pytest fixtures: one local GCS API server (fake-gcs-server) per test session.

Wire it into any test module or the top-level tests/conftest.py with
    pytest_plugins = ["tests.conftest_gcs"]
Fixtures:
  gcs_emulator  (session)  GcsEmulator(root, endpoint, env): root is the emulator root dir to pass as
                           --emulator-root / `handoff.emulator_root`; env points google-cloud-storage
                           and gcloud at it (STORAGE_EMULATOR_HOST, CLOUDSDK_*).
  gcs_client    (session)  an anonymous google-cloud-storage Client of that server.
  gcs_uri       (function) a fresh gs://BUCKET/PREFIX for one test (bucket already exists).
"""
from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from trainer.ops import gcs_emulator as emu

TEST_BUCKET = "sidrl-test"


@dataclass(frozen=True)
class GcsEmulator:
    root: Path
    endpoint: str

    @property
    def env(self) -> dict[str, str]:
        return emu.client_env(self.endpoint)

    def client(self):
        return emu.storage_client(self.endpoint)


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory) -> GcsEmulator:
    root = tmp_path_factory.mktemp("gcs_emulator")
    # Held for the session: CLI commands on the same root take and release their own leases.
    with emu.serving(root) as endpoint:
        assert endpoint.startswith("http://127.0.0.1:")
        yield GcsEmulator(root=root, endpoint=endpoint)
    assert emu.status(root) is None  # the last holder stopped it


@pytest.fixture(scope="session")
def gcs_client(gcs_emulator):
    client = gcs_emulator.client()
    emu.ensure_bucket(client, TEST_BUCKET)
    return client


@pytest.fixture
def gcs_uri(gcs_client, request) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40]
    return f"gs://{TEST_BUCKET}/{slug}-{uuid.uuid4().hex[:8]}"
