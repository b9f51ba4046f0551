// The gradstream dashboard: the caller's jobs, and a job's live charts from its event stream.
// No dependencies: charts are drawn on canvases. The API key stays in this browser
// (localStorage); the event stream authenticates with a short-lived stream token.
"use strict";

const keyInput = document.getElementById("key");
const view = document.getElementById("view");
const errorBox = document.getElementById("error");
let stopPage = () => {};

function apiKey() { return localStorage.getItem("gradstream_key") || ""; }

async function api(path, options = {}) {
  const headers = { Authorization: `Bearer ${apiKey()}`, ...(options.headers || {}) };
  const response = await fetch(path, { ...options, headers });
  const body = await response.json();
  if (!response.ok) {
    throw new Error(typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail));
  }
  return body;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  for (const child of children) node.append(child);
  return node;
}

function showError(error) { errorBox.textContent = error ? String(error.message || error) : ""; }

// ---- jobs list ---------------------------------------------------------------------------

function jobsPage() {
  const body = el("tbody");
  view.replaceChildren(el("h2", {}, "Jobs"), el("table", { id: "jobs" },
    el("thead", {}, el("tr", {}, ...["job", "status", "device", "steps", "created"].map(
      (name) => el("th", {}, name)))), body));
  async function refresh() {
    try {
      const { jobs } = await api("/v1/jobs?limit=100");
      body.replaceChildren(...jobs.map((job) => el("tr", { "data-job": job.id },
        el("td", { class: "id" }, el("a", { href: `#/jobs/${job.id}` }, job.id)),
        el("td", { class: `status ${job.status}` }, job.status),
        el("td", {}, job.device),
        el("td", {}, `${job.steps_done} / ${job.spec.steps}`),
        el("td", {}, job.created_at))));
      showError(null);
    } catch (error) { showError(error); }
  }
  refresh();
  const timer = setInterval(refresh, 1000);
  return () => clearInterval(timer);
}

// ---- charts ------------------------------------------------------------------------------

const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#db2777",
  "#65a30d", "#4b5563", "#ea580c"];

class Chart {
  constructor(title, options = {}) {
    this.canvas = el("canvas", { id: options.id || "", "data-points": "0" });
    this.series = new Map();  // name -> [[step, value], ...]
    this.log = false;
    const caption = el("figcaption", {}, title);
    if (options.logToggle) {
      const box = el("input", { type: "checkbox", id: `${options.id}-log` });
      box.addEventListener("change", () => { this.log = box.checked; this.draw(); });
      caption.append(el("label", {}, box, " log scale"));
    }
    this.figure = el("figure", {}, caption, this.canvas);
    this.pending = false;
  }

  add(name, step, value) {
    if (!this.series.has(name)) this.series.set(name, []);
    if (value !== null) this.series.get(name).push([step, value]);
  }

  update() {
    let points = 0;
    for (const values of this.series.values()) points += values.length;
    this.canvas.dataset.points = String(points);
    if (!this.pending) {
      this.pending = true;
      requestAnimationFrame(() => { this.pending = false; this.draw(); });
    }
  }

  draw() {
    const canvas = this.canvas;
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth, height = canvas.clientHeight;
    canvas.width = width * ratio; canvas.height = height * ratio;
    const ctx = canvas.getContext("2d");
    ctx.scale(ratio, ratio);
    ctx.clearRect(0, 0, width, height);
    const y = (v) => (this.log ? Math.log10(Math.max(v, 1e-300)) : v);
    let x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
    for (const values of this.series.values()) {
      for (const [step, value] of values) {
        if (this.log && value <= 0) continue;
        x0 = Math.min(x0, step); x1 = Math.max(x1, step);
        y0 = Math.min(y0, y(value)); y1 = Math.max(y1, y(value));
      }
    }
    if (!Number.isFinite(x0)) return;
    if (x1 === x0) x1 = x0 + 1;
    if (y1 === y0) { y0 -= 1; y1 += 1; }
    const left = 64, right = 8, top = 8, bottom = 22;
    const px = (step) => left + ((step - x0) / (x1 - x0)) * (width - left - right);
    const py = (value) => top + (1 - (y(value) - y0) / (y1 - y0)) * (height - top - bottom);
    ctx.strokeStyle = "#9ca3af"; ctx.fillStyle = "#374151"; ctx.font = "11px sans-serif";
    ctx.beginPath(); ctx.moveTo(left, top); ctx.lineTo(left, height - bottom);
    ctx.lineTo(width - right, height - bottom); ctx.stroke();
    const label = (v) => (this.log ? `1e${v.toFixed(1)}` : Number(v.toPrecision(4)).toString());
    ctx.fillText(label(y1), 2, top + 10); ctx.fillText(label(y0), 2, height - bottom);
    ctx.fillText(`step ${x0}`, left, height - 6);
    ctx.fillText(`${x1}`, width - right - 40, height - 6);
    let color = 0, legend = left + 8;
    for (const [name, values] of this.series) {
      ctx.strokeStyle = COLORS[color++ % COLORS.length];
      ctx.beginPath();
      let started = false;
      const stride = Math.max(1, Math.floor(values.length / (width * 2)));
      for (let i = 0; i < values.length; i += stride) {
        const [step, value] = values[i];
        if (this.log && value <= 0) continue;
        if (started) ctx.lineTo(px(step), py(value)); else ctx.moveTo(px(step), py(value));
        started = true;
      }
      ctx.stroke();
      ctx.fillStyle = ctx.strokeStyle; ctx.fillText(name, legend, top + 12);
      legend += ctx.measureText(name).width + 12;
    }
  }
}

