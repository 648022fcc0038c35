"""Frames: every typed message survives the wire, and every malformed frame is rejected with
the status its sender needs (dnet/ring/frames.py, the one place frames are built and checked).
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dnet.proto import dnet_ring_pb2 as pb
from dnet.ring import frames
from dnet.ring.frames import (
    FrameRejected,
    Opening,
    Release,
    RequestStep,
    ShardView,
    Status,
    TrainStep,
)

HIDDEN = 8
VOCAB = 64
VIEW = ShardView(epoch=3, held=frozenset({0, 1, 2, 5, 6}), vocab_size=VOCAB, hidden_size=HIDDEN)

ids = st.text(alphabet="0123456789abcdef", min_size=1, max_size=12)
addresses = st.sampled_from(["", "10.0.0.1:50501", "shard-2"])
tokens = st.integers(0, VOCAB - 1)
held_layers = st.sampled_from(sorted(VIEW.held))
samplings = st.builds(pb.SamplingParams, temperature=st.floats(0, 2, width=32),
                      max_tokens=st.integers(0, 1000), max_context=st.integers(0, 4096),
                      eos_token_ids=st.lists(tokens, max_size=3))


def tensor(rows: int, per_row: int, dtype: str = "float32") -> pb.Tensor:
    width = frames.WIRE_DTYPE_BYTES[dtype]
    return pb.Tensor(shape=[rows, per_row, HIDDEN], dtype=dtype,
                     data=bytes(rows * per_row * HIDDEN * width))


@st.composite
def request_steps(draw: st.DrawFn) -> RequestStep:
    layer = draw(held_layers)
    chunk = tuple(draw(st.lists(tokens, min_size=1, max_size=5)))
    position = draw(st.sampled_from([0, 0, 1, 17, 4000]))
    opening = None
    if position == 0:
        opening = Opening(draw(samplings), tuple(draw(st.lists(ids, max_size=3))))
    hidden = None if layer == 0 else tensor(1, len(chunk), draw(st.sampled_from(
        sorted(frames.WIRE_DTYPE_BYTES))))
    return RequestStep(draw(ids), layer, position, chunk, hidden, draw(st.booleans()),
                       draw(addresses), draw(addresses), VIEW.epoch, opening)


@st.composite
def train_steps(draw: st.DrawFn) -> TrainStep:
    members = tuple(draw(st.lists(ids, min_size=1, max_size=5, unique=True)))
    layer = draw(held_layers)
    hidden = None if layer == 0 else tensor(len(members), 1)
    return TrainStep(draw(ids), layer, members,
                     tuple(draw(st.integers(1, 5000)) for _ in members),
                     tuple(draw(tokens) for _ in members), hidden, draw(addresses), VIEW.epoch)


releases = st.builds(Release, ids, st.one_of(st.none(), held_layers), addresses,
                     st.just(VIEW.epoch))
messages = st.one_of(request_steps(), train_steps(), releases)


@given(messages)
def test_every_message_survives_the_wire(message: frames.Message) -> None:
    wire = pb.Frame.FromString(frames.to_wire(message).SerializeToString())
    assert frames.parse(wire, VIEW) == message


@given(request_steps(), st.integers(0, 20), ids)
def test_next_hop_keeps_the_request_and_adds_this_shard_to_a_first_steps_route(
        step: RequestStep, layer: int, me: str) -> None:
    hidden = tensor(1, len(step.tokens))
    out = frames.next_hop(step, layer + 1, hidden, me)
    assert isinstance(out, RequestStep)
    assert (out.request_id, out.position, out.tokens, out.sample, out.entry, out.head) == (
        step.request_id, step.position, step.tokens, step.sample, step.entry, step.head)
    assert out.layer == layer + 1 and out.hidden == hidden
    if step.opening is None:
        assert out.opening is None
    else:
        assert out.opening == Opening(step.opening.sampling, (*step.opening.route, me))


@given(train_steps(), st.data())
def test_a_train_keeps_its_members_and_selects_rows_in_order(step: TrainStep,
                                                             data: st.DataObject) -> None:
    keep = sorted(data.draw(st.sets(st.integers(0, len(step.members) - 1), min_size=1)))
    hidden = tensor(len(keep), 1)
    out = frames.next_hop(step, 7, tensor(len(step.members), 1), "me").select(keep, hidden)
    assert out.members == tuple(step.members[i] for i in keep)
    assert out.positions == tuple(step.positions[i] for i in keep)
    assert out.tokens == tuple(step.tokens[i] for i in keep)
    assert out.rows.tokens == tuple((step.tokens[i],) for i in keep)
    assert (out.train_id, out.layer, out.hidden) == (step.train_id, 7, hidden)


def test_invariants_are_enforced_when_a_step_is_built() -> None:
    with pytest.raises(ValueError, match="opening"):
        RequestStep("r", 0, 0, (1,), None, True, "", "", 0, None)  # position 0, no opening
    with pytest.raises(ValueError, match="opening"):
        RequestStep("r", 0, 5, (1,), None, True, "", "", 0, Opening(pb.SamplingParams()))
    with pytest.raises(ValueError, match="hidden"):
        RequestStep("r", 4, 5, (1,), None, True, "", "", 0, None)  # layer 4, no hidden
    with pytest.raises(ValueError, match="one position"):
        TrainStep("t", 0, ("a", "b"), (1,), (1, 2), None, "", 0)


# ----- rejections: (frame, expected status) ------------------------------------------------

BAD_FRAMES: dict[str, tuple[pb.Frame, Status]] = {
    "no-request-id": (pb.Frame(next_layer=0, tokens=[1], epoch=3), Status.INVALID_ARGUMENT),
    "other-epoch": (pb.Frame(request_id="r", next_layer=0, tokens=[1], epoch=2),
                    Status.FAILED_PRECONDITION),
    "release-other-epoch": (pb.Frame(request_id="r", kind=pb.RELEASE, epoch=4),
                            Status.FAILED_PRECONDITION),
    "layer-not-held": (pb.Frame(request_id="r", next_layer=3, tokens=[1], epoch=3,
                                hidden=tensor(1, 1)), Status.FAILED_PRECONDITION),
    "negative-layer": (pb.Frame(request_id="r", next_layer=-1, tokens=[1], epoch=3),
                       Status.FAILED_PRECONDITION),
    "no-tokens": (pb.Frame(request_id="r", next_layer=0, epoch=3), Status.INVALID_ARGUMENT),
    "token-past-vocabulary": (pb.Frame(request_id="r", next_layer=0, tokens=[1, VOCAB],
                                       epoch=3), Status.INVALID_ARGUMENT),
    "token-negative": (pb.Frame(request_id="r", next_layer=0, tokens=[-1], epoch=3),
                       Status.INVALID_ARGUMENT),
    "hidden-missing": (pb.Frame(request_id="r", next_layer=5, tokens=[1], epoch=3),
                       Status.INVALID_ARGUMENT),
    "hidden-int8": (pb.Frame(request_id="r", next_layer=5, tokens=[1], epoch=3,
                             hidden=pb.Tensor(shape=[1, 1, HIDDEN], dtype="int8",
                                              data=bytes(HIDDEN))), Status.INVALID_ARGUMENT),
    "hidden-wrong-width": (pb.Frame(request_id="r", next_layer=5, tokens=[1], epoch=3,
                                    hidden=pb.Tensor(shape=[1, 1, HIDDEN + 1], dtype="float32",
                                                     data=bytes(4 * HIDDEN + 4))),
                           Status.INVALID_ARGUMENT),
    "hidden-two-dimensional": (pb.Frame(request_id="r", next_layer=5, tokens=[1], epoch=3,
                                        hidden=pb.Tensor(shape=[1, HIDDEN], dtype="float32",
                                                         data=bytes(4 * HIDDEN))),
                               Status.INVALID_ARGUMENT),
    "hidden-truncated": (pb.Frame(request_id="r", next_layer=5, tokens=[1], epoch=3,
                                  hidden=pb.Tensor(shape=[1, 1, HIDDEN], dtype="float32",
                                                   data=bytes(4 * HIDDEN - 1))),
                         Status.INVALID_ARGUMENT),
    "hidden-rows-not-tokens": (pb.Frame(request_id="r", next_layer=5, tokens=[1],
                                        hidden=tensor(1, 3), epoch=3), Status.INVALID_ARGUMENT),
    "hidden-two-rows-for-one": (pb.Frame(request_id="r", next_layer=5, tokens=[1],
                                         hidden=tensor(2, 1), epoch=3),
                                Status.INVALID_ARGUMENT),
    "train-short-positions": (pb.Frame(request_id="t", next_layer=0, tokens=[1, 2],
                                       batch=["a", "b"], batch_positions=[3], epoch=3),
                              Status.INVALID_ARGUMENT),
    "train-duplicate-member": (pb.Frame(request_id="t", next_layer=0, tokens=[1, 2],
                                        batch=["a", "a"], batch_positions=[3, 4], epoch=3),
                               Status.INVALID_ARGUMENT),
    "train-member-in-prompt": (pb.Frame(request_id="t", next_layer=0, tokens=[1, 2],
                                        batch=["a", "b"], batch_positions=[0, 4], epoch=3),
                               Status.INVALID_ARGUMENT),
}


@pytest.mark.parametrize("case", list(BAD_FRAMES))
def test_malformed_frames_are_rejected_with_the_right_status(case: str) -> None:
    frame, expected = BAD_FRAMES[case]
    with pytest.raises(FrameRejected) as caught:
        frames.parse(frame, VIEW)
    assert caught.value.code is expected and caught.value.message


def test_statuses_are_grpc_status_codes() -> None:
    for status in Status:
        assert grpc.StatusCode[status.name].value[0] == status.value


frame_fields = st.fixed_dictionaries({
    "request_id": st.text(max_size=3), "kind": st.sampled_from([pb.ACTIVATION, pb.RELEASE]),
    "next_layer": st.integers(-3, 8), "position": st.integers(0, 5),
    "tokens": st.lists(st.integers(-5, VOCAB + 5), max_size=4),
    "batch": st.lists(st.text(max_size=2), max_size=3),
    "batch_positions": st.lists(st.integers(-1, 5), max_size=3),
    "epoch": st.sampled_from([3, 3, 0]),
    "hidden": st.builds(pb.Tensor, shape=st.lists(st.integers(0, HIDDEN + 1), max_size=4),
                        dtype=st.sampled_from(["float32", "bfloat16", "int8", ""]),
                        data=st.binary(max_size=4 * HIDDEN * 3)),
})


@settings(max_examples=300)
@given(frame_fields)
def test_any_frame_is_either_a_valid_message_or_rejected(fields: dict) -> None:
    frame = pb.Frame(**fields)
    try:
        message = frames.parse(frame, VIEW)
    except FrameRejected as exc:
        assert exc.code in Status and exc.message
        return
    # What passes is consistent: it can go back on the wire as the same message.
    assert frames.parse(frames.to_wire(message), VIEW) == message
    if not isinstance(message, Release) and message.hidden is not None:
        rows = message.rows
        shape = list(message.hidden.shape)
        assert shape == [len(rows.request_ids), rows.tokens_per_row, HIDDEN]
        width = frames.WIRE_DTYPE_BYTES[message.hidden.dtype]
        assert len(message.hidden.data) == int(np.prod(shape)) * width
