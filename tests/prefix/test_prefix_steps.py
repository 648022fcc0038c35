"""What the prefix cache puts on the wire: the entry's steps past a reused prefix, the blocks
full chunks name, lookups, and the frames a shard rejects. Pure: no model, no ring."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dnet.entry import decisions
from dnet.entry.decisions import RingView
from dnet.prefix.index import ROOT, block_keys, namespace_for, prefill_chunks
from dnet.proto import dnet_ring_pb2 as pb
from dnet.ring import frames
from dnet.ring.frames import (
    CacheBlock,
    FrameRejected,
    Lookup,
    Opening,
    RequestStep,
    ShardView,
    Status,
)

VOCAB = 64
VIEW = ShardView(epoch=3, held=frozenset({0, 1, 4}), vocab_size=VOCAB, hidden_size=8)
RING = RingView("head:1", 3, True)
PENALISED = pb.SamplingParams(max_tokens=4, repetition_penalty=1.3)


@given(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=80),
       st.lists(st.integers(0, VOCAB - 1), max_size=4), st.integers(1, 9), st.data(),
       st.booleans())
def test_steps_past_a_reused_prefix_are_the_uncached_runs_remaining_steps(
        prompt, generated, chunk, data, penalised) -> None:
    keys = block_keys(prompt, chunk, namespace_for(chunk))
    reused = data.draw(st.integers(0, len(keys)))
    sampling = PENALISED if penalised else pb.SamplingParams(max_tokens=4)
    full = decisions.prompt_steps("r", prompt, generated, sampling, entry="me", view=RING,
                                  chunk=chunk, keys=keys)
    steps = decisions.prompt_steps("r", prompt, generated, sampling, entry="me", view=RING,
                                   chunk=chunk, keys=keys, reused=reused)
    # The same steps as an uncached run, less those the reused blocks stand for.
    start = reused * chunk
    assert [(s.position, s.tokens, s.sample, s.block) for s in steps] == [
        (s.position, s.tokens, s.sample, s.block) for s in full if s.position >= start]
    # The first step opens the request at the reused prefix's end, and carries the reused
    # tokens only when the sampler's penalties look back over them.
    opening = steps[0].opening
    assert opening is not None and steps[0].position == start
    assert (opening.block_size, opening.reused_blocks) == (chunk, reused)
    assert opening.history == (tuple(prompt[:start]) if penalised and reused else ())
    assert all(s.opening is None for s in steps[1:])
    # Each full prefill chunk names its block: its key, its parent's, and a snapshot at the
    # prompt's last full block; nothing else does.
    chunks = {c[0]: c for c in prefill_chunks(len(prompt), chunk)}
    for step in full:
        expected = None
        if step.position in chunks and not step.sample and len(step.tokens) == chunk:
            k = step.position // chunk
            expected = CacheBlock(keys[k], keys[k - 1] if k else ROOT, k == len(keys) - 1)
        assert step.block == expected


def test_reuse_rules() -> None:
    assert decisions.may_reuse_prefix(pb.SamplingParams())
    assert not decisions.may_reuse_prefix(pb.SamplingParams(prompt_logprobs=True))
    assert not decisions.needs_history(pb.SamplingParams(temperature=0.7, logit_bias={3: 1.0}))
    for field in ("repetition_penalty", "presence_penalty", "frequency_penalty"):
        assert decisions.needs_history(pb.SamplingParams(**{field: 0.5}))
    with pytest.raises(ValueError):  # more reused blocks than keys
        decisions.prompt_steps("r", list(range(10)), [], pb.SamplingParams(), entry="e",
                               view=RING, chunk=4, keys=[], reused=1)


def test_openings_lookups_and_blocks_survive_the_wire() -> None:
    opening = Opening(PENALISED, ("a",), block_size=4, reused_blocks=2, history=(1, 2, 3))
    key, parent = b"k" * 16, b"p" * 16
    messages = [
        RequestStep("r", 0, 8, (5, 6, 7, 8), None, False, "e:1", "h:1", 3, opening,
                    CacheBlock(key, parent, True)),
        RequestStep("r", 0, 12, (9,), None, True, "e:1", "h:1", 3, None),
        Lookup("r", 4, (key, parent), 1, "e:1", "h:1", 3),
    ]
    for message in messages:
        assert frames.parse(frames.to_wire(message), VIEW) == message
    reply = frames.lookup_reply("r", 2)
    assert reply.lookup and reply.reused_blocks == 2 and not reply.error


BAD = {
    "opening-not-at-its-prefix-end": (
        pb.Frame(request_id="r", tokens=[1], epoch=3, opens=True, position=5, block_size=4,
                 reused_blocks=1), Status.INVALID_ARGUMENT),
    "reused-blocks-without-a-size": (
        pb.Frame(request_id="r", tokens=[1], epoch=3, opens=True, reused_blocks=1),
        Status.INVALID_ARGUMENT),
    "history-past-the-vocabulary": (
        pb.Frame(request_id="r", tokens=[1], epoch=3, opens=True, history=[VOCAB]),
        Status.INVALID_ARGUMENT),
    "block-without-a-key": (
        pb.Frame(request_id="r", tokens=[1], epoch=3, opens=True, block=pb.Block()),
        Status.INVALID_ARGUMENT),
    "block-on-a-sampled-step": (
        pb.Frame(request_id="r", tokens=[1], epoch=3, opens=True, sample=True,
                 block=pb.Block(key=b"k")), Status.INVALID_ARGUMENT),
    "lookup-without-keys": (pb.Frame(request_id="r", kind=pb.LOOKUP, epoch=3),
                            Status.INVALID_ARGUMENT),
    "lookup-deeper-than-its-keys": (
        pb.Frame(request_id="r", kind=pb.LOOKUP, epoch=3, block_keys=[b"k"], reused_blocks=2),
        Status.INVALID_ARGUMENT),
    "lookup-with-an-empty-key": (
        pb.Frame(request_id="r", kind=pb.LOOKUP, epoch=3, block_keys=[b"k", b""]),
        Status.INVALID_ARGUMENT),
    "lookup-for-a-layer-not-held": (
        pb.Frame(request_id="r", kind=pb.LOOKUP, epoch=3, next_layer=2, block_keys=[b"k"]),
        Status.FAILED_PRECONDITION),
    "lookup-of-another-epoch": (
        pb.Frame(request_id="r", kind=pb.LOOKUP, epoch=2, block_keys=[b"k"]),
        Status.FAILED_PRECONDITION),
}


@pytest.mark.parametrize("name", list(BAD))
def test_malformed_prefix_frames_are_rejected(name: str) -> None:
    frame, status = BAD[name]
    with pytest.raises(FrameRejected) as rejected:
        frames.parse(frame, VIEW)
    assert rejected.value.code is status and rejected.value.message
