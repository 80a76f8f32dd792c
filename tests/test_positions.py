"""Positions: learned, rope, alibi and none, in the config, the model, the cache and generation.

RoPE is checked against rotations written here in complex numbers (float64); ALiBi against
attention with the bias added by hand (tests/test_alibi.py does the kernels)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from truthgpt.config import ConfigError, TruthGPTConfig
from truthgpt.nn.attention import DistanceAttention, kinds
from truthgpt.nn.cache import KVCache
from truthgpt.nn.model import TruthGPTModel
from truthgpt.nn.positions import RotaryEmbedding, apply_rotary

POSITIONS = ("learned", "rope", "alibi", "none")


def config(position: str, kind: str = "l1", **changes) -> TruthGPTConfig:
    fields = dict(
        vocab_size=61,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        distance_type=kind,
        position_embedding=position,
    )
    return TruthGPTConfig(**(fields | changes))


def model(position: str, kind: str = "l1", seed: int = 0, **changes) -> TruthGPTModel:
    torch.manual_seed(seed)
    m = TruthGPTModel(config(position, kind, **changes)).eval()
    with torch.no_grad():  # sharper weights than the init, so positions visibly matter
        for p in m.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
    return m


def rotate_by_hand(x: torch.Tensor, positions: torch.Tensor, R: int, theta: float):
    """Dims (d, d + R/2) as one complex number, times e^(i·pos·θ^(−2d/R)), in float64."""
    x = x.double()
    half = R // 2
    z = torch.complex(x[..., :half], x[..., half:R])
    freq = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / R)
    angle = positions.double()[:, None] * freq  # (T, R/2)
    z = z * torch.polar(torch.ones_like(angle), angle)
    return torch.cat([z.real, z.imag, x[..., R:]], dim=-1)


@pytest.mark.parametrize("factor", [1.0, 0.5])
def test_rope_rotates_pairs_of_dims_by_position(factor):
    D, theta = 8, 100.0
    R = int(D * factor) // 2 * 2
    x = torch.randn(2, 3, 5, D, dtype=torch.float64)
    positions = torch.tensor([0, 1, 2, 7, 30])
    got = apply_rotary(x, RotaryEmbedding(R, theta)(positions))
    torch.testing.assert_close(got, rotate_by_hand(x, positions, R, theta), atol=1e-6, rtol=1e-6)


def test_rope_makes_l2_exactly_relative_and_l1_not():
    """‖R_i q − R_j k‖₂ depends on j − i only (rotations keep lengths); l1 does not."""
    rope = RotaryEmbedding(16, 10000.0)
    q, k = torch.randn(1, 1, 1, 16, dtype=torch.float64), torch.randn(1, 1, 1, 16).double()

    def distances(i: int, j: int, p: float) -> float:
        qi = apply_rotary(q, rope(torch.tensor([i])))
        kj = apply_rotary(k, rope(torch.tensor([j])))
        return float((qi - kj).abs().pow(p).sum() ** (1 / p))

    for shift in (1, 17, 1000):
        assert distances(3, 1, 2.0) == pytest.approx(distances(3 + shift, 1 + shift, 2.0), 1e-5)
    assert abs(distances(3, 1, 1.0) - distances(1003, 1001, 1.0)) > 1e-3


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"position_embedding": "sinusoidal"}, "position_embedding"),
        ({"rope_theta": 0.5}, "rope_theta"),
        ({"rope_theta": math.inf}, "rope_theta"),
        ({"partial_rotary_factor": 0.0}, "partial_rotary_factor"),
        ({"partial_rotary_factor": 1.5}, "partial_rotary_factor"),
        ({"position_embedding": "rope", "partial_rotary_factor": 0.1}, "partial_rotary_factor"),
    ],
)
def test_bad_position_settings_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=f"^{field}:"):
        config("learned", **changes)


def test_old_configs_load_as_learned_positions(tmp_path: Path):
    """A config.json written before positions were configurable has no such field."""
    data = config("learned").to_dict()
    for name in ("position_embedding", "rope_theta", "partial_rotary_factor"):
        del data[name]
    assert TruthGPTConfig.from_dict(data).position_embedding == "learned"


@pytest.mark.parametrize("position", POSITIONS)
def test_only_the_learned_table_has_a_length(position):
    m = model(position)
    long = torch.randint(0, 61, (1, 40))  # 2.5× max_position_embeddings
    if position == "learned":
        assert m.wpe is not None
        with pytest.raises(ValueError, match="exceeds max_position_embeddings=16"):
            m(long)
    else:
        assert m.wpe is None and "wpe.weight" not in m.state_dict()
        assert m(long).logits.shape == (1, 40, 61)


@pytest.mark.parametrize("position", ["rope", "alibi", "none"])
@pytest.mark.parametrize("kind", ["l1", "l2", "dot"])
def test_cache_and_padding_past_the_trained_window(position, kind):
    """Decoding with a cache equals the full forward at 3× the table length, and a left-padded
    batch equals each row alone."""
    m = model(position, kind)
    ids = torch.randint(0, 61, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = m(ids).logits
        cache = KVCache(len(m.blocks))
        steps = [m(ids[:, :20], past_key_values=cache).logits]
        steps += [m(ids[:, t : t + 1], past_key_values=cache).logits for t in range(20, 48)]
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=2e-5, rtol=1e-4)
        short = ids[1:, 30:]  # 18 tokens, left-padded to 48
        mask = torch.zeros(1, 48, dtype=torch.long)
        mask[:, 30:] = 1
        padded = m(ids[1:], attention_mask=mask).logits[:, 30:]
        torch.testing.assert_close(padded, m(short).logits, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("position", ["rope", "alibi", "none"])
def test_generation_goes_past_the_window_without_sliding(position):
    """No window: the model sees the whole context, and the cache changes nothing."""
    m = model(position)
    prompt = torch.randint(0, 61, (1, 10), generator=torch.Generator().manual_seed(2))
    cached = m.generate(prompt, 40, do_sample=False)
    uncached = m.generate(prompt, 40, do_sample=False, use_cache=False)
    assert cached.shape == (1, 50) and torch.equal(cached, uncached)
    with torch.no_grad():  # the last token is greedy on the full 49-token context
        assert int(m(cached[:, :-1]).logits[0, -1].argmax()) == int(cached[0, -1])


def reference_alibi_layer(layer: DistanceAttention, x: torch.Tensor) -> torch.Tensor:
    """The layer written out in float64: projections, −λ·d − m·(i − j), causal softmax."""
    from test_alibi import reference
    from truthgpt.nn.attention.functional import alibi_slopes

    q, k, v = (t.double() for t in layer.project(x))
    out = reference(q, k, v, layer.distance_type, layer.lambda_.double(), alibi_slopes(4))
    B, T, C = x.shape
    out = out.transpose(1, 2).reshape(B, T, C)
    return out @ layer.c_proj.weight.double().T + layer.c_proj.bias.double()


@pytest.mark.parametrize("kind", ["l1", "l2", "dot"])
def test_alibi_layer_adds_the_slopes_to_its_scores(kind):
    torch.manual_seed(0)
    layer = DistanceAttention(32, 4, kind, alibi=True).eval()
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            layer(x).output.double(), reference_alibi_layer(layer, x), atol=2e-5, rtol=1e-4
        )
        plain = DistanceAttention(32, 4, kind)
        plain.load_state_dict(layer.state_dict())  # same weights, no position term
        assert not torch.allclose(plain(x).output, layer(x).output, atol=1e-3)


@pytest.mark.parametrize("position", POSITIONS)
def test_save_and_load_keep_the_positions(position, tmp_path: Path):
    m = model(position, rope_theta=500.0, partial_rotary_factor=0.5)
    m.save_pretrained(tmp_path / "m")
    loaded = TruthGPTModel.from_pretrained(tmp_path / "m")
    assert loaded.config.position_embedding == position
    ids = torch.randint(0, 61, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, m(ids).logits)


def test_every_kind_runs_with_every_position():
    ids = torch.randint(0, 61, (1, 16))
    for kind in kinds.builtin_names():
        for position in POSITIONS:
            logits = model(position, kind, p_norm=3.0 if kind == "lp" else None)(ids).logits
            assert torch.isfinite(logits).all(), (kind, position)
