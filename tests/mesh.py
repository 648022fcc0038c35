"""Run `dnet join` processes for tests, on loopback or inside network namespaces.

Every process is stopped by its pid; `LocalMesh.stop()` runs from the fixtures' teardown.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from dnet.local_ring import free_port


@dataclass
class MeshNode:
    name: str
    host: str
    http_port: int
    grpc_port: int
    state_dir: Path
    log: Path
    process: subprocess.Popen

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def node_id(self) -> str:
        return (self.state_dir / f"node-{self.grpc_port}.id").read_text().strip()


@dataclass
class LocalMesh:
    root: Path
    model: str
    nodes: list[MeshNode] = field(default_factory=list)
    # Meshes of concurrent test runs on one machine must not merge: each gets its own key.
    cluster_key: str = field(default_factory=lambda: secrets.token_hex(8))

    def add(self, name: str, *, budget: str, host: str = "127.0.0.1", propose: bool = True,
            prefix: list[str] | None = None, extra: list[str] | None = None,
            state_dir: Path | None = None, grpc_port: int | None = None,
            http_port: int | None = None, pin_host: bool = True) -> MeshNode:
        """Start one node; `prefix` runs it in a namespace (`ip netns exec NAME`), where the
        ports default to dnet's own. Without `pin_host` the node picks its address itself
        (`host` is then only where the test reaches it)."""
        http_port = http_port or (free_port(host) if prefix is None else 8080)
        grpc_port = grpc_port or (free_port(host) if prefix is None else 50501)
        state_dir = state_dir or self.root / name
        log = self.root / f"{name}.log"
        command = [*(prefix or []), sys.executable, "-m", "dnet.cli", "join",
                   *(["--host", host] if pin_host else []),
                   "--http-port", str(http_port), "--grpc-port", str(grpc_port),
                   "--memory-budget", budget, "--name", name, "--state-dir", str(state_dir),
                   "--cluster-key", self.cluster_key,
                   *(["--model", self.model] if propose else []), *(extra or [])]
        with open(log, "ab") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
        node = MeshNode(name, host, http_port, grpc_port, state_dir, log, process)
        self.nodes.append(node)
        return node

    def kill(self, node: MeshNode) -> None:
        node.process.send_signal(signal.SIGKILL)
        node.process.wait(timeout=10)

    def stop(self) -> None:
        for node in self.nodes:
            if node.alive:
                node.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for node in self.nodes:
            try:
                node.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait()

    def live(self) -> list[MeshNode]:
        return [node for node in self.nodes if node.alive]

    def logs(self) -> str:
        return "\n".join(f"--- {n.name}\n{n.log.read_text()[-3000:]}" for n in self.nodes
                         if n.log.exists())


def topology(node: MeshNode) -> dict[str, Any] | None:
    try:
        response = httpx.get(f"{node.url}/v1/topology", timeout=5)
    except httpx.HTTPError:
        return None
    return response.json() if response.status_code == 200 else None


def wait_for(mesh: LocalMesh, check: Callable[[dict[str, Any]], bool], timeout_s: float,
             what: str) -> dict[str, Any]:
    """Poll every live node until all report a topology satisfying `check`."""
    deadline = time.monotonic() + timeout_s
    last: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        views = [topology(node) for node in mesh.live()]
        if views and all(view is not None and check(view) for view in views):
            return views[0]
        last = next((v for v in views if v is not None), last)
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}; last view "
                         f"{last}\n{mesh.logs()}")


def ring_covers(num_layers: int, size: int | None = None,
                excluding: set[str] = frozenset()) -> Callable[[dict[str, Any]], bool]:
    """A committed plan whose ring holds every layer exactly once, on healthy nodes."""

    def check(view: dict[str, Any]) -> bool:
        if view["epoch"] < 1 or not view["ring"]:
            return False
        holders = {n["id"]: n for n in view["nodes"] if n["layers"]}
        layers = sorted(layer for n in holders.values() for layer in n["layers"])
        return (layers == list(range(num_layers))
                and set(view["ring"]) == set(holders)
                and all(n["healthy"] for n in holders.values())
                and not set(view["ring"]) & set(excluding)
                and (size is None or len(view["ring"]) == size))

    return check


def hiding(path: Path) -> list[str]:
    """A command prefix that runs the command where `path` is an empty directory: a private
    mount namespace with a tmpfs over it, as on a machine that lacks those files. `unshare`
    and `sh` exec the command, so a Popen pid is the command's."""
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount -t tmpfs tmpfs "$0" && exec "$@"', str(path)]


def stream_completion(node: MeshNode, body: dict[str, Any], outcome: dict[str, Any]) -> None:
    """POST a streaming /v1/completions; fills `outcome` with "status", "tokens" (ids),
    "finish", "error" (the message of an error chunk) as they arrive, and "broken" when the
    connection breaks off."""
    outcome.setdefault("tokens", [])
    try:
        with httpx.stream("POST", f"{node.url}/v1/completions", timeout=120, json={
                **body, "stream": True, "return_token_ids": True}) as response:
            outcome["status"] = response.status_code
            for line in response.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    outcome["error"] = chunk["error"]["message"]
                for choice in chunk.get("choices", []):
                    outcome["tokens"].extend(choice["token_ids"])
                    outcome["finish"] = choice["finish_reason"] or outcome.get("finish")
    except httpx.HTTPError as exc:
        outcome["broken"] = str(exc)


def chat_token_ids(node: MeshNode, content: str, max_tokens: int) -> list[int]:
    response = httpx.post(f"{node.url}/v1/chat/completions", timeout=120, json={
        "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
        "return_token_ids": True})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["token_ids"]
