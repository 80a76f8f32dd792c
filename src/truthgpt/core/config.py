"""Configuration: the model (`TruthGPTConfig`), the training run (`TrainConfig`) and the flat
`TruthGPTOptimizationCoreConfig` that users of the original design construct.

Configs are plain dataclasses, validated on construction so that a bad value fails at once with
the name of the field, and they round-trip through JSON so a checkpoint is all one needs to
rebuild a model. This is the lowest layer (no torch), so `distance_type` is checked here only to
be a name: the registry of kinds (`truthgpt.nn.attention.kinds`) resolves it, aliases included,
when the model is built, and rejects an unknown one there with a `ConfigError` that names it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Self

PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
QK_NORMS: tuple[str, ...] = ("none", "rms", "layer")  # DistanceAttention's qk_norm
# How the model knows where a token is: a learned table (GPT-2), rotary q/k (RoPE), ALiBi's
# −m·|i − j| on the scores, or nothing but the causal mask. Only "learned" has a length.
POSITION_EMBEDDINGS: tuple[str, ...] = ("learned", "rope", "alibi", "none")
MAX_ROPE_THETA = 1e9

# Upper bounds of every size and count: generous (far past any model or run this code is for),
# so that a config, which a checkpoint carries, can never ask for an allocation or a loop no
# machine finishes. A model at every size limit at once would not fit any machine either: the
# limits only cap each field, and loading also checks the config against the weights' shapes.
MAX_VOCAB_SIZE = 2**24
MAX_HIDDEN_SIZE = 2**16
MAX_INTERMEDIATE_SIZE = 2**18
MAX_LAYERS = 1024
MAX_ATTENTION_HEADS = 1024
MAX_POSITIONS = 2**20  # max_position_embeddings and block_size
LAMBDA_MIN = 1e-3  # λ of a distance-attention head: its initial value and while training
LAMBDA_MAX = 1e3
MAX_P_NORM = 64.0  # the Lp exponent; beyond it |x|^p overflows fp32 (use chebyshev for p=∞)
MAX_LAYER_NORM_EPS = 1.0
MAX_COUNT = 2**53  # steps, intervals, counters: exact as a JSON number (a double)
MAX_BATCH_SIZE = 2**20
MAX_ACCUMULATION_STEPS = 2**16
MAX_KEEP_CHECKPOINTS = 2**16
MAX_SEED = 2**63 - 1  # what every generator seeded from it (torch, NumPy) takes as an int64
MAX_LEARNING_RATE = 10.0  # AdamW moves each weight by about lr a step: far past any that trains
MAX_WEIGHT_DECAY = 10.0
MAX_LAMBDA_LR_SCALE = 1e3  # log λ's learning rate as a multiple of the schedule's
MAX_GRAD_CLIP = 1e6  # 0 disables clipping; a larger norm is no clipping by another name
MAX_PEAK_FLOPS = 1e18  # an exaFLOP/s, per device
_CUDA_DEVICE = re.compile(r"cuda:\d{1,4}")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def _check(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{field}: {message}")


def in_range(value: Any, low: float, high: float) -> bool:
    """A number (not a bool) in [low, high]: NaN never is, nor an int too large for a float."""
    return is_number(value) and low <= value <= high


def _check_count(value: Any, name: str, low: int, high: int) -> None:
    _check(
        is_int(value) and low <= value <= high,
        name,
        f"must be an integer in [{low}, {high}], got {value!r}",
    )


class _JsonConfig:
    """JSON round-trip shared by every config class."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """Build from a dict, rejecting unknown keys so a typo never passes silently."""
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"{cls.__name__}: unknown field(s) {', '.join(unknown)}; "
                f"valid fields: {', '.join(sorted(known))}"
            )
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Self:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Self:
        path = Path(path)
        try:
            return cls.from_json(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, RecursionError) as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from None

    def replace(self, **changes: Any) -> Self:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


_MODEL_SIZES = {
    "vocab_size": MAX_VOCAB_SIZE,
    "hidden_size": MAX_HIDDEN_SIZE,
    "num_hidden_layers": MAX_LAYERS,
    "num_attention_heads": MAX_ATTENTION_HEADS,
    "intermediate_size": MAX_INTERMEDIATE_SIZE,
    "max_position_embeddings": MAX_POSITIONS,
}
_TRAIN_COUNTS = {  # name: (lowest, highest)
    "max_steps": (1, MAX_COUNT),
    "warmup_steps": (0, MAX_COUNT),
    "batch_size": (1, MAX_BATCH_SIZE),
    "block_size": (1, MAX_POSITIONS),
    "gradient_accumulation_steps": (1, MAX_ACCUMULATION_STEPS),
    "seed": (0, MAX_SEED),
    "eval_interval": (1, MAX_COUNT),
    "log_interval": (1, MAX_COUNT),
    "checkpoint_every": (1, MAX_COUNT),
    "keep_checkpoints": (1, MAX_KEEP_CHECKPOINTS),
    "max_bad_steps": (1, MAX_COUNT),
}


@dataclasses.dataclass(kw_only=True)
class TruthGPTConfig(_JsonConfig):
    """Everything needed to build a `TruthGPTModel`, with the original design's field names."""

    vocab_size: int
    hidden_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    intermediate_size: int | None = None  # None: 4 × hidden_size
    max_position_embeddings: int = 1024
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    distance_type: str = "l1"  # a registered kind or alias; kinds are matched in any case
    lambda_param: float | None = None  # initial λ; None: the kind's default
    use_learnable_lambda: bool = True
    p_norm: float | None = None  # exponent for distance_type="lp"; None: 3.0
    tie_word_embeddings: bool = True
    layer_norm_eps: float = 1e-5
    bias: bool = True
    qk_norm: str = "none"  # "none", "rms" or "layer": normalise q and k per head (QK_NORMS)
    qk_norm_gain: bool = False  # with qk_norm: learned gains for q and k
    position_embedding: str = "learned"  # POSITION_EMBEDDINGS; checkpoints without it: learned
    rope_theta: float = 10000.0  # with rope: the base of the rotation frequencies
    partial_rotary_factor: float = 1.0  # with rope: the fraction of each head's dims rotated

    def __post_init__(self) -> None:
        if isinstance(self.distance_type, str):
            self.distance_type = self.distance_type.lower()
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size if is_int(self.hidden_size) else None
        if self.distance_type == "lp" and self.p_norm is None:
            self.p_norm = 3.0
        self.validate()

    def validate(self) -> None:
        """Raise `ConfigError` naming the first invalid field."""
        for name, limit in _MODEL_SIZES.items():
            value = getattr(self, name)
            _check(
                is_int(value) and 0 < value <= limit,
                name,
                f"must be a positive integer ≤ {limit}, got {value!r}",
            )
        _check(
            self.hidden_size % self.num_attention_heads == 0,
            "num_attention_heads",
            f"must divide hidden_size ({self.hidden_size}), got {self.num_attention_heads}",
        )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            value = getattr(self, name)
            _check(
                is_number(value) and 0.0 <= value < 1.0, name, f"must be in [0, 1), got {value!r}"
            )
        _check(
            isinstance(self.distance_type, str) and self.distance_type.strip() != "",
            "distance_type",
            f"must name a distance kind (a non-empty string), got {self.distance_type!r}",
        )
        _check(
            self.lambda_param is None or in_range(self.lambda_param, LAMBDA_MIN, LAMBDA_MAX),
            "lambda_param",
            f"must be a number in [{LAMBDA_MIN}, {LAMBDA_MAX}] or null, got {self.lambda_param!r}",
        )
        _check(
            self.p_norm is None or (in_range(self.p_norm, 0, MAX_P_NORM) and self.p_norm > 0),
            "p_norm",
            f"must be a number in (0, {MAX_P_NORM}], got {self.p_norm!r}",
        )
        _check(
            in_range(self.layer_norm_eps, 0, MAX_LAYER_NORM_EPS) and self.layer_norm_eps > 0,
            "layer_norm_eps",
            f"must be in (0, {MAX_LAYER_NORM_EPS}], got {self.layer_norm_eps!r}",
        )
        _check(
            self.qk_norm in QK_NORMS,
            "qk_norm",
            f"must be one of {', '.join(QK_NORMS)}, got {self.qk_norm!r}",
        )
        for name in ("use_learnable_lambda", "tie_word_embeddings", "bias", "qk_norm_gain"):
            _check(isinstance(getattr(self, name), bool), name, "must be true or false")
        _check(
            self.position_embedding in POSITION_EMBEDDINGS,
            "position_embedding",
            f"must be one of {', '.join(POSITION_EMBEDDINGS)}, got {self.position_embedding!r}",
        )
        _check(
            in_range(self.rope_theta, 0, MAX_ROPE_THETA) and self.rope_theta > 1,
            "rope_theta",
            f"must be a number in (1, {MAX_ROPE_THETA:g}], got {self.rope_theta!r}",
        )
        _check(
            in_range(self.partial_rotary_factor, 0, 1) and self.partial_rotary_factor > 0,
            "partial_rotary_factor",
            f"must be in (0, 1], got {self.partial_rotary_factor!r}",
        )
        if self.position_embedding == "rope":
            _check(
                self.rotary_dim >= 2,
                "partial_rotary_factor",
                f"rotates no pair of the {self.head_dim} dims of a head at "
                f"{self.partial_rotary_factor} (at least 2 are needed)",
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        """With rope, how many of each head's dims rotate (even; the first ones): RoPE
        turns pairs of dims, and the rest carry no position."""
        return int(self.head_dim * self.partial_rotary_factor) // 2 * 2

    @property
    def position_limit(self) -> int | None:
        """The longest input the model takes: the learned table's length, or None (rope,
        alibi, none), where positions are computed, not looked up, and any length runs."""
        return self.max_position_embeddings if self.position_embedding == "learned" else None


@dataclasses.dataclass(kw_only=True)
class TrainConfig(_JsonConfig):
    """How a model is trained: optimiser, schedule, batch shape, precision, logging."""

    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    max_steps: int = 2000
    lr_decay_steps: int | None = None  # None: decay over max_steps
    weight_decay: float = 0.1
    lambda_lr_scale: float = 1.0  # log λ's learning rate ÷ the others' (λ is never decayed)
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0 disables clipping
    batch_size: int = 12
    block_size: int = 64
    gradient_accumulation_steps: int = 1
    precision: str = "fp32"
    device: str = "auto"
    seed: int = 1337
    eval_interval: int = 250
    eval_batches: int | None = 200  # None: the whole validation split
    log_interval: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    max_bad_steps: int = 5  # consecutive non-finite steps before the run stops
    peak_flops: float | None = None  # device peak for MFU; None: measured once

    def __post_init__(self) -> None:
        self.precision = str(self.precision).lower()
        self.device = str(self.device).lower()
        self.validate()

    def validate(self) -> None:
        """Raise `ConfigError` naming the first invalid field."""
        _check(
            in_range(self.learning_rate, 0, MAX_LEARNING_RATE) and self.learning_rate > 0,
            "learning_rate",
            f"must be in (0, {MAX_LEARNING_RATE}], got {self.learning_rate!r}",
        )
        _check(
            in_range(self.min_lr, 0, self.learning_rate),
            "min_lr",
            f"must be in [0, learning_rate={self.learning_rate}], got {self.min_lr!r}",
        )
        for name, (low, high) in _TRAIN_COUNTS.items():
            _check_count(getattr(self, name), name, low, high)
        for name in ("lr_decay_steps", "eval_batches"):
            value = getattr(self, name)
            if value is not None:
                _check_count(value, name, 1, MAX_COUNT)
        _check(
            in_range(self.weight_decay, 0, MAX_WEIGHT_DECAY),
            "weight_decay",
            f"must be in [0, {MAX_WEIGHT_DECAY}], got {self.weight_decay!r}",
        )
        _check(
            in_range(self.lambda_lr_scale, 0, MAX_LAMBDA_LR_SCALE) and self.lambda_lr_scale > 0,
            "lambda_lr_scale",
            f"must be in (0, {MAX_LAMBDA_LR_SCALE:g}], got {self.lambda_lr_scale!r}",
        )
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            _check(in_range(value, 0, 1) and value < 1, name, f"must be in [0, 1), got {value!r}")
        _check(
            in_range(self.grad_clip, 0, MAX_GRAD_CLIP),
            "grad_clip",
            f"must be in [0, {MAX_GRAD_CLIP}] (0 disables clipping), got {self.grad_clip!r}",
        )
        _check(
            self.precision in PRECISIONS,
            "precision",
            f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}",
        )
        _check(
            self.device in DEVICES or _CUDA_DEVICE.fullmatch(self.device) is not None,
            "device",
            f"unknown device {self.device!r}; choose auto, cpu, cuda or cuda:N",
        )
        _check(
            self.peak_flops is None
            or (in_range(self.peak_flops, 0, MAX_PEAK_FLOPS) and self.peak_flops > 0),
            "peak_flops",
            f"must be in (0, {MAX_PEAK_FLOPS:g}] or null, got {self.peak_flops!r}",
        )


_MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(TruthGPTConfig))
_TRAIN_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))


@dataclasses.dataclass(kw_only=True)
class TruthGPTOptimizationCoreConfig(TrainConfig, TruthGPTConfig):
    """The original design's flat config: model fields and training settings side by side."""

    def __post_init__(self) -> None:
        TruthGPTConfig.__post_init__(self)
        TrainConfig.__post_init__(self)

    def validate(self) -> None:
        TruthGPTConfig.validate(self)
        TrainConfig.validate(self)

    @property
    def model_config(self) -> TruthGPTConfig:
        return TruthGPTConfig(**{name: getattr(self, name) for name in _MODEL_FIELDS})

    @property
    def train_config(self) -> TrainConfig:
        return TrainConfig(**{name: getattr(self, name) for name in _TRAIN_FIELDS})

    @classmethod
    def from_parts(
        cls, model: TruthGPTConfig, train: TrainConfig
    ) -> TruthGPTOptimizationCoreConfig:
        return cls(**model.to_dict(), **train.to_dict())


# Named starting points. `char-small` is nanoGPT's CPU Shakespeare config; `seed` is the
# original design's demo model.
PRESETS: dict[str, dict[str, Any]] = {
    "char-small": dict(
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=64,
        block_size=64,
        batch_size=12,
        learning_rate=1e-3,
        min_lr=1e-4,
        warmup_steps=100,
        max_steps=2000,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    ),
    "seed": dict(
        hidden_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        intermediate_size=2048,
        max_position_embeddings=64,
        block_size=64,
        batch_size=4,
        learning_rate=3e-4,
        min_lr=3e-5,
        warmup_steps=100,
        max_steps=2000,
    ),
}


def preset(name: str) -> dict[str, Any]:
    """The fields of a named preset (a copy), or a clear error listing the valid names."""
    if name not in PRESETS:
        raise ConfigError(f"preset: unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dict(PRESETS[name])


def is_int(value: Any) -> bool:
    """An int that is not a bool (JSON true would otherwise pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int or float that is not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool)
