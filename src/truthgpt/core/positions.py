"""Rotary position embeddings (RoPE): positions as rotations of q and k.

Each pair of dims (d, d + R/2) of the first R = `rotary_dim` dims of every head turns by the
angle pos·θ^(−2d/R) (the Llama/GPT-NeoX layout); the other dims carry no position. Why it
suits distance attention: a rotation keeps Euclidean lengths, so for l2 (and sql2, dot,
cosine) ‖R_i q − R_j k‖ = ‖q − R_(j−i) k‖ depends on positions only through j − i — exactly
relative. l1, chebyshev and lp are not rotation-invariant: for them RoPE is relative only
approximately (the scores still change with i and j, not only with i − j).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RotaryEmbedding(nn.Module):
    """cos and sin of every position's angles, for `apply_rotary`.

    The frequencies are computed at each call (R/2 numbers, once per forward, not per layer)
    rather than kept in a buffer: nothing about positions is saved or has to be restored,
    and a model built on the meta device (as loaders do) needs no step to fill them in."""

    def __init__(self, rotary_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        if rotary_dim < 2 or rotary_dim % 2:
            raise ValueError(f"rotary_dim must be an even number >= 2, got {rotary_dim}")
        self.rotary_dim = rotary_dim
        self.theta = theta

    def extra_repr(self) -> str:
        return f"rotary_dim={self.rotary_dim}, theta={self.theta}"

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions (T,) or (B, T) → cos, sin of shape (1, 1, T, R) or (B, 1, T, R), fp32."""
        R = self.rotary_dim
        exponents = torch.arange(0, R, 2, device=positions.device, dtype=torch.float64) / R
        inv_freq = (1.0 / self.theta**exponents).float()
        angles = positions.to(torch.float32)[..., None] * inv_freq  # (…, T, R/2)
        angles = torch.cat([angles, angles], dim=-1)
        cos, sin = angles.cos(), angles.sin()
        if positions.dim() == 1:
            return cos[None, None], sin[None, None]
        return cos[:, None], sin[:, None]


def apply_rotary(x: Tensor, cos_sin: tuple[Tensor, Tensor]) -> Tensor:
    """x (B, H, T, D) with its first R dims rotated by (cos, sin) from `RotaryEmbedding`."""
    cos, sin = cos_sin
    R = cos.shape[-1]
    rot, rest = x[..., :R].float(), x[..., R:]
    half = R // 2
    turned = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    rotated = (rot * cos + turned * sin).to(x.dtype)
    return torch.cat([rotated, rest], dim=-1) if rest.shape[-1] else rotated
