"""An exact min-plus dynamic programme over devices, layers assigned so far and a small state.

Stages are devices. At each stage a transition moves from state s to state t and adds h layers
at cost c[h]; a stage may also be skipped (device left out). Because the objective is a sum of
per-device terms and every constraint is either per device or a count of layers (sum h = L) or
a role carried in the state, the minimum over all assignments equals the minimum this
programme finds; it enumerates every (stage, state, layers-so-far) once.

Ties within floating-point noise break towards the smaller sum of h^2, i.e. the more balanced
split, so identical devices get equal shares.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

RELATIVE_TIE = 1e-9
ABSOLUTE_TIE = 1e-12


def tie_tolerance(value: np.ndarray | float) -> np.ndarray | float:
    return ABSOLUTE_TIE + RELATIVE_TIE * np.abs(value)


def lexicographically_better(
    cost: np.ndarray, balance: np.ndarray, best_cost: np.ndarray, best_balance: np.ndarray
) -> np.ndarray:
    finite = np.isfinite(cost)
    with np.errstate(invalid="ignore"):
        clearly = cost < best_cost - tie_tolerance(best_cost)
        tied = (np.abs(cost - best_cost) <= tie_tolerance(best_cost)) & (balance < best_balance)
    return np.asarray(finite & (clearly | tied | ~np.isfinite(best_cost)))


@dataclass(frozen=True)
class Transition:
    """Taking h layers at cost[h] moves any `source` state to its `target` in `moves`."""

    moves: Sequence[tuple[int, int]]
    cost: np.ndarray
    tag: Hashable


@dataclass(frozen=True)
class Stage:
    transitions: Sequence[Transition]
    may_skip: bool


@dataclass(frozen=True)
class DPResult:
    cost: float
    balance: float
    # One entry per stage: (tag, layers) for a used stage, None for a skipped one.
    choices: list[tuple[Hashable, int] | None]


def _best_shift(
    source_cost: np.ndarray, source_balance: np.ndarray, step_cost: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each source row and total y: the best h for source[y - h] + step[h], ties broken
    by balance. Rows are source states, handled together to save numpy calls."""
    rows, size = source_cost.shape
    steps = np.flatnonzero(np.isfinite(step_cost))
    origin = np.arange(size)[:, None] - steps[None, :]
    # Index -1 reaches an appended inf column, so totals below h need no mask.
    origin[origin < 0] = size
    padded_cost = np.concatenate([source_cost, np.full((rows, 1), np.inf)], axis=1)
    padded_balance = np.concatenate([source_balance, np.full((rows, 1), np.inf)], axis=1)
    candidates = padded_cost[:, origin] + step_cost[steps]
    balances = padded_balance[:, origin] + (steps * steps).astype(np.float64)
    lowest = candidates.min(axis=2, keepdims=True)
    near = candidates <= lowest + tie_tolerance(lowest)
    pick = np.argmin(np.where(near, balances, np.inf), axis=2)
    row_index = np.arange(rows)[:, None]
    column_index = np.arange(size)[None, :]
    return (
        candidates[row_index, column_index, pick],
        balances[row_index, column_index, pick],
        steps[pick],
    )


