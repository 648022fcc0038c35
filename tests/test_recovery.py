"""A node SIGKILLed while it streams an answer costs the user nothing."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import reference_tokens
from tests.mesh import LocalMesh, chat_token_ids, ring_covers, wait_for

pytestmark = pytest.mark.slow  # starts real processes

NUM_LAYERS = 8
TOKENS = 300



def test_the_answer_completes_on_the_replanned_ring(mesh: LocalMesh, qwen3_model: Path) -> None:
    # 4 MB budgets: the model needs three nodes, so three survive a kill. The planner may use
    # the fourth as well (a shorter pipeline period); the request enters at a node outside the
    # ring if there is one, and the victim is a ring node that neither coordinates nor enters.
    for i in range(4):
        mesh.add(f"node{i}", budget="4MB", propose=i == 0)
    view = wait_for(mesh, ring_covers(NUM_LAYERS), 90, "a ring")
    assert len(view["ring"]) >= 3, view["ring"]
    by_id = {node.node_id(): node for node in mesh.nodes}
    entry_id = next((i for i in by_id if i not in view["ring"]),
                    next(i for i in view["ring"] if i != view["coordinator"]))
    entry = by_id[entry_id]
    victim = next(by_id[i] for i in view["ring"] if i not in (view["coordinator"], entry_id))

    prompt = list(range(5, 45))
    reference = reference_tokens(qwen3_model, prompt, TOKENS, ignore_eos=True)
    received: list[int] = []
    outcome: dict[str, object] = {}
    started = threading.Event()

    def stream() -> None:
        body = {"prompt": prompt, "max_tokens": TOKENS, "ignore_eos": True, "stream": True,
                "return_token_ids": True}
        with httpx.stream("POST", f"{entry.url}/v1/completions", json=body,
                          timeout=60) as response:
            for line in response.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    outcome["error"] = chunk["error"]["message"]
                for choice in chunk.get("choices", []):
                    received.extend(choice["token_ids"])
                    outcome["finish"] = choice["finish_reason"] or outcome.get("finish")
                if len(received) >= 30:
                    started.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert started.wait(60), "the answer never started"
    mesh.kill(victim)
    killed_at = time.monotonic()
    reader.join(timeout=120)
    assert not reader.is_alive(), "the answer hung after the kill"
    assert "error" not in outcome, outcome
    assert received == reference, "a token was lost, repeated or changed"
    assert outcome["finish"] == "length"
    assert time.monotonic() - killed_at < 120
    assert "replaying it on the re-planned ring" in entry.log.read_text()

    # The next request works, and so does the node once restarted by hand.
    survivor = next(n for n in mesh.live() if n is not entry)
    assert chat_token_ids(survivor, "again", 8) == chat_token_ids(entry, "again", 8)
    restarted = mesh.add(victim.name, budget="4MB", propose=False,
                         state_dir=victim.state_dir, grpc_port=victim.grpc_port)
    wait_for(mesh, lambda v: victim.node_id() in {n["id"] for n in v["nodes"] if n["healthy"]}
             and ring_covers(NUM_LAYERS)(v), 60, "the restarted node back in the mesh")
    assert chat_token_ids(restarted, "again", 8) == chat_token_ids(entry, "again", 8)
