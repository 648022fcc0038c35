"""Per-device cost tables over "layers held", the solver's building blocks.

For k rounds (q = k - 1 full rounds before the last), a device's role in the last round fixes
which layer counts h it can hold with per-round run n:
    FULL: a full run in the last round too:  h = k * n
    ZERO: nothing in the last round:         h = q * n          (needs q >= 1)
    TAIL: ends the last round with e layers: h = q * n + e, 1 <= e <= n
Its cost then depends only on h, on whether it holds the embedding and/or head, and on how many
hops it sends, which is the same for every h; the solver adds that constant itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np

from planner import cost
from planner.devices import DeviceProfile, PlanOptions
from planner.model_profile import ModelProfile


class LastRound(Enum):
    FULL = "full"
    ZERO = "zero"
    TAIL = "tail"


@dataclass(frozen=True)
class OptionTable:
    """Indexed by h = 0..L. `time_s` is inf where h is unreachable or does not fit."""

    run_length: np.ndarray
    window: np.ndarray
    time_s: np.ndarray
    excess_bytes: np.ndarray


def run_lengths(
    num_layers: int, rounds: np.ndarray, last_round: LastRound
) -> tuple[np.ndarray, np.ndarray]:
    """(n, reachable), shaped (len(rounds), L + 1): for each k and h, the smallest run n that
    gives h layers, and whether any does."""
    held = np.arange(num_layers + 1)[None, :]
    rounds = rounds[:, None]
    full_rounds = rounds - 1
    if last_round is LastRound.FULL:
        return held // rounds, (held > 0) & (held % rounds == 0)
    if last_round is LastRound.ZERO:
        divisor = np.maximum(full_rounds, 1)
        return held // divisor, (full_rounds >= 1) & (held > 0) & (held % divisor == 0)
    # The shortest run that reaches h; a longer one only needs a bigger window.
    run = -(-held // rounds)
    return run, (held > 0) & (full_rounds * run < held)


def option_tables(
    model: ModelProfile,
    device: DeviceProfile,
    options: PlanOptions,
    rounds: np.ndarray,
    last_round: LastRound,
    holds_embedding: bool,
    holds_head: bool,
) -> OptionTable:
    """Tables for every k in `rounds` at once, shaped (len(rounds), L + 1)."""
    num_layers = model.num_layers
    held = np.arange(num_layers + 1, dtype=np.int64)
    run, reachable = run_lengths(num_layers, rounds, last_round)
    fixed = (
        options.reserve_bytes
        + held * model.cache_bytes_per_layer(options.context_tokens)
        + cost.role_bytes(model, holds_embedding, holds_head)
    )
    free = device.memory_budget_bytes - fixed
    layer_bytes = model.bytes_per_layer
    if layer_bytes == 0:
        window = np.where(free >= 0, held, 0)
    else:
        window = np.minimum(held, np.floor_divide(free, layer_bytes))
    window = np.broadcast_to(window, run.shape)
    smallest_window = run if options.window_covers_run else np.ones_like(run)
    fits = reachable & (window >= smallest_window) & (window >= 1)
    time_s = held * cost.layer_time_s(model, device) + cost.streamed_layers(held, window) * (
        layer_bytes / device.disk_read_bytes_per_s
    )
    if holds_head:
        time_s = time_s + cost.head_time_s(model, device)
    excess = np.maximum(0, fixed + smallest_window * layer_bytes - device.memory_budget_bytes)
    return OptionTable(
        run_length=run,
        window=window,
        time_s=np.where(fits, time_s, np.inf),
        excess_bytes=np.where(reachable, excess.astype(np.float64), np.inf),
    )


def option_table(
    model: ModelProfile,
    device: DeviceProfile,
    options: PlanOptions,
    rounds: int,
    last_round: LastRound,
    holds_embedding: bool,
    holds_head: bool,
) -> OptionTable:
    """The table for one k, indexed by h = 0..L."""
    tables = option_tables(
        model, device, options, np.array([rounds]), last_round, holds_embedding, holds_head
    )
    return OptionTable(
        run_length=tables.run_length[0],
        window=tables.window[0],
        time_s=tables.time_s[0],
        excess_bytes=tables.excess_bytes[0],
    )
