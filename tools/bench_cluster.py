"""A cluster on one machine, measured against one node, in one run.

Each dnet node runs in a network namespace of its own (a bridge, a veth pair per node, `tc tbf`
at --rate on each link, plus a `tc netem` delay per --link preset where the kernel has netem;
where it does not, the links carry no added delay and the report says so), pinned to CPUs of
its own (taskset). The baseline, mlx-lm in one process (`generate_step` for one stream, its
`BatchGenerator` for concurrent streams), is pinned to the first node's CPUs. Every
configuration is up at once and measured in turn, repetition by repetition, so a slow minute
hits them all alike. The report (Markdown, on stdout) gives every figure as a ratio to the
baseline of the same run, the absolute figure beside it; tools/cluster_report.py defines them.

Mesh mode (the default) runs `dnet join` in each namespace, as users do: the planner decides
which nodes hold layers, and when it leaves a node out the report says so on that row.
`--manual` runs `dnet shard` per namespace with an even layer split (and `dnet api` at the
head), so the ring itself is measured.

Needs root (namespaces), iproute2 (`ip`, `tc`) and util-linux (`taskset`). Every process and
namespace it makes is removed by id on exit, on Ctrl-C, SIGTERM or SIGHUP, and on errors;
namespaces left by a run that was SIGKILLed are removed by the next run.

Usage (expect about 10 minutes for the full run on a quiet 2-core machine):
    sudo uv run python tools/bench_cluster.py [--manual] [--nodes 1,2] [--json out.json]
Smoke run:
    sudo uv run python tools/bench_cluster.py --layers 2 --hidden 64 --prompt-lengths 32 \\
        --decode-tokens 8 --streams 1,2 --stream-tokens 4 --repeats 1
"""

from __future__ import annotations

import argparse
import functools
import http.client
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from enum import Enum
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import machine_info, model_info  # noqa: E402
from cluster_baseline import BaselineDied  # noqa: E402
from cluster_lan import ClusterLan, LanError, remove_stale, run_tag, run_thread_in  # noqa: E402
from cluster_links import PRESET_DELAYS, LinkPreset, LinkShape, rate_bits_per_s  # noqa: E402
from cluster_measure import Measurer  # noqa: E402
from cluster_nodes import ClusterStartError, NodeSlot, RingCluster, node_cpu_sets  # noqa: E402
from cluster_report import Entry, Link, Mode, Report, render  # noqa: E402

from dnet.entry import PREFILL_CHUNK  # noqa: E402
from dnet.modelgen import ModelSpec, cached_model  # noqa: E402

DEFAULT_CONTEXT = 4096
BUSY_LOAD = 0.5


class Terminated(BaseException):
    """SIGTERM or SIGHUP: unwind like Ctrl-C, so everything is stopped and removed."""


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manual", action="store_true",
                   help="dnet shard + dnet api with an even layer split instead of dnet join")
    p.add_argument("--nodes", type=int_list, default=None,
                   help="ring sizes to measure (default 1,2 and 3 where the CPUs allow)")
    p.add_argument("--cpus-per-node", type=int, default=1)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=384,
                   help="hidden size (intermediate 3x, 8 heads, 4 KV heads)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--prompt-lengths", type=int_list, default=[512, 2048, 8192],
                   help="TTFT prompt lengths in tokens")
    p.add_argument("--short-prompt", type=int, default=32,
                   help="prompt length for the decode measurements")
    p.add_argument("--decode-tokens", type=int, default=128, help="tokens of one stream")
    p.add_argument("--streams", type=int_list, default=[1, 4, 8, 16])
    p.add_argument("--stream-tokens", type=int, default=64,
                   help="tokens of each concurrent stream (below 16 the figures are noise: "
                        "tokens the client reads in one burst share a timestamp)")
    p.add_argument("--repeats", type=int, default=3, help="repetitions of the decode figures")
    p.add_argument("--ttft-repeats", type=int, default=1)
    p.add_argument("--entry", choices=[e.value for e in Entry], default=Entry.TAIL.value,
                   help="where requests enter: the node holding the last layer (default; it "
                        "streams to the client while the head computes) or layer 0")
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help="tokens per prefill chunk, passed to dnet as --prefill-chunk and to "
                        f"mlx-lm as prefill_step_size (default: dnet's, {PREFILL_CHUNK})")
    p.add_argument("--link", choices=[p.value for p in LinkPreset], default="10gbe",
                   help="one-way delay preset for every link (needs netem; default 10gbe)")
    p.add_argument("--rate", default="10gbit", help="rate limit of every link (tc tbf)")
    p.add_argument("--memory-budget", default=None,
                   help="mesh mode: every node's --memory-budget (e.g. 30MB), to make the "
                        "planner split a model that one node could hold (every "
                        "configuration gets it: a 1-node mesh must then still fit)")
    p.add_argument("--floor-count", type=int, default=500, help="raw TCP round trips (the floor)")
    p.add_argument("--start-timeout", type=float, default=300.0)
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "dnet-bench-models"))
    p.add_argument("--log-dir", default=None,
                   help="keep the processes' logs here (default: a temporary directory, "
                        "removed after a successful run)")
    args = p.parse_args(argv)
    problems = validate(args)
    if problems:
        p.error("; ".join(problems))
    return args


