"""The KV cache of generation: keys and values in preallocated buffers, appended in place.

`TruthGPTModel` also takes the Hugging Face layout (a tuple of (k, v) per layer), which it
extends by concatenation; generation uses `KVCache`, which copies each new token once.
"""

from __future__ import annotations

from torch import Tensor


class LayerCache:
    """One layer's keys and values in buffers that grow by doubling (or are sized up front):
    a decoding step writes its keys and values in place, where concatenating would copy the
    whole cache at every token (O(T²) copying over a generation)."""

    def __init__(self, capacity: int = 0) -> None:
        self.capacity = capacity
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self.length = 0

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Add (B, H, T, D) keys and values; returns views of all of them so far."""
        B, H, T, D = k.shape
        end = self.length + T
        if self.k is not None and (self.k.shape[:2] != (B, H) or self.k.shape[3] != D):
            raise ValueError(
                f"past_key_value: the cache holds (B, H, ·, D) = {tuple(self.k.shape)}, "
                f"got new keys of shape {tuple(k.shape)}"
            )
        if self.k is None or self.v is None or end > self.k.shape[2]:
            size = max(end, self.capacity, 2 * (self.k.shape[2] if self.k is not None else 0))
            new_k, new_v = k.new_empty(B, H, size, D), v.new_empty(B, H, size, D)
            if self.k is not None and self.v is not None:
                new_k[:, :, : self.length] = self.k[:, :, : self.length]
                new_v[:, :, : self.length] = self.v[:, :, : self.length]
            self.k, self.v = new_k, new_v
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """Every layer's keys and values, preallocated (`capacity` positions, doubling past it):
    pass it as `past_key_values` and each step appends in place, where the tuple form
    copies the whole cache at every token."""

    def __init__(self, num_layers: int, capacity: int = 0) -> None:
        self.layers = [LayerCache(capacity) for _ in range(num_layers)]

    @property
    def length(self) -> int:
        """Positions cached so far."""
        return self.layers[0].length
