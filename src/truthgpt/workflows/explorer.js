// The attention explorer: draws the page from the JSON in #explorer-data (see explorer.py).
// One selection (layer, head, query token) is shared by every model's panel. Token text is
// only ever set through textContent, never parsed as HTML.
"use strict";
(function () {
  const SVG = "http://www.w3.org/2000/svg";
  const data = JSON.parse(document.getElementById("explorer-data").textContent);
  const T = data.pieces.length;
  const state = { layer: 0, head: 0, query: T - 1, pinned: false };
  const numLayers = Math.max(...data.models.map((m) => m.layers.length));
  const numHeads = Math.max(...data.models.flatMap((m) => m.layers.map((l) => l.heads.length)));

  // ---------------------------------------------------------------- helpers

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
    for (const child of children) node.append(child);
    return node;
  }

  function svgEl(tag, attrs, ...children) {
    const node = document.createElementNS(SVG, tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
    for (const child of children) node.append(child);
    return node;
  }

  function fmt(value, digits = 3) {
    if (value === null || value === undefined || !Number.isFinite(value)) return "–";
    if (Math.abs(value) >= 1000) return Math.round(value).toLocaleString("en");
    return value.toPrecision(digits);
  }

  // A token made readable inline: whitespace shown, long ones cut.
  function label(piece) {
    const text = piece.replace(/\n/g, "↵").replace(/\t/g, "⇥").replace(/ /g, "␣");
    if (text === "") return "∅";
    return text.length > 12 ? text.slice(0, 11) + "…" : text;
  }

  // Colour intensity of a weight: sqrt, so that a uniform row over 50 keys (0.02 each) is
  // still visible and a one-hot row is full colour.
  const intensity = (w) => Math.sqrt(Math.min(1, Math.max(0, w)));

  // One colour scale for the text and the heat map: from white to HOT.
  const HOT = [230, 85, 13];
  function heatColour(w) {
    const t = intensity(w);
    const [r, g, b] = HOT.map((c) => Math.round(255 + (c - 255) * t));
    return `rgb(${r}, ${g}, ${b})`;
  }

  const textColour = (w) => `rgba(${HOT.join(", ")}, ${intensity(w).toFixed(4)})`;

  // Weights of one head: the lower triangle, row by row, uint16 little-endian in base64.
  const cache = new Map();
  function headWeights(model, layer, head) {
    const key = `${model.name}/${layer}/${head}`;
    if (!cache.has(key)) {
      const bytes = atob(model.weights[layer][head]);
      const values = new Float64Array(bytes.length / 2);
      for (let i = 0; i < values.length; i++) {
        values[i] = (bytes.charCodeAt(2 * i) | (bytes.charCodeAt(2 * i + 1) << 8)) / data.scale;
      }
      cache.set(key, values);
    }
    return cache.get(key);
  }

  // Weight of query q on key k (0 for a masked, future key).
  const weightAt = (tri, q, k) => (k <= q ? tri[(q * (q + 1)) / 2 + k] : 0);

  const headOf = (model) => model.layers[state.layer]?.heads[state.head];

  // ---------------------------------------------------------------- controls

  function picker(name, count, key) {
    const box = el("div", { class: "picker", role: "group", "aria-label": name });
    box.append(el("span", { class: "picker-name" }, name));
    for (let i = 0; i < count; i++) {
      const button = el("button", { type: "button", ["data-" + key]: String(i) }, String(i));
      button.addEventListener("click", () => select({ [key]: i }));
      box.append(button);
    }
    return box;
  }

  function legend() {
    const stops = [0, 0.02, 0.1, 0.25, 0.5, 1];
    const bar = el("div", { class: "legend-bar" });
    for (const w of stops) {
      const tick = el("span", { class: "legend-tick" }, String(w));
      tick.style.left = `${100 * intensity(w)}%`;
      bar.append(tick);
    }
    return el("div", { class: "legend" }, el("span", {}, "weight"), bar);
  }

  function header() {
    const first = data.models[0];
    const what =
      `${T} tokens of the ${first.source || "sample"}; statistics are means over ` +
      `${first.num_samples ?? "?"} windows of ${first.block_size ?? "?"} tokens.`;
    return el(
      "header",
      {},
      el("h1", {}, data.title),
      el("p", { class: "sub" }, what),
      el(
        "div",
        { class: "controls" },
        picker("layer", numLayers, "layer"),
        picker("head", numHeads, "head"),
        legend()
      ),
      el(
        "p",
        { class: "hint", id: "hint" },
        "Hover a token (or a heat-map row) to see what it attends to; click to pin it. " +
          "← → move the token, ↑ ↓ change head, click a bar to pick its layer and head."
      )
    );
  }

  // ---------------------------------------------------------------- one model's panel

  function buildPanel(model, scales) {
    const panel = el("section", { class: "panel", "data-model": model.name });
    const meta = [model.distance_type && `distance ${model.distance_type}`];
    if (model.step !== null && model.step !== undefined) meta.push(`step ${model.step}`);
    if (model.num_parameters) meta.push(`${fmt(model.num_parameters)} parameters`);
    panel.append(
      el("h2", {}, model.name, " ", el("small", {}, meta.filter(Boolean).join(" · ")))
    );
    const headStats = el("p", { class: "head-stats" });
    const passage = el("div", { class: "passage" });
    const rowInfo = el("p", { class: "row-info" });
    const tokens = data.pieces.map((piece, i) => {
      const span = el("span", { class: "tok", "data-i": String(i) });
      if (piece === "") span.classList.add("empty");
      span.textContent = piece === "" ? "∅" : piece.replace(/\n/g, "↵\n");
      passage.append(span);
      return span;
    });
    const heat = buildHeatmap();
    const charts = el("div", { class: "charts" });
    const bars = [];
    for (const [key, name] of [
      ["lambda", "λ"],
      ["entropy", "entropy, nats"],
      ["distance_mean", "distance, tokens"],
    ]) {
      const chart = buildChart(model, key, name, scales[key]);
      charts.append(chart.svg);
      bars.push(...chart.bars);
    }
    panel.append(charts, headStats, passage, rowInfo, heat.svg);
    for (const box of [passage, heat.svg]) {
      box.addEventListener("mouseover", (event) => {
        const target = event.target.closest("[data-i], [data-q]");
        if (target && !state.pinned) select({ query: queryOf(target) });
      });
      box.addEventListener("click", (event) => {
        const target = event.target.closest("[data-i], [data-q]");
        if (!target) return;
        const q = queryOf(target);
        select({ query: q, pinned: !(state.pinned && state.query === q) });
      });
    }
    return { model, panel, headStats, tokens, rowInfo, heat, bars };
  }

  const queryOf = (node) => Number(node.dataset.q ?? node.dataset.i);

  function buildHeatmap() {
    const cell = Math.max(3, Math.min(12, Math.floor(456 / T)));
    const labelled = cell >= 7;
    const font = Math.min(10, cell - 1);
    const longest = Math.max(...data.labels.map((text) => text.length));
    const pad = labelled ? Math.ceil(6 + 0.65 * font * longest) : 4; // room for the labels
    const size = pad + T * cell + 1;
    const svg = svgEl("svg", {
      class: "heatmap",
      width: size,
      height: size,
      viewBox: `0 0 ${size} ${size}`,
      role: "img",
      "aria-label": "attention weights, row: query token, column: key token",
    });
    const rows = [];
    for (let q = 0; q < T; q++) {
      const row = [];
      for (let k = 0; k <= q; k++) {
        const rect = svgEl("rect", {
          x: pad + k * cell,
          y: pad + q * cell,
          width: cell,
          height: cell,
          "data-q": q,
          "data-k": k,
        });
        row.push(rect);
        svg.append(rect);
      }
      rows.push(row);
    }
    if (labelled) {
      data.labels.forEach((text, i) => {
        const mid = pad + (i + 0.5) * cell;
        svg.append(
          svgEl("text", { x: pad - 3, y: mid, "font-size": font, class: "axis", "data-q": i }, text)
        );
        const turn = `rotate(-90 ${mid} ${pad - 3})`;
        svg.append(
          svgEl(
            "text",
            { x: mid, y: pad - 3, "font-size": font, class: "axis top", transform: turn },
            text
          )
        );
      });
    }
    const mark = svgEl("rect", { class: "row-mark", x: pad, height: cell });
    svg.append(mark);
    return { svg, rows, mark, pad, cell };
  }

  // A small bar chart of one statistic for every (layer, head), grouped by layer.
  function buildChart(model, key, name, scaleMax) {
    const [barW, gap, top, height, bottom] = [9, 7, 16, 54, 14];
    const values = model.layers.map((layer) => layer.heads.map((h) => h[key]));
    const max = scaleMax || Math.max(1e-12, ...values.flat().filter(Number.isFinite));
    let x = 4;
    const bars = [];
    const svg = svgEl("svg", { class: "chart", height: top + height + bottom });
    const caption = `${name}  (max ${fmt(max)})`;
    const title = svgEl("text", { x: 4, y: 11, class: "chart-title" }, caption);
    const explain = data.definitions[key];
    if (explain) title.append(svgEl("title", {}, explain));
    svg.append(title);
    values.forEach((heads, layer) => {
      const start = x;
      heads.forEach((value, head) => {
        const h = Number.isFinite(value) ? Math.max(1, (height * value) / max) : 0;
        const bar = svgEl(
          "rect",
          { class: "bar", x, y: top + height - h, width: barW - 1, height: h },
          svgEl("title", {}, `layer ${layer} head ${head}: ${name} ${fmt(value)}`)
        );
        bar.dataset.layer = String(layer);
        bar.dataset.head = String(head);
        bar.addEventListener("click", () => select({ layer, head }));
        bars.push(bar);
        svg.append(bar);
        x += barW;
      });
      const at = { x: (start + x) / 2, y: top + height + 11, class: "chart-axis" };
      svg.append(svgEl("text", at, `L${layer}`));
      x += gap;
    });
    const base = top + height + 0.5;
    svg.append(svgEl("line", { x1: 2, x2: x - gap + 2, y1: base, y2: base, class: "baseline" }));
    svg.setAttribute("width", Math.max(x, 12 + 6 * caption.length));
    return { svg, bars };
  }

  // ---------------------------------------------------------------- drawing a selection

  function drawHead(view) {
    const stats = headOf(view.model);
    const heat = view.heat;
    if (!stats) {
      view.headStats.textContent = `This model has no layer ${state.layer} head ${state.head}.`;
      heat.rows.flat().forEach((rect) => rect.setAttribute("fill", "#eee"));
      return;
    }
    view.headStats.textContent =
      `layer ${state.layer} head ${state.head}: λ ${fmt(stats.lambda)} · entropy ` +
      `${fmt(stats.entropy)} nats (${fmt(stats.entropy_normalized, 2)} of uniform) · top-1 ` +
      `${fmt(stats.top1_weight, 2)} · attended distance ${fmt(stats.distance_mean)} tokens`;
    const tri = headWeights(view.model, state.layer, state.head);
    heat.rows.forEach((row, q) =>
      row.forEach((rect, k) => {
        const w = weightAt(tri, q, k);
        rect.setAttribute("fill", heatColour(w));
        rect.dataset.w = String(w);
      })
    );
    for (const bar of view.bars) {
      const { layer, head } = bar.dataset;
      const on = Number(layer) === state.layer && Number(head) === state.head;
      bar.classList.toggle("selected", on);
    }
  }

  function drawQuery(view) {
    const q = state.query;
    const stats = headOf(view.model);
    const tri = stats ? headWeights(view.model, state.layer, state.head) : null;
    const weights = [];
    view.tokens.forEach((span, k) => {
      const w = tri ? weightAt(tri, q, k) : 0;
      weights.push(w);
      span.style.backgroundColor = textColour(w);
      span.dataset.w = String(w);
      span.classList.toggle("future", k > q);
      span.classList.toggle("query", k === q);
      span.classList.toggle("pinned", k === q && state.pinned);
      span.title = `#${k} “${label(data.pieces[k])}”: weight ${fmt(w)} from #${q}`;
    });
    const heat = view.heat;
    if (heat.onRow !== q) {  // only the old and the new row change
      for (const rect of heat.rows[heat.onRow] || []) rect.classList.remove("on");
      for (const rect of heat.rows[q]) rect.classList.add("on");
      heat.onRow = q;
    }
    heat.mark.setAttribute("y", heat.pad + q * heat.cell);
    heat.mark.setAttribute("width", (q + 1) * heat.cell);
    if (!tri) {
      view.rowInfo.textContent = "";
      return;
    }
    const order = weights.map((w, k) => [w, k]).filter(([, k]) => k <= q);
    const distance = order.reduce((sum, [w, k]) => sum + w * (q - k), 0);
    const entropy = order.reduce((sum, [w]) => (w > 0 ? sum - w * Math.log(w) : sum), 0);
    order.sort((a, b) => b[0] - a[0]);
    const named = ([w, k]) => `#${k} “${label(data.pieces[k])}” ${fmt(w, 2)}`;
    const top = order.slice(0, 4).map(named);
    view.rowInfo.textContent =
      `#${q} “${label(data.pieces[q])}”${state.pinned ? " (pinned)" : ""} attends to ` +
      `${top.join(", ")}; distance ${fmt(distance)} tokens, entropy ${fmt(entropy)} nats.`;
  }

  function select(change) {
    const headChanged = "layer" in change || "head" in change;
    Object.assign(state, change);
    state.layer = Math.min(Math.max(state.layer, 0), numLayers - 1);
    state.head = Math.min(Math.max(state.head, 0), numHeads - 1);
    state.query = Math.min(Math.max(state.query, 0), T - 1);
    for (const button of document.querySelectorAll("button[data-layer]")) {
      button.classList.toggle("selected", Number(button.dataset.layer) === state.layer);
    }
    for (const button of document.querySelectorAll("button[data-head]")) {
      button.classList.toggle("selected", Number(button.dataset.head) === state.head);
    }
    for (const view of views) {
      if (headChanged || !view.drawn) drawHead(view);
      view.drawn = true;
      drawQuery(view);
    }
  }

  // ---------------------------------------------------------------- start

  // Entropy and distance share one scale across models, so panels compare at a glance;
  // λ multiplies different scores in each kind, so each model keeps its own.
  function sharedMax(key) {
    const values = data.models.flatMap((m) => m.layers.flatMap((l) => l.heads.map((h) => h[key])));
    return Math.max(1e-12, ...values.filter(Number.isFinite));
  }
  const scales = {
    lambda: null,
    entropy: sharedMax("entropy"),
    distance_mean: sharedMax("distance_mean"),
  };
  document.body.append(header());
  const panels = el("main", { class: "panels" });
  const views = data.models.map((model) => buildPanel(model, scales));
  views.forEach((view) => panels.append(view.panel));
  document.body.append(panels);

  document.addEventListener("keydown", (event) => {
    if (event.altKey || event.ctrlKey || event.metaKey) return;
    const moves = {
      ArrowLeft: { query: state.query - 1, pinned: true },
      ArrowRight: { query: state.query + 1, pinned: true },
      ArrowUp: { head: state.head - 1 },
      ArrowDown: { head: state.head + 1 },
    };
    if (event.key in moves) {
      event.preventDefault();
      select(moves[event.key]);
    }
  });
  select({});
})();
