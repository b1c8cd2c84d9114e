import pytest

from tests.procs import fake_gcs_servers

pytest_plugins = ["tests.conftest_gcs"]


@pytest.fixture(scope="session", autouse=True)
def no_emulator_left_running(tmp_path_factory):
    """Servers the project starts, it stops: after the whole session (every other fixture torn
    down first) no fake-gcs-server may still serve a directory of this session."""
    yield
    left = fake_gcs_servers(tmp_path_factory.getbasetemp())
    assert not left, f"fake-gcs-server left running after the test session: {left}"
