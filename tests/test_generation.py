"""Generation: the KV cache equals full forwards for every kind; sampling, errors, streaming."""

from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import truthgpt.nn.generation as generation
from truthgpt.config import TruthGPTConfig
from truthgpt.nn.attention import default_lambda, kinds
from truthgpt.nn.generation import TextStreamer, filter_logits, next_token, slide_keep
from truthgpt.nn.model import TruthGPTModel

VOCAB = 17


def tiny_model(kind: str = "l1", window: int = 64, seed: int = 0) -> TruthGPTModel:
    """A small model with weights wide enough that attention is far from uniform.

    GPT-2 init (std 0.02) gives nearly uniform attention and tiny logits, which would let a
    wrong cache pass a 1e-5 comparison. std 0.3 on the q/k/v projection makes the scores O(1)
    (sharp attention); std 0.1 elsewhere keeps the logits O(1), where float32 rounding stays
    well under 1e-5. λ is the kind's default for 16-wide heads, without the model's width
    scaling (which would double it at width 32 on top of std 0.3).
    """
    torch.manual_seed(seed)
    p = 3.0 if kind == "lp" else None
    config = TruthGPTConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=window,
        distance_type=kind,
        lambda_param=default_lambda(kind, 16, p=p),
    )
    model = TruthGPTModel(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.3 if "c_attn" in name else 0.1)
    return model.eval()


