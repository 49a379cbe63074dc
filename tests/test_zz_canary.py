"""Runs last: no token or secret value handed out during the suite reached the broker's logs.

conftest.py routes every log record of the in-process brokers (and the stderr of the broker
processes the suite started) through the production formatter into LOG_CAPTURE, and records
every value a test received. This test also makes values of its own, on error paths too.
"""

from __future__ import annotations

from broker.emulator import Fault
from tests.conftest import LOG_CAPTURE, SERVED_VALUES, RunningBroker


async def test_canary_token_never_logged(broker: RunningBroker) -> None:
    emulator = broker.emulator
    status, body = await broker.token("https://canary.example")
    assert status == 200
    canary = body["access_token"]
    emulator.token_lifetime = 2  # short-lived: refreshes, failures and 503s follow
    emulator.add_fault("identity", Fault(status=500, count=3))
    for resource in ("https://canary-2.example", "https://canary-3.example"):
        await broker.token(resource)
    await broker.token("https://canary.example", client_id="not-allowed")
    logs = LOG_CAPTURE.getvalue()
    assert "listening on" in logs  # the capture really holds the broker's log
    assert canary not in logs
    assert canary.split(".")[2] not in logs  # not even the signature part


def test_no_value_served_during_the_suite_was_logged() -> None:
    logs = LOG_CAPTURE.getvalue()
    # A value of a few characters would match ordinary log text by chance; tokens never are that short.
    values = [value for value in SERVED_VALUES if len(value) >= 12]
    assert len(values) > 50
    leaked = sum(1 for value in values if value in logs)
    assert leaked == 0, f"{leaked} of {len(values)} served values appear in the logs"