def validate(args: argparse.Namespace) -> list[str]:
    problems = []
    available = sorted(os.sched_getaffinity(0))
    fit = len(available) // max(1, args.cpus_per_node)
    if args.nodes is None:
        args.nodes = list(range(1, min(3, fit) + 1))
    if not args.nodes or min(args.nodes) < 1:
        problems.append("--nodes needs ring sizes of at least 1")
    elif max(args.nodes) > fit:
        problems.append(f"{max(args.nodes)} nodes need {max(args.nodes) * args.cpus_per_node} "
                        f"CPUs of their own; this process may use {len(available)}")
    elif any(n > args.layers for n in args.nodes):
        problems.append("every node needs at least one layer: --nodes above --layers")
    if args.hidden % 16:
        problems.append("--hidden must be a multiple of 16 (8 heads of an even size)")
    if args.decode_tokens < 2 or args.stream_tokens < 2:
        problems.append("--decode-tokens and --stream-tokens must be at least 2")
    if args.repeats < 1 or args.ttft_repeats < 1 or args.cpus_per_node < 1:
        problems.append("--repeats, --ttft-repeats and --cpus-per-node must be at least 1")
    if not args.streams or min(args.streams) < 1 or not args.prompt_lengths \
            or min(args.prompt_lengths) < 1 or args.short_prompt < 1:
        problems.append("stream counts and prompt lengths must be at least 1")
    if args.prefill_chunk is not None and args.prefill_chunk < 1:
        problems.append("--prefill-chunk must be at least 1")
    if args.memory_budget and args.manual:
        problems.append("--memory-budget is for mesh mode (the planner); --manual splits "
                        "evenly")
    try:
        rate_bits_per_s(args.rate)
    except ValueError as exc:
        problems.append(str(exc))
    return problems


def environment_problem() -> str | None:
    if sys.platform != "linux":
        return "network namespaces are Linux-only"
    if os.geteuid() != 0:
        return "creating network namespaces needs root: run it with sudo"
    missing = [tool for tool in ("ip", "tc", "taskset") if shutil.which(tool) is None]
    if missing:
        return f"missing commands: {', '.join(missing)} (iproute2, util-linux)"
    return None


def prefill_chunk(args: argparse.Namespace) -> int:
    """The ring's prefill chunk, which the mlx-lm baseline uses as its prefill_step_size."""
    return int(args.prefill_chunk or PREFILL_CHUNK)


def context_for(args: argparse.Namespace) -> int:
    """Positions the model must accept: the longest prompt plus its answer."""
    longest = max(max(args.prompt_lengths) + 2, args.short_prompt + max(
        args.decode_tokens, args.stream_tokens))
    context = DEFAULT_CONTEXT
    while context < longest:
        context *= 2
    return context


def model_spec(args: argparse.Namespace) -> ModelSpec:
    """The generated model. Why the defaults (measured on the 2-core AMD EPYC we build on,
    one core each): hidden 384 and 6 layers make one decode step take about 9-10 ms, so a
    step's compute outweighs a hop's ~0.1 ms as on real hardware, and 6 layers split evenly
    over 1, 2 and 3 nodes. MLX's CPU matmuls run at only 5-7 GFLOP/s here, so a prefill
    token costs nearly what a decode step does and an 8192-token prompt takes about 100 s
    per configuration, which is what bounds the model's size. float32, because bf16 is the
    slower one on this backend (matrix-vector 3.1 against 5.7 GFLOP/s, attention 3.7
    against 4.8)."""
    return ModelSpec(arch="qwen3", dtype=args.dtype, num_layers=args.layers,
                     hidden_size=args.hidden, intermediate_size=3 * args.hidden, num_heads=8,
                     num_kv_heads=4, vocab_size=1024,
                     max_position_embeddings=context_for(args))


def log(started: float, message: str) -> None:
    print(f"[{time.perf_counter() - started:6.0f} s] {message}", file=sys.stderr, flush=True)


def make_clusters(args: argparse.Namespace, lan: ClusterLan, model: Path) -> list[RingCluster]:
    """Each configuration on namespaces of its own; node i of every one on CPU set i."""
    cpus = node_cpu_sets(sorted(os.sched_getaffinity(0)), max(args.nodes), args.cpus_per_node)
    mode = Mode.MANUAL if args.manual else Mode.MESH
    clusters, hosts = [], iter(lan.hosts)
    for k in sorted(args.nodes):
        slots = [NodeSlot(f"node{i + 1}", next(hosts), cpus[i]) for i in range(k)]
        clusters.append(RingCluster(f"dnet, {k} node{'s' if k > 1 else ''}", mode, slots,
                                    model, args.layers, context_for(args),
                                    memory_budget=args.memory_budget, entry=Entry(args.entry),
                                    prefill_chunk=args.prefill_chunk))
    return clusters