def prompt(length: int = 5, batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------
# the KV cache


@pytest.mark.parametrize("kind", kinds.names())
def test_cached_logits_equal_full_forward_every_step(kind: str) -> None:
    """55 cached steps: each step's logits equal a full forward on the whole prefix."""
    model = tiny_model(kind, window=64)
    steps, start = 55, 6
    seq = prompt(start + steps, batch=2)
    with torch.no_grad():
        out = model(seq[:, :start], use_cache=True)
        past = out.past_key_values
        full = model(seq[:, :start]).logits[:, -1]
        assert torch.allclose(out.logits[:, -1], full, atol=1e-5, rtol=0)
        spread = []
        for t in range(start, start + steps):
            out = model(seq[:, t : t + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values
            assert past[0][0].shape[-2] == t + 1
            full = model(seq[:, : t + 1]).logits[:, -1]
            torch.testing.assert_close(out.logits[:, -1], full, atol=1e-5, rtol=0)
            if t % 10 == 0:
                # The same token at a shifted position gives clearly different logits, so the
                # comparison above would catch a cache with wrong positions or a lost key.
                shifted = model(seq[:, 1 : t + 1]).logits[:, -1]
                spread.append(float((shifted - full).abs().max()))
    assert min(spread) > 1e-2


def recorded_logits(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """Make `generate` record the logits it picks each token from."""
    seen: list[torch.Tensor] = []
    original = generation.next_token

    def spy(logits: torch.Tensor, **kwargs) -> torch.Tensor:
        seen.append(logits.clone())
        return original(logits, **kwargs)

    monkeypatch.setattr(generation, "next_token", spy)
    return seen


@pytest.mark.parametrize("kind", ["dot", "l1", "chebyshev"])
def test_sliding_window_rebuilds_cache_exactly(kind: str, monkeypatch) -> None:
    """Past the window the cache is rebuilt on the kept tokens; logits equal fresh forwards."""
    window, start_len, new = 12, 5, 30
    model = tiny_model(kind, window=window)
    seen = recorded_logits(monkeypatch)
    tokens = model.generate(prompt(start_len), new, do_sample=False)
    assert tokens.shape == (1, start_len + new)
    assert len(seen) == new

    # The documented schedule: the context grows to the window, then slides to the newest `keep`.
    keep, start, slides = slide_keep(window), 0, 0
    with torch.no_grad():
        for i, logits in enumerate(seen):
            n = start_len + i  # tokens known before step i
            if n - start > window:
                start, slides = n - keep, slides + 1
            fresh = model(tokens[:, start:n]).logits[:, -1]
            torch.testing.assert_close(logits, fresh, atol=1e-5, rtol=0)
    assert slides >= 2

    # use_cache=False follows the same schedule, so the tokens are the same.
    seen.clear()
    no_cache = model.generate(prompt(start_len), new, do_sample=False, use_cache=False)
    assert torch.equal(no_cache, tokens)


@pytest.mark.parametrize("kind", ["dot", "l1"])
def test_sliding_window_follows_the_documented_rule(kind: str) -> None:
    """An independent greedy loop of plain full forwards, written from the README's rule: a
    full window of 12 slides to its newest 12 − 12 // 4 = 9 tokens. `generate` (cached or
    not) must produce the same tokens."""
    window, kept = 12, 9
    model = tiny_model(kind, window=window)
    tokens, first, slides = prompt(5)[0].tolist(), 0, 0
    with torch.no_grad():
        for _ in range(30):
            if len(tokens) - first > window:
                first, slides = len(tokens) - kept, slides + 1
            logits = model(torch.tensor([tokens[first:]])).logits[0, -1]
            tokens.append(int(logits.argmax()))
    assert slides >= 2
    for use_cache in (True, False):
        out = model.generate(prompt(5), 30, do_sample=False, use_cache=use_cache)
        assert out[0].tolist() == tokens


def test_prompt_longer_than_window_is_kept_whole() -> None:
    model = tiny_model("l2", window=8)
    ids = prompt(20)
    out = model.generate(ids, 10, do_sample=False)
    assert out.shape == (1, 30)
    assert torch.equal(out[:, :20], ids)
    assert torch.equal(out, model.generate(ids, 10, do_sample=False, use_cache=False))


@pytest.mark.parametrize("kind", kinds.names())
def test_greedy_is_deterministic_and_equals_cacheless(kind: str) -> None:
    model = tiny_model(kind, window=64)
    ids = prompt(4, batch=2)
    first = model.generate(ids, 40, do_sample=False)
    assert torch.equal(first, model.generate(ids, 40, do_sample=False))
    assert torch.equal(first, model.generate(ids, 40, do_sample=False, use_cache=False))
    # Greedy really is the argmax of the model's next-token logits.
    with torch.no_grad():
        for t in range(4, 44):
            assert torch.equal(first[:, t], model(first[:, :t]).logits[:, -1].argmax(-1))


# --------------------------------------------------------------------------------------------
# sampling


def test_seed_reproduces_samples_and_leaves_global_rng_alone() -> None:
    model = tiny_model("l1")
    ids = prompt(4)
    state = torch.random.get_rng_state()
    a = model.generate(ids, 30, seed=123)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a, model.generate(ids, 30, seed=123))
    assert torch.equal(a, model.generate(ids, 30, seed=123, use_cache=False))
    assert not torch.equal(a, model.generate(ids, 30, seed=124))


def test_temperature_zero_and_do_sample_false_mean_argmax() -> None:
    model = tiny_model("cosine")
    ids = prompt(4)
    greedy = model.generate(ids, 20, do_sample=False)
    assert torch.equal(greedy, model.generate(ids, 20, temperature=0.0, seed=5))
    assert torch.equal(greedy, model.generate(ids, 20, temperature=0, top_k=3, top_p=0.5))
    logits = torch.tensor([[0.1, 2.0, -1.0, 2.0]])
    for temperature, do_sample in ((0.0, True), (5.0, False)):
        pick = next_token(
            logits,
            temperature=temperature,
            top_k=None,
            top_p=None,
            do_sample=do_sample,
            generator=None,
        )
        assert pick.tolist() == [[1]]  # the first of the tied maxima


def test_sampling_draws_only_from_the_filtered_set() -> None:
    logits = torch.tensor([[4.0, 3.0, 2.5, 0.0, -1.0]]).repeat(400, 1)
    gen = torch.Generator().manual_seed(0)

    def drawn(temperature: float, top_k: int | None, top_p: float | None) -> set[int]:
        picks = next_token(
            logits,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            do_sample=True,
            generator=gen,
        )
        return set(picks.flatten().tolist())

    assert {0, 1, 2} <= drawn(1.0, None, None)  # unfiltered: more than the top 2
    assert drawn(1.0, 2, None) == {0, 1}
    assert drawn(1.0, None, 0.5) == {0}  # p(token 0) = 0.62 already reaches 0.5
    assert drawn(1e-3, None, None) == {0}  # a very low temperature is nearly greedy


def kept(logits: torch.Tensor) -> list[int]:
    return torch.isfinite(logits).nonzero().flatten().tolist()


def test_top_k_keeps_the_k_largest_and_ties() -> None:
    logits = torch.tensor([1.0, 3.0, 2.0, 0.0, -2.0])
    assert kept(filter_logits(logits, top_k=1)) == [1]
    assert kept(filter_logits(logits, top_k=2)) == [1, 2]
    assert kept(filter_logits(logits, top_k=5)) == [0, 1, 2, 3, 4]
    assert kept(filter_logits(logits, top_k=50)) == [0, 1, 2, 3, 4]
    # Every logit tied with the k-th is kept: the result must not depend on sort order.
    tied = torch.tensor([1.0, 3.0, 2.0, 2.0, 0.0])
    assert kept(filter_logits(tied, top_k=2)) == [1, 2, 3]
    # Kept values are unchanged, and the input is not modified.
    out = filter_logits(logits, top_k=2)
    assert out[1] == 3.0 and out[2] == 2.0 and logits[0] == 1.0


def test_top_p_keeps_the_smallest_nucleus() -> None:
    probs = torch.tensor([0.1, 0.5, 0.15, 0.25])
    logits = probs.log()
    # Sorted: 0.5 (index 1), 0.25 (3), 0.15 (2), 0.1 (0); cumulative 0.5, 0.75, 0.9, 1.0.
    assert kept(filter_logits(logits, top_p=0.3)) == [1]  # the top token alone reaches 0.3
    assert kept(filter_logits(logits, top_p=1e-9)) == [1]  # the top token is always kept
    assert kept(filter_logits(logits, top_p=0.6)) == [1, 3]
    assert kept(filter_logits(logits, top_p=0.8)) == [1, 2, 3]
    assert kept(filter_logits(logits, top_p=0.95)) == [0, 1, 2, 3]
    assert kept(filter_logits(logits, top_p=1.0)) == [0, 1, 2, 3]
    # Tokens as likely as the nucleus's least likely member are kept too.
    tied = torch.tensor([0.4, 0.3, 0.3]).log()
    assert kept(filter_logits(tied, top_p=0.5)) == [0, 1, 2]
    top_tie = torch.tensor([2.0, 0.0, 2.0])
    assert kept(filter_logits(top_tie, top_p=0.01)) == [0, 2]


def test_top_p_at_exactly_the_cumulative_mass() -> None:
    """Probabilities 1/2, 1/4, 1/8, 1/8 are exact in binary, so the masses before each sorted
    token are exactly 0, 0.5, 0.75, 0.875. A nucleus is the smallest set that reaches top_p:
    a top_p equal to a cumulative mass is reached there, and no further token is needed."""
    probs = torch.tensor([0.125, 0.5, 0.125, 0.25], dtype=torch.float64)
    logits = probs.log()
    assert kept(filter_logits(logits, top_p=0.5)) == [1]  # 1/2 reaches 0.5
    assert kept(filter_logits(logits, top_p=0.75)) == [1, 3]  # 1/2 + 1/4 reaches 0.75
    assert kept(filter_logits(logits, top_p=0.5 + 2**-20)) == [1, 3]
    assert kept(filter_logits(logits, top_p=0.75 - 2**-20)) == [1, 3]
    # Past 0.75 a third token is needed, and the fourth is as likely as it: both are kept.
    assert kept(filter_logits(logits, top_p=0.75 + 2**-20)) == [0, 1, 2, 3]
    assert kept(filter_logits(logits, top_p=0.875)) == [0, 1, 2, 3]


def test_top_k_then_top_p_and_rows_are_independent() -> None:
    logits = torch.tensor([[0.1, 0.5, 0.15, 0.25], [0.7, 0.1, 0.1, 0.1]]).log()
    out = filter_logits(logits, top_k=3, top_p=0.9)
    # Row 0: top-3 leaves 0.5, 0.25, 0.15 (renormalised 0.556, 0.278, 0.167); 0.9 needs all.
    assert kept(out[0]) == [1, 2, 3]
    assert kept(out[1]) == [0, 1, 2, 3]  # 0.7 then three ties at 0.1: all tied with the 2nd
    out = filter_logits(logits, top_p=0.72)
    assert kept(out[0]) == [1, 3]
    assert kept(out[1]) == [0, 1, 2, 3]


@settings(max_examples=60, deadline=None)
@given(
    # allow_subnormal=False: a compiled kernel built with fast math may have switched the
    # process to flushing subnormals, which hypothesis refuses to generate under.
    values=st.lists(st.floats(-5, 5, allow_subnormal=False), min_size=1, max_size=12),
    top_p=st.floats(1e-3, 1.0, allow_subnormal=False),
)
def test_top_p_nucleus_properties(values: list[float], top_p: float) -> None:
    logits = torch.tensor(values, dtype=torch.float64)
    probs = logits.softmax(-1)
    mask = torch.isfinite(filter_logits(logits, top_p=top_p))
    assert mask[probs.argmax()]  # the top token is in
    assert float(probs[mask].sum()) >= top_p - 1e-9  # the nucleus reaches top_p
    if (~mask).any():  # every kept token is more likely than every dropped one
        assert float(probs[mask].min()) > float(probs[~mask].max())
        # and the nucleus is minimal: without its least likely tokens it falls short of top_p
        smallest = probs[mask].min()
        assert float(probs[mask & (probs > smallest)].sum()) < top_p + 1e-9


# --------------------------------------------------------------------------------------------
# arguments


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": -0.1}, "top_p"),
        ({"top_p": math.nan}, "top_p"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": -3}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"max_new_tokens": 2.0}, "max_new_tokens"),
        ({"eos_token_id": VOCAB}, "eos_token_id"),
        ({"eos_token_id": -1}, "eos_token_id"),
        ({"seed": "x"}, "seed"),
    ],
)
def test_bad_arguments_name_the_field(kwargs: dict, field: str) -> None:
    model = tiny_model("dot")
    args = {"max_new_tokens": 3} | kwargs
    with pytest.raises(ValueError, match=field):
        model.generate(prompt(3), **args)


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        (torch.zeros(1, 0, dtype=torch.long), "non-empty"),
        (torch.tensor([[1, VOCAB]]), "outside the vocabulary"),
        (torch.tensor([[-1, 2]]), "outside the vocabulary"),
    ],
)
def test_bad_prompts_are_rejected(ids: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny_model("dot").generate(ids, 3)


def test_list_prompt_zero_new_tokens_and_training_mode_restored() -> None:
    model = tiny_model("sql2").train()
    out = model.generate([3, 1, 4], 0)
    assert out.tolist() == [[3, 1, 4]]
    out = model.generate([3, 1, 4], 5, do_sample=False)
    assert out.shape == (1, 8) and not out.requires_grad
    assert model.training  # generation switches to eval and back
    assert torch.equal(out, model.eval().generate(torch.tensor([3, 1, 4]), 5, do_sample=False))


# --------------------------------------------------------------------------------------------
# eos and streaming


def test_eos_stops_generation() -> None:
    model = tiny_model("l1")
    ids = prompt(4)
    free = model.generate(ids, 30, do_sample=False)
    eos = int(free[0, 7])  # the 4th generated token
    first = next(i for i in range(4, 34) if free[0, i] == eos)
    stopped = model.generate(ids, 30, do_sample=False, eos_token_id=eos)
    assert stopped.shape[1] == first + 1  # stops right after the first eos, which it keeps
    assert torch.equal(stopped, free[:, : first + 1])


def test_eos_pads_rows_that_finished_first() -> None:
    model = tiny_model("l1")
    ids = prompt(4, batch=2, seed=3)
    free = model.generate(ids, 25, do_sample=False)
    eos = int(free[0, 4])  # row 0 ends at once
    out = model.generate(ids, 25, do_sample=False, eos_token_id=eos)
    row1_hits = (free[1, 4:] == eos).nonzero().flatten().tolist()
    expected_len = 4 + (row1_hits[0] + 1 if row1_hits else 25)
    assert out.shape == (2, expected_len)
    assert (out[0, 4:] == eos).all()
    assert torch.equal(out[1], free[1, :expected_len])


class RecordingStreamer:
    def __init__(self) -> None:
        self.puts: list[torch.Tensor] = []
        self.ended = 0

    def put(self, token_ids: torch.Tensor) -> None:
        assert self.ended == 0
        self.puts.append(token_ids.clone())

    def end(self) -> None:
        self.ended += 1


def test_streamer_receives_every_token_in_order() -> None:
    model = tiny_model("lp")
    ids = prompt(4, batch=2)
    streamer = RecordingStreamer()
    out = model.generate(ids, 12, seed=0, streamer=streamer)
    assert streamer.ended == 1
    assert len(streamer.puts) == 12
    assert torch.equal(torch.stack(streamer.puts, dim=1), out[:, 4:])


def test_text_streamer_writes_exactly_the_decoded_output() -> None:
    alphabet = "abcdefghijklmnopq"
    decode = lambda ids: "".join(alphabet[i] for i in ids)  # noqa: E731
    model = tiny_model("l2")
    ids = prompt(3)
    sink = io.StringIO()
    out = model.generate(ids, 25, seed=2, streamer=TextStreamer(decode, file=sink))
    assert sink.getvalue() == decode(out[0, 3:].tolist()) + "\n"


def test_text_streamer_holds_back_incomplete_characters() -> None:
    # Token 1 alone is half of "é" (decoded as U+FFFD); with token 2 it completes.
    def decode(ids: list[int]) -> str:
        text = "".join({0: "a", 1: "\ufffd", 2: ""}[i] for i in ids)
        return text.replace("\ufffd", "é") if ids[-1] == 2 else text

    class Sink(io.StringIO):
        def __init__(self) -> None:
            super().__init__()
            self.writes: list[str] = []

        def write(self, s: str) -> int:
            self.writes.append(s)
            return super().write(s)

    sink = Sink()
    streamer = TextStreamer(decode, file=sink)
    for token in (0, 1, 2, 0):
        streamer.put(torch.tensor([token]))
    streamer.end()
    assert sink.writes == ["a", "é", "a", "\n"]
    with pytest.raises(ValueError, match="batch size 1"):
        streamer.put(torch.tensor([1, 2]))


def test_bad_arguments_fail_before_streaming_anything() -> None:
    streamer = RecordingStreamer()
    with pytest.raises(ValueError, match="top_p"):
        tiny_model("dot").generate(prompt(3), 5, top_p=2.0, streamer=streamer)
    assert streamer.puts == [] and streamer.ended == 0


# ------------------------------------------------------------------------------ the KV cache


def test_layer_cache_appends_in_place_and_matches_concatenation() -> None:
    from truthgpt.nn.cache import LayerCache

    cache = LayerCache(capacity=8)
    ks = [torch.randn(2, 3, t, 4) for t in (3, 1, 1, 2)]
    vs = [torch.randn(2, 3, t, 4) for t in (3, 1, 1, 2)]
    pointer = None
    for i, (k, v) in enumerate(zip(ks, vs, strict=True)):
        all_k, all_v = cache.append(k, v)
        assert torch.equal(all_k, torch.cat(ks[: i + 1], dim=2))
        assert torch.equal(all_v, torch.cat(vs[: i + 1], dim=2))
        pointer = pointer or cache.k.data_ptr()
        assert cache.k.data_ptr() == pointer  # within capacity: never reallocated
    all_k, _ = cache.append(torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4))  # past capacity
    assert all_k.shape == (2, 3, 12, 4) and cache.k.shape[2] >= 12
    assert torch.equal(all_k[:, :, :7], torch.cat(ks, dim=2))
    with pytest.raises(ValueError, match="the cache holds"):
        cache.append(torch.randn(1, 3, 1, 4), torch.randn(1, 3, 1, 4))


