"""What the cluster benchmark measured, the figures derived from it, and its Markdown report.

Pure: plain data in, numbers and text out; no I/O, clocks or processes (tested exhaustively in
tests/test_bench_cluster.py). Definitions, as printed with every report:

- TTFT: from sending the request to its first streamed token (mlx-lm: from calling
  `generate_step` to its first token), for a fresh random prompt of each length.
- Decode tok/s of one stream: (n - 1) / (t_last - t_first) over n tokens.
- Aggregate decode tok/s of N concurrent streams, while all N decode: the tokens arriving after
  the last stream's first token up to the first stream's last token, over that window
  (tools/benchlib.py `steady_decode_tok_s`); mlx-lm's is its BatchGenerator given all N prompts
  at once, whose streams start and end together. The ring prefills concurrent prompts one
  after another; counting that as decode time would measure prefill.
- Hops per token: the messages on a decode step's critical path. The layers, in order, form
  runs on nodes; each run but the last hands its activation to the next run's node, and the
  tail sends the sampled token to the head unless it is the head: (runs - 1) + (tail != head);
  an even k-node ring makes k, a single node none.
- Per-hop overhead above the link delay, for a ring of k nodes:
  (ms/token of the k-node ring - ms/token of the 1-node ring) / hops per token - the added
  one-way link delay. The 1-node ring computes the same layers with no hop, and every node has
  a core of its own, so the difference is what the hops cost. Given as the median over paired
  repetitions (the k-node and 1-node figures of the same repetition) and their range.
- Floor: half the median round trip of a raw TCP message of one decode hop's size between
  two Python processes in two node namespaces (tools/cluster_floor.py), less the link delay.
"""

from __future__ import annotations

import enum
import statistics
from dataclasses import dataclass, field


class Entry(enum.Enum):
    """Where the benchmark's requests enter the ring."""

    TAIL = "tail"  # the node holding the last layer: it streams while the head computes
    HEAD = "head"  # the node holding layer 0


class Mode(enum.Enum):
    MESH = "mesh"  # `dnet join` in every namespace: the planner places the layers
    MANUAL = "manual"  # `dnet shard` per namespace with an even split, `dnet api` at the head


@dataclass(frozen=True)
class Placement:
    """Which node holds which layers, as the running cluster reported it."""

    nodes: tuple[str, ...]
    layers: tuple[tuple[int, ...], ...]  # per node, in the order of `nodes`
    explanation: tuple[str, ...] = ()

    def owners(self) -> list[int]:
        """The index of the node holding each layer, layer 0 first."""
        owner = {layer: i for i, held in enumerate(self.layers) for layer in held}
        return [owner[layer] for layer in sorted(owner)]

    @property
    def stages(self) -> int:
        return sum(1 for held in self.layers if held)

    @property
    def hops_per_token(self) -> int:
        return hops_per_token(self.owners())

    @property
    def left_out(self) -> list[str]:
        return [name for name, held in zip(self.nodes, self.layers, strict=True) if not held]

    def describe(self) -> str:
        return ", ".join(f"{name}: {format_layers(held) or 'no layers (entry only)'}"
                         for name, held in zip(self.nodes, self.layers, strict=True))


def hops_per_token(owners: list[int]) -> int:
    if len(set(owners)) <= 1:
        return 0
    runs = 1 + sum(1 for a, b in zip(owners, owners[1:], strict=False) if a != b)
    return (runs - 1) + (1 if owners[-1] != owners[0] else 0)


def format_layers(layers: tuple[int, ...]) -> str:
    """(0, 1, 2, 5) -> '0-2, 5'."""
    parts, start = [], None
    for i, layer in enumerate(layers):
        if start is None:
            start = layer
        if i + 1 == len(layers) or layers[i + 1] != layer + 1:
            parts.append(str(start) if start == layer else f"{start}-{layer}")
            start = None
    return ", ".join(parts)


@dataclass
class ConfigResult:
    """The raw samples of one configuration; every list has one entry per repetition."""

    name: str
    nodes: int
    placement: Placement | None = None  # None for the mlx-lm baseline
    ttft_s: dict[int, list[float]] = field(default_factory=dict)
    decode_tok_s: list[float] = field(default_factory=list)
    aggregate_tok_s: dict[int, list[float]] = field(default_factory=dict)

    @property
    def stages(self) -> int:
        return self.placement.stages if self.placement else 1

    @property
    def ms_per_token(self) -> float | None:
        return 1000.0 / median(self.decode_tok_s) if self.decode_tok_s else None


def median(values: list[float]) -> float:
    return statistics.median(values)


@dataclass(frozen=True)
class Spread:
    median: float
    low: float
    high: float