def pin_client(args: argparse.Namespace) -> str:
    """Put this thread (and the threads it starts: the HTTP client's) on the CPUs no node
    uses, when there are any; otherwise it shares theirs, and the report says so."""
    available = sorted(os.sched_getaffinity(0))
    used = max(args.nodes) * args.cpus_per_node
    spare = available[used:]
    if not spare:
        return f"{','.join(map(str, available))} (shared with the nodes: no CPU is spare)"
    os.sched_setaffinity(0, spare)  # 0: the calling thread only
    return ",".join(map(str, spare))


def run(args: argparse.Namespace, lan: ClusterLan, model: Path, info: dict,
        started: float, load_before: float) -> Report:
    """Everything after the LAN exists; runs on a thread inside the client namespace."""
    clusters = make_clusters(args, lan, model)
    client_cpus = pin_client(args)
    measurer = Measurer(args, lan, model, info["vocab_size"], clusters,
                        lambda message: log(started, message), prefill_chunk(args))
    machine = machine_info()
    machine["kernel"] = platform.release()
    machine["loadavg_start"] = load_before  # before we generated the model or started much
    measurer.start()
    measurer.cpus["the benchmark's HTTP client"] = client_cpus
    measurer.measure()
    machine["loadavg_end"] = os.getloadavg()[0]
    link = Link(args.rate, args.link, PRESET_DELAYS[LinkPreset(args.link)].delay_ms,
                lan.netem, lan.netem_note)
    settings = {key: getattr(args, key) for key in (
        "decode_tokens", "short_prompt", "stream_tokens", "repeats", "ttft_repeats",
        "nodes", "cpus_per_node", "prompt_lengths", "streams", "memory_budget", "entry")}
    settings["prefill_chunk"] = prefill_chunk(args)
    settings["busy_load"] = BUSY_LOAD
    return Report(machine, info, settings, Mode.MANUAL if args.manual else Mode.MESH, link,
                  measurer.cpus, measurer.baseline_result, measurer.ring_results,
                  measurer.floor_rtt_ms, measurer.floor_bytes,
                  elapsed_s=time.perf_counter() - started)


def _raise_terminated(signum: int, _frame: object) -> None:
    raise Terminated(signal.Signals(signum).name)


def _json_default(value: object) -> object:
    return value.value if isinstance(value, Enum) else str(value)


def measure_and_clean_up(args: argparse.Namespace, lan: ClusterLan,
                         started: float) -> tuple[int, Report | None]:
    """Build the cluster and measure it; whatever happens, stop and remove all of it.
    Returns the exit status (0, 1 on errors, 130 on SIGINT, 143 on SIGTERM/SIGHUP)."""
    code, report = 1, None
    # Explicitly: a shell starting us in the background would have us ignore SIGINT.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_terminated)
    load_before = os.getloadavg()[0]
    try:
        model = cached_model(model_spec(args), cache_dir=Path(args.cache_dir))
        info = model_info(model, model_spec(args))
        log(started, f"model {info['name']}: {info['parameters'] / 1e6:.1f} M parameters")
        lan.build(sum(args.nodes), LinkShape(args.rate, PRESET_DELAYS[LinkPreset(args.link)]))
        log(started, f"namespaces {lan.tag}-*: {len(lan.hosts)} node(s), links tbf {args.rate}"
            f"; {lan.netem_note}")
        assert lan.client is not None
        benchmark = functools.partial(run, args, lan, model, info, started, load_before)
        thread, outcome = run_thread_in(lan.client.namespace, benchmark)
        while thread.is_alive():
            thread.join(0.2)
        if "error" in outcome:
            raise outcome["error"]
        code, report = 0, outcome["value"]
    except KeyboardInterrupt:
        log(started, "interrupted: stopping every process, removing the namespaces")
        code = 130
    except Terminated as exc:
        log(started, f"{exc}: stopping every process, removing the namespaces")
        code = 143
    except (ClusterStartError, LanError, BaselineDied, OSError, http.client.HTTPException,
            RuntimeError) as exc:
        log(started, f"error: {exc}")
    except Exception:  # anything else: the traceback, then the same cleanup
        traceback.print_exc()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)
        problems = lan.close()
        for problem in problems:
            log(started, f"cleanup: {problem}")
    return (code or (1 if problems else 0)), report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problem = environment_problem()
    if problem:
        print(f"bench_cluster: {problem}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    for name in remove_stale():
        log(started, f"removed {name}, left by an earlier run that was killed")
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="dnet-bench-cluster-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    code, report = measure_and_clean_up(args, ClusterLan(run_tag(os.getpid()), log_dir),
                                        started)
    if report is not None:
        print(render(report))
        if args.json:
            Path(args.json).write_text(json.dumps(asdict(report), indent=2,
                                                  default=_json_default))
    if code == 0 and args.log_dir is None:
        shutil.rmtree(log_dir, ignore_errors=True)
    elif code != 0:
        log(started, f"logs kept in {log_dir}")
    log(started, f"done, exit status {code}")
    return code


if __name__ == "__main__":
    sys.exit(main())
