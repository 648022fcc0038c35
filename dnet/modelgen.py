"""Small random-weight models in the standard Hugging Face / MLX layout.

Tests, benchmarks and `dnet demo` run on these: no model can be downloaded on the machines we
build on, and committed weights are not allowed. A generated model is a directory holding
`config.json`, `model-0000X-of-0000N.safetensors` with `model.safetensors.index.json` (layers
spread over several files, so a shard can fetch only the files it needs), and a byte-level BPE
tokenizer with a ChatML chat template. The weights are random, so the text is gibberish.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map
from mlx_lm.convert import mixed_quant_predicate_builder
from mlx_lm.utils import _get_classes, quantize_model

from planner.tensors import TensorRole, tensor_role

ARCHITECTURES = ("qwen3", "qwen2", "llama", "mistral", "deepseek_v2", "qwen3_moe",
                 "deepseek_v3", "kimi_k25", "gpt_oss", "glm4_moe", "qwen3_5", "qwen3_5_moe",
                 "qwen3_next", "gemma3_text", "gemma4_text", "mixtral", "minimax")
# mlx-lm's convert recipes: per-layer mixed bits, written into the config path by path.
QUANT_RECIPES = ("mixed_4_6", "mixed_3_6", "mixed_2_6", "mixed_3_4")
SLIDING_WINDOW = 16  # tokens: small, so test prompts pass every sliding window
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# A few sentences are enough for a byte-level BPE that round-trips any text.
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Distributed inference splits a large language model across several machines.",
    "Each shard holds a run of transformer layers and passes activations round a ring.",
    "What is two plus two? Two plus two is four.",
    "Apple Silicon Macs share unified memory between the CPU and the GPU.",
    "Hello, world! How are you today? I am fine, thank you.",
    "def main():\n    print('hello')\n    return 0\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Symbols: + - * / = < > ( ) [ ] { }",
    "Streaming weights from disk lets a model larger than memory still run.",
    "The coordinator plans which layers each device keeps resident at once.",
]


@dataclass(frozen=True)
class ModelSpec:
    """What to generate. The defaults give a ~2 MB Qwen3 that decodes fast on a CPU."""

    arch: str = "qwen3"
    dtype: str = "bfloat16"
    quant_bits: int | None = None
    quant_recipe: str | None = None  # one of QUANT_RECIPES instead of uniform quant_bits
    num_layers: int = 8
    hidden_size: int = 128
    intermediate_size: int = 256
    num_heads: int = 4
    num_kv_heads: int = 2
    vocab_size: int = 512
    weight_files: int = 3
    init_scale: float = 0.3
    seed: int = 0
    max_position_embeddings: int = 4096  # the longest prompt plus answer it accepts
    # A directory of real tokenizer files to use instead of the toy BPE (tokenizer.json,
    # tokenizer_config.json, and generation_config.json / special_tokens_map.json if there).
    tokenizer_dir: str = ""

    def validate(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.arch!r}; choose from {ARCHITECTURES}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose from {list(DTYPES)}")
        if self.quant_bits not in (None, 4, 8):
            raise ValueError("quant_bits must be 4, 8 or None")
        if self.quant_recipe is not None and (self.quant_recipe not in QUANT_RECIPES
                                              or self.quant_bits):
            raise ValueError(f"quant_recipe must be one of {QUANT_RECIPES}, without quant_bits")
        if (self.quant_bits or self.quant_recipe) and self.hidden_size % 64:
            raise ValueError("quantized models need hidden_size to be a multiple of 64")
        if self.num_layers < 1 or self.weight_files < 1:
            raise ValueError("num_layers and weight_files must be at least 1")
        if self.max_position_embeddings < 1:
            raise ValueError("max_position_embeddings must be at least 1")

    @property
    def name(self) -> str:
        precision = (self.quant_recipe or f"q{self.quant_bits}") if (
            self.quant_bits or self.quant_recipe) else self.dtype
        context = "" if self.max_position_embeddings == 4096 else \
            f"-C{self.max_position_embeddings}"
        tokenizer = f"-T{Path(self.tokenizer_dir).name}" if self.tokenizer_dir else ""
        return (
            f"{self.arch}-{precision}-L{self.num_layers}-H{self.hidden_size}"
            f"-I{self.intermediate_size}-V{self.vocab_size}-s{self.seed}{context}{tokenizer}"
        )


def build_tokenizer(out_dir: Path, vocab_size: int) -> int:
    """Train a byte-level BPE and write tokenizer files; returns the real vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "unk_token": None,
        "add_bos_token": False,
        "model_max_length": 4096,
        "clean_up_tokenization_spaces": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    special_map = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))
    return tokenizer.get_vocab_size()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")


