"""The cluster benchmark (tools/bench_cluster.py): its definitions and report, fast; then the
tool itself with the tiniest settings, as root in network namespaces (slow): it prints the
table, says when the planner leaves a node out, and leaves no namespace or process behind,
also when interrupted."""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.purity import imported_roots

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import bench_cluster  # noqa: E402
import cluster_report as cr  # noqa: E402
from benchlib import StreamTrace, aggregate_decode_tok_s, steady_decode_tok_s  # noqa: E402
from cluster_lan import RUN_ENV, stale_tags  # noqa: E402
from cluster_links import (  # noqa: E402
    PRESET_DELAYS,
    LinkPreset,
    LinkShape,
    rate_bits_per_s,
    tbf_burst_bytes,
)
from cluster_nodes import (  # noqa: E402
    cpu_set,
    entry_index,
    node_cpu_sets,
    placement_from_topology,
)

# ----- hops, placement, per-hop overhead ------------------------------------------------------


def test_hops_per_token_counts_every_handover_round_the_ring() -> None:
    # Independent formulation: walking the layers cyclically (the last one feeds the first
    # through the sampled token), every change of node is one message on the critical path.
    for length in range(1, 7):
        for owners in itertools.product(range(3), repeat=length):
            cyclic = sum(1 for i in range(length) if owners[i] != owners[(i + 1) % length])
            assert cr.hops_per_token(list(owners)) == cyclic, owners


@pytest.mark.parametrize(("owners", "hops"), [
    ([0, 0, 0, 0, 0, 0], 0),  # one node: no hop
    ([0, 0, 0, 1, 1, 1], 2),  # even 2-node ring
    ([0, 0, 1, 1, 2, 2], 3),  # even 3-node ring
    ([0, 0, 1, 1, 0, 0], 2),  # two rounds ending on the head: no token hop
    ([0, 1, 0, 1], 4),  # two rounds on two nodes
])
def test_hops_per_token_examples(owners: list[int], hops: int) -> None:
    assert cr.hops_per_token(owners) == hops


def test_placement_describes_stages_and_who_is_left_out() -> None:
    p = cr.Placement(("node1", "node2"), ((), (0, 1, 2, 5)))
    assert p.stages == 1 and p.hops_per_token == 0 and p.left_out == ["node1"]
    assert p.describe() == "node1: no layers (entry only), node2: 0-2, 5"
    split = cr.Placement(("node1", "node2"), ((0, 1, 2), (3, 4, 5)))
    assert split.stages == 2 and split.hops_per_token == 2 and split.left_out == []


def ring(name: str, nodes: int, layers: tuple, decode: list[float], **kw) -> cr.ConfigResult:
    names = tuple(f"node{i + 1}" for i in range(len(layers)))
    return cr.ConfigResult(name, nodes, cr.Placement(names, layers), decode_tok_s=decode, **kw)


ONE = ((0, 1, 2, 3),)
TWO = ((0, 1), (2, 3))


def test_per_hop_overhead_is_the_paired_difference_per_hop_above_the_delay() -> None:
    one = ring("1", 1, ONE, [100.0, 50.0, 100.0])  # 10, 20, 10 ms/token
    two = ring("2", 2, TWO, [80.0, 40.0, 50.0])  # 12.5, 25, 20 ms/token
    spread = cr.per_hop_overhead(two, one, delay_ms=0.25)
    # pairs: (12.5-10)/2, (25-20)/2, (20-10)/2 = 1.25, 2.5, 5.0, less 0.25 each
    assert spread == cr.Spread(2.25, 1.0, 4.75)


def test_per_hop_overhead_needs_hops_and_a_one_node_ring() -> None:
    one = ring("1", 1, ONE, [100.0])
    left_out = cr.ConfigResult("2", 2, cr.Placement(("a", "b"), ((), (0, 1, 2, 3))),
                               decode_tok_s=[90.0])
    assert cr.per_hop_overhead(left_out, one, 0.0) is None
    assert cr.per_hop_overhead(ring("2", 2, TWO, [90.0]), None, 0.0) is None


