"""Real servers only. Every fixture plugin is listed here, once: the servers come from
hcrepo's own pytest plugin (under the suite's names in tests/plugins/servers.py), the
databases built on them from tests/plugins/database.py, and the hcrepo Databases of the
repository, routing and cache tests from tests/plugins/repos.py, routing.py and cache.py.
Helpers that are not fixtures live in tests/support/."""

pytest_plugins = [
    "hcrepo.testing.plugin",
    "tests.plugins.servers",
    "tests.plugins.database",
    "tests.plugins.repos",
    "tests.plugins.routing",
    "tests.plugins.cache",
]