def per_hop_overhead(ring: ConfigResult, one: ConfigResult | None,
                     delay_ms: float) -> Spread | None:
    """See the module docstring; None when the ring makes no hop or a figure is missing."""
    hops = ring.placement.hops_per_token if ring.placement else 0
    if one is None or hops == 0 or not ring.decode_tok_s or not one.decode_tok_s:
        return None
    samples = [(1000.0 / k - 1000.0 / o) / hops - delay_ms
               for k, o in zip(ring.decode_tok_s, one.decode_tok_s, strict=False)]
    return Spread(median(samples), min(samples), max(samples))


def floor_one_way_ms(rtt_ms: list[float], delay_ms: float) -> float | None:
    return median(rtt_ms) / 2 - delay_ms if rtt_ms else None


def ratio(value: list[float] | None, base: list[float] | None) -> float | None:
    if not value or not base:
        return None
    return median(value) / median(base)


@dataclass(frozen=True)
class Link:
    rate: str
    preset: str
    wanted_delay_ms: float
    netem: bool
    netem_note: str

    @property
    def applied_delay_ms(self) -> float:
        return self.wanted_delay_ms if self.netem else 0.0


@dataclass
class Report:
    machine: dict
    model: dict
    settings: dict
    mode: Mode
    link: Link
    cpus: dict[str, str]  # what runs where: "mlx-lm" / "<config> <node>" -> CPU list
    baseline: ConfigResult
    rings: list[ConfigResult]
    floor_rtt_ms: list[float] = field(default_factory=list)
    floor_bytes: int = 0
    elapsed_s: float = 0.0

    def ring(self, nodes: int) -> ConfigResult | None:
        return next((r for r in self.rings if r.nodes == nodes), None)

    def hop(self, ring: ConfigResult) -> Spread | None:
        return per_hop_overhead(ring, self.ring(1), self.link.applied_delay_ms)


# ----- targets (issue 15: 2 nodes against 1, each node one core, 10 Gbit links) --------------


@dataclass(frozen=True)
class Target:
    name: str
    measured: float | None
    op: str  # "<=" or ">="
    threshold: float
    unit: str
    why_not: str = ""  # set when the target cannot be judged

    @property
    def status(self) -> str:
        if self.why_not:
            return f"n/a: {self.why_not}"
        if self.measured is None:
            return "n/a: not measured"
        ok = self.measured <= self.threshold if self.op == "<=" else \
            self.measured >= self.threshold
        return "ok" if ok else "MISS"


def targets(report: Report) -> list[Target]:
    two, base = report.ring(2), report.baseline
    why = ""
    if two is None:
        why = "no 2-node configuration was run"
    elif two.stages < 2:
        why = f"the 2-node configuration ran on {two.stages} stage"
    longest = 8192 if 8192 in base.ttft_s else None
    hop = report.hop(two) if two and not why else None
    return [
        Target("TTFT, 8192-token prompt, 2 nodes / mlx-lm", ratio(
            two.ttft_s.get(8192) if two and longest else None, base.ttft_s.get(8192)),
            "<=", 0.6, "x", why or ("" if longest else "no 8192-token prompt measured")),
        Target("aggregate decode, 8 streams, 2 nodes / mlx-lm BatchGenerator", ratio(
            two.aggregate_tok_s.get(8) if two else None, base.aggregate_tok_s.get(8)),
            ">=", 1.7, "x", why),
        Target("one stream's decode, 2 nodes / mlx-lm",
               ratio(two.decode_tok_s if two else None, base.decode_tok_s), ">=", 0.92, "x",
               why),
        Target("per-hop overhead above the link delay, 2 nodes",
               hop.median if hop else None, "<=", 0.3, "ms", why),
    ]


# ----- Markdown --------------------------------------------------------------------------------


def _cell(r: float | None, absolute: str) -> str:
    return "-" if r is None else f"{r:.2f}x ({absolute})"


def _seconds(values: list[float] | None) -> str:
    return f"{median(values):.2f} s" if values else ""


def _rate(values: list[float] | None) -> str:
    return f"{median(values):.1f} tok/s" if values else ""


