"""The kernel's word on who is at the other end of a Unix socket (SO_PEERCRED)."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from pathlib import Path

_UCRED = struct.Struct("3i")


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gids: frozenset[int]  # primary and supplementary groups


def peer_of(sock: socket.socket) -> Peer:
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return Peer(pid=pid, uid=uid, gids=frozenset({gid, *_supplementary_groups(pid)}))


def _supplementary_groups(pid: int) -> set[int]:
    # SO_PEERCRED carries only the primary group; /proc has the rest while the peer lives.
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return set()
    for line in status.splitlines():
        if line.startswith("Groups:"):
            return {int(g) for g in line.split()[1:]}
    return set()
