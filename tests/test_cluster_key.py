"""A cluster key: strangers can neither call a member nor join its mesh."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from dnet.proto import dnet_ring_pb2 as pb
from dnet.proto import dnet_ring_pb2_grpc as pb_grpc
from dnet.ring import auth
from tests.conftest import chat_prompt_ids, reference_tokens
from tests.mesh import LocalMesh, chat_token_ids, ring_covers, topology, wait_for

pytestmark = pytest.mark.slow

pytestmark = pytest.mark.slow  # starts real processes

KEY = "correct horse battery staple"


@pytest.fixture
def keyed_auth() -> Iterator[None]:
    """Sign this test process's own calls with KEY, and undo it afterwards."""
    auth.configure(KEY)
    try:
        yield
    finally:
        auth.configure(None)


def call_health(address: str, metadata: list[tuple[str, str]] | None = None) -> grpc.StatusCode:
    with grpc.insecure_channel(address) as channel:
        try:
            pb_grpc.RingStub(channel).Health(pb.HealthRequest(), timeout=5, metadata=metadata)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def test_a_keyed_ring_serves_and_refuses_strangers(qwen3_model: Path, start_ring,
                                                   keyed_auth: None) -> None:
    ring = start_ring(qwen3_model, [[0, 1, 2, 3], [4, 5, 6, 7]],
                      shard_args=["--cluster-key", KEY], api_args=["--cluster-key", KEY])
    response = httpx.post(f"{ring.url}/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
        "return_token_ids": True})
    assert response.status_code == 200, response.text
    prompt = chat_prompt_ids(qwen3_model, "hi")
    assert response.json()["choices"][0]["token_ids"] == reference_tokens(qwen3_model, prompt, 8)

    shard = ring.shard_addresses[1]
    # No key: refused.
    assert call_health(shard) == grpc.StatusCode.UNAUTHENTICATED
    with grpc.insecure_channel(shard) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.RingStub(channel).Forward(pb.Frame(
                request_id="intruder", next_layer=4, position=0, tokens=[1],
                hidden=pb.Tensor(shape=[1, 1, 128], dtype="bfloat16", data=b"\0" * 256)),
                timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # The wrong key: refused.
    wrong = auth.ClusterAuth("not the key")
    assert call_health(shard, wrong.sign("/dnet.ring.v1.Ring/Health")) == \
        grpc.StatusCode.UNAUTHENTICATED
    # The right key: accepted once; the same signature again (a replay): refused.
    right = auth.ClusterAuth(KEY).sign("/dnet.ring.v1.Ring/Health")
    assert call_health(shard, right) == grpc.StatusCode.OK
    assert call_health(shard, right) == grpc.StatusCode.UNAUTHENTICATED
    # The member logs each attempt, with the caller's address.
    log = (ring.log_dir / "shard1.log").read_text()
    assert "refused /dnet.ring.v1.Ring/Health" in log and "replayed call" in log


def test_an_api_without_the_key_cannot_use_a_keyed_ring(qwen3_model: Path, start_ring,
                                                        keyed_auth: None) -> None:
    ring = start_ring(qwen3_model, [[0, 1, 2, 3, 4, 5, 6, 7]],
                      shard_args=["--cluster-key", KEY], api_args=["--cluster-key", "other"])
    response = httpx.post(f"{ring.url}/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert response.status_code >= 500
    assert "error" in response.json()


@pytest.fixture
def meshes(qwen3_model: Path, tmp_path: Path) -> Iterator[tuple[LocalMesh, LocalMesh]]:
    first = LocalMesh(tmp_path / "a", str(qwen3_model), cluster_key=KEY)
    second = LocalMesh(tmp_path / "b", str(qwen3_model), cluster_key="another key")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    try:
        yield first, second
    finally:
        first.stop()
        second.stop()


def test_meshes_with_different_keys_never_merge(meshes, qwen3_model: Path) -> None:
    ours, theirs = meshes
    a = [ours.add(f"a{i}", budget="64MB", propose=i == 0) for i in range(2)]
    theirs.add("b0", budget="64MB")
    view = wait_for(ours, lambda v: ring_covers(8)(v) and len(v["nodes"]) == 2, 90,
                    "our two-node mesh")
    assert {n["name"] for n in view["nodes"]} == {"a0", "a1"}
    wait_for(theirs, lambda v: [n["name"] for n in v["nodes"]] == ["b0"] and v["epoch"] >= 1,
             60, "their one-node mesh")
    prompt = chat_prompt_ids(qwen3_model, "hi")
    assert chat_token_ids(a[1], "hi", 6) == reference_tokens(qwen3_model, prompt, 6)
    # Their advert carries a different cluster id, never the key.
    log = a[0].log.read_text()
    assert KEY not in log and "discovered b0" not in log
    # The user is told once that another cluster is there, and `dnet status` says so.
    told = [line for line in log.splitlines() if "another cluster key" in line and "b0" in line]
    assert len(told) == 1, log
    view = topology(a[1])
    assert any("b0" in other["seen"] for other in view["other_clusters"])
    status = subprocess.run([sys.executable, "-m", "dnet.cli", "status", "--api",
                             f"{a[1].host}:{a[1].http_port}"], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "COLUMNS": "250"})
    assert status.returncode == 0, status.stderr
    assert "another dnet cluster (a different --cluster-key)" in status.stdout
    assert "b0" in status.stdout
