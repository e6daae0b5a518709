// The review page: a queue of results, one result's detail, corrections, the threshold
// slider and the score-over-time chart. Plain JavaScript against the station's /v1 API.
"use strict";

const state = { filter: "", selected: null, threshold: null, scores: [], model: null };
// An outline being drawn on the original image: boxes in the image's own pixels.
const outline = { drawing: false, boxes: [], start: null, of: null };
const $ = (id) => document.getElementById(id);
// Off loopback the station's session cookie (set by /login, HttpOnly) carries the access;
// this page never sees, stores or sends a token itself.
async function api(path, options = {}) {
  const response = await fetch(path, Object.assign({ credentials: "same-origin" }, options));
  if (response.status === 401) {
    location.assign("/login");
    throw new Error("not logged in");
  }
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.detail ? JSON.stringify(body.detail) : response.statusText);
  return body;
}

function say(text, isError = false) {
  const box = $("message");
  box.textContent = text;
  box.className = isError ? "error" : "";
}

async function loadModel() {
  const m = await api("/v1/model");
  state.model = m;
  state.threshold = m.threshold ? m.threshold.value : null;
  $("model-version").textContent = m.version;
  $("model-method").textContent = m.method;
  $("threshold-value").textContent = state.threshold === null ? "none" : state.threshold.toPrecision(4);
  $("threshold-how").textContent = m.threshold ? `(${m.threshold.method})` : "";
}

const fmtScore = (score) => (score === null || score === undefined ? "not scored" : score.toPrecision(4));

function item(r) {
  const li = document.createElement("li");
  li.dataset.id = r.id;
  li.className = r.id === state.selected ? "selected" : "";
  const review = r.review ? ` · reviewed ${r.review}` : "";
  li.innerHTML = `<img src="${r.heatmap_url}" alt="">
    <div><span class="verdict-${r.verdict}">${r.verdict}</span> ${fmtScore(r.score)}
    <div class="muted">${new Date(r.created * 1000).toLocaleTimeString()} · v ${r.model_version}${review}</div></div>`;
  li.addEventListener("click", () => select(r.id));
  return li;
}

async function loadQueue() {
  const page = await api(`/v1/results?limit=100${state.filter ? "&" + state.filter : ""}`);
  const queue = $("queue");
  queue.replaceChildren(...page.items.map(item));
  $("queue-count").textContent = `${page.total} shown by this filter`;
}

function drawBoxes(r) {
  const img = $("detail-heatmap");
  const boxes = $("boxes");
  boxes.replaceChildren();
  const sx = img.clientWidth / img.naturalWidth, sy = img.clientHeight / img.naturalHeight;
  for (const g of r.regions) {
    const b = document.createElement("div");
    b.className = "box";
    Object.assign(b.style, { left: `${g.x * sx}px`, top: `${g.y * sy}px`, width: `${g.width * sx}px`, height: `${g.height * sy}px` });
    b.title = `${g.position}, ${(100 * g.area_share).toFixed(2)}% of the image`;
    boxes.appendChild(b);
  }
}

async function select(id) {
  const r = await api(`/v1/results/${id}`);
  state.selected = id;
  $("detail").hidden = false;
  $("detail-verdict").textContent = r.verdict;
  $("detail-verdict").className = `verdict-${r.verdict}`;
  $("detail-score").textContent = fmtScore(r.score);
  $("detail-reason").textContent = r.reason ? `Cannot judge this image: ${r.reason}` : "";
  $("detail-meta").textContent = `${r.source} · scored by model ${r.model_version} · ${r.regions.length} region(s) above the threshold`;
  $("detail-image").src = r.image_url;
  const heat = $("detail-heatmap");
  heat.onload = () => drawBoxes(r);
  heat.src = r.heatmap_url;
  $("review-state").textContent = r.review ? `reviewed: ${r.review}` : "not reviewed";
  if (outline.of !== id) stopOutline();  // an outline belongs to the result it was drawn on
  outline.of = id;
  $("btn-outline").disabled = r.review !== "defect";
  $("ask-answer").textContent = "";
  for (const li of $("queue").children) li.className = li.dataset.id === id ? "selected" : "";
}

async function ask() {
  if (!state.selected) return;
  const q = $("ask-question").value.trim() || "Is there an anomaly in this image?";
  try {
    const out = await api(`/v1/results/${state.selected}/answer?q=${encodeURIComponent(q)}`);
    $("ask-answer").textContent = out.text;
  } catch (err) {
    say(`Could not answer: ${err.message}`, true);
  }
}

