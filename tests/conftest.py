import pytest

from tests.procs import fake_gcs_servers

pytest_plugins = ["tests.conftest_gcs"]

# .ci/run runs the suite on 2 workers (pytest-xdist, --dist loadgroup). A group is one module, so
# its module and session fixtures are built once per worker that runs it; the two modules that share
# the demo workflow run go together, so that run is made once.
SAME_WORKER = {"test_workflow_faults": "test_workflow"}
# The longest modules start first, so no worker is left with one at the end (measured in CI on 2
# workers: 3-8 minutes each).
LONG_FIRST = ("test_workflow", "test_sft", "test_kill_rerun", "test_tpu_profile", "test_rl_multihost",
              "test_preemption", "test_recipes", "test_preset_1p5b")


def pytest_collection_modifyitems(config, items):
    def module(item) -> str:
        return item.module.__name__.rsplit(".", 1)[-1]

    for item in items:
        item.add_marker(pytest.mark.xdist_group(SAME_WORKER.get(module(item), module(item))))
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(SAME_WORKER.get(module(item), module(item)), len(rank)))  # stable


@pytest.fixture(scope="session", autouse=True)
def no_emulator_left_running(tmp_path_factory):
    """Servers the project starts, it stops: after the whole session (every other fixture torn
    down first) no fake-gcs-server may still serve a directory of this session."""
    yield
    left = fake_gcs_servers(tmp_path_factory.getbasetemp())
    assert not left, f"fake-gcs-server left running after the test session: {left}"
