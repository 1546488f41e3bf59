"""The PostgreSQL store: the same repository Protocols over asyncpg, for several replicas
sharing one database (``MAILROOM_DATABASE=postgresql://...``)."""
