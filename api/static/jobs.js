// The caller's jobs (filtered by status, refreshed every second, with cancel and delete), and
// the compare view: the loss curves of the jobs ticked in the list, overlaid on one chart (a
// job with eval adds its val_loss, dashed, in its colour).
import {
  api, dataText, el, fmt, fmtDuration, fmtTime, jobSeconds, optimizerText, secondClick,
  showError, shortId, statusBadge, whyEnded,
} from "./common.js";
import { LineChart, PALETTE } from "./charts.js";

const STATUSES = ["queued", "running", "cancelling", "succeeded", "failed", "diverged", "cancelled", "pruned"];
const ENDED = new Set(["succeeded", "failed", "diverged", "cancelled", "pruned"]);
const COLUMNS = ["", "job", "status", "optimizer", "data", "steps", "final loss", "val loss",
  "device", "duration", "why it ended", "created", ""];
const ACTION = COLUMNS.length - 1;  // the cancel or delete button's cell

// A finished job's loss at its final parameters (on all the data, or the training rows of a
// job with eval; the last step's where the worker did not compute it), and its validation
// loss (jobs with eval); "—" while it runs.
export function finalLoss(job) {
  return job.result ? job.result.full_loss ?? job.result.loss : null;
}

export function finalValLoss(job) {
  return job.result ? job.result.val_loss ?? null : null;
}
const selected = new Set();  // ticked jobs, kept while the page is left and come back to
let statusFilter = "";

export function jobsPage() {
  const body = el("tbody");
  const filter = el("select", { id: "status-filter", onchange: () => {
    statusFilter = filter.value; refresh();
  } }, el("option", { value: "" }, "all statuses"),
  ...STATUSES.map((status) => el("option", { value: status }, status)));
  filter.value = statusFilter;
  const compare = el("button", { id: "compare", class: "primary", onclick: () => {
    location.hash = `#/compare/${[...selected].join(",")}`;
  } });
  const empty = el("p", { class: "empty-row", id: "jobs-empty", hidden: true });
  document.getElementById("view").replaceChildren(
    el("div", { class: "page-head" }, el("h2", {}, "Jobs"),
      el("div", { class: "toolbar" }, el("label", {}, "Status ", filter), compare)),
    el("section", { class: "card flush" },
      el("table", { id: "jobs", class: "grid" },
        el("thead", {}, el("tr", {}, ...COLUMNS.map((name) => el("th", {}, name)))), body),
      empty));
  const rows = new Map();  // job id -> its row, updated in place

  function showSelection() {
    compare.textContent = `Compare (${selected.size})`;
    compare.disabled = selected.size < 2;
  }

  function row(job) {
    const tick = el("input", { type: "checkbox", class: "pick", "aria-label": `select ${job.id}`,
      onchange: () => {
        if (tick.checked) selected.add(job.id); else selected.delete(job.id);
        showSelection();
      } });
    tick.checked = selected.has(job.id);
    const tr = el("tr", { "data-job": job.id },
      el("td", {}, tick),
      el("td", { class: "id" }, el("a", { href: `#/jobs/${job.id}`, title: job.id }, shortId(job.id)),
        job.sweep ? el("a", { class: "sweep-tag", href: `#/sweeps/${job.sweep}`,
          title: `member of sweep ${job.sweep}` }, "sweep") : null),
      ...Array.from({ length: COLUMNS.length - 2 }, () => el("td")));
    return tr;
  }

  function fill(tr, job) {
    const cells = tr.children;
    const set = (index, text, cls) => {
      if (cells[index].textContent !== text) cells[index].textContent = text;
      if (cls) cells[index].className = cls;
    };
    if (tr.dataset.status !== job.status) {
      tr.dataset.status = job.status;
      cells[2].replaceChildren(statusBadge(job.status));
      cells[ACTION].replaceChildren(ENDED.has(job.status)
        ? el("button", { class: "delete danger small", onclick: (e) => remove(e.target, job.id) }, "Delete")
        : el("button", { class: "cancel small", onclick: () => cancel(job.id),
          disabled: job.status === "cancelling" }, "Cancel"));
    }
    set(3, optimizerText(job.spec));
    set(4, dataText(job.spec));
    set(5, `${job.steps_done.toLocaleString()} / ${job.spec.steps.toLocaleString()}`, "num");
    set(6, fmt(finalLoss(job)), "num final-loss");
    set(7, job.spec.eval ? fmt(finalValLoss(job)) : "", "num val-loss");
    set(8, job.device);
    set(9, fmtDuration(jobSeconds(job)), "num");
    set(10, whyEnded(job), "why");
    cells[10].title = whyEnded(job);
    set(11, fmtTime(job.created_at));
  }

  async function refresh() {
    try {
      const query = statusFilter ? `&status=${statusFilter}` : "";
      const { jobs } = await api(`/v1/jobs?limit=100${query}`);
      const seen = new Set();
      jobs.forEach((job, index) => {
        seen.add(job.id);
        let tr = rows.get(job.id);
        if (!tr) { tr = row(job); rows.set(job.id, tr); }
        fill(tr, job);
        if (body.children[index] !== tr) body.insertBefore(tr, body.children[index] || null);
      });
      for (const [id, tr] of rows) if (!seen.has(id)) { tr.remove(); rows.delete(id); }
      empty.hidden = jobs.length > 0;
      empty.textContent = statusFilter ? `No ${statusFilter} jobs.` :
        "No jobs yet: submit one with `gradstream submit` or POST /v1/jobs.";
      showError(null);
    } catch (error) { showError(error); }
  }

  async function cancel(id) {
    try { await api(`/v1/jobs/${id}/cancel`, { method: "POST" }); refresh(); } catch (error) { showError(error); }
  }

  // Delete asks once more: the first click arms the button for three seconds.
  async function remove(button, id) {
    if (!secondClick(button)) return;
    try {
      await api(`/v1/jobs/${id}`, { method: "DELETE" });
      selected.delete(id);
      showSelection();
      refresh();
    } catch (error) { showError(error); }
  }

  showSelection();
  refresh();
  const timer = setInterval(refresh, 1000);
  return () => clearInterval(timer);
}

