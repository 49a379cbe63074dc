"""A local stand-in for Azure's managed-identity endpoint and Key Vault (secrets).

Tests drive the real azure-identity and azure-keyvault-secrets clients against it, and
``tokenbroker serve --dev`` / ``tokenbroker emulator`` run it so the broker works without Azure.
See ``keyvault`` for the vault URL scheme and ``identity`` for the two token protocols.
"""

from .demo import DEMO_VAULT, seed_demo
from .faults import Fault, Target
from .server import DEFAULT_TENANT_ID, Emulator, Stats
from .tokens import InvalidToken

__all__ = [
    "DEFAULT_TENANT_ID",
    "DEMO_VAULT",
    "Emulator",
    "Fault",
    "InvalidToken",
    "Stats",
    "Target",
    "seed_demo",
]