def copy_tokenizer(source: Path, out_dir: Path) -> tuple[int, int]:
    """Use given tokenizer files; returns (vocabulary size with added tokens, eos id)."""
    from tokenizers import Tokenizer

    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, out_dir / name)
    tokenizer = Tokenizer.from_file(str(source / "tokenizer.json"))
    eos = json.loads((source / "tokenizer_config.json").read_text())["eos_token"]
    eos = eos["content"] if isinstance(eos, dict) else eos
    return tokenizer.get_vocab_size(with_added_tokens=True), tokenizer.token_to_id(eos)


def model_config(spec: ModelSpec, vocab_size: int,
                 eos_token_id: int = SPECIAL_TOKENS.index("<|im_end|>")) -> dict:
    """A config.json in the shape the Hugging Face / mlx-lm model classes read.

    Each family keeps what makes it itself at a tiny size: experts with shared experts and
    dense first layers, latent attention, linear-attention layers, sliding windows (of
    SLIDING_WINDOW tokens), attention sinks, soft-capping.
    """
    head_dim = spec.hidden_size // spec.num_heads
    common = {
        "model_type": spec.arch,
        "hidden_size": spec.hidden_size,
        "num_hidden_layers": spec.num_layers,
        "intermediate_size": spec.intermediate_size,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "rms_norm_eps": 1e-6,
        "vocab_size": vocab_size,
        "max_position_embeddings": spec.max_position_embeddings,
        "rope_theta": 10000.0,
        "eos_token_id": eos_token_id,
        "torch_dtype": spec.dtype,
    }
    experts = {"num_experts_per_tok": 2, "moe_intermediate_size": spec.intermediate_size // 2}
    family = _FAMILIES[spec.arch](spec, head_dim, experts)
    if spec.arch == "kimi_k25":  # a multimodal checkpoint: the text model under text_config
        return {"model_type": "kimi_k25", "text_config": {**common, **family},
                "tie_word_embeddings": False, "eos_token_id": common["eos_token_id"],
                "torch_dtype": spec.dtype}
    if spec.arch in ("qwen3_5", "qwen3_5_moe"):
        text = {**common, **family, "model_type": f"{spec.arch}_text"}
        return {"model_type": spec.arch, "text_config": text, "tie_word_embeddings": False,
                "eos_token_id": common["eos_token_id"], "torch_dtype": spec.dtype}
    return {**common, **family}


def _deepseek(spec: ModelSpec, head_dim: int, experts: dict) -> dict:
    """Multi-head latent attention, one dense layer, then routed plus shared experts."""
    return {**experts, "num_key_value_heads": spec.num_heads, "n_shared_experts": 1,
            "n_routed_experts": 4, "routed_scaling_factor": 1.0, "first_k_dense_replace": 1,
            "moe_layer_freq": 1, "kv_lora_rank": 32, "qk_rope_head_dim": 16,
            "qk_nope_head_dim": 32, "v_head_dim": 32,
            "rope_scaling": {"type": "yarn", "factor": 1.0,
                             "original_max_position_embeddings": 4096}}


def _deepseek_v3(spec: ModelSpec, head_dim: int, experts: dict) -> dict:
    return {**_deepseek(spec, head_dim, experts), "q_lora_rank": 64, "topk_method": "noaux_tc",
            "scoring_func": "sigmoid", "n_group": 2, "topk_group": 1, "norm_topk_prob": True,
            "tie_word_embeddings": False}


def _qwen3_next(spec: ModelSpec, head_dim: int, experts: dict) -> dict:
    """Three gated-delta (linear attention) layers to each full-attention layer."""
    return {**experts, "head_dim": head_dim, "linear_num_value_heads": 4,
            "linear_num_key_heads": 2, "linear_key_head_dim": 32, "linear_value_head_dim": 32,
            "linear_conv_kernel_dim": 4, "full_attention_interval": 4, "num_experts": 4,
            "decoder_sparse_step": 1, "shared_expert_intermediate_size": spec.intermediate_size,
            "mlp_only_layers": [], "partial_rotary_factor": 0.25, "norm_topk_prob": True,
            "tie_word_embeddings": False}


def _qwen3_5(spec: ModelSpec, head_dim: int, experts: dict) -> dict:
    config = {**_qwen3_next(spec, head_dim, experts), "num_experts": 0}
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0,
                                 "partial_rotary_factor": 0.25}
    return config


