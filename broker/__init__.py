"""tokenbroker: a local broker for Azure managed-identity tokens, Key Vault secrets and SQL."""

__version__ = "0.1.0"
