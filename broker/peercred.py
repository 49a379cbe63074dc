"""The kernel's word on who is at the other end of a Unix socket (SO_PEERCRED)."""

from __future__ import annotations

import socket
import struct
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


class PeerCache:
    """Credentials per connection, looked up on its first request.

    The kernel fixes SO_PEERCRED at connect(), so one lookup serves every request on the
    connection: it saves a /proc read per request, and a pid recycled while the connection
    lives cannot lend another process's groups. Entries go with their transports.
    """

    def __init__(self) -> None:
        self._peers: weakref.WeakKeyDictionary[Any, Peer] = weakref.WeakKeyDictionary()

    def of(self, transport: Any) -> Peer:
        peer = self._peers.get(transport)
        if peer is None:
            peer = self._peers[transport] = peer_of(transport.get_extra_info("socket"))
        return peer