def test_steady_decode_counts_only_the_window_where_every_stream_decodes() -> None:
    # Together (mlx-lm's BatchGenerator): the whole decode, as the plain aggregate.
    together = [StreamTrace(0.0, [1.0 + 0.1 * i for i in range(11)]) for _ in range(4)]
    assert steady_decode_tok_s(together) == pytest.approx(40 / 1.0)
    assert steady_decode_tok_s(together) == pytest.approx(aggregate_decode_tok_s(together))
    # Staggered starts (a ring prefills one prompt after another): the second stream's
    # first token comes at 2.0, the first stream's last at 3.0; 10 tokens each per second.
    first = StreamTrace(0.0, [1.0 + 0.1 * i for i in range(21)])
    second = StreamTrace(0.0, [2.0 + 0.1 * i for i in range(21)])
    assert steady_decode_tok_s([first, second]) == pytest.approx(20.0)
    assert aggregate_decode_tok_s([first, second]) == pytest.approx(40 / 3.0)  # prefill counted
    # One stream: its decode rate.
    assert steady_decode_tok_s([first]) == pytest.approx(10.0)
    # Streams that never all decode at once: no figure.
    late = StreamTrace(0.0, [4.0 + 0.1 * i for i in range(5)])
    assert steady_decode_tok_s([first, late]) is None


def test_requests_enter_at_the_tail_or_the_head() -> None:
    two = cr.Placement(("node1", "node2"), ((0, 1, 2), (3, 4, 5)))
    assert entry_index(two, 6, cr.Entry.TAIL) == 1 and entry_index(two, 6, cr.Entry.HEAD) == 0
    rounds = cr.Placement(("node1", "node2"), ((0, 1, 4, 5), (2, 3)))
    assert entry_index(rounds, 6, cr.Entry.TAIL) == 0
    left_out = cr.Placement(("node1", "node2"), ((), (0, 1, 2, 3, 4, 5)))
    assert entry_index(left_out, 6, cr.Entry.TAIL) == entry_index(left_out, 6, cr.Entry.HEAD) == 1


def test_floor_is_half_the_median_round_trip_above_the_delay() -> None:
    assert cr.floor_one_way_ms([0.2, 0.4, 0.3], 0.05) == pytest.approx(0.1)
    assert cr.floor_one_way_ms([], 0.0) is None


# ----- targets and the report -----------------------------------------------------------------


def report(two: cr.ConfigResult, netem: bool = False, lengths: tuple = (512, 8192)) -> cr.Report:
    base = cr.ConfigResult("mlx-lm, 1 node", 1, None,
                           ttft_s={n: [float(n) / 1000] for n in lengths},
                           decode_tok_s=[100.0], aggregate_tok_s={1: [100.0], 8: [200.0]})
    one = ring("dnet, 1 node", 1, ONE, [95.0], ttft_s={n: [n / 900] for n in lengths},
               aggregate_tok_s={1: [95.0], 8: [150.0]})
    machine = {"cpu": "Test CPU", "cores": 2, "kernel": "6.1", "mlx": "0.32", "mlx_device": "cpu",
               "mlx_lm": "0.32", "python": "3.11", "loadavg_start": 0.1, "loadavg_end": 0.2}
    model = {"name": "qwen3-test", "parameters": 12_300_000, "mib": 47.0}
    settings = {"decode_tokens": 128, "short_prompt": 32, "stream_tokens": 64, "repeats": 1,
                "ttft_repeats": 1}
    link = cr.Link("10gbit", "10gbe", 0.1, netem, "netem available" if netem else
                   "the kernel has no netem qdisc")
    return cr.Report(machine, model, settings, cr.Mode.MESH, link,
                     {"mlx-lm": "0", "dnet, 2 nodes: node2": "1"}, base, [one, two],
                     floor_rtt_ms=[0.2], floor_bytes=1536, elapsed_s=42)


def test_targets_judge_two_stages_against_mlx_lm() -> None:
    two = ring("dnet, 2 nodes", 2, TWO, [95.0], ttft_s={512: [0.6], 8192: [4.0]},
               aggregate_tok_s={1: [90.0], 8: [400.0]})
    status = {t.name: (t.measured, t.status) for t in cr.targets(report(two))}
    assert status["TTFT, 8192-token prompt, 2 nodes / mlx-lm"] == (pytest.approx(4.0 / 8.192),
                                                                   "ok")
    assert status["aggregate decode, 8 streams, 2 nodes / mlx-lm BatchGenerator"] == (2.0, "ok")
    assert status["one stream's decode, 2 nodes / mlx-lm"] == (0.95, "ok")
    hop = status["per-hop overhead above the link delay, 2 nodes"]
    assert hop == (pytest.approx(0.0), "ok")  # 95 tok/s on both rings, no delay applied
    slow = ring("dnet, 2 nodes", 2, TWO, [50.0], ttft_s={512: [1.0], 8192: [9.0]},
                aggregate_tok_s={1: [50.0], 8: [100.0]})
    assert {t.status for t in cr.targets(report(slow))} == {"MISS"}


