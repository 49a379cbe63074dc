"""The kernel's word on who is at the other end of a Unix socket.

SO_PEERCRED (pid, uid, primary gid) and SO_PEERGROUPS (supplementary groups) are both fixed
by the kernel when the peer connects, so they cannot be changed afterwards by the peer, nor
borrowed from another process that later gets the same pid.
"""

from __future__ import annotations

import errno
import socket
import struct
import weakref
from dataclasses import dataclass
from typing import Any

_UCRED = struct.Struct("3i")
_GID = struct.Struct("I")
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13; Python 3.11 lacks the name


@dataclass(frozen=True)
class Peer:
    uid: int
    gids: frozenset[int]  # primary and supplementary groups


def peer_of(sock: socket.socket) -> Peer:
    _pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return Peer(uid=uid, gids=frozenset({gid, *_peer_groups(sock)}))


def _peer_groups(sock: socket.socket) -> set[int]:
    for room in (256, 65536):  # NGROUPS_MAX is 65536; most processes have a handful
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, room * _GID.size)
        except OSError as exc:
            if exc.errno == errno.ERANGE:
                continue
            return set()  # an old kernel: only the primary group counts
        return {gid for (gid,) in _GID.iter_unpack(raw)}
    return set()


class PeerCache:
    """Credentials per connection, looked up on its first request and kept with it."""

    def __init__(self) -> None:
        self._peers: weakref.WeakKeyDictionary[Any, Peer] = weakref.WeakKeyDictionary()

    def of(self, transport: Any) -> Peer:
        peer = self._peers.get(transport)
        if peer is None:
            peer = self._peers[transport] = peer_of(transport.get_extra_info("socket"))
        return peer
