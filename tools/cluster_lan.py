"""A simulated cluster on one machine: network namespaces on a bridge, rate-limited links, and
every process started in them pinned to a CPU set of its own and stopped by its pid.

    switch namespace <tag>-sw                      node namespaces <tag>-1 .. <tag>-N
    +----------------------------------------+     +-----------------------------------------+
    | br0 (no STP, no multicast snooping)    |     | lo up, dnet0 10.214.K.i/24 (veth)       |
    | p1 .. pN, pc: veth ports, each with a  |-----| dnet0: tbf at the link rate, and netem  |
    | tbf at the link rate towards its node  |     |   delay under it where the kernel has it|
    +----------------------------------------+     +-----------------------------------------+
                                                   client namespace <tag>-c: the benchmark's
                                                   HTTP client (a thread that setns()es in)

Each direction of a link is rate-limited once (`tc tbf` on the sender's egress: the node's
dnet0 going out, the switch port going in). The link delay, where `netem` exists, sits only
on each node's egress, so a one-way trip between two nodes carries it exactly once.

Nothing is created in or changed in the root namespace. Namespace names carry the tag
`dnbc<pid>` of the run that made them, so a later run can remove what a killed one left.

This duplicates parts of tests/netns.py (ip(), namespace listing, the subnet choice, setns,
the bridge build, the pid sweep); that module imports pytest and skips tests, so a tool
cannot use it. One home for both is left to a later change.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import re
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster_links import LinkShape

NETNS_DIR = Path("/var/run/netns")
CLONE_NEWNET = 0x40000000
BRIDGE = "br0"
VETH = "dnet0"
MULTICAST = "224.0.0.0/4"
SUBNET_POOL = ipaddress.ip_network("10.214.0.0/16")
CLIENT_INDEX = 100
TAG_PREFIX = "dnbc"
RUN_ENV = "DNET_BENCH_CLUSTER_RUN"  # set on every process a run starts, to find leftovers
STOP_GRACE_S = 10.0
NETEM_MISSING = "Specified qdisc kind is unknown"  # tc, on a kernel without sch_netem


class LanError(RuntimeError):
    pass


def ip(*args: str, ns: str | None = None) -> str:
    """Run `ip [-n NS] ARGS...`; raise with ip's own message on failure."""
    command = ["ip", *(["-n", ns] if ns else []), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise LanError(f"`{' '.join(command)}` failed: {result.stderr.strip()}")
    return result.stdout


def tc(ns: str, args: list[str]) -> None:
    result = subprocess.run(["tc", "-n", ns, *args], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise LanError(f"`tc -n {ns} {' '.join(args)}` failed: {result.stderr.strip()}")


def namespaces() -> set[str]:
    """Names in `ip netns list` (lines look like "name (id: 3)" or just "name")."""
    return {line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()}


def netns_pids(namespace: str) -> set[int]:
    """Every process whose network namespace this is."""
    return {int(pid) for pid in ip("netns", "pids", namespace).split()}


def run_tag(pid: int) -> str:
    return f"{TAG_PREFIX}{pid}"


def stale_tags(names: set[str], alive: Callable[[int], bool]) -> set[str]:
    """Tags of namespaces made by runs whose process is gone."""
    tags = set()
    for name in names:
        match = re.match(rf"^{TAG_PREFIX}(\d+)-", name)
        if match and not alive(int(match.group(1))):
            tags.add(f"{TAG_PREFIX}{match.group(1)}")
    return tags


def is_running_benchmark(pid: int) -> bool:
    try:
        return b"bench_cluster" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def free_subnet(pool: ipaddress.IPv4Network = SUBNET_POOL) -> ipaddress.IPv4Network:
    """A random /24 of `pool` overlapping no address or route of the root namespace (the LAN
    never meets the root namespace, so a clash could not break anything; avoiding one keeps
    addresses in logs unambiguous)."""
    used = []
    for line in ip("-4", "-o", "addr", "show").splitlines():
        words = line.split()
        used.append(ipaddress.ip_network(words[words.index("inet") + 1], strict=False))
    for line in ip("-4", "route", "show", "table", "all").splitlines():
        for word in line.split()[:2]:
            with contextlib.suppress(ValueError):
                used.append(ipaddress.ip_network(word, strict=False))
                break
    candidates = list(pool.subnets(new_prefix=24))[1:-1]
    for _ in range(100):
        subnet = candidates[secrets.randbelow(len(candidates))]
        if not any(subnet.overlaps(net) for net in used):
            return subnet
    raise LanError(f"no free /24 in {pool}")


def enter_netns(namespace: str) -> None:
    """Move the calling thread (only) into a named network namespace. Threads it starts
    afterwards inherit the namespace; the rest of the process stays where it was."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(NETNS_DIR / namespace, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns({namespace}): {os.strerror(errno)}")
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Host:
    namespace: str
    address: str


@dataclass
class Started:
    name: str
    process: subprocess.Popen
    log: Path
    cpus: str


@dataclass
class ClusterLan:
    """Namespaces `<tag>-1..N` and `<tag>-c` bridged in `<tag>-sw`, and the processes run
    in them. `close()` stops every process by its pid and deletes every namespace."""

    tag: str
    log_dir: Path
    hosts: list[Host] = field(default_factory=list)
    client: Host | None = None
    created: list[str] = field(default_factory=list)
    started: list[Started] = field(default_factory=list)
    netem: bool = False
    netem_note: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _closing: bool = False

    @property
    def switch(self) -> str:
        return f"{self.tag}-sw"

    def probe_netem(self) -> tuple[bool, str]:
        """Whether this kernel has the netem qdisc: try it on a veth in a scratch namespace."""
        probe = f"{self.tag}-probe"
        self._add_namespace(probe)
        try:
            ip("link", "add", "pa", "type", "veth", "peer", "name", "pb", ns=probe)
            try:
                tc(probe, ["qdisc", "add", "dev", "pa", "root", "netem", "delay", "1ms"])
            except LanError as exc:
                if NETEM_MISSING in str(exc):
                    return False, f"the kernel has no netem qdisc (tc: \"{NETEM_MISSING}\")"
                raise
            return True, "netem available"
        finally:
            ip("netns", "del", probe)
            self.created.remove(probe)

    def build(self, num_hosts: int, shape: LinkShape) -> None:
        self.netem, self.netem_note = self.probe_netem()
        subnet = free_subnet()
        self._add_namespace(self.switch)
        ip("link", "set", "lo", "up", ns=self.switch)
        ip("link", "add", BRIDGE, "type", "bridge", "stp_state", "0", "mcast_snooping", "0",
           ns=self.switch)
        ip("link", "set", BRIDGE, "up", ns=self.switch)
        self.hosts = [self._add_host(str(i), subnet, i, shape) for i in range(1, num_hosts + 1)]
        self.client = self._add_host("c", subnet, CLIENT_INDEX, shape)

    def _add_namespace(self, name: str) -> None:
        self.created.append(name)  # first: an interrupt right after `ip` must not lose it
        ip("netns", "add", name)

    def _add_host(self, suffix: str, subnet: ipaddress.IPv4Network, index: int,
                  shape: LinkShape) -> Host:
        namespace = f"{self.tag}-{suffix}"
        address = str(subnet.network_address + index)
        self._add_namespace(namespace)
        port = f"p{suffix}"
        wire_host(self.switch, namespace, port, address, subnet.prefixlen)
        for args in shape.tc_commands(port, netem=self.netem, with_delay=False):
            tc(self.switch, args)
        for args in shape.tc_commands(VETH, netem=self.netem, with_delay=suffix != "c"):
            tc(namespace, args)
        return Host(namespace, address)

    # ----- processes --------------------------------------------------------------------

    def spawn(self, name: str, argv: list[str], cpus: str, host: Host | None = None,
              env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start `argv` pinned to `cpus` (taskset), in `host`'s namespace (`ip netns exec`)
        or the root one; its output goes to `<log_dir>/<name>.log`. `ip netns exec` and
        taskset exec the command, so the Popen pid is the command's own."""
        prefix = ["ip", "netns", "exec", host.namespace] if host else []
        command = [*prefix, "taskset", "-c", cpus, *argv]
        log = self.log_dir / f"{name}.log"
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", RUN_ENV: self.tag, **(env or {})}
        with self._lock:
            if self._closing:
                raise LanError("the cluster is shutting down")
            with open(log, "ab") as out:
                # Its own session: a Ctrl-C in the terminal reaches only the benchmark, which
                # then stops everything in order.
                process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, env=full_env,
                                           start_new_session=True)
            self.started.append(Started(name, process, log, cpus))
        return process

    def spawn_piped(self, name: str, argv: list[str], cpus: str) -> subprocess.Popen:
        """Like spawn, with stdin/stdout as pipes (a worker protocol), in the calling
        thread's network namespace: the benchmark calls it from the client namespace, so the
        sweep of that namespace stops it too."""
        log = self.log_dir / f"{name}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", RUN_ENV: self.tag}
        with self._lock:
            if self._closing:
                raise LanError("the cluster is shutting down")
            with open(log, "ab") as err:
                process = subprocess.Popen(["taskset", "-c", cpus, *argv],
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                           stderr=err, text=True, env=env,
                                           start_new_session=True)
            self.started.append(Started(name, process, log, cpus))
        return process

    def dead(self) -> list[Started]:
        return [s for s in self.started if s.process.poll() is not None]

    # ----- teardown ---------------------------------------------------------------------

    def close(self) -> list[str]:
        """Stop every process (SIGTERM, then SIGKILL after a grace period), kill by pid any
        process still inside our namespaces, delete them. Returns what could not be removed."""
        with self._lock:
            self._closing = True
        live = [s.process for s in self.started if s.process.poll() is None]
        for process in live:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for process in live:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        problems = []
        for namespace in reversed(self.created):
            problems += remove_namespace(namespace)
        self.created = [n for n in self.created if n in namespaces()]
        return problems