// ---- one job -----------------------------------------------------------------------------

function names(values) {
  // {"w": [..], "b": x} -> [["w[0]", v], ..., ["b", x]]; at most 10 series per chart.
  const out = [];
  for (const [name, value] of Object.entries(values)) {
    if (Array.isArray(value)) value.forEach((v, i) => out.push([`${name}[${i}]`, v]));
    else out.push([name, value]);
  }
  return out.slice(0, 10);
}

function jobPage(jobId) {
  const status = el("span", { id: "status", class: "status" }, "");
  const result = el("pre", { id: "result" }, "");
  const explain = el("div", { id: "explain" });
  const loss = new Chart("loss", { id: "loss-chart", logToggle: true });
  const params = new Chart("parameters", { id: "params-chart" });
  const grads = new Chart("gradients", { id: "grads-chart" });
  view.replaceChildren(
    el("h2", {}, "Job ", el("code", {}, jobId), " ", status),
    el("div", { class: "charts" }, loss.figure, params.figure, grads.figure),
    explain, el("h3", {}, "Result"), result);
  let explained = false, source = null, closed = false, lastStep = -1;

  // The stream token lives a few minutes: EventSource reconnects by itself after a dropped
  // connection, but once the token has expired it gets a 401 and gives up. Then this opens a
  // new stream with a new token, after the last step it has.
  async function follow() {
    const { token } = await api(`/v1/jobs/${jobId}/stream-token`, { method: "POST" });
    if (closed) return;
    const query = `token=${encodeURIComponent(token)}&after=${lastStep}`;
    source = new EventSource(`/v1/jobs/${jobId}/events?${query}`);
    source.addEventListener("error", () => {
      if (!closed && source.readyState === EventSource.CLOSED) {
        setTimeout(() => follow().catch(showError), 1000);
      }
    });
    source.addEventListener("step", (message) => {
      const step = JSON.parse(message.data);
      lastStep = step.step;
      loss.add("loss", step.step, step.loss);
      for (const [name, value] of names(step.params)) params.add(name, step.step, value);
      for (const [name, value] of names(step.grads)) grads.add(name, step.step, value);
      loss.update(); params.update(); grads.update();
      if (step.explain && !explained) { explained = true; showExplain(explain, step); }
    });
    source.addEventListener("status", (message) => {
      const { status: now } = JSON.parse(message.data);
      status.textContent = now; status.className = `status ${now}`;
    });
    source.addEventListener("done", (message) => {
      source.close();  // before the server ends the stream: no reconnect
      const final = JSON.parse(message.data);
      status.textContent = final.status; status.className = `status ${final.status}`;
      result.textContent = JSON.stringify(final.result || { error: final.error }, null, 2);
    });
  }

  (async () => {
    try {
      const job = await api(`/v1/jobs/${jobId}`);
      status.textContent = job.status; status.className = `status ${job.status}`;
      if (closed) return;
      await follow();
      showError(null);
    } catch (error) { showError(error); }
  })();
  return () => { closed = true; if (source) source.close(); };
}

// The tutorial's view of one step (jobs run with record.explain): each node of the graph
// with its value, the gradient flowing into it and its local gradient, then the chain rule.
function showExplain(box, step) {
  const show = (v) => JSON.stringify(v);
  const rows = step.explain.nodes.map((node) => el("tr", {},
    el("td", {}, node.node), el("td", {}, node.op), el("td", { class: "value" }, show(node.value)),
    el("td", {}, show(node.grad)),
    el("td", {}, Object.entries(node.local).map(([name, v]) => `d${name.replace("/", "/d")} = ${show(v)}`).join("; "))));
  const chain = step.explain.chain;
  const gradients = ["w", "b"].filter((name) => name in chain)
    .map((name) => `dLoss/d${name} = ${show(chain[name])}`).join(", ");
  box.replaceChildren(
    el("h3", {}, `Backpropagation at step ${step.step}`),
    el("table", { id: "explain-table" },
      el("thead", {}, el("tr", {}, ...["node", "op", "value", "dLoss/d(node)", "local gradient"]
        .map((name) => el("th", {}, name)))),
      el("tbody", {}, ...rows)),
    el("p", { id: "explain-chain" }, `${chain.rule}: ${gradients}`));
}

// ---- routing -----------------------------------------------------------------------------

function route() {
  stopPage();
  const match = location.hash.match(/^#\/jobs\/([0-9a-f]{32})$/);
  stopPage = match ? jobPage(match[1]) : jobsPage();
}

// A link may carry the key in its fragment (never sent to a server): /#key=...&/jobs/<id>.
const linked = location.hash.match(/^#key=([^&]*)(?:&(.*))?$/);
if (linked) {
  localStorage.setItem("gradstream_key", decodeURIComponent(linked[1]));
  history.replaceState(null, "", location.pathname + (linked[2] ? `#${linked[2]}` : ""));
}
keyInput.value = apiKey();
keyInput.addEventListener("change", () => {
  localStorage.setItem("gradstream_key", keyInput.value);
  route();
});
window.addEventListener("hashchange", route);
route();