def test_targets_are_not_judged_on_a_two_node_row_that_ran_on_one_node() -> None:
    left_out = cr.ConfigResult("dnet, 2 nodes", 2, cr.Placement(
        ("node1", "node2"), ((), (0, 1, 2, 3)), ("node1 is left out: hops cost more",)),
        ttft_s={512: [0.5], 8192: [8.0]}, decode_tok_s=[99.0],
        aggregate_tok_s={1: [99.0], 8: [199.0]})
    rep = report(left_out)
    assert {t.status for t in cr.targets(rep)} == {"n/a: the 2-node configuration ran on 1 stage"}
    text = cr.render(rep)
    assert "**The planner left node1 out: this row ran on 1 node(s), not 2.**" in text
    assert "planner: node1 is left out: hops cost more" in text
    row = next(line for line in text.splitlines() if line.startswith("| dnet, 2 nodes |"))
    assert row.split(" | ")[1] == "1"  # the stages column says what really ran


def test_render_gives_ratios_with_absolute_figures_and_says_what_the_links_carry() -> None:
    two = ring("dnet, 2 nodes", 2, TWO, [80.0], ttft_s={512: [0.256], 8192: [4.096]},
               aggregate_tok_s={1: [80.0], 8: [300.0]})
    text = cr.render(report(two))
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines()
            if line.startswith("| mlx-lm") or line.startswith("| dnet")}
    assert set(rows) == {"mlx-lm, 1 node", "dnet, 1 node", "dnet, 2 nodes"}
    assert "| 1.00x (0.51 s) | 1.00x (8.19 s) | 1.00x (100.0 tok/s) |" in rows["mlx-lm, 1 node"]
    assert "0.50x (0.26 s) | 0.50x (4.10 s) | 0.80x (80.0 tok/s) | 0.80x (80.0 tok/s) | " \
        "1.50x (300.0 tok/s)" in rows["dnet, 2 nodes"]
    # (12.5 - 10.526) / 2 hops, no delay applied: netem is missing
    assert rows["dnet, 2 nodes"].endswith("| 0.99 (0.99 to 0.99) |")
    assert "NOT added, the kernel has no netem qdisc" in text
    assert "Linux 6.1" in text and "Test CPU, 2 cores" in text and "MLX 0.32" in text
    assert "pinned: mlx-lm on CPU 0; dnet, 2 nodes: node2 on CPU 1" in text
    assert "0.100 ms one way above the link delay" in text
    with_netem = cr.render(report(two, netem=True))
    assert "0.1 ms one-way delay per hop, added with netem" in with_netem
    assert "0.89 (0.89 to 0.89)" in with_netem  # the same, less the 0.1 ms delay


@pytest.mark.parametrize("module", ["cluster_report.py", "cluster_links.py"])
def test_the_definitions_are_pure(module: str) -> None:
    source = (REPO / "tools" / module).read_text()
    assert imported_roots(source) <= {"__future__", "enum", "statistics", "dataclasses", "re"}


# ----- links, CPUs, topology, arguments -------------------------------------------------------


def test_link_rates_and_tc_commands() -> None:
    assert rate_bits_per_s("10gbit") == 1e10 and rate_bits_per_s("500mbit") == 5e8
    for bad in ("10gb", "fast", "0gbit", "-1mbit"):
        with pytest.raises(ValueError):
            rate_bits_per_s(bad)
    assert tbf_burst_bytes("10gbit") == 2_500_000  # 2 ms at 10 Gbit/s
    assert tbf_burst_bytes("1mbit") == 256 * 1024  # never below a GSO segment's worth
    shape = LinkShape("10gbit", PRESET_DELAYS[LinkPreset.WIFI])
    tbf = ["qdisc", "add", "dev", "d", "root", "handle", "1:", "tbf", "rate", "10gbit",
           "burst", "2500000", "latency", "50ms"]
    assert shape.tc_commands("d", netem=False, with_delay=True) == [tbf]
    assert shape.tc_commands("d", netem=True, with_delay=False) == [tbf]
    assert shape.tc_commands("d", netem=True, with_delay=True) == [tbf, [
        "qdisc", "add", "dev", "d", "parent", "1:1", "handle", "10:", "netem", "delay",
        "2.0ms", "1.0ms", "distribution", "normal"]]
    none = LinkShape("10gbit", PRESET_DELAYS[LinkPreset.NONE])
    assert none.tc_commands("d", netem=True, with_delay=True) == [tbf]