def solve_layered(
    stages: Sequence[Stage],
    num_states: int,
    start_state: int,
    final_states: Sequence[int],
    total_layers: int,
) -> DPResult | None:
    """Minimum-cost path giving exactly `total_layers` layers and ending in a final state."""
    size = total_layers + 1
    cost = np.full((num_states, size), np.inf)
    balance = np.full((num_states, size), np.inf)
    cost[start_state, 0] = 0.0
    balance[start_state, 0] = 0.0
    picked_transition: list[np.ndarray] = []
    picked_source: list[np.ndarray] = []
    picked_layers: list[np.ndarray] = []
    columns = np.arange(size)
    for stage in stages:
        # Every way to reach each target state at this stage, as rows; the best row wins.
        row_cost: list[np.ndarray] = []
        row_balance: list[np.ndarray] = []
        row_transition: list[int] = []
        row_source: list[int] = []
        row_layers: list[np.ndarray] = []
        row_target: list[int] = []
        reachable = np.isfinite(cost).any(axis=1)
        usable = [
            index
            for index, transition in enumerate(stage.transitions)
            if any(reachable[src] for src, _ in transition.moves)
            and np.isfinite(transition.cost).any()
        ]
        if stage.may_skip and not usable:
            # Nothing this device can take: the stage is the identity (it is left out).
            picked_transition.append(np.full((num_states, size), -1, dtype=np.int64))
            picked_source.append(np.zeros((num_states, size), dtype=np.int64))
            picked_layers.append(np.zeros((num_states, size), dtype=np.int64))
            continue
        if stage.may_skip:
            for state in np.flatnonzero(reachable).tolist():
                row_cost.append(cost[state])
                row_balance.append(balance[state])
                row_transition.append(-1)
                row_source.append(int(state))
                row_layers.append(np.zeros(size, dtype=np.int64))
                row_target.append(int(state))
        for index in usable:
            transition = stage.transitions[index]
            moves = [(src, dst) for src, dst in transition.moves if reachable[src]]
            sources = [src for src, _ in moves]
            shifted_cost, shifted_balance, steps = _best_shift(
                cost[sources], balance[sources], transition.cost
            )
            for row, (source, target) in enumerate(moves):
                row_cost.append(shifted_cost[row])
                row_balance.append(shifted_balance[row])
                row_transition.append(index)
                row_source.append(source)
                row_layers.append(steps[row])
                row_target.append(target)
        if not row_cost:
            return None
        all_cost, all_balance = np.stack(row_cost), np.stack(row_balance)
        # Rows laid out per target state (inf elsewhere) so one argmin picks every state's best.
        by_target = np.full((num_states, len(row_cost), size), np.inf)
        by_target[row_target, np.arange(len(row_cost))] = all_cost
        lowest = by_target.min(axis=1, keepdims=True)
        near = by_target <= lowest + tie_tolerance(lowest)
        # argmin keeps the first of equal rows: the skip, then transitions in order.
        pick = np.argmin(np.where(near, all_balance[None, :, :], np.inf), axis=1)
        cost = np.where(np.isfinite(lowest[:, 0, :]), all_cost[pick, columns], np.inf)
        balance = all_balance[pick, columns]
        transition_of = np.asarray(row_transition)[pick]
        source_of = np.asarray(row_source)[pick]
        layers_of = np.stack(row_layers)[pick, columns]
        picked_transition.append(transition_of)
        picked_source.append(source_of)
        picked_layers.append(layers_of)

    best_state: int | None = None
    for state in final_states:
        if (
            best_state is None
            or lexicographically_better(
                cost[state, -1:],
                balance[state, -1:],
                cost[best_state, -1:],
                balance[best_state, -1:],
            )[0]
        ):
            best_state = state
    if best_state is None or not np.isfinite(cost[best_state, -1]):
        return None

    choices: list[tuple[Hashable, int] | None] = []
    state, remaining = best_state, total_layers
    for stage, transition_of, source_of, layers_of in zip(
        reversed(stages),
        reversed(picked_transition),
        reversed(picked_source),
        reversed(picked_layers),
        strict=True,
    ):
        index = int(transition_of[state, remaining])
        if index < 0:
            choices.append(None)
            continue
        layers = int(layers_of[state, remaining])
        choices.append((stage.transitions[index].tag, layers))
        state, remaining = int(source_of[state, remaining]), remaining - layers
    choices.reverse()
    if state != start_state or remaining != 0:
        raise RuntimeError("planner DP backtrack did not return to its start; this is a bug")
    return DPResult(
        cost=float(cost[best_state, -1]), balance=float(balance[best_state, -1]), choices=choices
    )
