// One job: what it is and how it went (spec, device, worker, duration, rate, why it ended),
// live charts of its loss (and validation loss, for a job with eval), parameters and
// gradients from its event stream, and its result with the fit's metrics.
import {
  api, dataText, el, evalText, fmt, fmtDuration, fmtTime, jobRate, jobSeconds, optimizerText,
  shortId, showError, statusBadge, whyEnded,
} from "./common.js";
import { LineChart } from "./charts.js";

const ENDED = new Set(["succeeded", "failed", "diverged", "cancelled", "pruned"]);

// {"w": [..], "b": x} -> [["w[0]", v], ..., ["b", x]]
function flatten(values) {
  const out = [];
  for (const [name, value] of Object.entries(values || {})) {
    if (Array.isArray(value)) value.forEach((v, i) => out.push([`${name}[${i}]`, v]));
    else out.push([name, value]);
  }
  return out;
}

export function jobPage(jobId) {
  const status = el("span", { id: "status-slot" });
  const sweepSlot = el("span", { id: "sweep-slot" });  // a member's link to its sweep
  const actions = el("div", { class: "actions" });
  const facts = el("dl", { id: "job-summary", class: "facts" });
  const resultBox = el("section", { id: "result-card", class: "card", hidden: true });
  const explain = el("div", { id: "explain" });
  // The training loss at every step and, with eval, val_loss at the evaluated steps (DESIGN
  // §11): one chart, one y axis, log scale first (losses fall by orders of magnitude).
  const loss = new LineChart({ id: "loss-chart", title: "Loss", log: true, logScale: true,
    smoothing: true });
  loss.declare("loss");
  const params = new LineChart({ id: "params-chart", title: "Parameters" });
  const grads = new LineChart({ id: "grads-chart", title: "Gradients" });
  loss.figure.classList.add("wide");
  document.getElementById("view").replaceChildren(
    el("div", { class: "page-head" },
      el("h2", {}, "Job ", el("code", { class: "job-id" }, jobId)), status, sweepSlot, actions),
    el("section", { class: "card" }, facts),
    el("div", { class: "charts" }, loss.figure, params.figure, grads.figure),
    resultBox, explain);
  let job = null, source = null, closed = false, lastStep = -1, explained = false;

  // The facts are built once and their text set in place on each refresh.
  const FACTS = [["optimizer", "spec-optimizer"], ["data", "spec-data"], ["steps", "spec-steps"],
    ["evaluation", "spec-eval"], ["device", "device"], ["worker", "worker"], ["duration", "duration"], ["rate", "rate"],
    ["created", "created"], ["state", "why-ended"]];
  const cell = {}, label = {};
  for (const [text, id] of FACTS) {
    cell[id] = el("dd", { id });
    label[id] = el("dt", {}, text);
    facts.append(el("div", { class: `fact fact-${id}` }, label[id], cell[id]));
  }
  const put = (id, text) => { if (cell[id].textContent !== text) cell[id].textContent = text; };

  function show(view) {
    const changed = !job || job.status !== view.status;
    job = view;
    const spec = view.spec;
    const optimizer = spec.optimizer || {};
    const rate = jobRate(view);
    const ended = ENDED.has(view.status);
    put("spec-optimizer", optimizerText(spec) + (optimizer.momentum ? `, momentum ${optimizer.momentum}` : ""));
    put("spec-data", dataText(spec) + (spec.bias ? " + bias" : "") +
      (spec.batch_size ? `, batch ${spec.batch_size}` : ", full batch"));
    put("spec-steps", `${view.steps_done.toLocaleString()} / ${spec.steps.toLocaleString()}`);
    put("spec-eval", evalText(spec));
    if (spec.eval) loss.declare("val_loss");
    put("device", view.device);
    cell.device.title = view.route_reason;
    put("worker", view.worker || "—");
    put("duration", fmtDuration(jobSeconds(view)));
    put("rate", rate ? `${fmt(rate)} steps/s` : "—");
    put("created", fmtTime(view.created_at));
    put("why-ended", ended ? `${view.status}: ${whyEnded(view) || "—"}` : view.status);
    label["why-ended"].textContent = ended ? "why it ended" : "state";
    if (view.sweep && !sweepSlot.firstChild) {
      sweepSlot.append(el("a", { id: "sweep-link", href: `#/sweeps/${view.sweep}` },
        `member of sweep ${shortId(view.sweep)}`));
    }
    if (!changed) return;
    status.replaceChildren(statusBadge(view.status, { id: "status" }));
    actions.replaceChildren(ended
      ? el("button", { id: "delete", class: "danger", onclick: remove }, "Delete")
      : el("button", { id: "cancel", onclick: cancel, disabled: view.status === "cancelling" },
        "Cancel"));
    if (ended) showResult(view);
  }

  async function refresh() {
    try { show(await api(`/v1/jobs/${jobId}`)); showError(null); } catch (error) { showError(error); }
  }

  async function cancel() {
    try { show(await api(`/v1/jobs/${jobId}/cancel`, { method: "POST" })); } catch (error) { showError(error); }
  }

  async function remove() {
    try { await api(`/v1/jobs/${jobId}`, { method: "DELETE" }); location.hash = "#/"; } catch (error) { showError(error); }
  }

  function showResult(view) {
    const result = view.result;
    if (!result) {
      if (view.error) {
        resultBox.replaceChildren(el("h3", {}, "Result"), el("p", { id: "result", class: "bad" }, view.error));
        resultBox.hidden = false;
      }
      return;
    }
    const row = (text, value, id) => [el("div", { class: "fact" }, el("dt", {}, text), el("dd", { id }, value))];
    const values = (params) => flatten(params).map(([name, v]) => `${name} = ${fmt(v)}`).join(", ");
    const evaluated = Boolean(view.spec.eval);
    resultBox.replaceChildren(el("h3", {}, "Result"), el("dl", { id: "result", class: "facts" },
      ...row("final loss", fmt(result.loss)),
      // With eval, full_loss and R² are the training rows' (the validation rows are held out).
      ...row(evaluated ? "loss on the training rows" : "loss on all data", fmt(result.full_loss)),
      ...(evaluated ? row("validation loss", fmt(result.val_loss), "result-val-loss") : []),
      ...row(evaluated ? "R² (training rows)" : "R²", fmt(result.r2)),
      ...row("gap to least squares", fmt(result.lstsq_gap)),
      ...row("stepper", result.stepper || "—"),
      ...row("final parameters", values(result.params))),
    result.metrics ? metricsTable(result.metrics) : null);
    resultBox.hidden = false;
    if (loss.points === 0) {
      for (const chart of [loss, params, grads]) chart.emptyNote.textContent = "No steps were recorded.";
    }
  }

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
      if ("val_loss" in step) loss.add("val_loss", step.step, step.val_loss);
      // A sparse job (record.every N) keeps gradients and parameters every N steps only:
      // their charts take the steps that have them, the loss chart every step.
      if (step.params) {
        for (const [name, value] of flatten(step.params)) params.add(name, step.step, value);
        for (const [name, value] of flatten(step.grads)) grads.add(name, step.step, value);
      }
      loss.update(); params.update(); grads.update();
      if (step.explain && !explained) { explained = true; showExplain(explain, step); }
    });
    source.addEventListener("status", (message) => {
      const { status: now } = JSON.parse(message.data);
      if (job && job.status !== now) refresh();
    });
    source.addEventListener("done", () => {
      source.close();  // before the server ends the stream: no reconnect
      refresh();
    });
    source.addEventListener("gone", (message) => {
      source.close();  // permanent (the archived steps are missing): reconnecting cannot help
      showError(new Error(JSON.parse(message.data).detail));
    });
  }

  // The job view (worker, duration, rate) is read again every second while the job runs.
  const timer = setInterval(() => { if (job && !ENDED.has(job.status)) refresh(); }, 1000);
  (async () => {
    try {
      show(await api(`/v1/jobs/${jobId}`));
      if (!closed) await follow();
      showError(null);
    } catch (error) { showError(error); }
  })();
  return () => {
    closed = true;
    clearInterval(timer);
    if (source) source.close();
    for (const chart of [loss, params, grads]) chart.dispose();
  };
}

