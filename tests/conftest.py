"""Real servers only: fixtures come from hcrepo's pytest plugin, under the suite's names in
tests/plugins/servers.py, and the databases built on them in tests/plugins/database.py."""

pytest_plugins = ["hcrepo.testing.plugin", "tests.plugins.servers", "tests.plugins.database"]
