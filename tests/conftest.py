"""Real servers only: fixtures live in tests/plugins (servers, then databases built on them)."""

pytest_plugins = ["tests.plugins.servers", "tests.plugins.database"]
