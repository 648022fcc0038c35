"""OpenAI-style request bodies (chat and text completions), validated.

Unknown fields are ignored: OpenAI clients send newer parameters than we know of. Fields we
accept are honoured or refused with a 400; none is silently dropped. Defaults follow mlx-lm's
server (temperature 0, so answers are reproducible).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dnet.api.errors import ApiError
from dnet.api.generation import Options

__all__ = ["ApiError", "ChatRequest", "CompletionRequest", "Message"]

MAX_STOP_SEQUENCES = 16
MAX_CHOICES = 16
INT32_MAX = 2**31 - 1  # the ring's wire format carries these counts as int32
MAX_TOP_LOGPROBS = 20


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class FunctionCall(_Body):
    name: str
    arguments: str | dict[str, Any] = "{}"  # a JSON string, as OpenAI sends it


class ToolCallIn(_Body):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # Parts are checked when the conversation is built, so an image part gets a message that
    # says images are not supported rather than a validation error.
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class FunctionDef(_Body):
    name: Annotated[str, Field(min_length=1, max_length=128)]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(_Body):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Body):
    name: str | None = None
    description: str | None = None
    schema_: Annotated[dict[str, Any], Field(alias="schema")]
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(_Body):
    include_usage: bool = False


NonNegativeFloat = Annotated[float, Field(ge=0.0)]


class SamplingFields(_Body):
    """Parameters shared by chat and text completions."""

    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None  # capped by the context
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=0, le=INT32_MAX)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0)] | None = None
    repetition_context_size: Annotated[int, Field(ge=1, le=INT32_MAX)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] = 1
    # Extensions, as vLLM names them: no end-of-sequence stop, and token ids in the answer.
    ignore_eos: bool = False
    return_token_ids: bool = False

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_options(self, max_tokens: int | None, *, logprobs: bool,
                         top_logprobs: int) -> Options:
        return Options(
            max_tokens=max_tokens, temperature=self.temperature or 0.0, top_p=self.top_p,
            top_k=self.top_k, min_p=self.min_p, repetition_penalty=self.repetition_penalty,
            repetition_context_size=self.repetition_context_size,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            logit_bias=dict(self.logit_bias or {}), seed=self.seed,
            stops=tuple(self.stop or ()), logprobs=logprobs, top_logprobs=top_logprobs,
            ignore_eos=self.ignore_eos)


class ChatRequest(SamplingFields):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    tools: list[ToolDef] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def options(self) -> Options:
        return self.sampling_options(self.max_completion_tokens or self.max_tokens,
                                     logprobs=self.logprobs,
                                     top_logprobs=self.top_logprobs or 0)


class CompletionRequest(SamplingFields):
    prompt: str | Annotated[list[int], Field(min_length=1)] | Annotated[
        list[str], Field(min_length=1, max_length=1)]
    # 0 is allowed with echo: score the prompt without generating (lm-evaluation-harness).
    max_tokens: Annotated[int, Field(ge=0)] | None = None
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    echo: bool = False

    def options(self) -> Options:
        return self.sampling_options(self.max_tokens, logprobs=self.logprobs is not None,
                                     top_logprobs=self.logprobs or 0)
