"""Sampling from a TruthGPT model: greedy, temperature, top-k, top-p, with a KV cache.

The cache holds each layer's projected keys and values, so a new token costs one query against
the cached keys instead of a forward pass over the whole context. Learned absolute positions
cap the context at `max_position_embeddings`; past it the window slides: the oldest tokens are
dropped and the cache is rebuilt from the tokens that remain.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol, TextIO

import torch
from torch import Tensor

if TYPE_CHECKING:
    from truthgpt.model import PastKeyValues, TruthGPTModel


class Streamer(Protocol):
    """Receives tokens as they are produced (the Hugging Face streamer convention)."""

    def put(self, token_ids: Tensor) -> None: ...

    def end(self) -> None: ...


def check_sampling_args(
    temperature: float, top_k: int | None, top_p: float | None, max_new_tokens: int
) -> None:
    """Reject values that have no meaning, naming the argument."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: must be an integer ≥ 0, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature: must be ≥ 0 (0 means greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k: must be a positive integer or None, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p: must be in (0, 1], got {top_p!r}")


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Set to −inf every logit outside the top-k and outside the top-p nucleus.

    The nucleus is the smallest set of most likely tokens whose probability reaches `top_p`;
    the most likely token is always kept.
    """
    logits = logits.clone()
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits[logits < kth] = float("-inf")
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p.
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits[drop] = float("-inf")
    return logits


def next_token(
    logits: Tensor,
    *,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    do_sample: bool,
    generator: torch.Generator | None,
) -> Tensor:
    """Pick the next token (B, 1) from last-position logits (B, vocab)."""
    if not do_sample or temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = filter_logits(logits.float() / temperature, top_k=top_k, top_p=top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


def generate(
    model: TruthGPTModel,
    input_ids: Tensor | Sequence[int],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    do_sample: bool = True,
    eos_token_id: int | None = None,
    seed: int | None = None,
    streamer: Streamer | None = None,
    use_cache: bool = True,
) -> Tensor:
    """Return `input_ids` followed by the generated tokens, shape (B, T + new).

    Generation stops early once every row has produced `eos_token_id`; rows that finished
    earlier are padded with it.
    """
    check_sampling_args(temperature, top_k, top_p, max_new_tokens)
    if not isinstance(input_ids, Tensor):
        input_ids = torch.tensor([list(input_ids)], dtype=torch.long)
    if input_ids.dim() == 1:
        input_ids = input_ids[None, :]
    if input_ids.dim() != 2 or input_ids.size(1) == 0:
        raise ValueError(f"input_ids: expected a non-empty (batch, length) prompt, got "
                         f"shape {tuple(input_ids.shape)}")
    device = model.device
    input_ids = input_ids.to(device)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)

    was_training = model.training
    model.eval()
    window = model.config.max_position_embeddings
    # When the cache fills, keep this many tokens and rebuild; the slack avoids rebuilding at
    # every single step once the context is full.
    keep = max(1, window - max(1, window // 4))
    tokens = input_ids
    finished = torch.zeros(tokens.size(0), dtype=torch.bool, device=device)
    past: PastKeyValues | None = None
    try:
        for _ in range(max_new_tokens):
            if not use_cache:
                logits = model(tokens[:, -window:]).logits[:, -1, :]
            else:
                if past is None or past[0][0].size(-2) + 1 > window:
                    context = tokens[:, -(keep if past is not None else window):]
                    out = model(context, use_cache=True)
                else:
                    out = model(tokens[:, -1:], past_key_values=past, use_cache=True)
                past = out.past_key_values
                logits = out.logits[:, -1, :]
            token = next_token(
                logits,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                do_sample=do_sample,
                generator=generator,
            )
            if eos_token_id is not None:
                token = torch.where(finished[:, None], eos_token_id, token)
                finished |= token.squeeze(-1) == eos_token_id
            tokens = torch.cat([tokens, token], dim=1)
            if streamer is not None:
                streamer.put(token.cpu())
            if eos_token_id is not None and bool(finished.all()):
                break
    finally:
        if streamer is not None:
            streamer.end()
        model.train(was_training)
    return tokens


class TextStreamer:
    """Prints text as tokens arrive, decoding the whole sequence so multi-byte pieces join up."""

    def __init__(self, decode: Callable[[list[int]], str], file: TextIO | None = None) -> None:
        self.decode = decode
        self.file = file if file is not None else sys.stdout
        self.ids: list[int] = []
        self.printed = 0

    def put(self, token_ids: Tensor) -> None:
        self.ids.extend(int(t) for t in token_ids.reshape(-1)[:1])
        text = self.decode(self.ids)
        # Hold back a trailing replacement char: the next token may complete it.
        stable = text.rstrip("\ufffd")
        if len(stable) > self.printed:
            self.file.write(stable[self.printed :])
            self.file.flush()
            self.printed = len(stable)

    def end(self) -> None:
        text = self.decode(self.ids)
        if len(text) > self.printed:
            self.file.write(text[self.printed :])
        self.file.write("\n")
        self.file.flush()
