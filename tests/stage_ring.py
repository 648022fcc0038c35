"""An in-process ring of Stage objects, chained the way the shard runtime chains them.

The prompt goes in as the entry sends it (all but the last token in prefill chunks of
PREFILL_CHUNK, then the last token alone with sampling); each step's activation walks the
stages in layer order (embed on the stage holding layer 0, each stage's contiguous run, the
head and dnet's TokenSampler on the tail); decode steps go one token at a time. Hidden states
cross between stages through the wire codec, as they do between processes. Batched decode
(`decode_batched`) merges the requests' caches into batch caches per layer, as
dnet/shard/groups.py does for a train.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from dnet.entry import PREFILL_CHUNK
from dnet.proto import dnet_ring_pb2 as pb
from dnet.ring import codec
from dnet.sampling import TokenSampler
from dnet.shard.groups import GroupCaches
from dnet.stage import Stage


@dataclass
class Request:
    caches: list[dict[int, object]]  # per stage: layer -> cache
    sampler: TokenSampler
    generated: list[int] = field(default_factory=list)


class StageRing:
    def __init__(self, model: Path, layer_lists: Sequence[Sequence[int]],
                 windows: Sequence[int | None] | None = None) -> None:
        windows = windows or [None] * len(layer_lists)
        self.stages = [Stage(model, list(layers), window=window)
                       for layers, window in zip(layer_lists, windows, strict=True)]
        self.owner = {layer: i for i, stage in enumerate(self.stages) for layer in stage.layers}
        self.num_layers = self.stages[0].num_layers
        self.vocab_size = int(self.stages[0].config["vocab_size"])

    def close(self) -> None:
        for stage in self.stages:
            stage.close()

    def open(self, **sampling) -> Request:
        params = pb.SamplingParams(**sampling)
        return Request([stage.new_caches() for stage in self.stages],
                       TokenSampler(params, self.vocab_size))

    def _walk(self, tokens: list[list[int]], caches: list[dict[int, object]]) -> mx.array:
        """One step through every stage in layer order; the last layer's hidden states."""
        layer, h = 0, None
        while layer < self.num_layers:
            index = self.owner[layer]
            stage = self.stages[index]
            if layer == 0:
                h = stage.embed(mx.array(tokens, dtype=mx.uint32))
            else:  # across a process boundary, as the runtime sends it
                h = codec.decode(codec.encode(h)) if len(self.stages) > 1 else h
            h, layer = stage.forward(h, layer, caches[index])
            mx.eval(h)
        return h

    def step(self, request: Request, tokens: list[int], sample: bool) -> int | None:
        h = self._walk([tokens], request.caches)
        request.sampler.observe(tokens)
        if not sample:
            return None
        logits = self.stages[self.owner[self.num_layers - 1]].logits(h)
        token, _ = request.sampler.sample(logits)
        return int(token.item())

    def generate(self, prompt: list[int], max_tokens: int, **sampling) -> list[int]:
        """Tokens for `prompt`, step for step as the ring's entry and tail produce them."""
        request = self.open(**sampling)
        prefix = prompt[:-1]
        for i in range(0, len(prefix), PREFILL_CHUNK):
            self.step(request, prefix[i:i + PREFILL_CHUNK], sample=False)
        token = self.step(request, prompt[-1:], sample=True)
        out = [token]
        while len(out) < max_tokens:
            token = self.step(request, [token], sample=True)
            out.append(token)
        return out

    def prefill(self, prompt: list[int], **sampling) -> tuple[Request, int]:
        """A request through its prompt; returns it and its first token."""
        request = self.open(**sampling)
        prefix = prompt[:-1]
        for i in range(0, len(prefix), PREFILL_CHUNK):
            self.step(request, prefix[i:i + PREFILL_CHUNK], sample=False)
        return request, self.step(request, prompt[-1:], sample=True)

    def decode_batched(self, requests: list[Request], tokens: list[int],
                       steps: int) -> list[list[int]]:
        """`steps` decode steps of all `requests` as one train (batch caches per stage)."""
        groups = [GroupCaches() for _ in self.stages]
        ids = [str(i) for i in range(len(requests))]
        outs: list[list[int]] = [[] for _ in requests]
        for _ in range(steps):
            caches = [group.caches_for("train", ids, {r: req.caches[s]
                                                      for r, req in zip(ids, requests,
                                                                        strict=True)})
                      for s, group in enumerate(groups)]
            h = self._walk([[t] for t in tokens], caches)
            logits = self.stages[self.owner[self.num_layers - 1]].logits(h)
            previous, tokens = tokens, []
            for i, request in enumerate(requests):
                request.sampler.observe([previous[i]])
                token, _ = request.sampler.sample(logits[i:i + 1])
                tokens.append(int(token.item()))
                outs[i].append(tokens[-1])
        return outs
