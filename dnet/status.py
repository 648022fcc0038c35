"""`dnet status` and `dnet load`: talk to any node of the mesh, found over mDNS if need be."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import httpx
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from dnet.model_files import format_layers
from dnet.node.sizes import format_bytes

BROWSE_S = 3.0


class MeshNotFound(RuntimeError):
    pass


def find_api(api: str | None, host: str | None) -> str:
    """The base URL of a node: the one given, or the most senior node a short mDNS browse
    turns up (of this process's cluster, when a cluster key is set)."""
    if api:
        return api if api.startswith("http") else f"http://{api}"
    from discovery.identity import cluster_id
    from discovery.mdns import browse_once
    from dnet.ring import auth

    found = browse_once(host, BROWSE_S)
    if auth.enabled():
        found = [info for info in found if info.cluster_id == cluster_id(auth.key())]
    if not found:
        where = f" on {host}" if host else ""
        mine = " of this cluster key" if auth.enabled() else ""
        raise MeshNotFound(f"no dnet node{mine} answered over mDNS{where} within "
                           f"{BROWSE_S:.0f} s; is `dnet join` running? (or pass --api "
                           "HOST:PORT)")
    return sorted(found, key=lambda info: info.started_at)[0].http_url


def api_headers() -> dict[str, str]:
    """The API key of a node started with --api-key, from DNET_API_KEY, as a header."""
    key = os.environ.get("DNET_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def fetch_topology(url: str) -> dict[str, Any]:
    response = httpx.get(f"{url}/v1/topology", timeout=10, headers=api_headers())
    response.raise_for_status()
    return response.json()


def render(topology: dict[str, Any]) -> Group:
    title = (f"model {topology['model'] or '(none)'}  ·  epoch {topology['epoch']}  ·  "
             f"coordinator {topology['coordinator'] or '(electing)'}")
    table = Table(title=title, title_justify="left")
    for column in ("", "node", "address", "layers", "window", "memory used / budget",
                   "tok/s", "health"):
        table.add_column(column)
    ring = topology["ring"]
    ordered = sorted(topology["nodes"], key=lambda n: (ring.index(n["id"]) if n["id"] in ring
                                                       else len(ring), n["id"]))
    for node in ordered:
        position = str(ring.index(node["id"]) + 1) if node["id"] in ring else "-"
        marker = " ★" if node["coordinator"] else ""
        used = node["memory_used_bytes"]
        used_text = format_bytes(used) if used is not None else "?"
        memory = f"{used_text} / {format_bytes(node['memory_budget_bytes'])}"
        window = (f"{node['window']} (streams)" if node["streaming"]
                  else str(node["window"] or "-"))
        rate = node["decode_tokens_per_s"]
        table.add_row(position, f"{node['name']} ({node['id']}){marker}",
                      f"{node['address']}:{node['http_port']}",
                      format_layers(node["layers"]) or "entry only", window, memory,
                      f"{rate:.1f}" if rate else "-", _health(node))
    lines: list[Table | Text] = [table]
    predicted, measured = topology.get("predicted_ms_per_token"), topology.get(
        "measured_ms_per_token")
    if predicted or measured:
        lines.append(Text(
            f"predicted {_rate(predicted)} tok/s, measured {_rate(measured)} tok/s"))
    for node in ordered:
        excluded = node.get("excluded")
        if excluded:
            lines.append(Text(
                f"{node['name']} is left out of planning: {excluded['failure']}: "
                f"{excluded['reason']} (failed {excluded['failures']} time(s); next try in "
                f"{excluded['retry_in_s']:.0f} s, or when it changes)", "yellow"))
    if topology.get("unavailable"):
        lines.append(Text(f"no ring can serve: {topology['unavailable']}", "red"))
    for other in topology.get("other_clusters", []):
        lines.append(Text(f"another dnet cluster (a different --cluster-key) is on the "
                          f"network: {other['seen']}; its nodes are ignored", "yellow"))
    return Group(*lines)


def _health(node: dict[str, Any]) -> Text:
    if not node["healthy"]:
        return Text("down", "red")
    if node.get("excluded"):
        return Text(f"excluded ({node['excluded']['failure']})", "yellow")
    return Text("ok", "green")



def _rate(ms_per_token: float | None) -> str:
    return f"{1000.0 / ms_per_token:.1f}" if ms_per_token else "-"


def run_status(api: str | None, host: str | None, as_json: bool, watch: bool) -> int:
    console = Console()
    try:
        url = find_api(api, host)
        topology = fetch_topology(url)
    except (MeshNotFound, httpx.HTTPError) as exc:
        print(f"dnet status: {exc}", file=sys.stderr)
        return 1
    if as_json and not watch:
        print(json.dumps(topology, indent=2))
        return 0
    if not watch:
        console.print(render(topology))
        return 0
    with Live(render(topology), console=console, refresh_per_second=2) as live:
        try:
            while True:
                time.sleep(1.0)
                try:
                    live.update(render(fetch_topology(url)))
                except httpx.HTTPError as exc:
                    live.update(Text(f"{url} is not answering: {exc}", "red"))
        except KeyboardInterrupt:
            return 0


def run_load(model: str, api: str | None, host: str | None) -> int:
    try:
        url = find_api(api, host)
        response = httpx.post(f"{url}/v1/models/load", json={"model": model}, timeout=None,
                              headers=api_headers())
    except (MeshNotFound, httpx.HTTPError) as exc:
        print(f"dnet load: {exc}", file=sys.stderr)
        return 1
    if response.status_code != 200:
        message = response.json().get("error", {}).get("message", response.text)
        print(f"dnet load: {message}", file=sys.stderr)
        return 1
    print(f"the cluster now runs {model} (epoch {response.json()['epoch']})")
    return 0
