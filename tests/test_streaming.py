"""Windowed weight streaming: fewer layers resident, the same tokens."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from dnet.local_ring import shard_health
from dnet.model_facts import profile_model
from dnet.modelgen import ModelSpec
from tests.conftest import DEEPSEEK_F32, QWEN3_BF16, QWEN3_Q4, chat_prompt_ids, reference_tokens
from tests.test_identity import assert_diverse, chat_ids, completion_ids

pytestmark = pytest.mark.slow  # starts real processes

MAX_TOKENS = 16

# A model whose weights dominate the process: 8 layers of ~60 MB (bf16).
HEAVY = ModelSpec(arch="qwen3", dtype="bfloat16", num_layers=8, hidden_size=1536,
                  intermediate_size=5120, num_heads=12, num_kv_heads=4, weight_files=4)


def vmhwm_bytes(pid: int) -> int:
    """Peak resident set size of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_small_window_lowers_peak_memory(make_model, start_ring) -> None:
    model = make_model(HEAVY)
    per_layer = profile_model(model).layer_bytes[3]
    assert per_layer > 40 * 2**20, "the test model must be weight-dominated"

    peaks = {}
    outputs = {}
    for window in (8, 2):
        ring = start_ring(model, [list(range(8))],
                          shard_args=["--prefetch-window", str(window)])
        outputs[window] = completion_ids(ring.url, list(range(3, 40)), max_tokens=4)
        peaks[window] = vmhwm_bytes(ring.processes[0].pid)
        health = shard_health(ring.shard_addresses[0])
        assert health is not None and health.window == window
        ring.stop()

    assert outputs[2] == outputs[8]
    not_kept = 6 * per_layer
    saved = peaks[8] - peaks[2]
    assert saved >= 0.6 * not_kept, (
        f"window 2 saved {saved / 2**20:.0f} MiB of peak RSS; expected at least "
        f"{0.6 * not_kept / 2**20:.0f} MiB (60% of the 6 layers not kept)")


# Streaming on any subset of the shards of a multi-round ring, for each precision required.
STREAMED_RINGS = {
    "qwen3-bf16-both-stream": (QWEN3_BF16, [[0, 1, 4, 5], [2, 3, 6, 7]], [1, 2]),
    "qwen3-4bit-first-streams": (QWEN3_Q4, [[0, 1, 2, 6, 7], [3, 4, 5]], [2, None]),
    "deepseek-f32-second-streams": (DEEPSEEK_F32, [[0, 1, 4, 5], [2, 3, 6, 7]], [None, 1]),
}


@pytest.mark.parametrize("name", list(STREAMED_RINGS))
def test_streamed_ring_matches_full_residency(name: str, make_model, start_ring) -> None:
    spec, layer_lists, windows = STREAMED_RINGS[name]
    model = make_model(spec)
    per_shard_args = [["--prefetch-window", str(w)] if w else [] for w in windows]
    ring = start_ring(model, layer_lists, per_shard_args=per_shard_args)

    content = "Stream the weights, keep the tokens."
    reference = reference_tokens(model, chat_prompt_ids(model, content), MAX_TOKENS)
    assert_diverse(reference)
    assert chat_ids(ring.url, content, stream=True, max_tokens=MAX_TOKENS) == reference
    prompt = list(range(5, 300))
    assert completion_ids(ring.url, prompt, max_tokens=MAX_TOKENS) == reference_tokens(
        model, prompt, MAX_TOKENS, ignore_eos=True)
    for address, window in zip(ring.shard_addresses, windows, strict=True):
        health = shard_health(address)
        assert health is not None
        assert health.window == (window or len(health.layers))


def test_window_at_least_layers_held_keeps_everything(qwen3_model, start_ring) -> None:
    ring = start_ring(qwen3_model, [list(range(8))], shard_args=["--prefetch-window", "20"])
    health = shard_health(ring.shard_addresses[0])
    assert health is not None and health.window == 8
    response = httpx.get(f"{ring.url}/health", timeout=10)
    assert response.status_code == 200
