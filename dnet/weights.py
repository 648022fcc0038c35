"""Windowed weight residency: a shard keeps at most `window` of its layers in memory.

The layers a shard holds run in a fixed cyclic order (its runs, in layer order, token after
token), so what comes next is known. With `window` w smaller than the h layers held, the
first w - 2 layers stay pinned in memory and the others stream through two slots: the layer
being computed and the next streamed layer, which a background thread loads meanwhile (with
w = 1, a single slot: the next layer loads while the activation is elsewhere in the ring).

Bound: at most w layers' weights are in memory at any moment, counting a layer being loaded;
a layer leaves only after the computation that used it is evaluated. Per token a streaming
shard reads h - w + 2 layers from disk (all h when w <= 2); the planner's cost model uses the
same count. Caches (KV, sliding window, linear-attention state) are not touched: only
weights stream.

An evicted layer holds lazy arrays straight from `mx.load`, which cost no memory. A layer that
is needed before its load lands is waited for; one never scheduled would load on the spot
when evaluated, so a wrong guess is slow, never wrong.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

log = logging.getLogger(__name__)

# Lazy arrays for one layer's weights, named relative to the layer module.
LayerReader = Callable[[int], dict[str, mx.array]]


STREAMING_SLOTS = 2


class LayerWindow:
    def __init__(self, layers: dict[int, nn.Module], read_layer: LayerReader,
                 window: int) -> None:
        if not 1 <= window < len(layers):
            raise ValueError(f"window must be in 1..{len(layers) - 1}, got {window}")
        self.window = window
        self._layers = layers
        order = sorted(layers)
        pinned = max(window - STREAMING_SLOTS, 0)
        self._pinned = set(order[:pinned])
        self._streamed = order[pinned:]
        self._slots = window - pinned
        self._position = {layer: i for i, layer in enumerate(self._streamed)}
        self._read_layer = read_layer
        self._resident: set[int] = set()
        self._loading: dict[int, Future[dict[str, mx.array]]] = {}
        # One loader thread: disk reads are sequential anyway, and it leaves the other
        # core to compute on small machines.
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        self.loads = 0  # layers read from disk, for stats and tests

    def close(self) -> None:
        self._loader.shutdown(wait=True, cancel_futures=True)

    @property
    def resident_layers(self) -> list[int]:
        return sorted(self._resident)

    def warm(self) -> None:
        """Load the pinned layers, and start on the first streamed ones."""
        for layer in sorted(self._pinned):
            self._install(layer, self._load(layer))
        self._want_from(self._streamed[0])

    def acquire(self, layer: int) -> None:
        """Make `layer` resident; call on the compute thread before running it."""
        if layer in self._pinned:
            return
        self._want_from(layer)
        if layer not in self._resident:
            future = self._loading.pop(layer, None)
            self._install(layer, future.result() if future is not None else self._load(layer))
            self._want_from(layer)

    def release(self, layer: int) -> None:
        """`layer` ran and its output is evaluated: free its slot for the next layer."""
        if layer in self._pinned:
            return
        following = self._streamed[(self._position[layer] + 1) % len(self._streamed)]
        self._want_from(following)

    def _want_from(self, layer: int) -> None:
        """Fill the slots with the streamed layers from `layer` on; evict the rest."""
        start = self._position[layer]
        wanted = [self._streamed[(start + i) % len(self._streamed)]
                  for i in range(self._slots)]
        for old in list(self._resident - self._pinned):
            if old not in wanted:
                self._evict(old)
        for old in list(self._loading):
            # A load already running cannot be stopped: it keeps its place in the bound
            # until it finishes, and is dropped then.
            future = self._loading[old]
            if old not in wanted and (future.cancel() or future.done()):
                del self._loading[old]
        for new in wanted:
            busy = len(self._resident - self._pinned) + len(self._loading)
            if busy >= self._slots:
                break
            if new not in self._resident and new not in self._loading:
                self._loading[new] = self._loader.submit(self._load, new)

    def _load(self, layer: int) -> dict[str, mx.array]:
        weights = self._read_layer(layer)
        mx.eval(weights)
        self.loads += 1
        return weights

    def _install(self, layer: int, weights: dict[str, mx.array]) -> None:
        self._layers[layer].update(tree_unflatten(list(weights.items())))
        self._resident.add(layer)

    def _evict(self, layer: int) -> None:
        # Lazy arrays from the files take the evaluated ones' place: no memory until used.
        self._layers[layer].update(tree_unflatten(list(self._read_layer(layer).items())))
        self._resident.discard(layer)
        mx.clear_cache()
