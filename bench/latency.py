"""Latency and throughput of cached answers: the broker against bare aiohttp serving the same JSON.

    .venv/bin/python bench/latency.py [--requests N] [--concurrency C] [--rounds R]

Starts, all on loopback and in a fresh temporary directory:

- the emulator (in this process: it is only asked on a cache miss, and counts what it is asked);
- the broker as a subprocess (``python -m broker serve --config FILE``) with a Unix socket and a
  TCP listener on a free port, one socket client (this uid) and one TCP client (a key), a vault
  ``main`` on the emulator with a secret ``bench``;
- bench/baseline_server.py as a subprocess: aiohttp answering GET /msi/token with a copy of the
  broker's own token answer, on a TCP port and a Unix socket: the floor of "aiohttp serves a small
  JSON".

Each target gets one keep-alive client session. After a warm-up, every round measures each target:
N/R sequential requests (latency of each), then M/R requests from C concurrent workers (throughput),
reading the server's CPU time from /proc around the concurrent part. Latencies are pooled over the
rounds, throughput is the median of the rounds, server CPU per request is summed over them.
Nothing here asserts on timing: a benchmark reports, it does not fail on speed. It does fail on a
non-200 answer, since timing errors would be meaningless.

The client (this process) is Python and aiohttp too. With 2 or more CPUs it is pinned to one and
the servers to the others, so client and server really run side by side; "client busy" near 100 %
means the client, not the server, limited the throughput of that row.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import aiohttp
from yarl import URL

from broker.emulator import Emulator

HERE = Path(__file__).resolve().parent
RESOURCE = "https://vault.azure.net"
CLIENT_KEY = "bench-client-key-0123456789abcdef"
VAULT = "main"
SECRET = "bench"
LOOPBACK = "127.0.0.1"

START_TIMEOUT = 30.0  # seconds for a server to come up (the broker also fetches its warm-up tokens)
STOP_TIMEOUT = 10.0  # seconds a server gets to exit on SIGTERM before SIGKILL
REQUEST_TIMEOUT = 10.0  # seconds per request: a hung server ends the run instead of hanging it

# ---------------------------------------------------------------------------------------------
# child processes


@dataclass
class Child:
    """A server subprocess in its own session (a terminal's Ctrl-C reaches only us; we stop it)."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    log: IO[bytes]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        """SIGTERM, wait, SIGKILL if need be; synchronous so it also runs after the event loop is gone."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                self.proc.wait(STOP_TIMEOUT)
        self.log.close()


@dataclass
class Children:
    items: list[Child] = field(default_factory=list)
    cpus: set[int] | None = None  # pin every server to these CPUs (see pin_cpus)

    def start(self, name: str, argv: list[str], log_path: Path, env: Mapping[str, str] | None = None) -> Child:
        log = log_path.open("wb")
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None, start_new_session=True,
            )
        except BaseException:
            log.close()
            raise
        child = Child(name, proc, log_path, log)
        self.items.append(child)
        if self.cpus is not None:
            # Right after the fork, before the server has started its loop or any thread.
            os.sched_setaffinity(proc.pid, self.cpus)
        return child

    def stop_all(self) -> None:
        for child in reversed(self.items):
            child.stop()


def pin_cpus(children: Children) -> tuple[set[int], set[int]] | None:
    """Client (this process) on one CPU, servers on the others; None with fewer than 2 CPUs.

    Unpinned, the kernel's wake-affine heuristic tends to run a woken server on the CPU of the
    client that woke it, so client and server take turns on one core and the other one idles.
    """
    if not hasattr(os, "sched_setaffinity"):
        return None
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2:
        return None
    client, servers = {available[0]}, set(available[1:])
    os.sched_setaffinity(0, client)
    children.cpus = servers
    return client, servers


def free_port() -> int:
    """A port free right now on loopback (the servers bind it a moment later; a clash fails loudly)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process, from /proc (Linux); None where unavailable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state is fields[0], utime [11], stime [12]
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float | None:
    """CPU seconds all CPUs spent on anything but idle and iowait since boot, from /proc/stat."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in first[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