async function review(label) {
  if (!state.selected) return;
  try {
    const out = await api("/v1/feedback", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ id: state.selected, label }),
    });
    const update = out.model_update;
    say(update ? `Learned this good part: model ${update.version} (${update.added_patches ?? "new"} patches added).` : `Recorded: ${label}.`);
    await refresh();
    await select(state.selected);
  } catch (err) {
    say(`Could not record the review: ${err.message}`, true);
  }
}

async function upload(files) {
  if (!files.length) return;
  const form = new FormData();
  for (const f of files) form.append("files", f, f.name);
  say(`Scoring ${files.length} image(s)…`);
  try {
    const out = await api("/v1/predict", { method: "POST", body: form });
    say(`Scored ${out.results.length}: ` + out.results.map((r) => `${r.verdict} (${fmtScore(r.score)})`).join(", "));
    await refresh();
    await select(out.results[0].id);
  } catch (err) {
    say(`Upload refused: ${err.message}`, true);
  }
}

function toImage(e) {
  const img = $("detail-image"), box = img.getBoundingClientRect();
  const x = Math.min(Math.max(e.clientX - box.left, 0), box.width), y = Math.min(Math.max(e.clientY - box.top, 0), box.height);
  return [x * img.naturalWidth / box.width, y * img.naturalHeight / box.height];
}

function drawOutline() {
  const img = $("detail-image"), layer = $("outline-boxes");
  const sx = img.clientWidth / img.naturalWidth, sy = img.clientHeight / img.naturalHeight;
  layer.replaceChildren(...outline.boxes.map(([x0, y0, x1, y1]) => {
    const b = document.createElement("div");
    b.className = "outline-box";
    Object.assign(b.style, {
      left: `${Math.min(x0, x1) * sx}px`, top: `${Math.min(y0, y1) * sy}px`,
      width: `${Math.abs(x1 - x0) * sx}px`, height: `${Math.abs(y1 - y0) * sy}px`,
    });
    return b;
  }));
  $("outline-state").textContent = outline.drawing ? `${outline.boxes.length} box(es): drag over the defect` : "";
}

function startOutline() {
  outline.drawing = true;
  outline.boxes = [];
  $("btn-save-outline").hidden = $("btn-clear-outline").hidden = false;
  drawOutline();
}

function stopOutline() {
  outline.drawing = false;
  outline.boxes = [];
  outline.start = null;
  $("btn-save-outline").hidden = $("btn-clear-outline").hidden = true;
  drawOutline();
}

async function saveOutline() {
  try {
    const out = await api(`/v1/results/${state.selected}/outline`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ boxes: outline.boxes }),
    });
    say(out.outlined ? "Outline saved: the next retraining learns where this defect is." : "Outline removed.");
    stopOutline();
  } catch (err) {
    say(`Outline not saved: ${err.message}`, true);
  }
}

async function pollRetrain() {
  const r = await api("/v1/retrain");
  const line = {
    idle: "",
    running: `running: ${r.stage ?? ""} ${r.total ? `${r.done}/${r.total}` : r.done ?? ""}`,
    done: `done: model ${r.version} (${r.reviewed_defects} reviewed defects, ${r.outlined} outlined)`,
    failed: `failed: ${r.error}`,
  }[r.state];
  $("retrain-state").textContent = line;
  if (r.state === "running") {
    setTimeout(() => pollRetrain().catch(() => {}), 1000);
  } else if (r.state === "done") {
    await refresh();
  }
  return r;
}

async function startRetrain() {
  try {
    await api("/v1/retrain", { method: "POST" });
    say("Retraining from the reviews in the background; the page shows the new version when it is ready.");
    await pollRetrain();
  } catch (err) {
    say(`Retraining not started: ${err.message}`, true);
  }
}

function flips(value) {
  if (state.threshold === null) return state.scores.length;
  return state.scores.filter((p) => (p.score >= value) !== (p.score >= state.threshold)).length;
}

function setupSlider() {
  const slider = $("slider");
  const values = state.scores.map((p) => p.score).concat(state.threshold === null ? [] : [state.threshold]);
  if (!values.length) return;
  const lo = Math.min(...values), hi = Math.max(...values);
  slider.min = lo - 0.05 * (hi - lo || 1);
  slider.max = hi + 0.05 * (hi - lo || 1);
  if (document.activeElement !== slider) slider.value = state.threshold ?? hi;
  showSlider();
}

