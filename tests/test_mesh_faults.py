"""Ordinary mistakes never take the mesh down (issue 14), with real `dnet join` processes on
loopback: a node that lacks the model, taken ports, Ctrl-C mid-stream, a model that fits
nowhere, a host name for --host, a newcomer the planner leaves out, an early Status call."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from dnet.local_ring import free_port
from dnet.proto import dnet_ring_pb2 as pb
from dnet.proto import dnet_ring_pb2_grpc as pb_grpc
from dnet.ring import auth
from tests.conftest import chat_prompt_ids, reference_tokens
from tests.mesh import (
    LocalMesh,
    MeshNode,
    chat_token_ids,
    hiding,
    ring_covers,
    stream_completion,
    topology,
    wait_for,
)

pytestmark = pytest.mark.slow

NUM_LAYERS = 8
MAX_TOKENS = 12
QUESTION = "What is 2+2?"
STARTUP_S = 90  # a Python process with MLX on two busy cores takes a while to start


@pytest.fixture
def reference(qwen3_model: Path) -> list[int]:
    tokens = reference_tokens(qwen3_model, chat_prompt_ids(qwen3_model, QUESTION), MAX_TOKENS)
    assert len(set(tokens)) >= MAX_TOKENS // 3
    return tokens


def node_view(view: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((n for n in view["nodes"] if n["name"] == name), None)


def is_excluded(name: str, because: str) -> Any:
    def check(view: dict[str, Any]) -> bool:
        node = node_view(view, name)
        return bool(node and node["excluded"] and because in node["excluded"]["reason"])
    return check


def test_a_node_without_the_model_is_excluded_while_the_mesh_keeps_serving(
        mesh: LocalMesh, qwen3_model: Path, reference: list[int]) -> None:
    good = mesh.add("good", budget="64MB")
    wait_for(mesh, ring_covers(NUM_LAYERS), STARTUP_S, "a ring")
    prompt = list(range(5, 40))
    long_reference = reference_tokens(qwen3_model, prompt, 200, ignore_eos=True)
    assert len(set(long_reference)) > 20
    streamed: dict[str, Any] = {}
    stream = threading.Thread(target=stream_completion, args=(
        good, {"prompt": prompt, "max_tokens": 200, "ignore_eos": True}, streamed))
    stream.start()

    # The newcomer runs where the model's directory is empty, as on a machine without it.
    broken = mesh.add("broken", budget="64MB", propose=False, prefix=hiding(qwen3_model),
                      http_port=free_port(), grpc_port=free_port())
    deadline = time.monotonic() + STARTUP_S
    chats = 0
    while True:  # chat keeps working, with the same answer, while it is tried and excluded
        assert chat_token_ids(good, QUESTION, MAX_TOKENS) == reference
        chats += 1
        views = [topology(node) for node in (good, broken)]
        if all(v is not None and is_excluded("broken", "cannot read")(v) for v in views):
            break
        assert time.monotonic() < deadline, f"never excluded: {views}\n{mesh.logs()}"
    excluded_at = time.monotonic()
    stream.join(timeout=180)
    assert not stream.is_alive()
    assert "error" not in streamed and streamed["finish"] == "length"
    assert streamed["tokens"] == long_reference, "the stream in flight was cut or replayed"

    # The node left out answers with its reason, the coordinator's word.
    answer = httpx.post(f"{broken.url}/v1/chat/completions", timeout=30, json={
        "messages": [{"role": "user", "content": "hi"}]})
    assert answer.status_code == 503, answer.text
    assert "cannot read" in answer.json()["error"]["message"]
    status = subprocess.run([sys.executable, "-m", "dnet.cli", "status", "--api",
                             f"{good.host}:{good.http_port}"], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "COLUMNS": "250"})
    assert status.returncode == 0, status.stderr
    assert "broken is left out of planning" in status.stdout and "cannot read" in status.stdout

    # Retries back off: 2, 4, 8, ... seconds apart, never a retry every few seconds.
    time.sleep(15)
    elapsed = time.monotonic() - excluded_at + 2
    log = good.log.read_text()
    attempts = log.count("excluding broken")
    assert 2 <= attempts <= 2 + math.log2(1 + elapsed / 2), log[-3000:]
    assert log.count("draining the entries") == 1, "only the first plan drains"
    assert "replaying" not in log


def test_a_fresh_mesh_forms_without_the_node_that_cannot_load(
        mesh: LocalMesh, qwen3_model: Path, reference: list[int]) -> None:
    # The broken node starts first, so it is the senior one and coordinates: it plans with
    # the profile its peer reads and leaves itself out.
    broken = mesh.add("broken", budget="64MB", prefix=hiding(qwen3_model),
                      http_port=free_port(), grpc_port=free_port())
    wait_for(mesh, lambda v: v["coordinator"] is not None, STARTUP_S, "the first node")
    good = mesh.add("good", budget="64MB")
    view = wait_for(mesh, lambda v: ring_covers(NUM_LAYERS)(v) and is_excluded(
        "broken", "cannot read")(v), STARTUP_S, "a ring without the broken node")
    assert view["ring"] == [good.node_id()]
    assert view["coordinator"] == broken.node_id()
    assert chat_token_ids(good, QUESTION, MAX_TOKENS) == reference


# ----- ports, addresses, early calls ---------------------------------------------------------


def join_argv(tmp_path: Path, http_port: int, grpc_port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dnet.cli", "join", "--host", "127.0.0.1", "--http-port",
            str(http_port), "--grpc-port", str(grpc_port), "--memory-budget", "64MB",
            "--state-dir", str(tmp_path / "state"), "--name", "second", *extra]


def adverts_named(name: str) -> list[str]:
    from discovery.mdns import browse_once

    return [info.name for info in browse_once("127.0.0.1", 2.0) if info.name == name]


def test_a_taken_grpc_port_ends_join_at_once_before_advertising(tmp_path: Path) -> None:
    # Held the way grpc holds it by default (SO_REUSEPORT on), as a running node did: a
    # second process used to share the port silently.
    held = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = held.add_insecure_port("127.0.0.1:0")
    held.start()
    try:
        result = subprocess.run(join_argv(tmp_path, free_port(), port,
                                          "--cluster-key", "k-grpc"),
                                capture_output=True, text=True, timeout=120)
    finally:
        held.stop(grace=None)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == (f"dnet join: port {port} is already in use; choose another with "
                         "--grpc-port"), result.stderr
    assert "Traceback" not in result.stderr
    assert "joined" not in result.stderr and not adverts_named("second")


def test_a_taken_http_port_ends_join_at_once_before_advertising(tmp_path: Path) -> None:
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        result = subprocess.run(join_argv(tmp_path, port, free_port(),
                                          "--cluster-key", "k-http"),
                                capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"dnet join: port {port} is already in use; choose another with --http-port")
    assert "Traceback" not in result.stderr and "joined" not in result.stderr


def test_status_calls_from_the_first_moment_never_fail_oddly(tmp_path: Path) -> None:
    """A restarted node is asked for its status by its peers as soon as it listens."""
    grpc_port, http_port = free_port(), free_port()
    process = subprocess.Popen(join_argv(tmp_path, http_port, grpc_port, "--cluster-key",
                                         "k-early"), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    auth.configure("k-early")
    answered, failures = 0, []
    try:
        with auth.channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = pb_grpc.ControlStub(channel)
            deadline = time.monotonic() + STARTUP_S
            while answered < 20 and time.monotonic() < deadline and process.poll() is None:
                try:
                    status = stub.Status(pb.StatusRequest(), timeout=2)
                    assert status.node_id and status.name == "second"
                    answered += 1
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.UNAVAILABLE:  # not listening yet
                        failures.append(f"{exc.code().name}: {exc.details()}")
                time.sleep(0.02)
    finally:
        auth.configure(None)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=30)
    assert not failures, failures
    assert answered == 20, err
    assert "Traceback" not in err and "AttributeError" not in err


def test_host_names_are_accepted(mesh: LocalMesh, reference: list[int]) -> None:
    node = mesh.add("named", budget="64MB", extra=["--host", "localhost"])
    wait_for(mesh, ring_covers(NUM_LAYERS), STARTUP_S, "a ring")
    assert chat_token_ids(node, QUESTION, MAX_TOKENS) == reference
    assert topology(node)["nodes"][0]["address"] == "127.0.0.1"
    result = subprocess.run([sys.executable, "-m", "dnet.cli", "status", "--host", "localhost",
                             "--json"], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "DNET_CLUSTER_KEY": mesh.cluster_key})
    assert result.returncode == 0, result.stderr
    assert "named" in {n["name"] for n in json.loads(result.stdout)["nodes"]}


# ----- shutdown ---------------------------------------------------------------------------------


def test_sigint_during_a_stream_ends_it_says_goodbye_and_exits_within_5_s(
        mesh: LocalMesh, qwen3_model: Path) -> None:
    serving = mesh.add("serving", budget="64MB")
    other = mesh.add("other", budget="64MB", propose=False)
    wait_for(mesh, lambda v: ring_covers(NUM_LAYERS)(v) and len(v["nodes"]) == 2,
             STARTUP_S, "a mesh of two")
    prompt = list(range(5, 40))
    reference = reference_tokens(qwen3_model, prompt, 40, ignore_eos=True)
    streamed: dict[str, Any] = {}
    stream = threading.Thread(target=stream_completion, args=(
        serving, {"prompt": prompt, "max_tokens": 4000, "ignore_eos": True}, streamed))
    stream.start()
    deadline = time.monotonic() + 120
    while len(streamed.get("tokens", [])) < 10:
        assert time.monotonic() < deadline and stream.is_alive(), streamed
        time.sleep(0.05)
    signalled = time.monotonic()
    serving.process.send_signal(signal.SIGINT)
    assert serving.process.wait(timeout=30) == 0
    exited_s = time.monotonic() - signalled
    stream.join(timeout=30)
    assert not stream.is_alive()
    assert exited_s <= 5.0, f"exited {exited_s:.1f} s after SIGINT"
    # The stream ended with an error chunk (a 4000-token answer cannot finish in the drain).
    assert "shutting down" in streamed.get("error", ""), streamed
    tokens = streamed["tokens"]
    assert tokens[:40] == reference[:len(tokens[:40])]
    # The goodbye: the other node drops it at once, not after the 10 s silence.
    gone = wait_for(mesh, lambda v: [n["name"] for n in v["nodes"]] == ["other"], 5,
                    "the other node to see it leave")
    assert gone["this_node"] == other.node_id()
    log = serving.log.read_text()
    assert "shutting down: waiting up to 2 s for 1 request(s) in flight" in log


def test_a_second_interrupt_exits_at_once(mesh: LocalMesh) -> None:
    node = mesh.add("solo", budget="64MB")
    wait_for(mesh, ring_covers(NUM_LAYERS), STARTUP_S, "a ring")
    streamed: dict[str, Any] = {}
    stream = threading.Thread(target=stream_completion, args=(
        node, {"prompt": list(range(5, 40)), "max_tokens": 4000, "ignore_eos": True},
        streamed))
    stream.start()
    deadline = time.monotonic() + 120
    while len(streamed.get("tokens", [])) < 5:
        assert time.monotonic() < deadline and stream.is_alive(), streamed
        time.sleep(0.05)
    node.process.send_signal(signal.SIGINT)
    time.sleep(0.2)
    node.process.send_signal(signal.SIGINT)
    assert node.process.wait(timeout=10) == 130
    stream.join(timeout=30)
    assert "received SIGINT again: exiting now" in node.log.read_text()


# ----- when no ring can serve ----------------------------------------------------------------


def generating_answers(node: MeshNode) -> list[tuple[int, dict[str, Any]]]:
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    answers = []
    for path, body in (("chat/completions", chat), ("completions", {"prompt": "hi"}),
                       ("chat/completions", {**chat, "stream": True})):
        response = httpx.post(f"{node.url}/v1/{path}", json=body, timeout=30)
        answers.append((response.status_code, response.json()))
    return answers


def test_a_model_that_fits_nowhere_is_one_503_from_every_node_and_endpoint(
        mesh: LocalMesh, tmp_path: Path) -> None:
    nodes = [mesh.add(f"tiny{i}", budget="1MB", propose=i == 0) for i in range(2)]
    view = wait_for(mesh, lambda v: len(v["nodes"]) == 2 and "bytes" in v["unavailable"],
                    STARTUP_S, "the coordinator's verdict on every node")
    message = view["unavailable"]
    assert re.search(r"\d+ bytes .* short", message), message
    for node in nodes:
        for status, body in generating_answers(node):
            assert status == 503, body
            assert body["error"]["type"] == "server_error"
            assert body["error"]["message"] == message

    lone = LocalMesh(tmp_path / "lone", mesh.model)
    (tmp_path / "lone").mkdir()
    try:
        modelless = lone.add("modelless", budget="64MB", propose=False)
        wait_for(lone, lambda v: v["coordinator"] is not None and v["unavailable"], STARTUP_S,
                 "a verdict")
        answers = generating_answers(modelless)
        assert {status for status, _ in answers} == {503}
        assert all("no model is chosen" in body["error"]["message"] for _, body in answers)
    finally:
        lone.stop()


def test_a_newcomer_the_planner_leaves_out_cuts_no_stream(mesh: LocalMesh,
                                                         qwen3_model: Path) -> None:
    first = mesh.add("first", budget="64MB")
    before = wait_for(mesh, ring_covers(NUM_LAYERS), STARTUP_S, "a ring")
    prompt = list(range(5, 40))
    reference = reference_tokens(qwen3_model, prompt, 300, ignore_eos=True)
    streamed: dict[str, Any] = {}
    stream = threading.Thread(target=stream_completion, args=(
        first, {"prompt": prompt, "max_tokens": 300, "ignore_eos": True}, streamed))
    stream.start()
    while not streamed.get("tokens") and stream.is_alive():
        time.sleep(0.05)
    mesh.add("small", budget="1MB", propose=False)  # holds no layer: the plan leaves it out
    after = wait_for(mesh, lambda v: v["epoch"] > before["epoch"] and len(v["nodes"]) == 2,
                     STARTUP_S, "a plan with the newcomer")
    assert after["ring"] == before["ring"]
    stream.join(timeout=180)
    assert "error" not in streamed and streamed["finish"] == "length"
    assert streamed["tokens"] == reference
    log = first.log.read_text()
    assert f"epoch {after['epoch']}: the ring is unchanged; committing without a drain" in log
    assert "replaying" not in log