def _gemma(spec: ModelSpec, head_dim: int, experts: dict) -> dict:
    """Two sliding-window layers to each global one; Gemma 4 names them (last one global)."""
    pattern = ["sliding_attention", "sliding_attention", "full_attention"]
    layer_types = (pattern * spec.num_layers)[:spec.num_layers - 1] + ["full_attention"]
    return {"head_dim": head_dim, "sliding_window": SLIDING_WINDOW,
            "sliding_window_pattern": 3, "query_pre_attn_scalar": head_dim,
            "rope_local_base_freq": 10000.0, "layer_types": layer_types}


_FAMILIES = {
    "qwen3": lambda spec, head_dim, _: {"head_dim": head_dim, "tie_word_embeddings": True},
    "qwen2": lambda spec, head_dim, _: {"tie_word_embeddings": False},
    "llama": lambda spec, head_dim, _: {"head_dim": head_dim, "tie_word_embeddings": False},
    "mistral": lambda spec, head_dim, _: {"head_dim": head_dim, "tie_word_embeddings": False},
    "deepseek_v2": lambda spec, head_dim, experts: {
        **_deepseek(spec, head_dim, experts), "q_lora_rank": None, "topk_method": "greedy"},
    "deepseek_v3": _deepseek_v3,
    "kimi_k25": lambda spec, head_dim, experts: {**_deepseek_v3(spec, head_dim, experts),
                                                 "model_type": "kimi_k2"},
    "qwen3_moe": lambda spec, head_dim, experts: {
        **experts, "head_dim": head_dim, "num_experts": 4, "decoder_sparse_step": 1,
        "mlp_only_layers": [0], "norm_topk_prob": True, "tie_word_embeddings": False},
    "glm4_moe": lambda spec, head_dim, experts: {
        **experts, "head_dim": head_dim, "n_routed_experts": 4, "n_shared_experts": 1,
        "first_k_dense_replace": 1, "routed_scaling_factor": 1.0, "n_group": 1,
        "topk_group": 1, "norm_topk_prob": True, "use_qk_norm": True, "attention_bias": True,
        "partial_rotary_factor": 0.5, "rope_scaling": None, "tie_word_embeddings": False},
    "gpt_oss": lambda spec, head_dim, experts: {
        **experts, "head_dim": head_dim, "num_local_experts": 4,
        "sliding_window": SLIDING_WINDOW,
        "layer_types": (["sliding_attention", "full_attention"] * spec.num_layers)[
            :spec.num_layers],
        "rope_scaling": {"rope_type": "yarn", "factor": 2.0, "beta_fast": 32.0,
                         "beta_slow": 1.0, "original_max_position_embeddings": 2048}},
    "qwen3_5": _qwen3_5,
    "qwen3_5_moe": lambda spec, head_dim, experts: {**_qwen3_5(spec, head_dim, experts),
                                                    "num_experts": 4},
    "qwen3_next": _qwen3_next,
    "gemma3_text": _gemma,
    "gemma4_text": lambda spec, head_dim, experts: {
        # The 26B-A4B shape: experts beside the MLP, keys doubling as values in global layers.
        **_gemma(spec, head_dim, experts), "global_head_dim": 2 * head_dim,
        "num_kv_shared_layers": 0, "hidden_size_per_layer_input": 0,
        "enable_moe_block": True, "num_experts": 4, "top_k_experts": 2,
        "moe_intermediate_size": spec.intermediate_size // 2, "attention_k_eq_v": True,
        "num_global_key_value_heads": 1,
        "final_logit_softcapping": 30.0,
        # Tied, the sqrt(hidden)-scaled random embedding outweighs the random layers and the
        # model predicts its input token forever; a separate head keeps the output diverse.
        "tie_word_embeddings": False},
    "mixtral": lambda spec, head_dim, experts: {**experts, "num_local_experts": 4,
                                                "tie_word_embeddings": False},
    "minimax": lambda spec, head_dim, experts: {
        **experts, "head_dim": head_dim, "num_local_experts": 4,
        "shared_intermediate_size": 0, "rotary_dim": head_dim // 2, "use_qk_norm": True,
        "tie_word_embeddings": False},
}


