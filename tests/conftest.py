"""Suite-wide pytest configuration: plugins every test directory relies on."""

pytest_plugins = ["tests.fixtures.services", "tests.fixtures.server", "tests.fixtures.replicator"]