def test_stale_tags_are_those_of_runs_that_are_gone() -> None:
    names = {"dnbc10-1", "dnbc10-sw", "dnbc20-c", "dnet-t1a2b3c-1", "dnbcx-1", "other"}
    assert stale_tags(names, alive=lambda pid: pid == 20) == {"dnbc10"}


def test_each_node_gets_cpus_of_its_own() -> None:
    assert node_cpu_sets([0, 1], 2, 1) == ["0", "1"]
    assert node_cpu_sets([3, 1, 2, 0], 2, 2) == ["0,1", "2,3"]
    with pytest.raises(ValueError, match="need 3 CPUs"):
        node_cpu_sets([0, 1], 3, 1)
    assert cpu_set("0-2,5") == {0, 1, 2, 5} and cpu_set("1") == {1}


def topology(epoch: int = 3, **changes) -> dict:
    nodes = [{"id": "aaa", "name": "node1", "healthy": True, "epoch": epoch, "layers": []},
             {"id": "bbb", "name": "node2", "healthy": True, "epoch": epoch,
              "layers": [0, 1, 2, 3]}]
    for name, change in changes.items():
        next(n for n in nodes if n["name"] == name).update(change)
    return {"epoch": epoch, "nodes": nodes, "explanation": ["aaa is left out: bbb is enough"]}


def test_a_mesh_is_ready_once_every_node_serves_one_plan_covering_every_layer() -> None:
    placement = placement_from_topology(topology(), ["node1", "node2"], 4)
    assert placement == cr.Placement(("node1", "node2"), ((), (0, 1, 2, 3)),
                                     ("node1 is left out: node2 is enough",))
    assert placement_from_topology(topology(epoch=0), ["node1", "node2"], 4) is None
    assert placement_from_topology(topology(node1={"healthy": False}), ["node1", "node2"],
                                   4) is None
    assert placement_from_topology(topology(node1={"epoch": 2}), ["node1", "node2"], 4) is None
    assert placement_from_topology(topology(node2={"layers": [0, 1, 3]}), ["node1", "node2"],
                                   4) is None
    assert placement_from_topology(topology(), ["node1", "node2", "node3"], 4) is None


