"""Sampling from a TruthGPT model: greedy, temperature, top-k, top-p, with a KV cache.

The cache holds each layer's projected keys and values, so a new token costs one query against
the cached keys instead of a forward pass over the whole context. It works the same for every
distance kind: scores are always computed from the cached k against the new q.

Rotary, ALiBi and no positions take any length: the context grows with the output, and the
cache with it. Learned absolute positions cap the context at `max_position_embeddings` (the
window). Past it
the window slides: the oldest tokens are dropped, the newest `keep = window - window // 4` are
kept and re-encoded from position 0 (one full forward that rebuilds the cache), and decoding
goes on one token at a time until the window is full again. Sliding by a quarter window at once,
instead of by one token at every step, is what keeps the cache useful on long outputs: a
one-token slide would shift every position and force a full forward per token.

`use_cache=False` follows the very same window schedule with full forwards, so the cache only
changes speed, never the tokens: the two agree (up to float rounding) at any length.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol, TextIO

import torch
from torch import Tensor

from .cache import KVCache
from .config import is_int
from .inputs import check_token_ids

if TYPE_CHECKING:
    from .model import TruthGPTModel


class Streamer(Protocol):
    """Receives tokens as they are produced (the Hugging Face streamer convention)."""

    def put(self, token_ids: Tensor) -> None: ...

    def end(self) -> None: ...


# A bound on one call's output: past it a typo (an extra zero or two) would run for hours.
MAX_NEW_TOKENS = 1_000_000


def check_sampling_args(
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    max_new_tokens: int,
    *,
    eos_token_id: int | None = None,
    seed: int | None = None,
    vocab_size: int | None = None,
) -> None:
    """Reject values that have no meaning, naming the argument and what would be valid."""
    if not is_int(max_new_tokens) or not 0 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise ValueError(
            f"max_new_tokens: must be an integer in [0, {MAX_NEW_TOKENS:,}], got {max_new_tokens!r}"
        )
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, int | float)
        or not math.isfinite(temperature)
        or temperature < 0
    ):
        raise ValueError(
            f"temperature: must be a finite number ≥ 0 (0 means greedy), got {temperature!r}"
        )
    if top_k is not None and (not is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k: must be a positive integer or None, got {top_k!r}")
    if top_p is not None and (
        isinstance(top_p, bool) or not isinstance(top_p, int | float) or not 0.0 < top_p <= 1.0
    ):
        raise ValueError(f"top_p: must be in (0, 1], got {top_p!r}")
    if eos_token_id is not None and (
        not is_int(eos_token_id)
        or eos_token_id < 0
        or (vocab_size is not None and eos_token_id >= vocab_size)
    ):
        valid = f"[0, {vocab_size})" if vocab_size is not None else "≥ 0"
        raise ValueError(
            f"eos_token_id: must be a token id in {valid} or None, got {eos_token_id!r}"
        )
    if seed is not None and not is_int(seed):
        raise ValueError(f"seed: must be an integer or None, got {seed!r}")


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Set to −inf every logit outside the top-k and outside the top-p nucleus (Hugging Face rules).

    top-k keeps the k largest logits and every logit tied with the k-th, so the result never
    depends on how a sort orders equal values. top-p (applied after top-k) keeps the nucleus:
    the smallest set of most likely tokens whose probability reaches `top_p`, plus every token
    as likely as its least likely member (again so ties are treated alike). The most likely token
    is always kept, so sampling always has something to draw from.
    """
    logits = logits.clone()
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits[logits < kth] = float("-inf")
    if top_p is not None and top_p < 1.0:
        # float64 so a nucleus boundary does not move with float32 rounding of the cumsum.
        probs = logits.double().softmax(dim=-1)
        sorted_probs = probs.sort(dim=-1, descending=True).values
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        # The last token in the nucleus is the last whose preceding mass is still < top_p
        # (the first is always in: its preceding mass is 0).
        in_nucleus = mass_before < top_p
        last = in_nucleus.sum(dim=-1, keepdim=True) - 1
        threshold = sorted_probs.gather(-1, last)
        logits[probs < threshold] = float("-inf")
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
    """Pick the next token (B, 1) from last-position logits (B, vocab).

    Greedy (argmax, the lowest id on a tie) when `do_sample` is False or `temperature` is 0.
    """
    if not do_sample or temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = filter_logits(logits.float() / temperature, top_k=top_k, top_p=top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


def slide_keep(window: int) -> int:
    """How many of the newest tokens stay in context when a full window slides."""
    return max(1, window - max(1, window // 4))


@torch.no_grad()
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

    `input_ids` is a (B, T) or (T,) tensor or a list of ids; rows share one length (no padding).
    With learned positions, a prompt longer than the window is cut to its last
    `max_position_embeddings` tokens for the model, but returned whole; with rope, alibi or
    none the model sees all of it. `seed` seeds a private generator, so the global RNG is untouched
    and the same seed gives the same sample. Generation stops early once every row has produced
    `eos_token_id` (the eos is kept in the output); rows that finished earlier are padded with it.
    The streamer gets each new (B,) column of tokens as it is chosen, then `end()`.
    """
    check_sampling_args(
        temperature,
        top_k,
        top_p,
        max_new_tokens,
        eos_token_id=eos_token_id,
        seed=seed,
        vocab_size=model.config.vocab_size,
    )
    if not isinstance(input_ids, Tensor):
        input_ids = torch.tensor(list(input_ids), dtype=torch.long)
    if input_ids.dim() == 1:
        input_ids = input_ids[None, :]
    if input_ids.dim() != 2 or input_ids.size(1) == 0:
        raise ValueError(
            f"input_ids: expected a non-empty (batch, length) prompt, got shape "
            f"{tuple(input_ids.shape)}"
        )
    if input_ids.device.type == "cpu":  # checked once here, not at every decoding step
        check_token_ids(input_ids, model.config.vocab_size)
    device = model.device
    tokens = input_ids.to(device=device, dtype=torch.long)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)

    was_training = model.training
    model.eval()
    window = model.config.position_limit or tokens.size(1) + max_new_tokens  # None: no limit
    keep = slide_keep(window)
    start = max(0, tokens.size(1) - window)  # first position the model sees
    finished = torch.zeros(tokens.size(0), dtype=torch.bool, device=device)
    past: KVCache | None = None  # k, v of tokens[start:-1] in every layer, preallocated
    try:
        for _ in range(max_new_tokens):
            if tokens.size(1) - start > window:  # the window is full: slide, rebuild the cache
                start = tokens.size(1) - keep
                past = None
            if not use_cache:
                logits = model(tokens[:, start:]).logits[:, -1, :]
            elif past is None:
                past = KVCache(len(model.blocks), capacity=window)
                logits = model(tokens[:, start:], past_key_values=past).logits[:, -1, :]
            else:
                logits = model(tokens[:, -1:], past_key_values=past).logits[:, -1, :]
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
                streamer.put(token.squeeze(-1).cpu())
            if eos_token_id is not None and bool(finished.all()):
                break
    finally:
        if streamer is not None:
            streamer.end()
        model.train(was_training)
    return tokens


class TextStreamer:
    """Writes text to a terminal (or any text file) as tokens arrive; one sequence only.

    It decodes everything received so far and writes what is new, rather than decoding token
    by token, so pieces that only make sense together (a multi-byte character split over
    byte-level BPE tokens) come out whole: a trailing U+FFFD is held back until the next token
    completes it, or until `end()`.
    """

    def __init__(self, decode: Callable[[list[int]], str], file: TextIO | None = None) -> None:
        self.decode = decode
        self.file = file if file is not None else sys.stdout
        self.ids: list[int] = []
        self.printed = 0  # characters of the decoded text already written

    def put(self, token_ids: Tensor) -> None:
        if token_ids.numel() != 1:
            raise ValueError(
                f"TextStreamer: streams one sequence (batch size 1), got {token_ids.numel()} "
                "tokens at once"
            )
        self.ids.append(int(token_ids.reshape(-1)[0]))
        self._write(self.decode(self.ids).rstrip("\ufffd"))

    def end(self) -> None:
        self._write(self.decode(self.ids))
        self.file.write("\n")
        self.file.flush()

    def _write(self, text: str) -> None:
        if len(text) > self.printed:
            self.file.write(text[self.printed :])
            self.file.flush()
            self.printed = len(text)
