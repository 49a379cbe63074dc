"""A throwaway CA and a loopback server certificate for the Key Vault listener.

Key Vault clients refuse plain HTTP (the SDK's challenge policy enforces TLS), so the emulator needs a
certificate the client can be told to trust: the CA's PEM file is that trust anchor.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class TlsFiles:
    ca_file: Path
    server_file: Path  # private key followed by the certificate chain

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.server_file)
        return context


def create_tls_files(directory: Path, *, extra_names: tuple[str, ...] = ()) -> TlsFiles:
    """Mint a new CA and leaf into ``directory``; earlier files there are replaced."""
    directory.mkdir(parents=True, exist_ok=True)
    names = tuple(dict.fromkeys((*LOOPBACK_NAMES, *extra_names)))
    ca = trustme.CA(organization_name="tokenbroker emulator")
    leaf = ca.issue_cert(*names)
    ca_file = directory / "emulator-ca.pem"
    server_file = directory / "emulator-server.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    # The key file is written empty with owner-only permissions first, so the key is never world-readable.
    server_file.unlink(missing_ok=True)
    fd = os.open(server_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    leaf.private_key_and_cert_chain_pem.write_to_path(str(server_file))
    return TlsFiles(ca_file=ca_file, server_file=server_file)