@pytest.mark.parametrize("kind", ["l1", "dot"])
def test_kv_cache_steps_equal_the_full_forward(kind: str) -> None:
    from truthgpt.nn.cache import KVCache

    model = tiny_model(kind).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        full = model(ids).logits
        cache = KVCache(len(model.blocks), capacity=16)
        steps = [model(ids[:, :5], past_key_values=cache).logits]
        steps += [model(ids[:, t : t + 1], past_key_values=cache).logits for t in range(5, 12)]
    assert cache.length == 12
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["l1", "dot"])
def test_left_padded_batch_continues_each_prompt_as_alone(kind: str) -> None:
    """Prompts of different lengths, left-padded into one batch with an attention mask:
    positions count real tokens only and padding is never attended to, so each row's real
    tokens get the logits that row gets alone, and greedy decoding (full forwards, and the KV
    cache) continues every row as `generate` continues its prompt alone."""
    from truthgpt.nn.cache import KVCache

    model = tiny_model(kind)
    rows = [prompt(7, seed=1)[0], prompt(3, seed=2)[0], prompt(5, seed=3)[0]]
    width, new = 7, 12
    ids = torch.full((len(rows), width), 4, dtype=torch.long)  # a real token id as padding
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :], mask[i, width - len(row) :] = row, 1
    alone = [model.generate(row, new, do_sample=False)[0] for row in rows]

    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        for i, row in enumerate(rows):
            expected = model(row[None]).logits[0]
            torch.testing.assert_close(logits[i, width - len(row) :], expected)

        # Greedy with full forwards, the mask growing by one real token a step.
        tokens, grown = ids, mask
        for _ in range(new):
            token = model(tokens, attention_mask=grown).logits[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, token], dim=1)
            grown = torch.cat([grown, torch.ones_like(token)], dim=1)
        # Greedy with the cache: the mask covers past and new tokens.
        cache = KVCache(len(model.blocks), capacity=width + new)
        step = model(ids, attention_mask=mask, past_key_values=cache).logits[:, -1]
        cached, grown = ids, mask
        for _ in range(new):
            token = step.argmax(-1, keepdim=True)
            cached = torch.cat([cached, token], dim=1)
            grown = torch.cat([grown, torch.ones_like(token)], dim=1)
            step = model(token, attention_mask=grown, past_key_values=cache).logits[:, -1]

    for i, row in enumerate(rows):
        assert tokens[i, width - len(row) :].tolist() == alone[i].tolist()
        assert cached[i, width - len(row) :].tolist() == alone[i].tolist()