@dataclass
class OtherCpu:
    """CPU time spent by anything but this process and ``pids`` since ``begin`` (None: not readable)."""

    pids: list[int]
    start: float | None = None

    def _now(self) -> float | None:
        machine = machine_busy_seconds()
        ours = [cpu_seconds(pid) for pid in [os.getpid(), *self.pids]]
        if machine is None or any(seconds is None for seconds in ours):
            return None
        return machine - sum(seconds or 0.0 for seconds in ours)

    def begin(self) -> None:
        self.start = self._now()

    def seconds(self) -> float | None:
        now = self._now()
        return None if now is None or self.start is None else max(0.0, now - self.start)


async def wait_until(child: Child, what: str, check: Callable[[], object]) -> None:
    """Poll ``check`` (sync or async) until it is truthy; fail if the child dies or time runs out."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if not child.alive():
            raise RuntimeError(f"{child.name} exited ({child.proc.returncode}) before {what}:\n{child.log_tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{child.name}: no {what} after {START_TIMEOUT:.0f}s:\n{child.log_tail()}")
        await asyncio.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# the servers


def broker_config(tmp: Path, emulator: Emulator, socket_path: Path, http_port: int) -> Path:
    path = tmp / "broker.toml"
    path.write_text(f"""
[server]
socket = "{socket_path}"
socket_mode = "0600"
http = "{LOOPBACK}:{http_port}"
health = ""
shutdown_grace = 2

[identity]
source = "app_service"
endpoint = "{emulator.identity_url}"
timeout = 5

[[clients]]
name = "bench-socket"
uids = [{os.getuid()}]
resources = ["*"]
secrets = ["{VAULT}/*"]

[[clients]]
name = "bench-tcp"
key = "{CLIENT_KEY}"
resources = ["*"]