// The fit at the final parameters, computed by the worker in float64: a row per side of the
// split (`train`, and `val` for a job with eval), a column per metric.
const METRICS = [["mse", "MSE"], ["rmse", "RMSE"], ["mae", "MAE"], ["r2", "R²"]];
const SPLITS = [["train", "training rows"], ["val", "validation rows"]];

function metricsTable(metrics) {
  const rows = SPLITS.filter(([split]) => metrics[split]).map(([split, text]) =>
    el("tr", { "data-split": split }, el("th", {}, text),
      ...METRICS.map(([name]) => el("td", { class: "num", "data-metric": name }, fmt(metrics[split][name])))));
  return el("table", { id: "result-metrics", class: "grid metrics" },
    el("thead", {}, el("tr", {}, el("th", {}, "at the final parameters"),
      ...METRICS.map(([, text]) => el("th", { class: "num" }, text)))),
    el("tbody", {}, ...rows));
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
  box.replaceChildren(el("section", { class: "card" },
    el("h3", {}, `Backpropagation at step ${step.step}`),
    el("table", { id: "explain-table" },
      el("thead", {}, el("tr", {}, ...["node", "op", "value", "dLoss/d(node)", "local gradient"]
        .map((name) => el("th", {}, name)))),
      el("tbody", {}, ...rows)),
    el("p", { id: "explain-chain" }, `${chain.rule}: ${gradients}`)));
}
