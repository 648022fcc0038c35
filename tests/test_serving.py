"""The names a served model answers to, and its context length: one rule for every node."""

from __future__ import annotations

import pytest

from dnet.serving import DEFAULT_MODEL_ALIAS, accepts_model, context_tokens, model_aliases


@pytest.mark.parametrize(("model", "short"), [
    ("Qwen/Qwen3-32B-MLX-bf16", "Qwen3-32B-MLX-bf16"),
    ("/models/qwen3-bf16/", "qwen3-bf16"),
    ("~/.cache/dnet/models/x", "x"),
    ("plain", "plain"),
])
def test_a_model_answers_to_its_name_its_last_component_and_the_seed_alias(model: str,
                                                                           short: str) -> None:
    assert model_aliases(model) == {model, short, DEFAULT_MODEL_ALIAS}
    for asked in (None, "", model, short, DEFAULT_MODEL_ALIAS):
        assert accepts_model(model, asked)
    assert not accepts_model(model, "gpt-17-ultra")
    assert not accepts_model(model, "Qwen")


def test_the_context_comes_from_the_config_or_a_fallback() -> None:
    assert context_tokens({"max_position_embeddings": 32768}) == 32768
    assert context_tokens({"max_position_embeddings": None}) == 4096
    assert context_tokens({}) == 4096
