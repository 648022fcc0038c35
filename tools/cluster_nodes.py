"""The rings the cluster benchmark measures, started as users start them.

Mesh mode: one `dnet join` per namespace (the first proposes the model); the coordinator's
planner decides which nodes hold which layers, and the benchmark reads its decision from
`/v1/topology`. Manual mode: one `dnet shard` per namespace with an even contiguous split, and
`dnet api` beside one of them, in its namespace and on its CPU set (as a mesh node serves the
API in the same process as its layers).

Requests enter at the tail by default, the node holding the model's last layer (`Entry`): the
tail samples a token and sends it to the head and to the entry at once, so an entry on the
tail streams the token to the client while the head computes the next step, instead of
taking CPU from the head's step (a node here has one core). With `Entry.HEAD` they enter at
the node holding layer 0.

`wait_ready` talks HTTP and TCP to the namespaces, so it must run on a thread that has
entered the client namespace (cluster_lan.run_thread_in).
"""

from __future__ import annotations

import secrets
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from cluster_lan import ClusterLan, Host
from cluster_report import Entry, Mode, Placement

from dnet.local_ring import even_split

HTTP_PORT = 8080
GRPC_PORT = 50501
POLL_S = 0.5
ERROR_GRACE_S = 30.0  # a coordinator error that outlasts its retries: give up


class ClusterStartError(RuntimeError):
    pass


@dataclass(frozen=True)
class NodeSlot:
    name: str  # node1, node2, ...
    host: Host
    cpus: str


