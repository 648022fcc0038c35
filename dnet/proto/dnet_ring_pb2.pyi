from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FrameKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACTIVATION: _ClassVar[FrameKind]
    RELEASE: _ClassVar[FrameKind]
    LOOKUP: _ClassVar[FrameKind]

class UnavailableKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AVAILABLE: _ClassVar[UnavailableKind]
    NO_COORDINATOR: _ClassVar[UnavailableKind]
    NO_MODEL: _ClassVar[UnavailableKind]
    NO_NODE: _ClassVar[UnavailableKind]
    CANNOT_PLAN: _ClassVar[UnavailableKind]
    REPLANNING: _ClassVar[UnavailableKind]
    SHUTTING_DOWN: _ClassVar[UnavailableKind]

class FailureKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FAILURE_UNSPECIFIED: _ClassVar[FailureKind]
    LOAD_ERROR: _ClassVar[FailureKind]
    OUT_OF_MEMORY: _ClassVar[FailureKind]
    TIMEOUT: _ClassVar[FailureKind]
    UNREACHABLE: _ClassVar[FailureKind]
ACTIVATION: FrameKind
RELEASE: FrameKind
LOOKUP: FrameKind
AVAILABLE: UnavailableKind
NO_COORDINATOR: UnavailableKind
NO_MODEL: UnavailableKind
NO_NODE: UnavailableKind
CANNOT_PLAN: UnavailableKind
REPLANNING: UnavailableKind
SHUTTING_DOWN: UnavailableKind
FAILURE_UNSPECIFIED: FailureKind
LOAD_ERROR: FailureKind
OUT_OF_MEMORY: FailureKind
TIMEOUT: FailureKind
UNREACHABLE: FailureKind

class Tensor(_message.Message):
    __slots__ = ("shape", "dtype", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "repetition_context_size", "seed", "max_tokens", "eos_token_ids", "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty", "logit_bias", "draws_done", "max_context", "grammar", "prompt_logprobs")
    class LogitBiasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    REPETITION_CONTEXT_SIZE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    LOGIT_BIAS_FIELD_NUMBER: _ClassVar[int]
    DRAWS_DONE_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    GRAMMAR_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repetition_penalty: float
    repetition_context_size: int
    seed: int
    max_tokens: int
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: bool
    top_logprobs: int
    presence_penalty: float
    frequency_penalty: float
    logit_bias: _containers.ScalarMap[int, float]
    draws_done: int
    max_context: int
    grammar: str
    prompt_logprobs: bool
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., min_p: _Optional[float] = ..., repetition_penalty: _Optional[float] = ..., repetition_context_size: _Optional[int] = ..., seed: _Optional[int] = ..., max_tokens: _Optional[int] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[bool] = ..., top_logprobs: _Optional[int] = ..., presence_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., logit_bias: _Optional[_Mapping[int, float]] = ..., draws_done: _Optional[int] = ..., max_context: _Optional[int] = ..., grammar: _Optional[str] = ..., prompt_logprobs: _Optional[bool] = ...) -> None: ...

class Block(_message.Message):
    __slots__ = ("key", "parent", "snapshot")
    KEY_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    parent: bytes
    snapshot: bool
    def __init__(self, key: _Optional[bytes] = ..., parent: _Optional[bytes] = ..., snapshot: _Optional[bool] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("request_id", "kind", "next_layer", "position", "tokens", "hidden", "sample", "sampling", "entry", "head", "epoch", "batch", "batch_positions", "route", "opens", "block_size", "reused_blocks", "history", "block", "block_keys")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    NEXT_LAYER_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    BATCH_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    OPENS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    REUSED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    BLOCK_KEYS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    kind: FrameKind
    next_layer: int
    position: int
    tokens: _containers.RepeatedScalarFieldContainer[int]
    hidden: Tensor
    sample: bool
    sampling: SamplingParams
    entry: str
    head: str
    epoch: int
    batch: _containers.RepeatedScalarFieldContainer[str]
    batch_positions: _containers.RepeatedScalarFieldContainer[int]
    route: _containers.RepeatedScalarFieldContainer[str]
    opens: bool
    block_size: int
    reused_blocks: int
    history: _containers.RepeatedScalarFieldContainer[int]
    block: Block
    block_keys: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, request_id: _Optional[str] = ..., kind: _Optional[_Union[FrameKind, str]] = ..., next_layer: _Optional[int] = ..., position: _Optional[int] = ..., tokens: _Optional[_Iterable[int]] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., sample: _Optional[bool] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., entry: _Optional[str] = ..., head: _Optional[str] = ..., epoch: _Optional[int] = ..., batch: _Optional[_Iterable[str]] = ..., batch_positions: _Optional[_Iterable[int]] = ..., route: _Optional[_Iterable[str]] = ..., opens: _Optional[bool] = ..., block_size: _Optional[int] = ..., reused_blocks: _Optional[int] = ..., history: _Optional[_Iterable[int]] = ..., block: _Optional[_Union[Block, _Mapping]] = ..., block_keys: _Optional[_Iterable[bytes]] = ...) -> None: ...

