"""Every size, count and rate of the configs has an upper bound, so that a config (which a
checkpoint carries) can never ask for an allocation or a loop no machine finishes; a number
too large for a float is refused like any other."""

from __future__ import annotations

import pytest

from truthgpt import config as limits
from truthgpt.config import ConfigError, TrainConfig, TruthGPTConfig

SIZES = [
    ("vocab_size", limits.MAX_VOCAB_SIZE, {}),
    ("hidden_size", limits.MAX_HIDDEN_SIZE, {}),
    ("num_hidden_layers", limits.MAX_LAYERS, {}),
    ("num_attention_heads", limits.MAX_ATTENTION_HEADS, {"hidden_size": 2048}),
    ("intermediate_size", limits.MAX_INTERMEDIATE_SIZE, {}),
    ("max_position_embeddings", limits.MAX_POSITIONS, {}),
]


@pytest.mark.parametrize(("field", "limit", "others"), SIZES)
def test_model_sizes_have_an_upper_bound(field: str, limit: int, others: dict) -> None:
    fields = {"vocab_size": 40, **others}
    assert getattr(TruthGPTConfig(**{**fields, field: limit}), field) == limit
    for value in (limit + 1, 2**63, 10**400):
        with pytest.raises(ConfigError, match=rf"^{field}: must be a positive integer ≤ {limit}"):
            TruthGPTConfig(**{**fields, field: value})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("lambda_param", 1e4),
        ("lambda_param", 10**400),
        ("p_norm", 65.0),
        ("layer_norm_eps", 2.0),
    ],
)
def test_model_numbers_have_an_upper_bound(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=rf"^{field}: "):
        TruthGPTConfig(vocab_size=40, **{field: value})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("learning_rate", 1e300),
        ("learning_rate", 10**400),
        ("weight_decay", 1e300),
        ("grad_clip", 1e300),
        ("peak_flops", 2.0**63),
        ("seed", 2**63),
        ("max_steps", 2**63),
        ("batch_size", 2**21),
        ("block_size", 2**21),
        ("gradient_accumulation_steps", 2**17),
        ("keep_checkpoints", 2**17),
        ("eval_batches", 2**63),
        ("device", "cuda:x"),
    ],
)
def test_training_values_have_an_upper_bound(field: str, value) -> None:
    with pytest.raises(ConfigError, match=rf"^{field}: "):
        TrainConfig(**{field: value})
