"""A local stand-in for Azure's managed-identity endpoints, Entra ID (for apps) and Key Vault (secrets).

Tests drive the real azure-identity and azure-keyvault-secrets clients against it, and
``tokenbroker serve --dev`` / ``tokenbroker emulator`` run it so the broker works without Azure.
See ``keyvault`` for the vault URL scheme, ``identity`` for the managed-identity protocols (App Service,
IMDS, Arc), ``arc`` for Arc's key file and ``aad`` for the client-credentials token endpoint.
"""

from .arc import ARC_KEY_DIR
from .demo import DEMO_VAULT, seed_demo
from .faults import Fault, Target
from .server import DEFAULT_TENANT_ID, Emulator, ReceivedRequest, Stats
from .tokens import InvalidToken

__all__ = [
    "ARC_KEY_DIR",
    "DEFAULT_TENANT_ID",
    "DEMO_VAULT",
    "Emulator",
    "Fault",
    "InvalidToken",
    "ReceivedRequest",
    "Stats",
    "Target",
    "seed_demo",
]
