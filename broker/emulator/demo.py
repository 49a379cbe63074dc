"""Demo data for ``tokenbroker serve --dev`` and ``tokenbroker emulator``.

The values are fixed and fake, so documentation can show them and nobody mistakes them for real ones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .server import Emulator

DEMO_VAULT = "demo"


def seed_demo(emulator: Emulator) -> None:
    """Fill vault "demo": app-db (a connection string), api-key (two versions) and greeting."""
    emulator.set_secret(
        DEMO_VAULT,
        "app-db",
        "Server=tcp:demo-sql.database.windows.net,1433;Database=app;"
        "Authentication=Active Directory Managed Identity;Encrypt=True",
        content_type="application/x-sqlserver-connection-string",
        tags={"env": "demo", "owner": "tokenbroker"},
    )
    # Two versions, so a rotation shows up: "latest" is the second.
    emulator.set_secret(DEMO_VAULT, "api-key", "demo-api-key-v1-not-a-real-key", tags={"env": "demo"})
    emulator.set_secret(DEMO_VAULT, "api-key", "demo-api-key-v2-not-a-real-key", tags={"env": "demo"})
    emulator.set_secret(
        DEMO_VAULT, "greeting", "Hello from the tokenbroker emulator!", content_type="text/plain"
    )
