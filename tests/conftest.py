pytest_plugins = ["tests.conftest_gcs"]
