"""`attention.html` in a real headless Chromium, driven by Playwright.

The system's Chromium is used (Debian's `chromium` package; `.ci/run` installs it), never a
browser Playwright would download. Without Chromium or Playwright these tests skip and say
why; with TRUTHGPT_REQUIRE_BROWSER=1 (set by `.ci/run`) they fail instead.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from test_explorer import NASTY, sample_of
from truthgpt.workflows.explorer import SCALE, decode_weights, explorer_html, read_explorer_data

CELLS = "cells => cells.map(c => [+c.dataset.q, +c.dataset.k, +c.dataset.w])"  # JS
CANDIDATES = ("/usr/lib/chromium/chromium", "chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    """TRUTHGPT_CHROMIUM, else Debian's binary (not its shell wrapper), else one on PATH."""
    if os.environ.get("TRUTHGPT_CHROMIUM"):
        return os.environ["TRUTHGPT_CHROMIUM"]
    for name in CANDIDATES:
        path = name if os.path.isabs(name) else shutil.which(name)
        if path and os.access(path, os.X_OK):
            return path
    return None


def unavailable(reason: str) -> None:
    if os.environ.get("TRUTHGPT_REQUIRE_BROWSER") == "1":
        pytest.fail(f"TRUTHGPT_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("playwright is not installed (pip install -e '.[dev]')")
    executable = find_chromium()
    if executable is None:
        unavailable("no Chromium found (apt-get install chromium, or set TRUTHGPT_CHROMIUM)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, headless=True)
        try:
            yield launched
        finally:
            launched.close()


class Page:
    """A page opened from a file, with every request and console message it caused."""

    def __init__(self, browser: Any, path: Path) -> None:
        self.requests: list[str] = []
        self.problems: list[str] = []
        self.page = browser.new_page(viewport={"width": 1280, "height": 900})
        self.page.on("request", lambda request: self.requests.append(request.url))
        self.page.on("console", lambda m: self.problems.append(f"console {m.type}: {m.text}"))
        self.page.on("pageerror", lambda error: self.problems.append(f"page error: {error}"))
        self.page.on("dialog", self._dialog)  # alert() from a token that got run as code
        self.url = path.resolve().as_uri()
        self.page.goto(self.url)

    def _dialog(self, dialog: Any) -> None:
        self.problems.append(f"dialog {dialog.type}: {dialog.message}")
        dialog.dismiss()

    def panel(self, name: str) -> Any:
        return self.page.locator(f'section.panel[data-model="{name}"]')

    def token_weights(self, name: str) -> tuple[list[float], list[float]]:
        """Each token's data-w and the alpha of its computed background colour."""
        spans = self.panel(name).locator("span.tok")
        shown = spans.evaluate_all(
            "spans => spans.map(s => [s.dataset.w, getComputedStyle(s).backgroundColor])"
        )
        return [float(w) for w, _ in shown], [alpha(colour) for _, colour in shown]

    def highlighted_cells(self, name: str) -> tuple[set[int], list[float]]:
        """The query rows of the heat map's highlighted cells, and their weights by key."""
        cells = self.panel(name).locator("svg.heatmap rect.on").evaluate_all(CELLS)
        rows = {q for q, _, _ in cells}
        return rows, [w for _, _, w in sorted(cells, key=lambda c: c[1])]


def alpha(colour: str) -> float:
    numbers = [float(x) for x in re.findall(r"[\d.]+", colour)]
    return numbers[3] if len(numbers) == 4 else 1.0


@pytest.fixture(scope="module")
def side_by_side(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    """A page of l1 and dot on one passage, the way the demo writes it."""
    analyses, weights = {}, {}
    for seed, kind in enumerate(("l1", "dot")):
        analyses[kind], weights[kind] = sample_of(kind, T=24, seed=seed)
    path = tmp_path_factory.mktemp("explorer") / "attention.html"
    path.write_text(explorer_html(analyses, weights), encoding="utf-8")
    return path, analyses, weights


def test_page_loads_offline_without_errors(browser: Any, side_by_side: tuple) -> None:
    path, analyses, _ = side_by_side
    view = Page(browser, path)
    assert view.requests == [view.url]  # the file itself and nothing else
    assert view.problems == []
    assert view.page.locator("section.panel").count() == 2
    assert view.page.locator("button[data-layer]").count() == 2
    assert view.page.locator("button[data-head]").count() == 3
    # A bar per head in each of the three charts of each panel.
    assert view.page.locator("svg.chart rect.bar").count() == 2 * 3 * 2 * 3
    shown = view.panel("l1").locator("span.tok").all_text_contents()
    assert "".join(shown).replace("↵\n", "\n") == "".join(analyses["l1"]["sample"]["pieces"])
    view.page.close()


def test_hover_shows_the_row_of_the_selected_head(
    browser: Any, side_by_side: tuple, tmp_path: Path
) -> None:
    path, _, weights = side_by_side
    data = read_explorer_data(path.read_text(encoding="utf-8"))
    view = Page(browser, path)
    page = view.page
    page.click('button[data-layer="1"]')
    page.click('button[data-head="2"]')
    for query in (17, 5):
        view.panel("dot").locator(f'span.tok[data-i="{query}"]').hover()
        for index, name in enumerate(("l1", "dot")):  # both panels follow one selection
            expected = weights[name][1][2, query].double().numpy()
            stored = decode_weights(data["models"][index]["weights"][1][2], 24)[query]
            token_w, token_alpha = view.token_weights(name)
            np.testing.assert_allclose(token_w, stored, rtol=0, atol=1e-12)
            np.testing.assert_allclose(token_w, expected, rtol=0, atol=0.5 / SCALE + 1e-7)
            # The colour: alpha √w, which Chromium keeps in 8 bits.
            np.testing.assert_allclose(token_alpha, np.sqrt(stored), atol=1 / 255)
            rows, cell_w = view.highlighted_cells(name)
            assert rows == {query}
            np.testing.assert_allclose(cell_w, stored[: query + 1], rtol=0, atol=1e-12)
            query_token = view.panel(name).locator("span.tok.query")
            assert query_token.get_attribute("data-i") == str(query)
        assert f"#{query} " in view.panel("l1").locator(".row-info").inner_text()
    page.screenshot(path=tmp_path / "attention.png", full_page=True)
    assert (tmp_path / "attention.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "attention.png").stat().st_size > 20_000
    assert view.problems == [] and view.requests == [view.url]
    page.close()


def test_pin_keys_and_bars(browser: Any, side_by_side: tuple) -> None:
    path, analyses, weights = side_by_side
    view = Page(browser, path)
    page, l1 = view.page, view.panel("l1")
    l1.locator('span.tok[data-i="8"]').click()  # pinned: hovering elsewhere changes nothing
    l1.locator('span.tok[data-i="3"]').hover()
    assert view.highlighted_cells("l1")[0] == {8}
    page.keyboard.press("ArrowRight")
    assert view.highlighted_cells("dot")[0] == {9}
    l1.locator('svg.heatmap rect[data-q="9"][data-k="0"]').click()  # unpins
    l1.locator('svg.heatmap rect[data-q="20"][data-k="4"]').hover()
    rows, cell_w = view.highlighted_cells("l1")
    assert rows == {20}
    np.testing.assert_allclose(cell_w, weights["l1"][0][0, 20, :21].double(), atol=1e-4)
    # A chart's bar picks its layer and head; ↓ goes to the next head.
    view.panel("dot").locator("svg.chart").first.locator("rect.bar").nth(4).click()
    assert page.locator("button.selected[data-layer]").inner_text() == "1"
    assert page.locator("button.selected[data-head]").inner_text() == "1"
    page.keyboard.press("ArrowDown")
    stats = analyses["dot"]["layers"][1]["heads"][2]
    text = view.panel("dot").locator(".head-stats").inner_text()
    assert text.startswith("layer 1 head 2: λ ") and f"{stats['lambda']:.3g}" in text
    assert view.problems == []
    page.close()


def test_token_text_stays_text(browser: Any, tmp_path: Path) -> None:
    analysis, weights = sample_of("l1", T=len(NASTY))
    analysis["sample"]["pieces"] = NASTY
    analysis["sample"]["tokens"] = ["<b>x</b>", *NASTY[1:]]
    path = tmp_path / "attention.html"
    path.write_text(explorer_html({"<i>l1</i>": analysis}, {"<i>l1</i>": weights}), "utf-8")
    view = Page(browser, path)
    assert view.problems == []  # in particular no alert(1) ran
    page = view.page
    assert page.locator("script").count() == 2
    assert page.locator("b, i").count() == 0
    spans = view.panel("<i>l1</i>").locator("span.tok").all_text_contents()
    assert spans == [p.replace("\n", "↵\n") if p else "∅" for p in NASTY]
    assert page.locator("h2").first.inner_text().startswith("<i>l1</i>")
    labels = page.locator("svg.heatmap text.axis:not(.top)").all_text_contents()
    assert labels[0] == "<b>x</b>"
    page.close()


def test_the_weights_tensor_is_what_the_page_draws(browser: Any, side_by_side: tuple) -> None:
    """Every cell of a head's heat map carries its weight: the whole matrix, not one row."""
    path, _, weights = side_by_side
    view = Page(browser, path)
    view.page.click('button[data-head="1"]')
    cells = view.panel("l1").locator("svg.heatmap rect[data-k]").evaluate_all(CELLS)
    drawn = torch.zeros(24, 24, dtype=torch.float64)
    for q, k, w in cells:
        drawn[q, k] = w
    assert len(cells) == 24 * 25 // 2
    torch.testing.assert_close(drawn, weights["l1"][0][1].double(), atol=1e-4, rtol=0)
    view.page.close()
