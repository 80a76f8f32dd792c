"""`attention.html` without a browser: the data it embeds, its escaping, its refusals.

The page in a real browser is tested in `test_explorer_browser.py`.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from truthgpt.analysis import analyze_attention, layer_weights
from truthgpt.config import TruthGPTConfig
from truthgpt.data import CharTokenizer, TokenSplit
from truthgpt.io import json_safe
from truthgpt.nn.model import TruthGPTModel
from truthgpt.workflows.explorer import (
    SCALE,
    decode_weights,
    encode_weights,
    explorer_html,
    read_explorer_data,
)

TEXT = 'Enter <Romeo> & "Juliet"; \'tis\tnight.\n' * 8
# Token texts a page must show as text, never run or parse: script ends, entities, quotes,
# comment openers, line and paragraph separators, whitespace, nothing at all.
NASTY = ["</script><script>alert(1)</script>", "&amp;", '"', "'", "<!--", "\u2028", "\n", "", " "]


def sample_of(kind: str, T: int = 12, seed: int = 0) -> tuple[dict, list[torch.Tensor]]:
    """A tiny model's analysis of TEXT and its weights on the sample passage."""
    tokenizer = CharTokenizer.from_text(TEXT)
    ids = np.array(tokenizer.encode(TEXT), dtype=np.uint16)
    split = TokenSplit("val", ids, num_chars=len(TEXT))
    torch.manual_seed(seed)
    config = TruthGPTConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=24,
        num_hidden_layers=2,
        num_attention_heads=3,
        max_position_embeddings=32,
        distance_type=kind,
    )
    model = TruthGPTModel(config)
    analysis = analyze_attention(
        model, split, num_samples=4, block_size=32, tokenizer=tokenizer, sample_tokens=T
    )
    weights = [w[0] for w in layer_weights(model, torch.tensor([analysis["sample"]["token_ids"]]))]
    return analysis, weights


def test_embedded_data_is_the_analysis_and_the_weights() -> None:
    analyses, weights = {}, {}
    for kind in ("l1", "dot"):
        analyses[kind], weights[kind] = sample_of(kind)
    data = read_explorer_data(explorer_html(analyses, weights))
    sample = analyses["l1"]["sample"]
    assert data["token_ids"] == sample["token_ids"]
    assert data["labels"] == sample["tokens"]
    assert data["pieces"] == sample["pieces"] == [c for c in TEXT[:12]]
    assert [m["name"] for m in data["models"]] == ["l1", "dot"]
    T = len(sample["token_ids"])
    for model in data["models"]:
        analysis = analyses[model["name"]]
        assert model["distance_type"] == model["name"]
        assert model["num_samples"] == analysis["num_samples"] == 4
        # Every statistic of every head, exactly as in the analysis.
        for ours, theirs in zip(model["layers"], analysis["layers"], strict=True):
            assert ours["heads"] == json_safe(theirs["heads"])
            assert ours["mean"] == json_safe(theirs["mean"])
        for layer, per_head in enumerate(model["weights"]):
            w = weights[model["name"]][layer].double().numpy()
            assert len(per_head) == w.shape[0] == 3
            for head, text in enumerate(per_head):
                decoded = decode_weights(text, T)
                assert np.abs(decoded - w[head]).max() <= 0.5 / SCALE + 1e-7
                assert not decoded[np.triu_indices(T, 1)].any()  # masked keys stay 0


def test_token_text_is_escaped() -> None:
    analysis, weights = sample_of("l2", T=len(NASTY))
    analysis["sample"]["pieces"] = NASTY
    analysis["sample"]["tokens"] = [f"<{i}&>" for i in range(len(NASTY))]
    page = explorer_html({'l2 <"x">': analysis}, {'l2 <"x">': weights}, title="a <b> & 'c'")
    # Two script elements (the data and the code), closed twice; nothing from a token escapes.
    assert page.count("<script") == 2 and page.count("</script>") == 2
    assert "<!--" not in page and "\u2028" not in page
    assert "<title>a &lt;b&gt; &amp; &#x27;c&#x27; (l2)</title>" in page
    data = read_explorer_data(page)
    assert data["pieces"] == NASTY
    assert data["labels"] == analysis["sample"]["tokens"]
    assert data["models"][0]["name"] == 'l2 <"x">'
    assert data["title"] == "a <b> & 'c'"
    # The script sets token text through textContent only.
    script = page[page.rindex("<script>") : page.rindex("</script>")]
    assert "innerHTML" not in script and "insertAdjacentHTML" not in script


def test_page_loads_nothing_from_anywhere() -> None:
    analysis, weights = sample_of("l1")
    page = explorer_html({"l1": analysis}, {"l1": weights})
    assert "default-src 'none'" in page  # the browser enforces it, too
    # The only URL is the SVG namespace, an identifier that is never fetched.
    assert re.findall(r"https?://[^\s\"'`]+", page) == ["http://www.w3.org/2000/svg"]
    assert not re.search(r"\b(src|href)=\"(?!data:)", page)
    assert "@import" not in page and "url(" not in page
    assert len(page.encode("utf-8")) < 40_000  # 2 layers × 3 heads × 12 tokens


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 20), st.integers(0, 2**32 - 1))
def test_weights_round_trip(T: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    scores = np.where(np.tril(np.ones((T, T), bool)), rng.normal(size=(T, T)) * 4, -np.inf)
    w = np.exp(scores - scores.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    text = encode_weights(w)
    assert len(text) == 4 * -(-(T * (T + 1)) // 3)  # base64 of 2 bytes a visible weight
    assert np.abs(decode_weights(text, T) - w).max() <= 0.5 / SCALE + 1e-12
    with pytest.raises(ValueError, match="values"):
        decode_weights(text, T + 1)


def test_refusals() -> None:
    analysis, weights = sample_of("l1")
    with pytest.raises(ValueError, match="at least one"):
        explorer_html({}, {})
    with pytest.raises(ValueError, match="do not match"):
        explorer_html({"l1": analysis}, {"dot": weights})
    with pytest.raises(ValueError, match="layers"):
        explorer_html({"l1": analysis}, {"l1": weights[:1]})
    with pytest.raises(ValueError, match=r"layer 1 should be \(3, 12, 12\)"):
        explorer_html({"l1": analysis}, {"l1": [weights[0], weights[1][:, :5, :5]]})
    other, other_weights = sample_of("dot", T=10)
    with pytest.raises(ValueError, match="another passage"):
        explorer_html({"l1": analysis, "dot": other}, {"l1": weights, "dot": other_weights})
