"""Root test configuration: real-server fixtures live in tests/servers/ as plugins."""

pytest_plugins = ["tests.servers.dovecot", "tests.servers.smtp"]
