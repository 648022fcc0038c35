"""The seed's quick start, as written (ports, `localhost`, the alias scripts), on a local model."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from dnet.local_ring import api_healthy, port_is_free, shard_healthy
from tests.conftest import chat_prompt_ids, reference_tokens

pytestmark = pytest.mark.slow  # starts real processes

BIN = Path(sys.executable).parent


def seed_commands(model: str) -> list[list[str]]:
    """The seed README's three terminals, with the model path swapped in."""
    return [
        [str(BIN / "piped_mlx_ring_shard"), "-m", model, "-p", "50501",
         "-l", "[0,1,2,3]", "-n", "localhost:50502", "--prefetch-window", "4"],
        [str(BIN / "piped_mlx_ring_shard"), "-m", model, "-p", "50502",
         "-l", "[4,5,6,7]", "-n", "localhost:8080", "--prefetch-window", "4"],
        [str(BIN / "piped_mlx_ring_api"), "-a", "localhost:8080", "-s", "localhost:50501",
         "-m", model],
    ]


def test_seed_quick_start_as_written(qwen3_model: Path, tmp_path: Path) -> None:
    if not all(port_is_free(p) for p in (50501, 50502, 8080)):
        pytest.skip("the seed's fixed ports 50501, 50502 or 8080 are taken on this machine")
    processes = []
    try:
        for i, command in enumerate(seed_commands(str(qwen3_model))):
            log = open(tmp_path / f"terminal{i + 1}.log", "wb")  # noqa: SIM115
            processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT))
            log.close()
        deadline = time.monotonic() + 90
        while not (shard_healthy("localhost:50501") and shard_healthy("localhost:50502")
                   and api_healthy("http://localhost:8080")):
            assert time.monotonic() < deadline, "the seed's ring did not come up"
            assert all(p.poll() is None for p in processes), "a seed process exited"
            time.sleep(0.3)

        # The seed's curl, verbatim apart from asking for the token ids.
        response = httpx.post("http://localhost:8080/v1/chat/completions", timeout=60, json={
            "model": "default_model",
            "messages": [{"role": "user", "content": "What is 2+2?"}],
            "max_tokens": 30,
            "return_token_ids": True,
        })
        assert response.status_code == 200, response.text
        answer = response.json()
        prompt = chat_prompt_ids(qwen3_model, "What is 2+2?")
        assert answer["choices"][0]["token_ids"] == reference_tokens(qwen3_model, prompt, 30)
        assert answer["choices"][0]["message"]["content"]
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
