"""Fault injection: queued misbehaviours that the next requests to a target consume."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from http import HTTPStatus
from typing import Literal, cast, get_args

Target = Literal["identity", "keyvault"]
FaultMode = Literal["status", "drop", "delay"]

TARGETS: tuple[Target, ...] = get_args(Target)
_MODES: tuple[FaultMode, ...] = get_args(FaultMode)


@dataclass(frozen=True)
class Fault:
    """One misbehaviour, applied to the next ``count`` requests whose path contains ``path_contains``.

    ``status`` answers with that status and the target's own error body; ``drop`` closes the connection
    without a response; ``delay`` only sleeps. ``delay`` seconds are slept first in every mode.

    aiohttp (and so azure-core) resends an idempotent request once when its connection drops, so it
    takes ``Fault(mode="drop", count=2)`` for a GET to fail in the client.
    """

    mode: FaultMode = "status"
    status: int = 500
    count: int = 1
    retry_after: float | None = None
    delay: float = 0.0
    path_contains: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"mode must be one of {', '.join(_MODES)}, not {self.mode!r}")
        if not 400 <= self.status <= 599:
            raise ValueError(f"status must be an HTTP error status (400-599), not {self.status}")
        if self.count < 1:
            raise ValueError(f"count must be at least 1, not {self.count}")
        if self.delay < 0 or not math.isfinite(self.delay):
            raise ValueError(f"delay must be a finite number of seconds >= 0, not {self.delay}")
        if self.retry_after is not None and (self.retry_after < 0 or not math.isfinite(self.retry_after)):
            raise ValueError(f"retry_after must be a finite number of seconds >= 0, not {self.retry_after}")

    @property
    def retry_after_header(self) -> str | None:
        # Retry-After carries whole seconds; rounding up keeps clients from coming back too early.
        return None if self.retry_after is None else str(math.ceil(self.retry_after))

    def matches(self, path: str) -> bool:
        return self.path_contains is None or self.path_contains in path

    def as_json(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def status_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def check_target(target: str) -> Target:
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}, not {target!r}")
    return target


def fault_from_json(body: Mapping[str, object]) -> tuple[Target, Fault]:
    """Parse the control API's ``{"target": ..., <Fault fields>}``; raises ValueError on anything odd."""
    known = {f.name for f in fields(Fault)} | {"target"}
    unknown = sorted(set(body) - known)
    if unknown:
        raise ValueError(f"unknown field(s): {', '.join(unknown)}")
    target = check_target(str(body.get("target", "")))
    mode = body.get("mode", "status")
    if not isinstance(mode, str):
        raise ValueError("mode must be a string")
    path_contains = body.get("path_contains")
    if path_contains is not None and not isinstance(path_contains, str):
        raise ValueError("path_contains must be a string")
    retry_after = body.get("retry_after")
    return target, Fault(
        mode=cast(FaultMode, mode),
        status=_whole(body, "status", 500),
        count=_whole(body, "count", 1),
        retry_after=None if retry_after is None else _number(body, "retry_after", 0.0),
        delay=_number(body, "delay", 0.0),
        path_contains=path_contains,
    )


def _number(body: Mapping[str, object], key: str, default: float) -> float:
    value = body.get(key, default)
    # bool is an int subclass; `"count": true` is a mistake worth reporting.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key} must be a number")
    return float(value)


def _whole(body: Mapping[str, object], key: str, default: int) -> int:
    value = _number(body, key, default)
    if not value.is_integer():
        raise ValueError(f"{key} must be a whole number")
    return int(value)


class FaultQueue:
    """Per-target queues; a request consumes one unit of the first fault that matches its path."""

    def __init__(self) -> None:
        self._queues: dict[Target, list[tuple[Fault, int]]] = {target: [] for target in TARGETS}

    def add(self, target: Target, fault: Fault) -> None:
        self._queues[check_target(target)].append((fault, fault.count))

    def clear(self) -> None:
        for queue in self._queues.values():
            queue.clear()

    def take(self, target: Target, path: str) -> Fault | None:
        queue = self._queues[target]
        for index, (fault, remaining) in enumerate(queue):
            if fault.matches(path):
                if remaining <= 1:
                    del queue[index]
                else:
                    queue[index] = (fault, remaining - 1)
                return fault
        return None

    def pending(self, target: Target) -> list[tuple[Fault, int]]:
        return list(self._queues[target])
