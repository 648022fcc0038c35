"""LayerWindow keeps its documented bound and reads h - w + 2 layers per token."""

from __future__ import annotations

import threading

import mlx.core as mx
import mlx.nn as nn
import pytest

from dnet.weights import LayerWindow


class Counting:
    """Layers whose loads are counted; tracks the most ever in memory at once."""

    def __init__(self, count: int) -> None:
        self.layers = {i: nn.Linear(4, 4) for i in range(count)}
        self.lock = threading.Lock()
        self.in_memory: set[int] = set()
        self.peak = 0

    def read(self, layer: int) -> dict[str, mx.array]:
        return {"weight": mx.full((4, 4), float(layer)), "bias": mx.zeros((4,))}

    def observe(self, window: LayerWindow) -> None:
        with self.lock:
            self.peak = max(self.peak, len(window.resident_layers) + len(window._loading))


@pytest.mark.parametrize(("held", "window"), [(8, 1), (8, 2), (8, 3), (8, 6), (5, 4)])
def test_bound_and_reads_per_token(held: int, window: int) -> None:
    fake = Counting(held)
    weights = LayerWindow(fake.layers, fake.read, window)
    weights.warm()

    def settled_loads() -> int:
        for future in list(weights._loading.values()):
            future.result()
        return weights.loads

    before = settled_loads()
    tokens = 5
    for _ in range(tokens):
        for layer in range(held):
            weights.acquire(layer)
            fake.observe(weights)
            # The layer computes with its own weights, not a stale or lazy placeholder.
            out = fake.layers[layer](mx.ones((4,)))
            assert out.tolist() == pytest.approx([4.0 * layer] * 4)
            weights.release(layer)
            fake.observe(weights)
    per_token = (settled_loads() - before) / tokens
    weights.close()
    assert fake.peak <= window
    assert per_token == pytest.approx(held - max(window - 2, 0), abs=0.01)


def test_window_must_be_smaller_than_layers_held() -> None:
    fake = Counting(3)
    with pytest.raises(ValueError):
        LayerWindow(fake.layers, fake.read, 3)
