// What every page shares: the API key, API calls, building elements, formatting numbers and
// times. The API key stays in this browser (localStorage); it is never put in a URL.

export function apiKey() { return localStorage.getItem("gradstream_key") || ""; }
export function setApiKey(key) { localStorage.setItem("gradstream_key", key); }

// fetch with the key; the parsed JSON body (null for a 204); the API's `detail` as the error.
export async function api(path, options = {}) {
  const headers = { Authorization: `Bearer ${apiKey()}`, ...(options.headers || {}) };
  const response = await fetch(path, { ...options, headers });
  const body = response.status === 204 ? null : await response.json().catch(() => null);
  if (!response.ok) {
    const detail = body && body.detail;
    const text = typeof detail === "string" ? detail : JSON.stringify(detail ?? response.statusText);
    throw new Error(`${response.status}: ${text}`);
  }
  return body;
}

// el("a", { href: "#/", class: "x", onclick: fn }, "text", child...)
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (value === true) node.setAttribute(name, "");
    else if (value !== false && value != null) node.setAttribute(name, value);
  }
  for (const child of children) if (child != null) node.append(child);
  return node;
}

export function showError(error) {
  document.getElementById("error").textContent = error ? String(error.message || error) : "";
}

// A number in at most about 7 characters: 0.1234, 12.35, 1.2e+300 (a diverged job), 3.4e-7.
export function fmt(value) {
  if (value === null || value === undefined) return "—";
  if (!Number.isFinite(value)) return String(value);
  const size = Math.abs(value);
  if (size !== 0 && (size >= 1e5 || size < 1e-3)) {
    return value.toExponential(2).replace(/\.?0+e/, "e");
  }
  return String(Number(value.toPrecision(4)));
}

export function fmtDuration(seconds) {
  if (seconds === null || !Number.isFinite(seconds)) return "—";
  if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
  if (seconds < 60) return `${seconds.toFixed(1)} s`;
  const minutes = Math.floor(seconds / 60);
  if (minutes < 60) return `${minutes} min ${String(Math.round(seconds % 60)).padStart(2, "0")} s`;
  return `${Math.floor(minutes / 60)} h ${String(minutes % 60).padStart(2, "0")} min`;
}

export function fmtAge(iso, now = Date.now()) {
  const seconds = Math.max(0, (now - Date.parse(iso)) / 1000);
  if (seconds < 60) return `${Math.round(seconds)} s ago`;
  if (seconds < 3600) return `${Math.round(seconds / 60)} min ago`;
  return `${Math.round(seconds / 3600)} h ago`;
}

// 2026-11-27 10:41:40, in the browser's time zone.
export function fmtTime(iso) {
  if (!iso) return "—";
  const t = new Date(iso);
  const two = (n) => String(n).padStart(2, "0");
  return `${t.getFullYear()}-${two(t.getMonth() + 1)}-${two(t.getDate())} ` +
    `${two(t.getHours())}:${two(t.getMinutes())}:${two(t.getSeconds())}`;
}

// Seconds the job has run: start to end, or to now while it runs.
export function jobSeconds(job) {
  if (!job.started_at) return null;
  const end = job.finished_at ? Date.parse(job.finished_at) : Date.now();
  return Math.max(0, (end - Date.parse(job.started_at)) / 1000);
}

export function jobRate(job) {
  const seconds = jobSeconds(job);
  return seconds ? job.steps_done / seconds : null;
}

// Why a job ended, in a few words: its stop reason or error ("" while it runs).
export function whyEnded(job) {
  if (job.error) return job.error;
  if (job.stop_reason) return job.stop_reason;
  if (job.result && job.result.stopped) return job.result.stopped;
  return "";
}

export function optimizerText(spec) {
  const optimizer = spec.optimizer || {};
  return `${optimizer.name || "sgd"} lr ${fmt(optimizer.lr ?? 0.01)}`;
}

export function dataText(spec) {
  const data = spec.data || {};
  if (data.synthetic) return `synthetic ${data.synthetic.n}×${data.synthetic.d}`;
  if (data.inline) return `inline ${data.inline.samples}×${data.inline.features}`;
  if (data.x) return `inline ${data.x.length}×${Array.isArray(data.x[0]) ? data.x[0].length : 1}`;
  if (data.dataset_id) return `dataset ${data.dataset_id.slice(0, 8)}…`;
  return "—";
}

// How a job is evaluated (DESIGN §11): "holdout 20% (seed 0), every 10 steps", "validation
// set inline 50×3, every step", or "none".
export function evalText(spec) {
  const evaluation = spec.eval;
  if (!evaluation) return "none";
  const every = (evaluation.every || 1) === 1 ? "every step" : `every ${evaluation.every} steps`;
  if (evaluation.holdout != null) {
    const percent = Number((evaluation.holdout * 100).toPrecision(4));
    return `holdout ${percent}% (seed ${evaluation.seed || 0}), ${every}`;
  }
  return `validation set ${dataText({ data: evaluation.data })}, ${every}`;
}

// A destructive button asks once more: the first click arms it for three seconds, and only a
// second click while armed returns true.
export function secondClick(button, label = "Delete") {
  if (button.classList.contains("armed")) return true;
  button.classList.add("armed");
  button.textContent = "Sure?";
  setTimeout(() => { button.classList.remove("armed"); button.textContent = label; }, 3000);
  return false;
}

export function statusBadge(status, attrs = {}) {
  return el("span", { ...attrs, class: `badge ${status}` }, status);
}

// Job ids begin with their creation time, so jobs made together share a prefix: the random
// end tells them apart.
export function shortId(id) { return `…${id.slice(-8)}`; }