def _randomize(model: nn.Module, spec: ModelSpec) -> None:
    """Replace every parameter with scaled normal noise around its initial value.

    A small scale (0.02) makes greedy decoding repeat one token, which would let a broken
    ring still match its reference; 0.1 to 0.5 gives diverse output (see NOTES.md).
    Parameters that start at one (norm weights, Gemma 4's layer scalars) stay near one, so
    activations keep a sane range through many layers.
    """
    ones = {id(module): [key for key, value in module.items()
                         if isinstance(value, mx.array) and mx.all(value == 1).item()]
            for _, module in model.named_modules()}
    mx.random.seed(spec.seed)
    dtype = DTYPES[spec.dtype]

    def noise(p: mx.array) -> mx.array:
        return (mx.random.normal(p.shape) * spec.init_scale).astype(dtype)

    model.update(tree_map(noise, model.parameters()))
    for _, module in model.named_modules():
        for key in ones[id(module)]:
            module[key] = (1.0 + 0.1 * mx.random.normal(module[key].shape)).astype(dtype)
    mx.eval(model.parameters())


def _file_of(name: str, num_layers: int, files: int) -> int:
    """Which weight file a tensor goes to: embedding first, head last, layers spread evenly."""
    role, layer = tensor_role(name, num_layers)
    if role is TensorRole.LAYER:
        return min(files - 1, layer * files // num_layers)
    return 0 if role is TensorRole.FIRST else files - 1


def _save_weights(model: nn.Module, out_dir: Path, num_layers: int, files: int) -> None:
    weights = dict(tree_flatten(model.parameters()))
    groups: list[dict[str, mx.array]] = [{} for _ in range(files)]
    for name, value in weights.items():
        groups[_file_of(name, num_layers, files)][name] = value
    weight_map: dict[str, str] = {}
    for i, group in enumerate(groups):
        file_name = f"model-{i + 1:05d}-of-{files:05d}.safetensors"
        mx.save_safetensors(str(out_dir / file_name), group, metadata={"format": "mlx"})
        weight_map.update({name: file_name for name in group})
    index = {
        "metadata": {"total_size": sum(v.nbytes for v in weights.values())},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _quiet(function, *args, **kwargs):
    """mlx-lm's quantize_model prints its bits per weight; keep generation silent."""
    with contextlib.redirect_stdout(io.StringIO()):
        return function(*args, **kwargs)


def generate_model(out_dir: str | Path, spec: ModelSpec | None = None) -> Path:
    """Write a random-weight model to `out_dir` (replacing it) and return the path."""
    spec = spec or ModelSpec()
    spec.validate()
    out_dir = Path(out_dir)
    staging = Path(tempfile.mkdtemp(prefix=".gen-", dir=out_dir.parent if out_dir.parent.exists()
                                    else None))
    try:
        if spec.tokenizer_dir:
            size, eos = copy_tokenizer(Path(spec.tokenizer_dir), staging)
            config = model_config(spec, max(size, spec.vocab_size), eos)
        else:
            config = model_config(spec, build_tokenizer(staging, spec.vocab_size))
        model_class, args_class = _get_classes(config)
        model = model_class(args_class.from_dict(config))
        _randomize(model, spec)
        if spec.quant_recipe:
            predicate = mixed_quant_predicate_builder(spec.quant_recipe, model, group_size=64)
            model, config = _quiet(quantize_model, model, config, group_size=64, bits=None,
                                   quant_predicate=predicate)
        elif spec.quant_bits:
            model, config = _quiet(quantize_model, model, config, group_size=64,
                                   bits=spec.quant_bits)
        _save_weights(model, staging, spec.num_layers, min(spec.weight_files, spec.num_layers))
        config["dnet_generated"] = asdict(spec)
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out_dir


def default_cache_dir() -> Path:
    base = os.environ.get("DNET_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "dnet"
    )
    return Path(base) / "models"


def cached_model(spec: ModelSpec | None = None, cache_dir: Path | None = None) -> Path:
    """The generated model for `spec`, generating it once and reusing it afterwards."""
    spec = spec or ModelSpec()
    path = (cache_dir or default_cache_dir()) / spec.name
    path.parent.mkdir(parents=True, exist_ok=True)
    # A lock file, because parallel tests or two demos may ask for the same model at once.
    with open(path.parent / f".{spec.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / "config.json").exists():
            generate_model(path, spec)
    return path
