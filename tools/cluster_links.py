"""The links of the simulated cluster: rate and delay presets, and the `tc` commands that
shape a veth's egress (tbf at the root, netem under it). Pure: no processes are run here.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass


class LinkPreset(enum.Enum):
    """Added one-way delay per link: what a real cable and switch cost beyond the kernel's own
    stack, which the namespaces already pay. Typical figures, not measurements of ours:
    IP over a Thunderbolt bridge between Macs, 10 GbE through one switch, a home Wi-Fi hop."""

    NONE = "none"
    THUNDERBOLT = "thunderbolt"
    TEN_GBE = "10gbe"
    WIFI = "wifi"


@dataclass(frozen=True)
class LinkDelay:
    delay_ms: float  # one way, per hop
    jitter_ms: float


PRESET_DELAYS = {
    LinkPreset.NONE: LinkDelay(0.0, 0.0),
    LinkPreset.THUNDERBOLT: LinkDelay(0.05, 0.01),
    LinkPreset.TEN_GBE: LinkDelay(0.1, 0.02),
    LinkPreset.WIFI: LinkDelay(2.0, 1.0),
}

_RATE = re.compile(r"^(\d+(?:\.\d+)?)([kmg]?)bit$")
_RATE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}


def rate_bits_per_s(rate: str) -> float:
    """'10gbit' -> 1e10, '500mbit' -> 5e8 (tc's decimal units); ValueError otherwise."""
    match = _RATE.match(rate.strip().lower())
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(f"not a link rate: {rate!r} (try 10gbit or 500mbit)")
    return float(match.group(1)) * _RATE_UNITS[match.group(2)]


def tbf_burst_bytes(rate: str) -> int:
    """2 ms worth of the rate, at least 256 KiB: a tbf bucket smaller than one GSO segment
    (up to 64 KiB on a veth) drops it, and one smaller than rate/HZ cannot reach the rate."""
    return max(256 * 1024, int(rate_bits_per_s(rate) / 8 * 0.002))


@dataclass(frozen=True)
class LinkShape:
    rate: str  # tc's syntax, e.g. "10gbit"
    delay: LinkDelay  # wanted; applied only where netem exists

    def tc_commands(self, dev: str, *, netem: bool, with_delay: bool) -> list[list[str]]:
        """`tc` argument lists shaping `dev`'s egress: tbf at the root, netem under it."""
        commands = [["qdisc", "add", "dev", dev, "root", "handle", "1:", "tbf", "rate",
                     self.rate, "burst", str(tbf_burst_bytes(self.rate)), "latency", "50ms"]]
        if with_delay and netem and self.delay.delay_ms > 0:
            netem_args = ["delay", f"{self.delay.delay_ms}ms"]
            if self.delay.jitter_ms > 0:
                netem_args += [f"{self.delay.jitter_ms}ms", "distribution", "normal"]
            commands.append(["qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:",
                             "netem", *netem_args])
        return commands
