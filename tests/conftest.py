"""Root test configuration: real-server fixtures (tests/servers/) and the full disk
(tests/disk.py) are plugins."""

pytest_plugins = [
    "tests.disk",
    "tests.servers.dovecot",
    "tests.servers.smtp",
    "tests.servers.postfix",
]