def test_arguments_are_checked_before_anything_starts(capsys) -> None:
    cpus = len(os.sched_getaffinity(0))
    for argv, message in [
        (["--nodes", str(cpus + 1)], "CPUs of their own"),
        (["--manual", "--memory-budget", "30MB"], "--memory-budget is for mesh mode"),
        (["--rate", "fast"], "not a link rate"),
        (["--nodes", "2", "--layers", "1"], "at least one layer"),
        (["--hidden", "100"], "multiple of 16"),
        (["--decode-tokens", "1"], "at least 2"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            bench_cluster.parse_args(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    args = bench_cluster.parse_args(["--nodes", "1"])
    assert bench_cluster.context_for(args) == 16384  # 8192-token prompts do not fit 8192
    assert bench_cluster.model_spec(args).max_position_embeddings == 16384


# ----- the tool itself (root, namespaces, real processes) -------------------------------------

TINY = ["--layers", "2", "--hidden", "64", "--prompt-lengths", "32", "--decode-tokens", "8",
        "--streams", "1,2", "--stream-tokens", "4", "--repeats", "1", "--nodes", "1,2",
        "--floor-count", "20"]
RUN_S = 300


def tool_unavailable() -> str | None:
    if sys.platform != "linux" or os.geteuid() != 0:
        return "needs root on Linux (network namespaces)"
    missing = [t for t in ("ip", "tc", "taskset") if shutil.which(t) is None]
    if missing:
        return f"missing {missing}"
    if len(os.sched_getaffinity(0)) < 2:
        return "two nodes need two CPUs"
    return None


def leftovers(tag: str) -> list[str]:
    """Namespaces named by the run's tag, and processes carrying its marker."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    left = [line.split()[0] for line in out.stdout.splitlines()
            if line.startswith(f"{tag}-")]
    marker = f"{RUN_ENV}={tag}".encode()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if marker in (proc / "environ").read_bytes().split(b"\0"):
                    left.append(f"process {proc.name}")
            except OSError:
                continue
    return left


def start_tool(extra: list[str], tmp_path: Path) -> subprocess.Popen:
    """The tool, its stdout piped and its stderr (progress lines) in tmp_path/stderr.log."""
    with open(tmp_path / "stderr.log", "w") as err:
        return subprocess.Popen(
            [sys.executable, str(REPO / "tools" / "bench_cluster.py"), *TINY,
             "--cache-dir", str(tmp_path / "models"), *extra],
            stdout=subprocess.PIPE, stderr=err, text=True, cwd=REPO)


def finish(tool: subprocess.Popen, tmp_path: Path, timeout_s: float) -> tuple[str, str]:
    try:
        out, _ = tool.communicate(timeout=timeout_s)
    finally:
        if tool.poll() is None:
            tool.kill()
            tool.wait()
    return out, (tmp_path / "stderr.log").read_text()


needs_root = pytest.mark.skipif(tool_unavailable() is not None,
                                reason=tool_unavailable() or "")


@pytest.mark.slow
@needs_root
def test_a_tiny_manual_run_prints_the_table_and_leaves_nothing(tmp_path: Path) -> None:
    tool = start_tool(["--manual", "--json", str(tmp_path / "out.json")], tmp_path)
    out, err = finish(tool, tmp_path, RUN_S)
    assert tool.returncode == 0, err
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    names = [row.split(" | ")[0].lstrip("| ") for row in rows]
    assert names[:4] == ["configuration", "mlx-lm, 1 node", "dnet, 1 node", "dnet, 2 nodes"]
    two = rows[3].split(" | ")
    assert two[1] == "2", rows[3]  # an even split: two stages
    assert re.fullmatch(r"-?\d+\.\d\d \(-?\d+\.\d\d to -?\d+\.\d\d\) \|", two[-1]), rows[3]
    assert "node1: 0, node2: 1; 2 stage(s), 2 hop(s) per token" in out
    assert "raw TCP message of 256 bytes" in out
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved["mode"] == "manual" and len(saved["rings"]) == 2
    assert leftovers(f"dnbc{tool.pid}") == []


@pytest.mark.slow
@needs_root
def test_a_mesh_run_says_plainly_when_the_planner_leaves_a_node_out(tmp_path: Path) -> None:
    # Two equal nodes and a model one of them holds: a second stage would only add hops.
    tool = start_tool([], tmp_path)
    out, err = finish(tool, tmp_path, RUN_S)
    assert tool.returncode == 0, err
    row = next(line for line in out.splitlines() if line.startswith("| dnet, 2 nodes |"))
    assert row.split(" | ")[1] == "1"
    assert "out: this row ran on 1 node(s), not 2.**" in out
    assert "n/a: the 2-node configuration ran on 1 stage" in out
    assert leftovers(f"dnbc{tool.pid}") == []


def wait_for_progress(tool: subprocess.Popen, log: Path, text: str, timeout_s: float) -> None:
    """Until the tool's progress log shows `text`; fails if it ends or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while text not in log.read_text():
        if tool.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"no {text!r} from the tool: {log.read_text()}")
        time.sleep(0.2)


@pytest.mark.slow
@needs_root
@pytest.mark.parametrize(("signum", "when", "code"), [
    (signal.SIGINT, "warm-up done", 130),  # measuring: every ring up and busy
    (signal.SIGTERM, "one after another", 143),  # start-up: processes still loading
], ids=["SIGINT-while-measuring", "SIGTERM-while-starting"])
def test_an_interrupted_run_leaves_nothing(tmp_path: Path, signum: int, when: str,
                                           code: int) -> None:
    tool = start_tool(["--manual", "--decode-tokens", "2000", "--repeats", "5"], tmp_path)
    tag = f"dnbc{tool.pid}"
    try:
        wait_for_progress(tool, tmp_path / "stderr.log", when, RUN_S)
        assert leftovers(tag), "the run should have namespaces and processes by now"
        tool.send_signal(signum)
    finally:
        out, err = finish(tool, tmp_path, 120)
    assert tool.returncode == code, err
    assert "stopping every process, removing the namespaces" in err
    assert "| configuration |" not in out
    assert leftovers(tag) == []


@pytest.mark.slow
@needs_root
def test_a_run_that_fails_to_start_leaves_nothing(tmp_path: Path) -> None:
    tool = start_tool(["--manual", "--start-timeout", "0.1"], tmp_path)
    tag = f"dnbc{tool.pid}"
    out, err = finish(tool, tmp_path, RUN_S)
    assert tool.returncode == 1, err
    assert "error: dnet, 1 node: not ready after 0 s" in err
    assert "| configuration |" not in out
    assert leftovers(tag) == []
