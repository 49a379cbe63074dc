"""Clients of outside systems (identity endpoint, Key Vault, PostgreSQL, SQL Server).

Nothing here imports ``broker``: a token reaches a connector as
``Callable[[], Awaitable[str]]`` or as an azure-core ``AsyncTokenCredential``.
"""
