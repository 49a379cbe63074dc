"""Socket callers are identified by the kernel, once per connection."""

from __future__ import annotations

import os

import aiohttp
import pytest

import broker.peercred
from broker.peercred import Peer
from tests.conftest import BrokerFactory

VAULT = "https://vault.azure.net"


async def test_credentials_read_once_per_connection(make_broker: BrokerFactory,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Peer] = []
    real = broker.peercred.peer_of

    def counting(sock: object) -> Peer:
        peer = real(sock)  # type: ignore[arg-type]
        calls.append(peer)
        return peer

    monkeypatch.setattr(broker.peercred, "peer_of", counting)
    running = await make_broker()
    for _ in range(2):  # two connections, five requests each
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=running.socket_path)) as session:
            for _ in range(5):
                async with session.get("http://localhost/msi/token", params={"resource": VAULT},
                                       headers={"Metadata": "true"}) as response:
                    assert response.status == 200
    assert len(calls) == 2
    assert calls[0].uid == os.getuid()
    assert os.getgid() in calls[0].gids


async def test_a_group_admits_the_caller(make_broker: BrokerFactory) -> None:
    running = await make_broker(f'[[clients]]\nname = "by-group"\ngids = [{os.getgid()}]\nresources = ["*"]\n')
    async with running.unix().get("http://localhost/msi/token", params={"resource": VAULT},
                                  headers={"Metadata": "true"}) as response:
        assert response.status == 200


def test_supplementary_groups_come_from_the_kernel() -> None:
    import socket

    from broker.peercred import peer_of

    def child_groups() -> frozenset[int]:
        left, right = socket.socketpair()
        with left, right:
            return peer_of(left).gids

    before = child_groups()
    assert os.getgid() in before
    if os.getuid() != 0:
        pytest.skip("changing supplementary groups needs root")
    old = os.getgroups()
    try:
        os.setgroups([4242, 4343])
        assert {4242, 4343} <= child_groups()
    finally:
        os.setgroups(old)
