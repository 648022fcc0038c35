"""The exact search: for every number of rounds k, a DP over devices (`dp.solve_layered`).

Order-free search (every device's hops cost its own `latency_ms`): ring order then matters only
through which device is first (holds the embedding) and which ends the last round (the tail,
holding the head), so the DP assigns each device a role instead of a position:
    FULL   - a full run in every round              sends k hops
    ZERO   - nothing in the last round              sends k - 1 hops
    TAIL   - ends the last round (holds the head)   sends k hops, or k - 1 if it is also first
plus a flag for the device holding the embedding (FULL or TAIL). The ring is rebuilt as
first, other FULL devices, TAIL, ZERO devices. States track which roles are taken.

Fixed-order search (per-peer latencies): the same DP over the devices of one ring order, each
position's hop cost known from its neighbours; the caller enumerates orders.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np

from planner import cost, dp
from planner.devices import DeviceProfile, PlanOptions
from planner.model_profile import ModelProfile
from planner.tables import LastRound, OptionTable, option_tables

# Order-free DP states: which roles are taken so far. NONE_WITH_FULL: no first or tail yet but
# some FULL device placed, which rules out a first device that is also the tail (FULL devices
# sit between the first device and the tail). FIRST_IS_TAIL: one device is both.
NONE, NONE_WITH_FULL, FIRST, TAIL, FIRST_AND_TAIL, FIRST_IS_TAIL = range(6)
ORDER_FREE_FINAL = (FIRST_AND_TAIL, FIRST_IS_TAIL)
BEFORE_TAIL, AFTER_TAIL = 0, 1


@dataclass(frozen=True)
class Role:
    last_round: LastRound
    holds_embedding: bool

    @property
    def holds_head(self) -> bool:
        return self.last_round is LastRound.TAIL


FULL = Role(LastRound.FULL, False)
FULL_FIRST = Role(LastRound.FULL, True)
ZERO = Role(LastRound.ZERO, False)
TAIL_ONLY = Role(LastRound.TAIL, False)
TAIL_FIRST = Role(LastRound.TAIL, True)
# Which role may move the order-free DP from one state to another.
# Listed from the ring's end to its start: on exact ties the DP keeps the first role it tried,
# so later devices in the list take later ring positions and equal devices keep list order.
ORDER_FREE_MOVES: dict[Role, list[tuple[int, int]]] = {
    ZERO: [(state, state) for state in range(6)],
    TAIL_ONLY: [(NONE, TAIL), (NONE_WITH_FULL, TAIL), (FIRST, FIRST_AND_TAIL)],
    FULL: [
        (NONE, NONE_WITH_FULL),
        (NONE_WITH_FULL, NONE_WITH_FULL),
        (FIRST, FIRST),
        (TAIL, TAIL),
        (FIRST_AND_TAIL, FIRST_AND_TAIL),
    ],
    FULL_FIRST: [(NONE, FIRST), (NONE_WITH_FULL, FIRST), (TAIL, FIRST_AND_TAIL)],
    TAIL_FIRST: [(NONE, FIRST_IS_TAIL)],
}
# Where each role sits in a rebuilt ring; sorting is stable, so ties keep device-list order.
RING_POSITION = {FULL_FIRST: 0, TAIL_FIRST: 0, FULL: 1, TAIL_ONLY: 2, ZERO: 3}


def order_free_sends(role: Role, rounds: int) -> int:
    """Hops a device sends per token in a ring of two or more: one after each of its runs,
    except a first device that also ends the last round, which feeds itself the next token."""
    if role.last_round is LastRound.ZERO or (role.holds_embedding and role.holds_head):
        return rounds - 1
    return rounds


@dataclass(frozen=True)
class Assignment:
    """A candidate in solver terms: device indices in ring order and per-position runs."""

    order: tuple[int, ...]
    rounds: int
    run_lengths: tuple[int, ...]
    last_runs: tuple[int, ...]
    windows: tuple[int, ...]
    objective_s: float
    balance: float
    stage_s: float  # the busiest device's compute + disk per token: the pipeline's period

    def layer_owner(self, devices: Sequence[DeviceProfile]) -> list[str]:
        owner: list[str] = []
        for round_index in range(self.rounds):
            last = round_index == self.rounds - 1
            for position, device_index in enumerate(self.order):
                length = self.last_runs[position] if last else self.run_lengths[position]
                owner.extend([devices[device_index].id] * length)
        return owner


def better(candidate: Assignment | None, incumbent: Assignment | None) -> bool:
    """Lower predicted time; within float noise, fewer rounds, then the more balanced split."""
    if candidate is None:
        return False
    if incumbent is None:
        return True
    tolerance = dp.tie_tolerance(incumbent.objective_s)
    if candidate.objective_s < incumbent.objective_s - tolerance:
        return True
    if candidate.objective_s > incumbent.objective_s + tolerance:
        return False
    return (candidate.rounds, candidate.balance) < (incumbent.rounds, incumbent.balance)


class Searcher:
    """Holds the inputs and caches per-device tables, which do not depend on ring order.

    With `stage_cap_s`, a device may take only what costs it at most that much compute + disk
    per token: the plans it finds are those whose pipeline period is within the cap.
    """

    def __init__(
        self,
        model: ModelProfile,
        devices: Sequence[DeviceProfile],
        options: PlanOptions,
        stage_cap_s: float = float("inf"),
    ) -> None:
        self.model = model
        self.devices = list(devices)
        self.options = options
        self.stage_cap_s = stage_cap_s
        self._tables: dict[tuple[int, Role], OptionTable] = {}

    def capped(self, stage_cap_s: float) -> Searcher:
        """The same search with every device's compute + disk per token at most the cap
        (sharing this searcher's tables)."""
        searcher = Searcher(self.model, self.devices, self.options, stage_cap_s)
        searcher._tables = self._tables
        return searcher

    def most_layers(self) -> list[int]:
        """Per device, the most layers it can hold in any role and round count under the cap:
        a ring whose devices cannot hold the model between them cannot be a plan."""
        most = []
        for index in range(len(self.devices)):
            fits = np.zeros(self.model.num_layers + 1, dtype=bool)
            for role in ORDER_FREE_MOVES:
                self.table(index, 1, role)  # builds the tables of every k at once
                fits |= (self._tables[(index, role)].time_s <= self.stage_cap_s).any(axis=0)
            held = np.flatnonzero(fits)
            most.append(int(held[-1]) if len(held) else 0)
        return most

    def stage_times(self) -> np.ndarray:
        """Every compute + disk per token a device can have in some plan, ascending: the
        candidates for a plan's period."""
        for index in range(len(self.devices)):
            for role in ORDER_FREE_MOVES:
                self.table(index, 1, role)  # builds the tables of every k at once
        lone = [a.stage_s for index in range(len(self.devices))
                if (a := self.single_device(index)) is not None]
        values = np.concatenate([tables.time_s.ravel() for tables in self._tables.values()]
                                + [np.asarray(lone, dtype=np.float64)])
        return np.unique(values[np.isfinite(values)])

    def table(self, device_index: int, rounds: int, role: Role) -> OptionTable:
        key = (device_index, role)
        if key not in self._tables:
            # Every k at once: one vectorised pass instead of one per k.
            self._tables[key] = option_tables(
                self.model,
                self.devices[device_index],
                self.options,
                np.arange(1, self.model.num_layers + 1),
                role.last_round,
                role.holds_embedding,
                role.holds_head,
            )
        tables = self._tables[key]
        row = rounds - 1
        time_s = tables.time_s[row]
        if self.stage_cap_s < float("inf"):
            time_s = np.where(time_s <= self.stage_cap_s, time_s, np.inf)
        return OptionTable(
            run_length=tables.run_length[row],
            window=tables.window[row],
            time_s=time_s,
            excess_bytes=tables.excess_bytes[row],
        )

    def _transition(
        self,
        device_index: int,
        rounds: int,
        role: Role,
        hop_s: float,
        moves: Sequence[tuple[int, int]],
    ) -> list[dp.Transition]:
        times = self.table(device_index, rounds, role).time_s + hop_s
        return [dp.Transition(moves, times, role)]

    def _assignment(
        self,
        order: Sequence[int],
        roles: Sequence[Role],
        held: Sequence[int],
        rounds: int,
        result: dp.DPResult,
    ) -> Assignment:
        full_rounds = rounds - 1
        runs: list[int] = []
        lasts: list[int] = []
        windows: list[int] = []
        stage_s = 0.0
        for device_index, role, layers in zip(order, roles, held, strict=True):
            table = self.table(device_index, rounds, role)
            stage_s = max(stage_s, float(table.time_s[layers]))
            run = int(table.run_length[layers])
            runs.append(run)
            lasts.append(
                {LastRound.FULL: run, LastRound.ZERO: 0}.get(
                    role.last_round, layers - full_rounds * run
                )
            )
            windows.append(int(table.window[layers]))
        return Assignment(
            order=tuple(order),
            rounds=rounds,
            run_lengths=tuple(runs),
            last_runs=tuple(lasts),
            windows=tuple(windows),
            objective_s=result.cost,
            balance=result.balance,
            stage_s=stage_s,
        )

    def order_free_stages(
        self, rounds: int, measure_excess: bool = False, charge_hops: bool = True
    ) -> list[dp.Stage]:
        """One stage per device. Costs are seconds (hops at the sender's default latency, or
        free without `charge_hops`), or with `measure_excess` the bytes a device is over budget
        at its smallest window."""
        stages: list[dp.Stage] = []
        for index, device in enumerate(self.devices):
            latency_s = device.latency_ms / cost.MS_PER_S if charge_hops else 0.0
            transitions: list[dp.Transition] = []
            for role, moves in ORDER_FREE_MOVES.items():
                if role.last_round is LastRound.ZERO and rounds < 2:
                    continue
                table = self.table(index, rounds, role)
                values = (
                    table.excess_bytes
                    if measure_excess
                    else table.time_s + order_free_sends(role, rounds) * latency_s
                )
                transitions.append(dp.Transition(moves, values, role))
            stages.append(dp.Stage(transitions=transitions, may_skip=True))
        return stages

    def min_excess_bytes(self, rounds: int) -> tuple[float, dict[str, int]]:
        """Least total over-budget bytes of any k-round plan, and its split over devices."""
        stages = self.order_free_stages(rounds, measure_excess=True)
        result = dp.solve_layered(stages, 6, NONE, ORDER_FREE_FINAL, self.model.num_layers)
        if result is None:
            return float("inf"), {}
        split: dict[str, int] = {}
        for index, choice in enumerate(result.choices):
            if choice is not None:
                role, layers = cast(Role, choice[0]), choice[1]
                excess = int(self.table(index, rounds, role).excess_bytes[layers])
                if excess > 0:
                    split[self.devices[index].id] = excess
        return result.cost, split

    def order_free(self, rounds: int) -> Assignment | None:
        """Best plan with at least two devices' worth of roles, each hop at the sender's default
        latency. A lone FIRST_IS_TAIL device is overcharged q hops; `single_device` covers it."""
        stages = self.order_free_stages(rounds)
        result = dp.solve_layered(stages, 6, NONE, ORDER_FREE_FINAL, self.model.num_layers)
        if result is None:
            return None
        used = [
            (index, cast(Role, choice[0]), choice[1])
            for index, choice in enumerate(result.choices)
            if choice is not None
        ]
        ring = sorted(used, key=lambda entry: RING_POSITION[entry[1]])
        return self._assignment(
            [entry[0] for entry in ring],
            [entry[1] for entry in ring],
            [entry[2] for entry in ring],
            rounds,
            result,
        )

    def fixed_order(self, order: Sequence[int], rounds: int) -> Assignment | None:
        """Best plan that uses exactly `order` (two or more devices) as its ring."""
        full_rounds = rounds - 1
        ids = [self.devices[index].id for index in order]
        stages: list[dp.Stage] = []
        for position, device_index in enumerate(order):
            device = self.devices[device_index]
            next_s = device.latency_to_ms(ids[(position + 1) % len(order)]) / cost.MS_PER_S
            if position == 0:
                transitions = self._transition(
                    device_index, rounds, FULL_FIRST, rounds * next_s, [(BEFORE_TAIL, BEFORE_TAIL)]
                )
                if full_rounds >= 1:
                    transitions += self._transition(
                        device_index,
                        rounds,
                        TAIL_FIRST,
                        full_rounds * next_s,
                        [(BEFORE_TAIL, AFTER_TAIL)],
                    )
            else:
                to_first_s = device.latency_to_ms(ids[0]) / cost.MS_PER_S
                transitions = self._transition(
                    device_index, rounds, FULL, rounds * next_s, [(BEFORE_TAIL, BEFORE_TAIL)]
                )
                transitions += self._transition(
                    device_index,
                    rounds,
                    TAIL_ONLY,
                    full_rounds * next_s + to_first_s,
                    [(BEFORE_TAIL, AFTER_TAIL)],
                )
                if full_rounds >= 1:
                    transitions += self._transition(
                        device_index, rounds, ZERO, full_rounds * next_s, [(AFTER_TAIL, AFTER_TAIL)]
                    )
            stages.append(dp.Stage(transitions=transitions, may_skip=False))
        result = dp.solve_layered(stages, 2, BEFORE_TAIL, (AFTER_TAIL,), self.model.num_layers)
        if result is None:
            return None
        roles = [cast(Role, choice[0]) for choice in result.choices if choice is not None]
        held = [choice[1] for choice in result.choices if choice is not None]
        return self._assignment(order, roles, held, rounds, result)

    def single_device(self, device_index: int) -> Assignment | None:
        """One device holds every layer: no hops; it streams what does not fit."""
        model, options = self.model, self.options
        device = self.devices[device_index]
        layers = model.num_layers
        window = cost.largest_window(model, device, options, layers, True, True)
        if window < 1:
            return None
        # Rounds mean nothing to a lone device; with window_covers_run its runs must fit.
        rounds = -(-layers // window) if options.window_covers_run else 1
        run = -(-layers // rounds)
        objective = (
            layers * cost.layer_time_s(model, device)
            + cost.head_time_s(model, device)
            + cost.disk_time_s(model, device, layers, window)
        )
        if objective > self.stage_cap_s:
            return None
        return Assignment(
            order=(device_index,),
            rounds=rounds,
            run_lengths=(run,),
            last_runs=(layers - (rounds - 1) * run,),
            windows=(window,),
            objective_s=objective,
            balance=float(layers**2),
            stage_s=objective,
        )