// ---- compare -----------------------------------------------------------------------------

// Each job's stored steps, page by page (following `next`), then its new steps every second
// until it ends; all loss curves on one chart, a job's val_loss dashed in its loss's colour.
export function comparePage(ids) {
  const chart = new LineChart({ id: "compare-chart", title: "Loss", log: true, logScale: true,
    smoothing: true, empty: "Waiting for the first step…" });
  chart.figure.classList.add("wide", "tall");
  const body = el("tbody");
  document.getElementById("view").replaceChildren(
    el("div", { class: "page-head" }, el("h2", {}, `Compare ${ids.length} jobs`),
      el("a", { href: "#/", class: "button" }, "← Jobs")),
    chart.figure,
    el("section", { class: "card flush" }, el("table", { id: "compare-jobs", class: "grid" },
      el("thead", {}, el("tr", {}, ...["series", "job", "status", "optimizer", "data", "steps",
        "final loss", "val loss", "duration"].map((name) => el("th", {}, name)))), body)));
  let closed = false;

  // Each job's series and row first, in the order ticked; then their steps.
  async function load(job, index) {
    const id = job.id;
    const name = `${shortId(id)} ${optimizerText(job.spec)}`;
    const color = PALETTE[index % PALETTE.length];
    chart.declare(name, { color });
    const valName = `${name} val_loss`;
    if (job.spec.eval) chart.declare(valName, { color, dashed: true });
    const cells = Array.from({ length: 7 }, () => el("td"));
    body.append(el("tr", { "data-job": id },
      el("td", {}, el("span", { class: "swatch", style: `background: ${chart.colour(name)}` }), name),
      el("td", { class: "id" }, el("a", { href: `#/jobs/${id}` }, shortId(id))), ...cells));
    let after = -1, last = null, lastVal = null;
    for (;;) {
      const page = await api(`/v1/jobs/${id}/steps?after=${after}&limit=5000`);
      for (const step of page.steps) {
        chart.add(name, step.step, step.loss);
        last = step.loss;
        if ("val_loss" in step) { chart.add(valName, step.step, step.val_loss); lastVal = step.val_loss; }
      }
      if (page.steps.length) chart.update();
      if (page.next !== null) { after = page.next; continue; }
      if (page.steps.length) after = page.steps[page.steps.length - 1].step;
      cells[0].replaceChildren(statusBadge(job.status));
      cells[1].textContent = optimizerText(job.spec);
      cells[2].textContent = dataText(job.spec);
      cells[3].textContent = `${job.steps_done.toLocaleString()} / ${job.spec.steps.toLocaleString()}`;
      cells[4].textContent = fmt(job.result ? finalLoss(job) : last);
      cells[4].className = "num final-loss";
      cells[5].textContent = job.spec.eval ? fmt(job.result ? finalValLoss(job) : lastVal) : "";
      cells[5].className = "num val-loss";
      cells[6].textContent = fmtDuration(jobSeconds(job));
      if (ENDED.has(job.status) || closed) return;
      await new Promise((resolve) => setTimeout(resolve, 1000));
      if (closed) return;
      job = await api(`/v1/jobs/${id}`);  // read before the steps: its last steps are read next
    }
  }

  Promise.all(ids.map((id) => api(`/v1/jobs/${id}`)))
    .then((jobs) => Promise.all(jobs.map(load)))
    .then(() => showError(null), showError);
  return () => { closed = true; chart.dispose(); };
}