[vaults.{VAULT}]
url = "{emulator.vault_url(VAULT)}"
ca_file = "{emulator.ca_file}"
verify_challenge_resource = false
""")
    return path


async def socket_ready(socket_path: Path) -> bool:
    if not socket_path.exists():
        return False
    try:
        async with (
            aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(socket_path))) as session,
            session.get("http://localhost/readyz", timeout=aiohttp.ClientTimeout(total=2)) as response,
        ):
            return response.status == 200
    except aiohttp.ClientError:
        return False


async def tcp_open(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection(LOOPBACK, port)
    except OSError:
        return False
    writer.close()
    await writer.wait_closed()
    return True


async def start_broker(children: Children, tmp: Path, emulator: Emulator) -> tuple[Child, Path, int]:
    socket_path = tmp / "run" / "broker.sock"
    port = free_port()
    config = broker_config(tmp, emulator, socket_path, port)
    # The production default log level (info): no line per request, so logging costs nothing here.
    env = {**os.environ, "IDENTITY_HEADER": emulator.identity_header, "TOKENBROKER_LOG_LEVEL": "info"}
    for name in ("TOKENBROKER_CONFIG", "TOKENBROKER_SOCKET", "TOKENBROKER_HTTP", "TOKENBROKER_HEALTH"):
        env.pop(name, None)
    child = children.start(
        "broker", [sys.executable, "-m", "broker", "serve", "--config", str(config)], tmp / "broker.log", env
    )
    await wait_until(child, "/readyz 200 on its socket", lambda: socket_ready(socket_path))
    await wait_until(child, "TCP listener", lambda: tcp_open(port))
    return child, socket_path, port


async def start_baseline(children: Children, tmp: Path, body: Path) -> tuple[Child, Path, int]:
    socket_path = tmp / "baseline.sock"
    port = free_port()
    argv = [sys.executable, str(HERE / "baseline_server.py"),
            "--port", str(port), "--socket", str(socket_path), "--body", str(body)]
    child = children.start("baseline", argv, tmp / "baseline.log")
    await wait_until(child, "Unix socket", socket_path.exists)
    await wait_until(child, "TCP listener", lambda: tcp_open(port))
    return child, socket_path, port


# ---------------------------------------------------------------------------------------------
# measuring


@dataclass(frozen=True)
class Target:
    label: str
    url: URL
    headers: Mapping[str, str]
    socket_path: Path | None
    pid: int

    def session(self, limit: int) -> aiohttp.ClientSession:
        connector: aiohttp.BaseConnector = (
            aiohttp.UnixConnector(path=str(self.socket_path), limit=limit)
            if self.socket_path is not None
            else aiohttp.TCPConnector(limit=limit)
        )
        return aiohttp.ClientSession(
            connector=connector, headers=dict(self.headers), timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
        )


@dataclass
class Samples:
    latencies_ns: list[int] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)  # requests/s, one per round
    server_cpu_s: float | None = 0.0  # server CPU over every concurrent phase (None: not readable)
    server_cpu_requests: int = 0  # requests in those phases
    client_busy: list[float] = field(default_factory=list)  # client CPU / wall time, one per round
    body_bytes: int = 0


@dataclass(frozen=True)
class Summary:
    label: str
    median_us: float
    p90_us: float
    p99_us: float
    rate: float
    server_cpu_us: float | None
    client_busy: float
    body_bytes: int


async def fetch(session: aiohttp.ClientSession, target: Target) -> int:
    async with session.get(target.url) as response:
        body = await response.read()
        if response.status != 200:
            raise RuntimeError(f"{target.label}: HTTP {response.status}: {body[:300]!r}")
        return len(body)


async def sequential(session: aiohttp.ClientSession, target: Target, count: int, into: Samples) -> None:
    clock = time.perf_counter_ns
    for _ in range(count):
        start = clock()
        into.body_bytes = await fetch(session, target)
        into.latencies_ns.append(clock() - start)


async def concurrent(session: aiohttp.ClientSession, target: Target, count: int, workers: int) -> float:
    """Wall-clock seconds for ``count`` requests issued by ``workers`` tasks sharing one session."""
    left = count

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await fetch(session, target)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(workers)))
    return time.perf_counter() - start


async def measure_round(
    session: aiohttp.ClientSession, target: Target, seq: int, burst: int, workers: int, into: Samples
) -> None:
    await sequential(session, target, seq, into)
    cpu_before, client_before = cpu_seconds(target.pid), time.process_time()
    elapsed = await concurrent(session, target, burst, workers)
    cpu_after, client_after = cpu_seconds(target.pid), time.process_time()
    into.rates.append(burst / elapsed)
    into.client_busy.append((client_after - client_before) / elapsed)
    if cpu_before is None or cpu_after is None or into.server_cpu_s is None:
        into.server_cpu_s = None
    else:  # summed over the rounds: /proc counts in clock ticks (10 ms), too coarse for one round
        into.server_cpu_s += cpu_after - cpu_before
        into.server_cpu_requests += burst


def percentile(sorted_values: list[int], fraction: float) -> float:
    """Nearest-rank percentile."""
    index = max(0, math.ceil(fraction * len(sorted_values)) - 1)
    return float(sorted_values[index])


def summarize(target: Target, samples: Samples) -> Summary:
    values = sorted(samples.latencies_ns)
    return Summary(
        label=target.label,
        median_us=statistics.median(values) / 1000,
        p90_us=percentile(values, 0.90) / 1000,
        p99_us=percentile(values, 0.99) / 1000,
        rate=statistics.median(samples.rates),
        server_cpu_us=(
            None if samples.server_cpu_s is None or not samples.server_cpu_requests
            else samples.server_cpu_s / samples.server_cpu_requests * 1e6
        ),
        client_busy=statistics.median(samples.client_busy),
        body_bytes=samples.body_bytes,
    )


# ---------------------------------------------------------------------------------------------
# report


def usable_cpus() -> int:
    """What nproc prints: the CPUs this process may run on (before pin_cpus narrows it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def machine_info() -> list[str]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    load = "n/a"
    with contextlib.suppress(OSError, AttributeError):
        load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    return [
        f"machine:  nproc {usable_cpus()} (cpu_count {os.cpu_count()}), {model or platform.machine()}",
        f"system:   {platform.system()} {platform.release()}",
        f"python:   {platform.python_implementation()} {platform.python_version()}, aiohttp {aiohttp.__version__}",
        f"load:     {load}   (1, 5, 15-min averages at start: other work on the machine skews results)",
    ]


def ratio(numerator: float | None, denominator: float | None) -> str:
    if numerator is None or denominator is None or denominator == 0:
        return "n/a"
    return f"{numerator / denominator:.2f}x"


def render(results: dict[str, Summary], args: argparse.Namespace) -> list[str]:
    lines = [
        f"sequential: {args.requests} requests per target; throughput: {args.throughput_requests} requests "
        f"per target at concurrency {args.concurrency}; {args.rounds} rounds, after {args.warmup} warm-up requests",
        "",
        f"{'target':<34}{'bytes':>6}{'median us':>11}{'p90 us':>9}{'p99 us':>9}{'req/s':>9}"
        f"{'srv CPU us/req':>16}{'client busy':>13}",
    ]
    for item in results.values():
        cpu = "n/a" if item.server_cpu_us is None else f"{item.server_cpu_us:.0f}"
        lines.append(
            f"{item.label:<34}{item.body_bytes:>6}{item.median_us:>11.0f}{item.p90_us:>9.0f}{item.p99_us:>9.0f}"
            f"{item.rate:>9.0f}{cpu:>16}{item.client_busy:>12.0%}"
        )
    lines += ["", f"{'ratio (broker / baseline)':<44}{'median latency':>16}{'throughput':>12}{'srv CPU/req':>13}"]
    pairs = [
        ("socket /msi/token / baseline socket", "broker socket token", "baseline socket"),
        ("TCP /msi/token / baseline TCP", "broker tcp token", "baseline tcp"),
        ("socket /v1/secrets / baseline socket", "broker socket secret", "baseline socket"),
    ]
    for name, broker, base in pairs:
        b, f = results[broker], results[base]
        lines.append(
            f"{name:<44}{ratio(b.median_us, f.median_us):>16}{ratio(b.rate, f.rate):>12}"
            f"{ratio(b.server_cpu_us, f.server_cpu_us):>13}"
        )
    return lines


# ---------------------------------------------------------------------------------------------
# main


async def run(args: argparse.Namespace, header: list[str], tmp: Path, children: Children) -> None:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)

    async with Emulator(state_dir=tmp / "emulator") as emulator:
        emulator.set_secret(VAULT, SECRET, "value")
        broker, broker_socket, broker_port = await start_broker(children, tmp, emulator)

        # The baseline answers with a copy of the broker's own token answer: same size, same fields.
        token_path = f"/msi/token?resource={RESOURCE}"
        probe = Target("probe", URL("http://localhost" + token_path), {"Metadata": "true"},
                       broker_socket, broker.proc.pid)
        async with probe.session(1) as session, session.get(probe.url) as response:
            if response.status != 200:
                raise RuntimeError(f"broker token request failed: {response.status} {await response.text()}")
            body_path = tmp / "token.json"
            body_path.write_text(json.dumps(await response.json()))
        baseline, baseline_socket, baseline_port = await start_baseline(children, tmp, body_path)

        broker_pid, baseline_pid = broker.proc.pid, baseline.proc.pid
        targets = [
            Target("baseline socket", URL("http://localhost" + token_path), {"Metadata": "true"},
                   baseline_socket, baseline_pid),
            Target("broker socket token", URL("http://localhost" + token_path), {"Metadata": "true"},
                   broker_socket, broker_pid),
            Target("broker socket secret", URL(f"http://localhost/v1/secrets/{VAULT}/{SECRET}"),
                   {"Metadata": "true"}, broker_socket, broker_pid),
            Target("baseline tcp", URL(f"http://{LOOPBACK}:{baseline_port}{token_path}"), {},
                   None, baseline_pid),
            Target("broker tcp token", URL(f"http://{LOOPBACK}:{broker_port}{token_path}"),
                   {"X-IDENTITY-HEADER": CLIENT_KEY}, None, broker_pid),
        ]
        print("\n".join(header), flush=True)

        async with contextlib.AsyncExitStack() as stack:
            sessions = [await stack.enter_async_context(t.session(args.concurrency)) for t in targets]
            # Warm-up: fill the caches (the secret's first read goes to the emulator), open the
            # connections the concurrent phase will use, and let both servers settle.
            for target, session in zip(targets, sessions, strict=True):
                for _ in range(args.warmup):
                    await fetch(session, target)
                await concurrent(session, target, args.concurrency * 4, args.concurrency)
            before = emulator.stats
            other_cpu = OtherCpu([broker_pid, baseline_pid])
            other_cpu.begin()
            wall_before = time.perf_counter()

            samples = {t.label: Samples() for t in targets}
            seq = max(1, args.requests // args.rounds)
            burst = max(1, args.throughput_requests // args.rounds)
            for number in range(args.rounds):
                print(f"round {number + 1}/{args.rounds} ...", file=sys.stderr, flush=True)
                for target, session in zip(targets, sessions, strict=True):
                    await measure_round(session, target, seq, burst, args.concurrency, samples[target.label])
            after = emulator.stats
            other = other_cpu.seconds()
            wall = time.perf_counter() - wall_before

        results = {t.label: summarize(t, samples[t.label]) for t in targets}
        print()
        print("\n".join(render(results, args)))
        upstream = (after.identity_requests - before.identity_requests,
                    after.keyvault_requests - before.keyvault_requests)
        print()
        print(f"upstream requests during measurement: identity {upstream[0]}, key vault {upstream[1]} "
              f"(warm-up and start-up: identity {before.identity_requests}, key vault {before.keyvault_requests})")
        if other is not None:
            print(f"other CPU use during measurement: {other:.1f} s in {wall:.1f} s "
                  f"({other / wall:.0%} of one core; above a few % the numbers are disturbed)")
        for child in (broker, baseline):
            if not child.alive():
                raise RuntimeError(f"{child.name} died during the run:\n{child.log_tail()}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Cached-answer latency and throughput of tokenbroker against bare aiohttp.",
        epilog="Prints a table; never fails because of speed. See bench/README.md.",
    )
    parser.add_argument("--requests", type=int, default=3000,
                        help="sequential requests per target, split over the rounds (default 3000)")
    parser.add_argument("--concurrency", type=int, default=16,
                        help="concurrent workers (and connections) for throughput (default 16)")
    parser.add_argument("--throughput-requests", type=int, default=None,
                        help="requests per target for throughput, split over the rounds (default 3 x --requests)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds over all targets, so drift hits every target alike (default 3)")
    parser.add_argument("--warmup", type=int, default=200, help="warm-up requests per target (default 200)")
    parser.add_argument("--no-pin", dest="pin", action="store_false",
                        help="do not pin the client to one CPU and the servers to the others")
    args = parser.parse_args()
    if args.throughput_requests is None:
        args.throughput_requests = 3 * args.requests
    for name in ("requests", "concurrency", "throughput_requests", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must not be negative")
    return args


@contextlib.contextmanager
def no_interrupts() -> Iterator[None]:
    """Let clean-up finish even if Ctrl-C is pressed again."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def main() -> int:
    args = parse_args()
    children = Children()
    header = machine_info()  # before pinning, so nproc is the machine's
    pinned = pin_cpus(children) if args.pin else None
    header.append(f"cpus:     client on {sorted(pinned[0])}, servers on {sorted(pinned[1])}" if pinned
                  else "cpus:     not pinned")
    tmp = tempfile.TemporaryDirectory(prefix="tokenbroker-bench-")
    try:
        asyncio.run(run(args, header, Path(tmp.name), children))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted", file=sys.stderr)
        return 130
    except (RuntimeError, OSError, aiohttp.ClientError) as exc:
        print(f"bench failed: {exc!r}", file=sys.stderr)
        return 1
    finally:
        with no_interrupts():
            children.stop_all()
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