class FrameStatus(_message.Message):
    __slots__ = ("request_id", "code", "message")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    code: int
    message: str
    def __init__(self, request_id: _Optional[str] = ..., code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class Token(_message.Message):
    __slots__ = ("request_id", "index", "token", "logprob", "top_ids", "top_logprobs", "finish_reason", "error", "error_code", "prompt_logprobs", "lookup", "reused_blocks", "cached_tokens")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    LOOKUP_FIELD_NUMBER: _ClassVar[int]
    REUSED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    index: int
    token: int
    logprob: float
    top_ids: _containers.RepeatedScalarFieldContainer[int]
    top_logprobs: _containers.RepeatedScalarFieldContainer[float]
    finish_reason: str
    error: str
    error_code: int
    prompt_logprobs: _containers.RepeatedCompositeFieldContainer[PromptLogprob]
    lookup: bool
    reused_blocks: int
    cached_tokens: int
    def __init__(self, request_id: _Optional[str] = ..., index: _Optional[int] = ..., token: _Optional[int] = ..., logprob: _Optional[float] = ..., top_ids: _Optional[_Iterable[int]] = ..., top_logprobs: _Optional[_Iterable[float]] = ..., finish_reason: _Optional[str] = ..., error: _Optional[str] = ..., error_code: _Optional[int] = ..., prompt_logprobs: _Optional[_Iterable[_Union[PromptLogprob, _Mapping]]] = ..., lookup: _Optional[bool] = ..., reused_blocks: _Optional[int] = ..., cached_tokens: _Optional[int] = ...) -> None: ...

class PromptLogprob(_message.Message):
    __slots__ = ("token", "logprob", "top_ids", "top_logprobs")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    token: int
    logprob: float
    top_ids: _containers.RepeatedScalarFieldContainer[int]
    top_logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, token: _Optional[int] = ..., logprob: _Optional[float] = ..., top_ids: _Optional[_Iterable[int]] = ..., top_logprobs: _Optional[_Iterable[float]] = ...) -> None: ...

