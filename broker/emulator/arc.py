"""Azure Arc's himds challenge: the key file that proves a caller may read a directory only root can write.

An Arc-enabled server's agent (himds) answers a token request without credentials with 401 and
``WWW-Authenticate: Basic realm=<key file>``; the caller reads that file and sends its content as
``Authorization: Basic <content>``. The point is the file's permissions, so clients check where it is:
azure-identity (``_validate_key_file``) accepts only a ``.key`` file directly inside
``/var/opt/azcmagent/tokens`` on Linux, at most 4096 bytes. The emulator therefore writes its key there
by default, which needs root; where it cannot, Arc is off and ``reason`` says why.

One key lives as long as the emulator. Real himds writes a new file per challenge; a fixed key keeps
concurrent clients from invalidating each other's challenge, and nothing the broker does depends on rotation.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

ARC_KEY_DIR = Path("/var/opt/azcmagent/tokens")
# azure-identity sends 2020-06-01; 2019-11-01 is the version Arc's documentation shows. IMDS uses neither
# for tokens (2018-02-01 / 2019-08-01), so the version tells the two protocols apart on their shared path.
ARC_API_VERSIONS = frozenset({"2019-11-01", "2020-06-01"})


@dataclass
class ArcKey:
    path: Path
    secret: str = field(repr=False)
    _created_dirs: list[Path] = field(default_factory=list, repr=False)  # deepest last

    @classmethod
    def create(cls, directory: Path) -> ArcKey:
        """Write a fresh key file (mode 0600) into ``directory``, creating it if missing; raises OSError."""
        created: list[Path] = []
        missing: list[Path] = []
        probe = directory
        while not probe.exists():
            missing.append(probe)
            probe = probe.parent
        try:
            for item in reversed(missing):
                try:
                    # Owner-only, like the agent's own directory: the file's readers are the point of the scheme.
                    item.mkdir(mode=0o700 if item == directory else 0o755)
                except FileExistsError:  # another emulator got there first; it is theirs to remove
                    continue
                created.append(item)
            path = directory / f"{secrets.token_hex(8)}.key"
            # Hex keeps the value header-safe: azure-identity puts the file's bytes verbatim into a header.
            secret = secrets.token_hex(32)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w", encoding="ascii") as file:
                file.write(secret)
        except BaseException:
            _remove_dirs(created)
            raise
        return cls(path, secret, created)

    def matches(self, authorization: str) -> bool:
        """Whether an ``Authorization`` header value is ``Basic <this key>``."""
        scheme, _, value = authorization.partition(" ")
        return scheme.lower() == "basic" and hmac.compare_digest(value.strip().encode(), self.secret.encode())

    @property
    def challenge(self) -> str:
        # Unquoted, as himds sends it: azure-identity takes everything after the first "=" as the path.
        return f"Basic realm={self.path}"

    def remove(self) -> None:
        """Delete the key file and any directory ``create`` made (when empty: other emulators may share it)."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        _remove_dirs(self._created_dirs)
        self._created_dirs = []


def _remove_dirs(created: list[Path]) -> None:
    for item in reversed(created):
        try:
            item.rmdir()
        except OSError:  # not empty (another emulator's key) or already gone: leave it
            break
