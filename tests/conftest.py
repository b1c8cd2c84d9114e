import pytest

from tests.procs import fake_gcs_servers

pytest_plugins = ["tests.conftest_gcs"]

# .ci/run runs the suite on 2 workers (pytest-xdist). One module is one unit of work, so its module
# and session fixtures are built once; the two modules that share the demo workflow run go to the
# same worker, so that run is made once. (xdist's own `loadgroup` marks do nothing under pytest 9.2:
# they rename `item._nodeid`, which pytest 9 no longer reads.)
SAME_WORKER = {"test_workflow_faults": "test_workflow"}
# The longest modules start first, so no worker is left with one at the end (measured in CI on 2
# workers: 2-8 minutes each).
LONG_FIRST = ("test_workflow", "test_sft", "test_kill_rerun", "test_tpu_profile", "test_rl_multihost",
              "test_preemption", "test_recipes", "test_preset_1p5b")


def _unit(module: str) -> str:
    return SAME_WORKER.get(module, module)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(_unit(item.module.__name__.rsplit(".", 1)[-1]), len(rank)))  # stable


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class ByModule(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _unit(nodeid.split("::", 1)[0].rsplit("/", 1)[-1].removesuffix(".py"))

    config.option.loadscopereorder = False  # keep the collection order: LONG_FIRST
    return ByModule(config, log)


@pytest.fixture(scope="session", autouse=True)
def no_emulator_left_running(tmp_path_factory):
    """Servers the project starts, it stops: after the whole session (every other fixture torn
    down first) no fake-gcs-server may still serve a directory of this session."""
    yield
    left = fake_gcs_servers(tmp_path_factory.getbasetemp())
    assert not left, f"fake-gcs-server left running after the test session: {left}"