function showSlider() {
  const v = Number($("slider").value);
  $("slider-value").textContent = v.toPrecision(4);
  const n = flips(v);
  $("flip-count").textContent = `${n} of ${state.scores.length} verdicts would flip`;
  $("btn-save-threshold").disabled = state.threshold !== null && Math.abs(v - state.threshold) < 1e-9;
}

async function saveThreshold(body) {
  try {
    const m = await api("/v1/threshold", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    say(`Threshold ${m.threshold.value.toPrecision(4)} saved as model ${m.version}.`);
    await refresh();
  } catch (err) {
    say(`Threshold not saved: ${err.message}`, true);
  }
}

function drawDrift() {
  const svg = $("drift");
  const w = svg.width.baseVal.value, h = svg.height.baseVal.value, pad = 24;
  const pts = state.scores;
  const parts = [];
  if (pts.length) {
    const ys = pts.map((p) => p.score).concat(state.threshold === null ? [] : [state.threshold]);
    const lo = Math.min(...ys), hi = Math.max(...ys), span = hi - lo || 1;
    const X = (i) => pad + (i / Math.max(1, pts.length - 1)) * (w - 2 * pad);
    const Y = (v) => h - pad - ((v - lo) / span) * (h - 2 * pad);
    parts.push(`<polyline fill="none" stroke="#1f5fbf" stroke-width="1.2" points="${pts.map((p, i) => `${X(i).toFixed(1)},${Y(p.score).toFixed(1)}`).join(" ")}"/>`);
    for (const [i, p] of pts.entries()) {
      if (p.review) parts.push(`<circle cx="${X(i).toFixed(1)}" cy="${Y(p.score).toFixed(1)}" r="3" fill="${p.review === "normal" ? "#2b8a3e" : "#c92a2a"}"/>`);
    }
    if (state.threshold !== null) {
      const y = Y(state.threshold).toFixed(1);
      parts.push(`<line id="drift-threshold" x1="${pad}" x2="${w - pad}" y1="${y}" y2="${y}" stroke="#000" stroke-dasharray="5 3"/>`);
    }
    parts.push(`<text x="${pad}" y="14" font-size="11">${pts.length} latest images · dashed: threshold · dots: reviewed</text>`);
  } else {
    parts.push(`<text x="${pad}" y="40" font-size="12">No images scored yet.</text>`);
  }
  svg.innerHTML = parts.join("");
}

async function refresh() {
  await loadModel();
  const s = await api("/v1/scores");
  state.scores = s.points;
  setupSlider();
  drawDrift();
  await loadQueue();
}

function wire() {
  for (const b of $("filters").querySelectorAll("button")) {
    b.addEventListener("click", () => {
      state.filter = b.dataset.filter;
      for (const o of $("filters").querySelectorAll("button")) o.classList.toggle("on", o === b);
      loadQueue();
    });
  }
  $("ask").addEventListener("submit", (e) => { e.preventDefault(); ask(); });
  $("btn-good").addEventListener("click", () => review("normal"));
  $("btn-defect").addEventListener("click", () => review("defect"));
  $("slider").addEventListener("input", showSlider);
  $("btn-outline").addEventListener("click", startOutline);
  $("btn-save-outline").addEventListener("click", saveOutline);
  $("btn-clear-outline").addEventListener("click", () => { outline.boxes = []; drawOutline(); });
  $("btn-retrain").addEventListener("click", startRetrain);
  const area = $("outline-area");
  area.addEventListener("mousedown", (e) => {
    if (!outline.drawing) return;
    e.preventDefault();
    outline.start = toImage(e);
  });
  window.addEventListener("mouseup", (e) => {
    if (!outline.start) return;
    const [x0, y0] = outline.start, [x1, y1] = toImage(e);
    outline.start = null;
    if (Math.abs(x1 - x0) >= 2 && Math.abs(y1 - y0) >= 2) outline.boxes.push([x0, y0, x1, y1]);
    drawOutline();
  });
  $("btn-save-threshold").addEventListener("click", () => saveThreshold({ value: Number($("slider").value) }));
  $("btn-f1").addEventListener("click", () => saveThreshold({ f1_from_reviews: true }));
  $("file-input").addEventListener("change", (e) => {
    const files = [...e.target.files];
    e.target.value = "";  // the same file can be chosen again (re-check after a correction)
    upload(files);
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); upload([...e.dataTransfer.files]); });
  window.addEventListener("resize", () => state.selected && select(state.selected));
}

wire();
refresh().catch((err) => say(`Station not reachable: ${err.message}`, true));
pollRetrain().catch(() => {});
setInterval(() => refresh().catch(() => {}), 5000);
