"""OpenAI-style request bodies (chat and text completions), validated.

Unknown fields are ignored: OpenAI clients send newer parameters than we know of. Fields we
accept are honoured or refused with a 400; none is silently dropped, and the API parameters we
know but do not support (`unsupported` of each body) get a 400 that names them. Defaults
follow mlx-lm's server (temperature 0, so answers are reproducible).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dnet.api.errors import ApiError
from dnet.api.generation import Options

__all__ = ["ApiError", "ChatRequest", "CompletionRequest", "Message"]

MAX_STOP_SEQUENCES = 16
MAX_CHOICES = 16
INT32_MAX = 2**31 - 1  # the ring's wire format carries these counts as int32
MAX_TOP_LOGPROBS = 20


class Body(BaseModel):
    """A request body: unknown fields ignored, known unsupported ones refused."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    # Parameters of the API this body belongs to that we do not support: name -> why. Any
    # value but null, false or an empty list is a 400 naming the parameter.
    unsupported: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, why in cls.unsupported.items():
                if data.get(name) not in (None, False, [], "", {}):
                    raise ValueError(f"`{name}` is not supported: {why}")
        return data




class FunctionCall(Body):
    name: str
    arguments: str | dict[str, Any] = "{}"  # a JSON string, as OpenAI sends it


class ToolCallIn(Body):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # Parts are checked when the conversation is built, so an image part gets a message that
    # says images are not supported rather than a validation error.
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class FunctionDef(Body):
    name: Annotated[str, Field(min_length=1, max_length=128)]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(Body):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(Body):
    name: str


class NamedToolChoice(Body):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(Body):
    name: str | None = None
    description: str | None = None
    schema_: Annotated[dict[str, Any], Field(alias="schema")]
    strict: bool | None = None


class ResponseFormat(Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(Body):
    include_usage: bool = False


NonNegativeFloat = Annotated[float, Field(ge=0.0)]


class SamplingFields(Body):
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
    unsupported: ClassVar[dict[str, str]] = {
        "audio": "answers are text only", "functions": "send `tools` instead",
        "function_call": "send `tool_choice` instead",
        "prediction": "predicted outputs are not implemented",
        "web_search_options": "there is no web search"}

    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    tools: list[ToolDef] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    modalities: list[str] | None = None  # ["text"] only

    @model_validator(mode="after")
    def _consistent(self) -> ChatRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("`top_logprobs` needs `logprobs: true`")
        return self

    @field_validator("modalities")
    @classmethod
    def _text_only(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and set(value) - {"text"}:
            raise ValueError("answers are text only: `modalities` may only be [\"text\"]")
        return value

    def options(self) -> Options:
        return self.sampling_options(self.max_completion_tokens or self.max_tokens,
                                     logprobs=self.logprobs,
                                     top_logprobs=self.top_logprobs or 0)


class CompletionRequest(SamplingFields):
    unsupported: ClassVar[dict[str, str]] = {
        "suffix": "insertion (fill in the middle) is not implemented"}

    prompt: str | Annotated[list[int], Field(min_length=1)] | Annotated[
        list[str], Field(min_length=1, max_length=1)]
    # 0 is allowed with echo: score the prompt without generating (lm-evaluation-harness).
    max_tokens: Annotated[int, Field(ge=0)] | None = None
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    echo: bool = False
    best_of: Annotated[int, Field(ge=1)] | None = None  # only 1 (or n): no server-side ranking

    @model_validator(mode="after")
    def _no_ranking(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of not in (1, self.n):
            raise ValueError("`best_of` other than 1 (or n) is not supported: ask for n "
                             "choices and rank them yourself")
        return self

    def options(self) -> Options:
        return self.sampling_options(self.max_tokens, logprobs=self.logprobs is not None,
                                     top_logprobs=self.logprobs or 0)
