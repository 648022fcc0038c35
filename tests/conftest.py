"""Shared fixtures: generated models, rings in this process or of real processes on loopback,
mlx-lm references."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

from dnet.entry import PREFILL_CHUNK
from dnet.local_ring import LocalRing
from dnet.modelgen import ARCHITECTURES, ModelSpec, cached_model

# Fixtures of the API tests: Qwen3's real tokenizer and a model of its vocabulary.
pytest_plugins = ("tests.api_support",)

QWEN3_BF16 = ModelSpec(arch="qwen3", dtype="bfloat16")
QWEN3_Q4 = ModelSpec(arch="qwen3", dtype="bfloat16", quant_bits=4)
DEEPSEEK_F32 = ModelSpec(arch="deepseek_v2", dtype="float32")
LLAMA_F16 = ModelSpec(arch="llama", dtype="float16")
QWEN2_Q8 = ModelSpec(arch="qwen2", dtype="bfloat16", quant_bits=8)

# Types whose layers hold routed experts: on MLX's CPU backend their unquantized experts need
# float32 (gather_mm); quantized experts (gather_qmm) run in bfloat16.
MOE_TYPES = frozenset({"deepseek_v2", "qwen3_moe", "deepseek_v3", "kimi_k25", "gpt_oss",
                       "glm4_moe", "qwen3_5_moe", "qwen3_next", "gemma4_text", "mixtral",
                       "minimax"})
# Every supported type in a float precision the CPU runs (float16 for Llama, float32 for
# experts, bfloat16 otherwise) ...
FLOAT_SPECS = {arch: ModelSpec(arch=arch, dtype="float32" if arch in MOE_TYPES else
                               "float16" if arch == "llama" else "bfloat16")
               for arch in ARCHITECTURES}
# ... and quantized: 4-bit, 8-bit, or mlx-lm convert's mixed per-layer recipes, in bfloat16.
_QUANT = {"qwen3": "mixed_3_6", "deepseek_v3": "mixed_4_6", "qwen3_next": "mixed_4_6",
          "qwen2": 8, "mistral": 4, "llama": 8, "deepseek_v2": 8, "qwen3_moe": 4,
          "kimi_k25": 4, "gpt_oss": 4, "glm4_moe": 8, "qwen3_5": 8, "qwen3_5_moe": 4,
          "gemma3_text": 4, "gemma4_text": 8, "mixtral": 8, "minimax": 4}
QUANT_SPECS = {arch: ModelSpec(arch=arch, dtype="bfloat16",
                               quant_bits=q if isinstance(q, int) else None,
                               quant_recipe=q if isinstance(q, str) else None)
               for arch, q in _QUANT.items()}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Groups for xdist (`--dist loadgroup`, two workers): the fast tests of a module run on
    one worker, so its module fixtures (rings, tokenizers) are built once, and the tests of
    gpt-oss's tokenizer (seconds to load) share one worker. Slow tests, each a ring or mesh of
    its own processes, go to whichever worker is free."""
    for item in items:
        if item.get_closest_marker("slow") is not None:
            continue
        group = ("gpt-oss tokenizer" if "gptoss_tokenizer_dir" in item.fixturenames
                 else item.nodeid.split("::")[0])
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Generated models and fetched tokenizers, made once per run: xdist's workers share one
    folder beside their own (`cached_model` locks each model while it is made)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = tmp_path_factory.getbasetemp().parent / "models"
        shared.mkdir(exist_ok=True)
        return shared
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def make_model(model_cache: Path):
    def make(spec: ModelSpec) -> Path:
        return cached_model(spec, cache_dir=model_cache)

    return make


@pytest.fixture(scope="session")
def qwen3_model(make_model) -> Path:
    return make_model(QWEN3_BF16)


@pytest.fixture
def mesh(qwen3_model: Path, tmp_path: Path) -> Iterator:
    """A LocalMesh of `dnet join` processes on the generated Qwen3 model; stopped afterwards."""
    from tests.mesh import LocalMesh

    mesh = LocalMesh(tmp_path, str(qwen3_model))
    try:
        yield mesh
    finally:
        mesh.stop()


def wait_until(predicate, timeout_s: float, what: str) -> None:
    """Poll until `predicate()` holds; a bounded wait that fails the test instead of hanging."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting until {what}")


@pytest.fixture
def start_ring(tmp_path: Path) -> Iterator:
    """Start a LocalRing; every ring started this way is stopped by process id afterwards."""
    rings: list[LocalRing] = []

    def start(model: Path, layer_lists: list[list[int]], **kwargs) -> LocalRing:
        ring = LocalRing(str(model), layer_lists, log_dir=tmp_path / f"ring{len(rings)}",
                         **kwargs)
        rings.append(ring)
        return ring.start(timeout_s=90)

    yield start
    for ring in rings:
        ring.stop()


@pytest.fixture
def inprocess_ring(qwen3_model: Path) -> Iterator:
    """Start an InProcessRing (tests/inprocess.py) on the generated Qwen3, optionally serving
    HTTP (`http=True`, `max_context`, `api_key`); every ring is stopped afterwards."""
    from tests.inprocess import InProcessRing

    rings: list[InProcessRing] = []

    def start(layer_lists: list[list[int]], *, model: Path | None = None, http: bool = False,
              max_context: int | None = None, api_key: str | None = None,
              **options) -> InProcessRing:
        ring = InProcessRing(model or qwen3_model, layer_lists, **options)
        rings.append(ring)
        ring.start()
        if http:
            ring.serve_http(max_context=max_context, api_key=api_key)
        return ring

    yield start
    for ring in rings:
        ring.stop()


@cache
def _loaded(model_dir: str):
    import mlx_lm

    return mlx_lm.load(model_dir)


def reference_tokens(model_dir: Path, prompt: list[int], max_tokens: int, *,
                     ignore_eos: bool = False, temperature: float = 0.0, seed: int | None = None,
                     repetition_penalty: float | None = None,
                     prefill_step_size: int = PREFILL_CHUNK, **sampler_args) -> list[int]:
    """What single-process mlx-lm generates for the same prompt, prefilling in chunks of
    `prefill_step_size` (the ring's `--prefill-chunk`, whose default is the default here)."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step, stream_generate
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    model, tokenizer = _loaded(str(model_dir))
    if seed is not None:
        mx.random.seed(seed)
    kwargs = {
        "sampler": make_sampler(temp=temperature, **sampler_args),
        "logits_processors": make_logits_processors(repetition_penalty=repetition_penalty),
        "prefill_step_size": prefill_step_size,
    }
    if ignore_eos:
        steps = generate_step(mx.array(prompt), model, max_tokens=max_tokens, **kwargs)
        return [int(token) for token, _ in steps]
    return [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens,
                                             **kwargs)
            if r.finish_reason != "stop" or r.token not in tokenizer.eos_token_ids]


def reference_tokenizer(model_dir: Path):
    return _loaded(str(model_dir))[1]


def chat_prompt_ids(model_dir: Path, content: str) -> list[int]:
    tokenizer = reference_tokenizer(model_dir)
    return list(tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                              add_generation_prompt=True))