class Empty(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("request_id", "propagate")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROPAGATE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    propagate: bool
    def __init__(self, request_id: _Optional[str] = ..., propagate: _Optional[bool] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthReply(_message.Message):
    __slots__ = ("role", "model", "layers", "num_layers", "active_requests", "version", "hidden_size", "window", "node_id", "epoch", "leads_epoch", "unavailable", "excluded", "unavailable_kind")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LEADS_EPOCH_FIELD_NUMBER: _ClassVar[int]
    UNAVAILABLE_FIELD_NUMBER: _ClassVar[int]
    EXCLUDED_FIELD_NUMBER: _ClassVar[int]
    UNAVAILABLE_KIND_FIELD_NUMBER: _ClassVar[int]
    role: str
    model: str
    layers: _containers.RepeatedScalarFieldContainer[int]
    num_layers: int
    active_requests: int
    version: str
    hidden_size: int
    window: int
    node_id: str
    epoch: int
    leads_epoch: int
    unavailable: str
    excluded: _containers.RepeatedCompositeFieldContainer[Exclusion]
    unavailable_kind: UnavailableKind
    def __init__(self, role: _Optional[str] = ..., model: _Optional[str] = ..., layers: _Optional[_Iterable[int]] = ..., num_layers: _Optional[int] = ..., active_requests: _Optional[int] = ..., version: _Optional[str] = ..., hidden_size: _Optional[int] = ..., window: _Optional[int] = ..., node_id: _Optional[str] = ..., epoch: _Optional[int] = ..., leads_epoch: _Optional[int] = ..., unavailable: _Optional[str] = ..., excluded: _Optional[_Iterable[_Union[Exclusion, _Mapping]]] = ..., unavailable_kind: _Optional[_Union[UnavailableKind, str]] = ...) -> None: ...

class DataPlaneInfo(_message.Message):
    __slots__ = ("port",)
    PORT_FIELD_NUMBER: _ClassVar[int]
    port: int
    def __init__(self, port: _Optional[int] = ...) -> None: ...

class MeasureRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class DeviceInfo(_message.Message):
    __slots__ = ("node_id", "flops", "disk_read_bytes_per_s", "memory_budget_bytes", "chip", "platform", "peer_latency_ms", "model_profile_json", "model_error", "prefix_cache_bytes")
    class PeerLatencyMsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    FLOPS_FIELD_NUMBER: _ClassVar[int]
    DISK_READ_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHIP_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    PEER_LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    MODEL_PROFILE_JSON_FIELD_NUMBER: _ClassVar[int]
    MODEL_ERROR_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    flops: float
    disk_read_bytes_per_s: float
    memory_budget_bytes: int
    chip: str
    platform: str
    peer_latency_ms: _containers.ScalarMap[str, float]
    model_profile_json: str
    model_error: str
    prefix_cache_bytes: int
    def __init__(self, node_id: _Optional[str] = ..., flops: _Optional[float] = ..., disk_read_bytes_per_s: _Optional[float] = ..., memory_budget_bytes: _Optional[int] = ..., chip: _Optional[str] = ..., platform: _Optional[str] = ..., peer_latency_ms: _Optional[_Mapping[str, float]] = ..., model_profile_json: _Optional[str] = ..., model_error: _Optional[str] = ..., prefix_cache_bytes: _Optional[int] = ...) -> None: ...

class PlanMember(_message.Message):
    __slots__ = ("node_id", "name", "grpc_address", "http_port", "layers", "window")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    GRPC_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    HTTP_PORT_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    name: str
    grpc_address: str
    http_port: int
    layers: _containers.RepeatedScalarFieldContainer[int]
    window: int
    def __init__(self, node_id: _Optional[str] = ..., name: _Optional[str] = ..., grpc_address: _Optional[str] = ..., http_port: _Optional[int] = ..., layers: _Optional[_Iterable[int]] = ..., window: _Optional[int] = ...) -> None: ...

class PlanRequest(_message.Message):
    __slots__ = ("epoch", "model", "coordinator", "members", "plan_json", "ring_epoch")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    PLAN_JSON_FIELD_NUMBER: _ClassVar[int]
    RING_EPOCH_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    model: str
    coordinator: str
    members: _containers.RepeatedCompositeFieldContainer[PlanMember]
    plan_json: str
    ring_epoch: int
    def __init__(self, epoch: _Optional[int] = ..., model: _Optional[str] = ..., coordinator: _Optional[str] = ..., members: _Optional[_Iterable[_Union[PlanMember, _Mapping]]] = ..., plan_json: _Optional[str] = ..., ring_epoch: _Optional[int] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("epoch", "timeout_s")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    timeout_s: float
    def __init__(self, epoch: _Optional[int] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class PrepareReply(_message.Message):
    __slots__ = ("ok", "error", "failure")
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    error: str
    failure: FailureKind
    def __init__(self, ok: _Optional[bool] = ..., error: _Optional[str] = ..., failure: _Optional[_Union[FailureKind, str]] = ...) -> None: ...

class Exclusion(_message.Message):
    __slots__ = ("node_id", "failure", "reason", "failures", "retry_in_s")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    RETRY_IN_S_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    failure: FailureKind
    reason: str
    failures: int
    retry_in_s: float
    def __init__(self, node_id: _Optional[str] = ..., failure: _Optional[_Union[FailureKind, str]] = ..., reason: _Optional[str] = ..., failures: _Optional[int] = ..., retry_in_s: _Optional[float] = ...) -> None: ...

class CommitRequest(_message.Message):
    __slots__ = ("epoch",)
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    def __init__(self, epoch: _Optional[int] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeStatus(_message.Message):
    __slots__ = ("node_id", "name", "epoch", "model", "layers", "window", "streaming", "memory_used_bytes", "memory_budget_bytes", "decode_tokens_per_s", "active_requests", "ready", "running_plan", "prefix_cache_bytes", "prefix_cache_capacity_bytes", "prefix_cache_hit_rate")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    STREAMING_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    DECODE_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    RUNNING_PLAN_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_HIT_RATE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    name: str
    epoch: int
    model: str
    layers: _containers.RepeatedScalarFieldContainer[int]
    window: int
    streaming: bool
    memory_used_bytes: int
    memory_budget_bytes: int
    decode_tokens_per_s: float
    active_requests: int
    ready: bool
    running_plan: PlanRequest
    prefix_cache_bytes: int
    prefix_cache_capacity_bytes: int
    prefix_cache_hit_rate: float
    def __init__(self, node_id: _Optional[str] = ..., name: _Optional[str] = ..., epoch: _Optional[int] = ..., model: _Optional[str] = ..., layers: _Optional[_Iterable[int]] = ..., window: _Optional[int] = ..., streaming: _Optional[bool] = ..., memory_used_bytes: _Optional[int] = ..., memory_budget_bytes: _Optional[int] = ..., decode_tokens_per_s: _Optional[float] = ..., active_requests: _Optional[int] = ..., ready: _Optional[bool] = ..., running_plan: _Optional[_Union[PlanRequest, _Mapping]] = ..., prefix_cache_bytes: _Optional[int] = ..., prefix_cache_capacity_bytes: _Optional[int] = ..., prefix_cache_hit_rate: _Optional[float] = ...) -> None: ...

class LoadModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...
