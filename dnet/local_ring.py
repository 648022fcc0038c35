"""Start a ring of shard processes plus an API on this machine, in the seed's manual mode.

`dnet demo`, the benchmarks and the tests use it. Every process it starts is tracked by its
id and stopped by it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx

from dnet.proto import dnet_ring_pb2 as pb
from dnet.proto import dnet_ring_pb2_grpc as pb_grpc
from dnet.ring import auth

_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now and not handed out before by this process: several ports picked before
    any is bound must differ (the OS may offer the same free port twice)."""
    while True:
        with socket.socket() as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def even_split(num_layers: int, shards: int) -> list[list[int]]:
    """Contiguous runs, the earlier shards taking one extra layer when it does not divide."""
    base, extra = divmod(num_layers, shards)
    runs, start = [], 0
    for i in range(shards):
        size = base + (1 if i < extra else 0)
        runs.append(list(range(start, start + size)))
        start += size
    return runs


class RingStartError(RuntimeError):
    pass


@dataclass
class LocalRing:
    model: str
    layer_lists: list[list[int]]
    http_port: int = 0
    grpc_ports: list[int] = field(default_factory=list)
    host: str = "127.0.0.1"
    log_dir: Path | None = None
    shard_args: list[str] = field(default_factory=list)
    per_shard_args: list[list[str]] = field(default_factory=list)  # extra args per shard
    api_args: list[str] = field(default_factory=list)
    processes: list[subprocess.Popen] = field(default_factory=list)
    names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.http_port = self.http_port or free_port(self.host)
        if not self.grpc_ports:
            self.grpc_ports = [free_port(self.host) for _ in self.layer_lists]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def shard_addresses(self) -> list[str]:
        return [f"{self.host}:{port}" for port in self.grpc_ports]

    def shard_command(self, i: int) -> list[str]:
        last = i == len(self.layer_lists) - 1
        next_hop = f"{self.host}:{self.http_port}" if last else self.shard_addresses[i + 1]
        layers = "[" + ",".join(map(str, self.layer_lists[i])) + "]"
        return [sys.executable, "-m", "dnet.cli", "shard", "-m", self.model,
                "-p", str(self.grpc_ports[i]), "-l", layers, "-n", next_hop,
                "--host", self.host, *self.shard_args,
                *(self.per_shard_args[i] if self.per_shard_args else [])]

    def api_command(self) -> list[str]:
        return [sys.executable, "-m", "dnet.cli", "api", "-a", f"{self.host}:{self.http_port}",
                "-s", self.shard_addresses[0], "-m", self.model, *self.api_args]

    def start(self, timeout_s: float = 60.0) -> LocalRing:
        try:
            for i in range(len(self.layer_lists)):
                self._spawn(self.shard_command(i), f"shard{i}")
            self._spawn(self.api_command(), "api")
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, command: list[str], name: str) -> None:
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        else:
            out = subprocess.DEVNULL
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.processes.append(subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                               env=env))
        self.names.append(name)
        if out is not subprocess.DEVNULL:
            out.close()

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        pending = list(self.shard_addresses)
        while time.monotonic() < deadline:
            dead = [n for n, p in zip(self.names, self.processes, strict=True)
                    if p.poll() is not None]
            if dead:
                raise RingStartError(f"a process exited during start-up: {dead}"
                                     + (f" (logs in {self.log_dir})" if self.log_dir else ""))
            pending = [a for a in pending if not shard_healthy(a)]
            if not pending and api_healthy(self.url):
                return
            time.sleep(0.2)
        raise RingStartError(f"ring not ready after {timeout_s:.0f} s; waiting for "
                             f"{pending or [self.url]}")

    def stop(self, timeout_s: float = 10.0) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for process in self.processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()
        self.names.clear()

    def __enter__(self) -> LocalRing:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def shard_health(address: str, timeout_s: float = 1.0) -> pb.HealthReply | None:
    with auth.channel(address) as channel:
        try:
            return pb_grpc.RingStub(channel).Health(pb.HealthRequest(), timeout=timeout_s)
        except grpc.RpcError:
            return None


def shard_healthy(address: str) -> bool:
    return shard_health(address) is not None


def api_healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False