def results_table(report: Report) -> list[str]:
    base = report.baseline
    lengths = sorted(base.ttft_s)
    streams = sorted(base.aggregate_tok_s)
    head = (["configuration", "stages"] + [f"TTFT {n}" for n in lengths] + ["decode, 1 stream"]
            + [f"aggregate, {n} stream{'s' if n > 1 else ''}" for n in streams]
            + ["per-hop ms above link delay"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for result in [base, *report.rings]:
        hop = report.hop(result) if result is not base else None
        cells = [result.name, str(result.stages)]
        cells += [_cell(ratio(result.ttft_s.get(n), base.ttft_s[n]),
                        _seconds(result.ttft_s.get(n))) for n in lengths]
        cells.append(_cell(ratio(result.decode_tok_s, base.decode_tok_s),
                           _rate(result.decode_tok_s)))
        cells += [_cell(ratio(result.aggregate_tok_s.get(n), base.aggregate_tok_s[n]),
                        _rate(result.aggregate_tok_s.get(n))) for n in streams]
        cells.append(f"{hop.median:.2f} ({hop.low:.2f} to {hop.high:.2f})" if hop else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def placement_lines(report: Report) -> list[str]:
    lines = []
    for ring in report.rings:
        p = ring.placement
        if p is None:
            continue
        line = (f"- {ring.name}: {p.describe()}; {p.stages} stage(s), {p.hops_per_token} "
                f"hop(s) per token.")
        if p.stages < ring.nodes:
            line += (f" **The planner left {', '.join(p.left_out)} out: this row ran on "
                     f"{p.stages} node(s), not {ring.nodes}.**")
        lines.append(line)
        if p.stages < ring.nodes and p.explanation:
            lines += [f"  - planner: {text}" for text in p.explanation]
    return lines


def header_lines(report: Report) -> list[str]:
    m, mod, s, link = report.machine, report.model, report.settings, report.link
    busy = m.get("loadavg_start", 0.0) > s.get("busy_load", 0.5)
    delay = (f"{link.preset} preset: {link.wanted_delay_ms} ms one-way delay per hop, added "
             "with netem" if link.netem else
             f"{link.preset} preset wants {link.wanted_delay_ms} ms one-way delay per hop: "
             f"NOT added, {link.netem_note}; the links carry no added delay")
    if link.wanted_delay_ms == 0:
        delay = "no added delay (preset none)"
    pins = "; ".join(f"{name} on CPU {cpus}" for name, cpus in report.cpus.items())
    entry = Entry(s.get("entry", Entry.TAIL.value))
    where = {Entry.TAIL: "the node holding the last layer", Entry.HEAD: "the node holding layer 0"}
    how = {Mode.MESH: f"`dnet join` on every node, requests entering at {where[entry]}",
           Mode.MANUAL: f"`dnet shard` on every node, `dnet api` beside {where[entry]}, on its "
                        "CPUs"}
    return [
        f"- machine: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}, MLX {m['mlx']} "
        f"({m['mlx_device']}), mlx-lm {m['mlx_lm']}, Python {m['python']}; 1-min load "
        f"average {m['loadavg_start']:.2f} before, {m.get('loadavg_end', 0.0):.2f} after"
        + (" (**the machine was busy when the run started: figures are skewed**)"
           if busy else ""),
        f"- model: {mod['name']}, {mod['parameters'] / 1e6:.1f} M parameters, "
        f"{mod['mib']:.1f} MiB, random weights",
        f"- nodes: {report.mode.value} mode ({how[report.mode]}), each node in a network "
        f"namespace of its own; pinned: {pins}",
        f"- links: veth pairs on a bridge, tbf {link.rate} each way; {delay}",
        f"- settings: decode over {s['decode_tokens']} tokens after a {s['short_prompt']}-token "
        f"prompt, {s['stream_tokens']} tokens per concurrent stream; prefill in chunks of "
        f"{s.get('prefill_chunk', '?')} tokens (mlx-lm's prefill_step_size too); median of "
        f"{s['repeats']} (TTFT: {s['ttft_repeats']}) after a warm-up; elapsed "
        f"{report.elapsed_s:.0f} s",
    ]


def render(report: Report) -> str:
    floor = floor_one_way_ms(report.floor_rtt_ms, report.link.applied_delay_ms)
    floor_line = (f"- floor: a raw TCP message of {report.floor_bytes} bytes between two node "
                  f"namespaces takes {floor:.3f} ms one way above the link delay (half the "
                  f"median of {len(report.floor_rtt_ms)} round trips)"
                  if floor is not None else "- floor: not measured (no 2-node configuration)")
    target_rows = ["| target | measured | required | status |", "|---|---|---|---|"]
    for t in targets(report):
        measured = f"{t.measured:.2f} {t.unit}" if t.measured is not None else "-"
        target_rows.append(f"| {t.name} | {measured} | {t.op} {t.threshold} {t.unit} | "
                           f"{t.status} |")
    return "\n".join([
        f"## Cluster benchmark: dnet on 1 to {max(r.nodes for r in report.rings)} nodes "
        "against one node running mlx-lm",
        "", *header_lines(report), "",
        "Each cell: ratio to mlx-lm on one node in the same run (TTFT: lower is better; "
        "tok/s: higher is better), absolute figure in brackets. Aggregate columns compare "
        "with mlx-lm's BatchGenerator at the same number of streams.", "",
        *results_table(report), "",
        *placement_lines(report), floor_line,
        "- per-hop overhead above the link delay = (ms/token of the k-node ring - ms/token of "
        "the 1-node ring) / hops per token - the added one-way link delay; median of paired "
        "repetitions (range).",
        "", "Targets of issue 15 (2 nodes against 1, each node one core):", "", *target_rows,
    ])
