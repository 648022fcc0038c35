"""Sampling at the tail with a grammar, and prompt scoring (in-process, no ring).

The grammar's mask must never change the token the model would have chosen when the grammar
allows it; decoding a random model under a grammar must give text the grammar accepts.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import mlx.core as mx
import pytest

from dnet.api import constraints
from dnet.api.output import OutputParser, ToolCall
from dnet.proto import dnet_ring_pb2 as pb
from dnet.sampling import PromptScorer, TokenSampler, grammar_tokenizer

VOCAB = 151936
SCHEMA = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 12},
    "days": {"type": "integer", "minimum": 1, "maximum": 14},
    "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "days", "unit"], "additionalProperties": False}


class FixedMask:
    """A stand-in constraint that allows a given set of tokens."""

    def __init__(self, allowed: mx.array) -> None:
        self._allowed = allowed
        self.done = False

    def allowed(self) -> mx.array:
        return self._allowed

    def consume(self, token: int) -> None:
        assert bool(self._allowed[token].item())


def _params(**fields) -> pb.SamplingParams:
    return pb.SamplingParams(**{"top_p": 1.0, "max_tokens": 100, **fields})


@pytest.mark.parametrize("filters", [{}, {"top_p": 0.9}, {"top_k": 50}, {"min_p": 0.05},
                                     {"top_p": 0.8, "top_k": 20, "min_p": 0.02}])
@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.3])
def test_the_mask_keeps_the_models_choice_whenever_the_grammar_allows_it(
        temperature: float, filters: dict) -> None:
    vocab = 2000
    kept = changed = 0
    for case in range(40):
        key = mx.random.key(case)
        logits = mx.random.normal((1, vocab), key=key) * 3.0
        allowed = mx.random.uniform(shape=(vocab,), key=mx.random.key(1000 + case)) < 0.3
        params = _params(temperature=temperature, seed=case, **filters)
        free = TokenSampler(params, vocab)
        masked = TokenSampler(params, vocab)
        masked.constraint = FixedMask(allowed)
        choice = int(free.sample(logits)[0].item())
        constrained = int(masked.sample(logits)[0].item())
        assert bool(allowed[constrained].item()), "the grammar's mask was not applied"
        if bool(allowed[choice].item()):
            assert constrained == choice, (case, choice, constrained)
            kept += 1
        else:
            changed += 1
    assert kept and changed, "the cases must cover both an allowed and a refused choice"


def _decode_under_grammar(model_dir: Path, grammar: str, temperature: float = 0.0,
                          max_tokens: int = 120) -> list[int]:
    """Greedy (or sampled) decoding of random logits under a grammar, as the tail does it."""
    params = _params(temperature=temperature, seed=7, grammar=grammar)
    sampler = TokenSampler(params, VOCAB, lambda: grammar_tokenizer(model_dir, VOCAB))
    tokens: list[int] = []
    for step in range(max_tokens):
        logits = mx.random.normal((1, VOCAB), key=mx.random.key(step))
        token, logprobs = sampler.sample(logits)
        sample = sampler.describe(token, logprobs)
        tokens.append(sample.token)
        if sample.grammar_done or sample.token in (151645, 151643):
            return tokens
    raise AssertionError(f"the grammar did not complete in {max_tokens} tokens")


def _text(tokenizer, tokens: list[int]) -> str:
    return b"".join(tokenizer.token_bytes(t) for t in tokens
                    if t not in tokenizer.eos_token_ids).decode()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_random_logits_under_a_json_schema_grammar_give_schema_valid_json(
        qwen3_vocab_model: Path, qwen3_tokenizer, temperature: float) -> None:
    prompt = qwen3_tokenizer.encode("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    grammar = constraints.json_grammar(qwen3_tokenizer, prompt, "normal", SCHEMA, "schema")
    text = _text(qwen3_tokenizer, _decode_under_grammar(qwen3_vocab_model, grammar,
                                                        temperature))
    jsonschema.validate(json.loads(text), SCHEMA)


# Slow tier: seconds of sampling; the JSON-schema grammar above runs the same path fast.
@pytest.mark.slow
def test_random_logits_under_a_tool_call_grammar_give_a_call_with_valid_arguments(
        qwen3_vocab_model: Path, qwen3_tokenizer) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA}},
             {"type": "function", "function": {"name": "get_time", "parameters": {
                 "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                 "required": ["zone"]}}}]
    prompt = qwen3_tokenizer.encode("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    grammar = constraints.tool_call_grammar(qwen3_tokenizer, prompt, "normal", tools,
                                            parallel=False)
    tokens = _decode_under_grammar(qwen3_vocab_model, grammar)
    parser = OutputParser(qwen3_tokenizer, "normal", tools, parse_tools=True)
    text = _text(qwen3_tokenizer, tokens)
    parts = parser.feed(text) + parser.finish()
    calls = [p for p in parts if isinstance(p, ToolCall)]
    assert len(calls) == 1 and len(parts) == 1, parts
    schema = {t["function"]["name"]: t["function"]["parameters"] for t in tools}[calls[0].name]
    jsonschema.validate(json.loads(calls[0].arguments), schema)


def test_a_replayed_request_continues_its_grammar(qwen3_vocab_model: Path,
                                                  qwen3_tokenizer) -> None:
    prompt = [1, 2, 3]
    grammar = constraints.json_grammar(qwen3_tokenizer, prompt, "normal", SCHEMA, "schema")
    tokens = _decode_under_grammar(qwen3_vocab_model, grammar)
    done = 4
    replay = TokenSampler(_params(temperature=0.0, grammar=grammar, draws_done=done), VOCAB,
                          lambda: grammar_tokenizer(qwen3_vocab_model, VOCAB))
    replay.observe(prompt)
    for token in tokens[:done]:
        replay.observe([token])
    logits = mx.random.normal((1, VOCAB), key=mx.random.key(done))
    token, logprobs = replay.sample(logits)
    assert replay.describe(token, logprobs).token == tokens[done]


def test_the_prompt_scorer_gives_each_tokens_log_probability_across_chunks() -> None:
    vocab, width = 50, 8
    head_weight = mx.random.normal((width, vocab), key=mx.random.key(1))

    def head(rows: mx.array) -> mx.array:  # [n, 1, width] -> [n, vocab]
        return (rows @ head_weight)[:, -1, :]

    prompt = [3, 14, 15, 9, 26, 5, 35]
    hidden = mx.random.normal((1, len(prompt), width), key=mx.random.key(2))
    logits = head(hidden.reshape(-1, 1, width))
    reference = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    scorer = PromptScorer(top_n=3)
    scorer.add_chunk(prompt[:3], hidden[:, :3], head)  # chunks of 3 and 3, then the last
    scorer.add_chunk(prompt[3:6], hidden[:, 3:6], head)
    scorer.add_last(prompt[6])
    assert [e.token for e in scorer.entries] == prompt[1:]
    for k, entry in enumerate(scorer.entries):
        assert entry.logprob == pytest.approx(reference[k, prompt[k + 1]].item(), abs=1e-5)
        best = sorted(range(vocab), key=lambda i: -reference[k, i].item())[:3]
        assert list(entry.top_ids) == best


@pytest.mark.parametrize(("prompt_tail", "state", "accepted", "refused"), [
    # Thinking left to the model (Qwen3's default): a think block may come first, or not.
    ("<|im_start|>assistant\n", "normal",
     ["<think>\nhmm\n</think>\n\n{\"a\": 1}", "{\"a\": 1}"], ["hello {\"a\": 1}"]),
    # The template opened the block (thinking-only models): reasoning, then the answer.
    ("<|im_start|>assistant\n<think>\n", "reasoning",
     ["hmm, well\n</think>\n\n{\"a\": 1}"], ["{\"a\": 1}"]),
    # The template closed an empty block (enable_thinking false): the answer right away.
    ("<|im_start|>assistant\n<think>\n\n</think>\n\n", "normal",
     ["{\"a\": 1}"], ["<think>\nhmm\n</think>\n\n{\"a\": 1}"]),
])
def test_thinking_passes_the_grammar_untouched_and_the_answer_is_constrained(
        qwen3_vocab_model: Path, qwen3_tokenizer, prompt_tail: str, state: str,
        accepted: list[str], refused: list[str]) -> None:
    from llguidance import LLMatcher

    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    prompt = qwen3_tokenizer.encode("<|im_start|>user\nHi<|im_end|>\n" + prompt_tail)
    grammar = constraints.json_grammar(qwen3_tokenizer, prompt, state, schema, "schema")
    tokenizer = grammar_tokenizer(qwen3_vocab_model, VOCAB)
    for text, ok in [*((t, True) for t in accepted), *((t, False) for t in refused)]:
        matcher = LLMatcher(tokenizer, grammar, log_level=0)
        ids = [*qwen3_tokenizer.encode(text), 151645]
        assert (matcher.validate_tokens(ids) == len(ids)) is ok, text