@dataclass
class RingCluster:
    """One configuration: `len(slots)` nodes running one model, reached at `entry_url`."""

    label: str  # "dnet, 2 nodes"
    mode: Mode
    slots: list[NodeSlot]
    model: Path
    num_layers: int
    context: int  # longest prompt plus answer the benchmark sends
    memory_budget: str | None = None
    entry: Entry = Entry.TAIL
    prefill_chunk: int | None = None  # passed as --prefill-chunk; None: dnet's default
    cluster_key: str = field(default_factory=lambda: secrets.token_hex(8))
    process_names: list[str] = field(default_factory=list)
    entry_url: str = ""
    placement: Placement | None = None
    error: str = ""  # the coordinator's last error while starting, and since when
    error_since: float = 0.0

    @property
    def nodes(self) -> int:
        return len(self.slots)

    def _python(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "dnet.cli", *args]

    def start(self, lan: ClusterLan, state_dir: Path) -> None:
        if self.mode is Mode.MESH:
            self._start_mesh(lan, state_dir)
        else:
            self._start_manual(lan)

    def _spawn(self, lan: ClusterLan, name: str, argv: list[str], slot: NodeSlot) -> None:
        process_name = f"{self.label.replace(', ', '-').replace(' ', '')}-{name}"
        lan.spawn(process_name, argv, slot.cpus, slot.host)
        self.process_names.append(process_name)

    def _start_mesh(self, lan: ClusterLan, state_dir: Path) -> None:
        for i, slot in enumerate(self.slots):
            argv = self._python(
                "join", "--host", slot.host.address, "--http-port", str(HTTP_PORT),
                "--grpc-port", str(GRPC_PORT), "--name", slot.name,
                "--state-dir", str(state_dir / f"{slot.host.namespace}"),
                "--cluster-key", self.cluster_key, "--context", str(self.context),
                *(["--model", str(self.model)] if i == 0 else []),
                *(["--memory-budget", self.memory_budget] if self.memory_budget else []),
                *self._chunk_args())
            self._spawn(lan, slot.name, argv, slot)

    def _chunk_args(self) -> list[str]:
        return ["--prefill-chunk", str(self.prefill_chunk)] if self.prefill_chunk else []

    def _start_manual(self, lan: ClusterLan) -> None:
        splits = even_split(self.num_layers, self.nodes)
        head = self.slots[0].host.address
        api_slot = self.slots[-1] if self.entry is Entry.TAIL else self.slots[0]
        api = f"{api_slot.host.address}:{HTTP_PORT}"
        for i, (slot, layers) in enumerate(zip(self.slots, splits, strict=True)):
            last = i == self.nodes - 1
            next_hop = api if last else f"{self.slots[i + 1].host.address}:{GRPC_PORT}"
            argv = self._python(
                "shard", "-m", str(self.model), "-p", str(GRPC_PORT),
                "-l", "[" + ",".join(map(str, layers)) + "]", "-n", next_hop,
                "--host", slot.host.address, "--cluster-key", self.cluster_key)
            self._spawn(lan, slot.name, argv, slot)
        self._spawn(lan, "api", self._python(
            "api", "-a", api, "-s", f"{head}:{GRPC_PORT}",
            "-m", str(self.model), "--max-context", str(self.context),
            "--cluster-key", self.cluster_key, *self._chunk_args()), api_slot)
        self.placement = Placement(tuple(s.name for s in self.slots),
                                   tuple(tuple(layers) for layers in splits))
        self.entry_url = f"http://{api}"

    # ----- readiness (on a thread inside the client namespace) ------------------------------

    def wait_ready(self, lan: ClusterLan, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        ready = self._mesh_ready if self.mode is Mode.MESH else self._manual_ready
        while time.monotonic() < deadline:
            dead = [s.name for s in lan.dead() if s.name in self.process_names]
            if dead:
                raise ClusterStartError(f"{self.label}: {', '.join(dead)} exited during "
                                        f"start-up (logs in {lan.log_dir})")
            if ready():
                return
            if self.error and time.monotonic() - self.error_since > ERROR_GRACE_S:
                raise ClusterStartError(f"{self.label}: the mesh cannot start: {self.error}")
            time.sleep(POLL_S)
        raise ClusterStartError(f"{self.label}: not ready after {timeout_s:.0f} s"
                                + (f"; last error: {self.error}" if self.error else "")
                                + f" (logs in {lan.log_dir})")

    def _manual_ready(self) -> bool:
        if not all(listening(s.host.address, GRPC_PORT) for s in self.slots):
            return False
        return _get_json(f"{self.entry_url}/health") is not None

    def _mesh_ready(self) -> bool:
        """Every node is known, healthy and serving one committed plan covering every layer."""
        views = [_get_json(f"http://{s.host.address}:{HTTP_PORT}/v1/topology")
                 for s in self.slots]
        if any(view is None for view in views):
            return False
        error = next((v["last_error"] for v in views if v.get("last_error")), "")
        if error != self.error:
            self.error, self.error_since = error, time.monotonic()
        placement = placement_from_topology(views[0], [s.name for s in self.slots],
                                            self.num_layers)
        if placement is None or any(v["epoch"] != views[0]["epoch"] for v in views):
            return False
        self.placement = placement
        entry = self.slots[entry_index(placement, self.num_layers, self.entry)]
        self.entry_url = f"http://{entry.host.address}:{HTTP_PORT}"
        return True


def placement_from_topology(view: dict, names: list[str], num_layers: int) -> Placement | None:
    """The plan in a node's `/v1/topology`, once it is committed on every one of `names`,
    all healthy, and covers every layer exactly once; else None (not ready yet)."""
    by_name = {node["name"]: node for node in view.get("nodes", [])}
    if view.get("epoch", 0) < 1 or set(by_name) != set(names):
        return None
    nodes = [by_name[name] for name in names]
    if not all(n["healthy"] and n["epoch"] == view["epoch"] for n in nodes):
        return None
    layers = tuple(tuple(sorted(n["layers"])) for n in nodes)
    if sorted(layer for held in layers for layer in held) != list(range(num_layers)):
        return None
    explanation = []
    for line in view.get("explanation") or ():
        for node in nodes:  # the planner names nodes by id; the report by name
            line = line.replace(node["id"], node["name"])
        explanation.append(line)
    return Placement(tuple(names), layers, tuple(explanation))


def entry_index(placement: Placement, num_layers: int, entry: Entry) -> int:
    """Which node requests enter at: the holder of the last layer, or of layer 0."""
    layer = num_layers - 1 if entry is Entry.TAIL else 0
    return next(i for i, held in enumerate(placement.layers) if layer in held)


def listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _get_json(url: str) -> dict | None:
    try:
        response = httpx.get(url, timeout=5.0)
    except httpx.HTTPError:
        return None
    return response.json() if response.status_code == 200 else None


def check_pinning(lan: ClusterLan) -> list[str]:
    """Processes whose CPU affinity is not the set they were started with."""
    wrong = []
    for started in lan.started:
        try:
            status = Path(f"/proc/{started.process.pid}/status").read_text()
        except OSError:
            continue
        allowed = next(line.split(":", 1)[1].strip() for line in status.splitlines()
                       if line.startswith("Cpus_allowed_list"))
        if cpu_set(allowed) != cpu_set(started.cpus):
            wrong.append(f"{started.name}: CPUs {allowed}, wanted {started.cpus}")
    return wrong


def cpu_set(text: str) -> set[int]:
    """'0-2,5' -> {0, 1, 2, 5}."""
    cpus: set[int] = set()
    for part in filter(None, text.split(",")):
        start, _, end = part.partition("-")
        cpus.update(range(int(start), int(end or start) + 1))
    return cpus


def format_cpus(cpus: list[int]) -> str:
    return ",".join(map(str, cpus))


def node_cpu_sets(available: list[int], nodes: int, per_node: int) -> list[str]:
    """CPU sets for `nodes` nodes of `per_node` CPUs each, disjoint, from `available`."""
    if nodes * per_node > len(available):
        raise ValueError(f"{nodes} node(s) of {per_node} CPU(s) need {nodes * per_node} CPUs; "
                       f"this process may use {len(available)} ({format_cpus(available)}): "
                       "every node needs CPUs of its own")
    ordered = sorted(available)
    return [format_cpus(ordered[i * per_node:(i + 1) * per_node]) for i in range(nodes)]