def wire_host(switch: str, namespace: str, port: str, address: str, prefixlen: int) -> None:
    """Plug `namespace` into the bridge of `switch` by a veth (`port` on the bridge's side,
    VETH inside), with `address`/`prefixlen` and, as there is no default route, a route for
    multicast (mDNS to 224.0.0.251)."""
    ip("link", "add", port, "type", "veth", "peer", "name", VETH, "netns", namespace, ns=switch)
    ip("link", "set", port, "master", BRIDGE, "up", ns=switch)
    ip("link", "set", "lo", "up", ns=namespace)
    ip("addr", "add", f"{address}/{prefixlen}", "dev", VETH, ns=namespace)
    ip("link", "set", VETH, "up", ns=namespace)
    ip("route", "add", MULTICAST, "dev", VETH, ns=namespace)


def remove_namespace(namespace: str) -> list[str]:
    """Kill (by pid) what still runs in `namespace`, then delete it; what failed, if any."""
    if namespace not in namespaces():
        return []
    try:
        kill_all_in(namespace)
        ip("netns", "del", namespace)
    except LanError as exc:
        return [str(exc)]
    return []


def kill_all_in(namespace: str, timeout_s: float = 10) -> None:
    """SIGKILL every process in `namespace` (but this one) until none is left."""
    deadline = time.monotonic() + timeout_s
    while pids := netns_pids(namespace) - {os.getpid()}:
        if time.monotonic() > deadline:
            raise LanError(f"processes {sorted(pids)} in {namespace} survive SIGKILL")
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def remove_stale() -> list[str]:
    """Delete the namespaces of earlier runs that died without cleaning up; their names."""
    existing = namespaces()
    stale = stale_tags(existing, is_running_benchmark)
    removed = sorted(n for n in existing if any(n.startswith(f"{t}-") for t in stale))
    for namespace in removed:
        remove_namespace(namespace)
    return removed


def run_thread_in(namespace: str, fn: Callable[[], Any]) -> tuple[threading.Thread, dict]:
    """Start `fn()` on a daemon thread inside `namespace`; the dict gets "value" or "error"."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            enter_netns(namespace)
            outcome["value"] = fn()
        except BaseException as exc:  # handed to the caller
            outcome["error"] = exc

    thread = threading.Thread(target=run, name=f"in-{namespace}", daemon=True)
    thread.start()
    return thread, outcome
