// Sweeps: the caller's sweeps (#/sweeps), and one sweep (#/sweeps/<id>) with every member's
// loss curve on one chart, a parallel-coordinates plot of the swept values against the final
// value of the sweep's metric, and a leaderboard. The sweep page is fed by the sweep's ONE
// event stream (a progress event per group flush: a (step, loss) point for each member that
// moved, and its last val_loss where the flush had an evaluated step), replayed from its
// start and then followed live; the SweepView adds what the stream does not carry (values,
// final losses, the best).
//
// A sweep ranks by its `metric` (DESIGN §11): `loss`, the training loss (final_loss, the
// result's), or `val_loss`, the validation loss (final_val_loss). The leaderboard's order,
// the best, and the parallel plot's last axis and colours all follow it.
import {
  api, dataText, el, evalText, fmt, fmtDuration, fmtTime, secondClick, shortId, showError,
  statusBadge,
} from "./common.js";
import { PALETTE, baseOption, escapeHtml } from "./charts.js";
import { followEvents } from "./sse.js";

const SWEEP_ENDED = new Set(["succeeded", "failed", "cancelled"]);
const MEMBER_ENDED = new Set(["succeeded", "failed", "diverged", "cancelled", "pruned"]);
// Statuses in the order counts are shown.
const STATUS_ORDER = ["running", "queued", "cancelling", "succeeded", "pruned", "diverged",
  "failed", "cancelled"];
const PRUNED_OPACITY = 0.4;  // pruned members keep their colour, faint
const MAX_CURVES = 200;  // beyond this many members only the best-ranked are drawn
const MAX_ROWS = 100;  // leaderboard rows before "Show all"
const REDRAW_MS = 200;

// Members per status as small labelled counts (data-status, data-count for the tests).
function countsList(counts, attrs = {}) {
  const box = el("span", { ...attrs, class: "counts" });
  for (const status of STATUS_ORDER) {
    const n = counts[status] || 0;
    if (n) {
      box.append(el("span", { class: `count ${status}`, "data-status": status, "data-count": n },
        el("b", {}, String(n)), ` ${status}`));
    }
  }
  return box;
}

function sweepEnded(sweep) { return SWEEP_ENDED.has(sweep.status); }

// ---- the list -----------------------------------------------------------------------------

const COLUMNS = ["sweep", "status", "members", "members by status", "best (by its metric)",
  "created", ""];

// The metric a sweep ranks by, as the API resolved it (a sweep stored before metrics: loss).
function metricOf(sweep) { return sweep.spec.metric || "loss"; }

// A member's (or the best's) final value of the metric: the result's.
function finalMetric(member, metric) {
  return metric === "val_loss" ? member.final_val_loss : member.final_loss;
}

export function sweepsPage() {
  const body = el("tbody");
  const empty = el("p", { class: "empty-row", id: "sweeps-empty", hidden: true },
    "No sweeps yet: submit one with `gradstream sweep FILE` or POST /v1/sweeps.");
  document.getElementById("view").replaceChildren(
    el("div", { class: "page-head" }, el("h2", {}, "Sweeps")),
    el("section", { class: "card flush" },
      el("table", { id: "sweeps", class: "grid" },
        el("thead", {}, el("tr", {}, ...COLUMNS.map((name) => el("th", {}, name)))), body),
      empty));
  const rows = new Map();  // sweep id -> its row, updated in place

  function fill(tr, sweep) {
    const cells = tr.children;
    const best = sweep.best;
    if (tr.dataset.status !== sweep.status) {
      tr.dataset.status = sweep.status;
      cells[1].replaceChildren(statusBadge(sweep.status));
      cells[6].replaceChildren(sweepEnded(sweep)
        ? el("button", { class: "delete danger small", onclick: (e) => remove(e.target, sweep.id) }, "Delete")
        : el("button", { class: "cancel small", onclick: () => cancel(sweep.id) }, "Cancel"));
    }
    cells[2].textContent = String(sweep.member_count);  // a listing's row has no members
    cells[3].replaceChildren(countsList(sweep.counts));
    cells[4].textContent = best ? `${metricOf(sweep)} ${fmt(finalMetric(best, metricOf(sweep)))}` : "—";
    cells[4].title = best ? valuesText(best.values, shortNames(Object.keys(best.values))) : "";
    cells[5].textContent = fmtTime(sweep.created_at);
  }

  async function refresh() {
    try {
      const { sweeps } = await api("/v1/sweeps?limit=100");
      const seen = new Set();
      sweeps.forEach((sweep, index) => {
        seen.add(sweep.id);
        let tr = rows.get(sweep.id);
        if (!tr) {
          tr = el("tr", { "data-sweep": sweep.id },
            el("td", {}, el("a", { href: `#/sweeps/${sweep.id}`, title: sweep.id },
              sweep.name || "unnamed"), el("span", { class: "muted id" }, ` ${shortId(sweep.id)}`)),
            el("td"), el("td", { class: "num" }), el("td"), el("td", { class: "num" }), el("td"), el("td"));
          rows.set(sweep.id, tr);
        }
        fill(tr, sweep);
        if (body.children[index] !== tr) body.insertBefore(tr, body.children[index] || null);
      });
      for (const [id, tr] of rows) if (!seen.has(id)) { tr.remove(); rows.delete(id); }
      empty.hidden = sweeps.length > 0;
      showError(null);
    } catch (error) { showError(error); }
  }

  async function cancel(id) {
    try { await api(`/v1/sweeps/${id}/cancel`, { method: "POST" }); refresh(); } catch (error) { showError(error); }
  }

  async function remove(button, id) {
    if (!secondClick(button)) return;
    try { await api(`/v1/sweeps/${id}`, { method: "DELETE" }); refresh(); } catch (error) { showError(error); }
  }

  refresh();
  const timer = setInterval(refresh, 2000);
  return () => clearInterval(timer);
}

// ---- values and ranks ---------------------------------------------------------------------

// "optimizer.lr" -> "lr", unless two swept paths end alike: then the whole path.
function shortNames(paths) {
  const last = (path) => path.split(".").pop();
  return Object.fromEntries(paths.map((path) => [path,
    paths.filter((other) => last(other) === last(path)).length > 1 ? path : last(path)]));
}

function valueText(value) {
  if (typeof value === "number") return fmt(value);
  if (typeof value === "string") return value;
  return JSON.stringify(value);
}

function valuesText(values, names) {
  return Object.entries(values).map(([path, value]) => `${names[path] || path} ${valueText(value)}`)
    .join(" · ");
}

// The leaderboard's order: members still in the race or done (by the metric's final value,
// else its current one), then pruned ones (their value is from an earlier step, so not
// comparable), then queued, then the failed, diverged and cancelled; ties by member order.
// (The API's best counts values within GRADSTREAM_RANK_RTOL as ties; a near-tie may order
// differently here, and the best's row is marked whatever its rank.)
function tier(member) {
  if (member.status === "succeeded" || member.status === "running" || member.status === "cancelling") return 0;
  if (member.status === "pruned") return 1;
  if (member.status === "queued") return 2;
  return 3;
}

// A member's value of the metric as the page knows it: the final one, else the current one.
function metricValue(member, metric) {
  return metric === "val_loss" ? member.finalVal ?? member.val : member.final ?? member.loss;
}

function score(member, metric) {
  const value = metricValue(member, metric);
  return value === null || value === undefined || !Number.isFinite(value) ? Infinity : value;
}

function ranked(members, metric) {
  return [...members].sort((a, b) => tier(a) - tier(b) || score(a, metric) - score(b, metric) ||
    a.index - b.index);
}

const METRIC_NAMES = { loss: "loss", val_loss: "val_loss" };

// A log axis where every value is positive and they span more than `span` times (learning
// rates, epsilons: 100x; losses, read as ratios: 10x); a linear one otherwise.
function numberAxisType(values, span = 100) {
  const finite = values.filter((v) => Number.isFinite(v));
  if (!finite.length || finite.some((v) => v <= 0)) return "value";
  return Math.max(...finite) / Math.min(...finite) > span ? "log" : "value";
}

// ---- one sweep ----------------------------------------------------------------------------

export function sweepPage(sweepId) {
  const status = el("span", { id: "status-slot" });
  const actions = el("div", { class: "actions" });
  const title = el("span", { id: "sweep-name" });
  const facts = el("dl", { id: "sweep-summary", class: "facts" });
  const curves = new SweepCurves();
  const parallel = new ParallelPlot();
  const board = el("tbody");
  const boardHead = el("tr");
  const boardHint = el("span", { class: "muted hint", id: "leaderboard-metric" });
  const more = el("button", { id: "leaderboard-all", class: "small", hidden: true, onclick: () => {
    showAll = true; more.hidden = true; schedule();
  } });
  document.getElementById("view").replaceChildren(
    el("div", { class: "page-head" },
      el("h2", {}, "Sweep ", title, " ", el("code", { class: "job-id" }, sweepId)), status, actions),
    el("section", { class: "card" }, facts),
    el("div", { class: "charts" }, curves.figure, parallel.figure),
    el("section", { class: "card flush" },
      el("h3", {}, "Leaderboard ", boardHint),
      el("table", { id: "leaderboard", class: "grid" }, el("thead", {}, boardHead), board), more));

  const FACTS = [["members", "members"], ["by status", "counts"], ["groups", "groups"], ["best", "best"],
    ["ranked by", "metric"], ["data", "data"], ["steps", "steps"], ["early stop", "early-stop"], ["created", "created"],
    ["duration", "duration"]];
  const cell = {};
  for (const [text, id] of FACTS) {
    cell[id] = el("dd", { id: `sweep-${id}` });
    facts.append(el("div", { class: `fact fact-${id}` }, el("dt", {}, text), cell[id]));
  }

  let sweep = null, names = {}, paths = [], closed = false, showAll = false, viewTimer = null;
  let refreshing = null, refreshAgain = false, metric = "loss", evaluated = false;
  // id -> { index, id, label, values, status, steps, loss, final, val, finalVal, points }
  const members = new Map();

  function member(id) {
    let m = members.get(id);
    if (!m) {  // a member the view has not shown yet: the next refresh fills it in
      m = { index: members.size, id, label: `#${members.size + 1}`, values: {}, status: "queued",
        steps: 0, loss: null, final: null, val: null, finalVal: null, points: [],
        colour: PALETTE[members.size % PALETTE.length] };
      members.set(id, m);
    }
    return m;
  }

  // The view is read at one moment and the stream at another: keep the further of the two.
  function show(view) {
    const first = sweep === null;
    sweep = view;
    if (first) {
      paths = [...Object.keys(view.spec.grid || {}), ...Object.keys((view.spec.random || {}).space || {})];
      names = shortNames(paths);
      metric = metricOf(view);
      evaluated = Boolean(view.spec.base && view.spec.base.eval);
      // The metric's final column is the one the rows are ranked by.
      const ranking = metric === "val_loss" ? "final val loss" : "final loss";
      const columns = ["rank", "member", ...paths.map((p) => names[p]), "status", "steps", "loss",
        ...(evaluated ? ["val loss"] : []), "final loss", ...(evaluated ? ["final val loss"] : []), "job"];
      boardHead.replaceChildren(...columns.map((name) => el("th",
        name === ranking ? { class: "ranked", title: "ranked by this" } : {}, name)));
      boardHint.textContent = `by final ${METRIC_NAMES[metric]} (running members by their ` +
        `${metric === "val_loss" ? "last evaluated" : "current"} ${METRIC_NAMES[metric]}); ` +
        "pruned members after the rest";
      parallel.metric = metric;
      curves.setTitle(evaluated ? "Training loss per member" : "Loss per member");
      title.textContent = view.name || "";
    }
    view.members.forEach((vm, index) => {
      const m = member(vm.id);
      m.index = index;
      m.label = `#${index + 1}`;
      m.colour = PALETTE[index % PALETTE.length];
      m.values = vm.values;
      m.final = vm.final_loss;
      m.finalVal = vm.final_val_loss ?? null;
      if (MEMBER_ENDED.has(vm.status) || !MEMBER_ENDED.has(m.status)) m.status = vm.status;
      if (vm.steps_done >= m.steps) {
        m.steps = vm.steps_done;
        m.loss = vm.loss;
        m.val = vm.val_loss ?? m.val;
      }
    });
    for (const id of [...members.keys()]) {
      if (!view.members.some((vm) => vm.id === id)) members.delete(id);  // deleted meanwhile
    }
    showFacts();
    schedule();
  }

  function showFacts() {
    const base = sweep.spec.base || {};
    const stop = sweep.spec.early_stop;
    const best = sweep.best;
    status.replaceChildren(statusBadge(sweep.status, { id: "sweep-status" }));
    const ended = sweepEnded(sweep);
    if (actions.dataset.ended !== String(ended)) {
      actions.dataset.ended = String(ended);
      actions.replaceChildren(ended
        ? el("button", { id: "delete", class: "danger", onclick: remove }, "Delete")
        : el("button", { id: "cancel", onclick: cancel }, "Cancel"));
    }
    cell.members.textContent = String(members.size);
    cell.groups.textContent = groupsText(sweep);
    cell.metric.textContent = metric === "val_loss"
      ? `val_loss: the validation loss (${evalText(sweep.spec.base)})` : "loss: the training loss";
    cell.metric.dataset.metric = metric;
    cell.data.textContent = base.data ? dataText(base) : "—";
    cell.steps.textContent = base.steps ? base.steps.toLocaleString() : "—";
    cell["early-stop"].textContent = stop
      ? `successive halving: rungs from ${stop.min_steps} steps, eta ${stop.eta}` : "none";
    cell.created.textContent = fmtTime(sweep.created_at);
    const start = sweep.started_at ? Date.parse(sweep.started_at) : null;
    const end = sweep.finished_at ? Date.parse(sweep.finished_at) : Date.now();
    cell.duration.textContent = start === null ? "—" : fmtDuration(Math.max(0, (end - start) / 1000));
    if (best) {
      const m = members.get(best.id);
      cell.best.replaceChildren(el("a", { href: `#/jobs/${best.id}`, id: "best-link" },
        m ? m.label : shortId(best.id)),
      ` ${valuesText(best.values, names)} → ${METRIC_NAMES[metric]} ${fmt(finalMetric(best, metric))}`);
    } else {
      cell.best.textContent = ended ? "none succeeded" : "— (when a member succeeds)";
    }
  }

  // Progress: a point per member that moved, at its last flushed step.
  function progress(data) {
    for (const [id, update] of Object.entries(data.members)) {
      const m = member(id);
      const loss = update.loss;
      m.points.push([update.step, loss === null || !Number.isFinite(loss) ? null : loss]);
      curves.points++;
      if (update.step + 1 >= m.steps) {
        m.steps = update.step + 1;
        m.loss = loss;
        if ("val_loss" in update) m.val = update.val_loss;
      }
      const was = m.status;
      if (!MEMBER_ENDED.has(m.status) && !(update.status === "running" && m.status === "cancelling")) {
        m.status = update.status;
      }
      // Its final loss and the best are in the view: read it soon.
      if (MEMBER_ENDED.has(m.status) && !MEMBER_ENDED.has(was)) refreshSoon();
    }
    curves.counted(members);
    schedule();
  }

  async function refreshView() {
    if (refreshing) { refreshAgain = true; return refreshing; }
    refreshing = (async () => {
      try { show(await wholeSweep(sweepId)); showError(null); } catch (error) { showError(error); }
    })();
    await refreshing;
    refreshing = null;
    if (refreshAgain && !closed) { refreshAgain = false; refreshView(); }
  }

  function refreshSoon() {
    if (viewTimer !== null) return;
    viewTimer = setTimeout(() => { viewTimer = null; if (!closed) refreshView(); }, 300);
  }

  async function cancel() {
    // Its answer has a page of the members: the page then reads them all.
    try { await api(`/v1/sweeps/${sweepId}/cancel`, { method: "POST" }); refreshView(); } catch (error) { showError(error); }
  }

  async function remove(event) {
    if (!secondClick(event.target)) return;
    try { await api(`/v1/sweeps/${sweepId}`, { method: "DELETE" }); location.hash = "#/sweeps"; } catch (error) { showError(error); }
  }

  // Everything drawn at most every REDRAW_MS, in an animation frame.
  let drawTimer = null, drawnAt = 0;
  function schedule() {
    if (drawTimer !== null || closed) return;
    drawTimer = setTimeout(() => requestAnimationFrame(() => {
      drawTimer = null;
      drawnAt = performance.now();
      if (!closed) draw();
    }), Math.max(0, drawnAt + REDRAW_MS - performance.now()));
  }

  function draw() {
    if (!sweep) return;
    const order = ranked(members.values(), metric);
    const best = sweep.best ? members.get(sweep.best.id)
      : order.find((m) => tier(m) === 0 && metricValue(m, metric) != null);
    const counts = {};
    for (const m of members.values()) counts[m.status] = (counts[m.status] || 0) + 1;
    cell.counts.replaceChildren(countsList(counts, { id: "sweep-counts" }));
    curves.draw(order, best, names);
    parallel.draw([...members.values()], best, paths, names);
    drawBoard(order, best);
  }

  // Rows are kept (a row under the pointer stays, and keeps its hover) and put in rank order.
  const rows = new Map();  // member id -> { tr, cells }
  function drawBoard(order, best) {
    const shown = showAll ? order : order.slice(0, MAX_ROWS);
    more.hidden = showAll || order.length <= MAX_ROWS;
    more.textContent = `Show all ${order.length} members`;
    const seen = new Set();
    shown.forEach((m, rank) => {
      seen.add(m.id);
      let row = rows.get(m.id);
      if (!row) {
        const cells = Array.from({ length: boardHead.children.length }, () => el("td"));
        const tr = el("tr", { "data-job": m.id,
          onmouseenter: () => { curves.highlight(m.id, true); parallel.highlight(m.id, true); },
          onmouseleave: () => { curves.highlight(m.id, false); parallel.highlight(m.id, false); } },
        ...cells);
        row = { tr, cells };
        rows.set(m.id, row);
      }
      const { tr, cells } = row;
      const put = (index, text, cls) => {
        if (cells[index].textContent !== text) cells[index].textContent = text;
        if (cls && cells[index].className !== cls) cells[index].className = cls;
      };
      const classes = [m === best ? "best" : "", m.status === "pruned" ? "pruned" : ""].join(" ").trim();
      if (tr.className !== classes) tr.className = classes;
      put(0, String(rank + 1), "num rank");
      const faint = m.status === "pruned" ? `; opacity: ${PRUNED_OPACITY}` : "";
      if (cells[1].dataset.key !== `${faint} ${m.label}`) {
        cells[1].dataset.key = `${faint} ${m.label}`;
        cells[1].replaceChildren(el("span", { class: "swatch", style: `background: ${m.colour}${faint}` }), m.label);
      }
      paths.forEach((path, i) => put(2 + i, valueText(m.values[path]), "num"));
      const at = 2 + paths.length;
      if (tr.dataset.status !== m.status) {
        tr.dataset.status = m.status;
        cells[at].replaceChildren(statusBadge(m.status));
      }
      put(at + 1, m.steps.toLocaleString(), "num");
      const shown = [["loss", m.loss], ...(evaluated ? [["val", m.val]] : []), ["final", m.final],
        ...(evaluated ? [["final-val", m.finalVal]] : [])];
      const ranking = metric === "val_loss" ? "final-val" : "final";
      shown.forEach(([name, value], i) => put(at + 2 + i, fmt(value),
        `num ${name}${name === ranking ? " ranked" : ""}`));
      const link = cells[at + 2 + shown.length];
      if (!link.firstChild) {
        link.className = "id";
        link.append(el("a", { href: `#/jobs/${m.id}`, title: m.id }, shortId(m.id)));
      }
      if (board.children[rank] !== tr) board.insertBefore(tr, board.children[rank] || null);
    });
    for (const [id, row] of rows) if (!seen.has(id)) { row.tr.remove(); rows.delete(id); }
  }

  const stopStream = followEvents(`/v1/sweeps/${sweepId}/events`, {
    status: () => refreshView(),
    progress: (data) => { showError(null); progress(data); },
    done: () => { refreshView(); },  // done carries the sweep's summary: read its members
  }, (error, retrying) => showError(retrying ? `event stream: ${error.message}; reconnecting…` : error));
  refreshView();
  // Duration and statuses of queued members (no progress event until they run).
  const timer = setInterval(() => { if (sweep && !sweepEnded(sweep)) refreshView(); }, 2000);
  return () => {
    closed = true;
    stopStream();
    clearInterval(timer);
    clearTimeout(viewTimer);
    clearTimeout(drawTimer);
    curves.dispose();
    parallel.dispose();
  };
}

// ---- the charts ---------------------------------------------------------------------------

// GET /v1/sweeps/{id} pages its members: the view with all of them, page after page.
export async function wholeSweep(sweepId) {
  const path = `/v1/sweeps/${sweepId}?members_limit=1000`;
  const view = await api(path);
  while (view.members_next !== null && view.members_next !== undefined) {
    const page = await api(`${path}&members_cursor=${view.members_next}`);
    view.members.push(...page.members);
    view.members_next = page.members_next;
  }
  return view;
}

// The groups, and where halving cut each (it ranks within a group: each keeps its own winners).
function groupsText(view) {
  const groups = view.group_details || [];
  const cut = groups.some((g) => g.rungs.length);
  if (!cut) return `${view.groups}`;
  return `${view.groups}, halving within each: ` + groups.map((g) =>
    `${g.members}${g.rungs.map((r) => ` → ${r.kept}`).join("")}`).join("; ");
}

// Every member's loss over steps, one line each: pruned members faint, their line
// ending where they stopped (a hollow dot), the best (or while running, the leader) thick and
// labelled. Hover: the members nearest the pointer's step, lowest loss first, with their
// values; a leaderboard row's hover brings its line forward (data-focus).
class SweepCurves {
  constructor() {
    this.log = true;
    this.focus = null;  // a member id
    this.points = 0;
    this.chart = null;
    this.box = el("div", { id: "sweep-curves", class: "chart", "data-points": "0", "data-series": "0" });
    this.emptyNote = el("div", { class: "empty", id: "sweep-curves-empty" }, "Waiting for the first flush…");
    this.note = el("span", { class: "muted hint", id: "sweep-curves-note" });
    const key = el("span", { class: "key-list" },
      el("span", {}, el("span", { class: "swatch thick" }), "best"),
      el("span", {}, el("span", { class: "swatch", style: `background: #334155; opacity: ${PRUNED_OPACITY}` }),
        "pruned"));
    const controls = el("div", { class: "controls" }, key, el("label", {}, el("input", {
      type: "checkbox", id: "sweep-curves-log", checked: true,
      onchange: (event) => { this.log = event.target.checked; this.redraw(); },
    }), " log scale"));
    this.title = el("h3", {}, "Loss per member");
    this.figure = el("figure", { class: "card chart-card wide tall" },
      el("figcaption", {}, this.title, this.note, controls),
      el("div", { class: "chart-wrap" }, this.box, this.emptyNote));
  }

  setTitle(text) { this.title.textContent = text; }

  // The whole y axis each time: ECharts rebuilds an axis whose type changes (linear, log)
  // from the option given with the change, and would drop the label formatter.
  yAxis() {
    return { ...baseOption("step").yAxis, type: this.log ? "log" : "value", name: "loss",
      nameTextStyle: { color: "#64748b", fontSize: 11 } };
  }

  // What the chart holds (the tests wait on these): points, and members with a point.
  counted(members) {
    this.box.dataset.points = String(this.points);
    let series = 0;
    for (const m of members.values()) if (m.points.length) series++;
    this.box.dataset.series = String(series);
  }

  redraw() { if (this.last) this.draw(...this.last); }

  draw(order, best, names) {
    this.last = [order, best, names];
    if (this.points === 0 || !this.box.isConnected) return;
    this.emptyNote.hidden = true;
    if (!this.chart) this.start(names);
    this.names = names;
    const drawn = order.slice(0, MAX_CURVES).filter((m) => m.points.length)
      .sort((a, b) => a.index - b.index);
    this.byId = new Map(drawn.map((m) => [m.id, m]));
    this.note.textContent = order.length > MAX_CURVES
      ? `the ${MAX_CURVES} best-ranked of ${order.length} members` : "";
    const series = drawn.map((m) => {
      const pruned = m.status === "pruned";
      const top = m === best;
      // A leaderboard row under the pointer: its line forward, the others faint.
      const focused = this.focus === m.id;
      const fade = this.focus && !focused ? 0.2 : 1;
      const data = this.log ? m.points.map(([x, y]) => [x, y !== null && y > 0 ? y : null]) : m.points;
      return {
        type: "line", id: m.id, name: m.label, data, color: m.colour,
        // A member with one flush so far has one point: a dot, as a line it would not show.
        showSymbol: m.points.length === 1, sampling: "lttb", connectNulls: false,
        lineStyle: { width: top || focused ? 3 : pruned ? 1.2 : 1.6,
          opacity: fade * (top || focused ? 1 : pruned ? PRUNED_OPACITY : 0.85) },
        z: focused ? 6 : top ? 5 : pruned ? 1 : 2,
        // The axis tooltip would emphasise every line at the pointer's step, pruned ones too.
        emphasis: { disabled: true },
        endLabel: top ? { show: true, formatter: `best ${m.label}`, color: m.colour,
          fontWeight: 600, fontSize: 12 } : { show: false },
      };
    });
    const ends = drawn.filter((m) => m.status === "pruned").map((m) => {
      const last = m.points[m.points.length - 1];
      return { name: m.label, value: [last[0], this.log && !(last[1] > 0) ? null : last[1]],
        itemStyle: { borderColor: m.colour } };
    });
    series.push({ type: "scatter", id: "pruned-ends", name: "pruned at", data: ends,
      symbolSize: 6, z: 3, silent: true, itemStyle: { color: "#fff", borderWidth: 1.5 } });
    this.chart.setOption({ yAxis: this.yAxis(), series }, { replaceMerge: ["series"] });
    this.maxStep = Math.max(0, ...drawn.map((m) => m.points[m.points.length - 1][0]));
    this.box.dataset.drawn = String(drawn.reduce((n, m) => n + m.points.length, 0));
    this.box.dataset.scale = this.log ? "log" : "linear";
    this.box.dataset.pruned = String(ends.length);
    this.box.dataset.best = best ? best.id : "";
    this.box.dataset.focus = this.focus || "";
  }

  start() {
    this.chart = echarts.init(this.box, null, { renderer: "canvas" });
    const option = baseOption("step");
    option.legend = { show: false };
    option.grid = { ...option.grid, top: 16, right: 78 };
    option.xAxis = { ...option.xAxis, min: 0 };  // points are at flushes: the first is not step 0
    option.yAxis = this.yAxis();
    option.tooltip = { ...option.tooltip, formatter: (params) => this.tooltip(params) };
    this.chart.setOption(option);
    this.resizer = new ResizeObserver(() => this.chart.resize());
    this.resizer.observe(this.box);
  }

  // The members with a point near the pointer's step (a pruned member's line has ended before
  // it), lowest loss first: at most eight, with their values.
  tooltip(params) {
    const step = Math.round(params.length ? params[0].axisValue : 0);
    const near = Math.max(1, this.maxStep * 0.02);
    const rows = params.filter((p) => p.seriesType === "line" && p.value && p.value[1] !== null &&
      Math.abs(p.value[0] - step) <= near).sort((a, b) => a.value[1] - b.value[1]);
    const html = rows.slice(0, 8).map((p) => {
      const m = this.byId.get(p.seriesId);
      const values = m ? valuesText(m.values, this.names) : "";
      const state = m && m.status !== "running" ? ` <i>${escapeHtml(m.status)}</i>` : "";
      return `<div class="tip-row">${p.marker}<span>${escapeHtml(p.seriesName)}</span>` +
        `<span class="tip-values">${escapeHtml(values)}${state}</span><b>${fmt(p.value[1])}</b></div>`;
    });
    if (rows.length > 8) html.push(`<div class="tip-more">+ ${rows.length - 8} more</div>`);
    return `<div class="tip-head">step ${step.toLocaleString()}</div>${html.join("")}`;
  }

  highlight(id, on) {
    if (on) this.focus = id; else if (this.focus === id) this.focus = null;
    if (this.last) this.draw(...this.last);
  }

  dispose() {
    if (this.resizer) this.resizer.disconnect();
    if (this.chart) this.chart.dispose();
  }
}

// Parallel coordinates: an axis per swept path (log for a positive range over 100x,
// categories for strings and booleans), and the sweep's metric last (its final value; a
// member without one yet, running or pruned, at its last value). One line per member with a
// value, coloured by that value (a visualMap: the colour bar at the right; on a log axis, by
// the value's logarithm), the best thick, pruned members faint.
const METRIC_COLOURS = ["#1e40af", "#2563eb", "#0891b2", "#65a30d", "#d97706", "#dc2626"];

class ParallelPlot {
  constructor() {
    this.chart = null;
    this.metric = "loss";
    this.box = el("div", { id: "sweep-parallel", class: "chart", "data-lines": "0" });
    this.emptyNote = el("div", { class: "empty", id: "sweep-parallel-empty" }, "Waiting for the first loss…");
    this.title = el("h3", {}, "Swept values against the final loss");
    this.hint = el("span", { class: "muted hint" }, "pruned and running members at their last loss");
    this.figure = el("figure", { class: "card chart-card wide" },
      el("figcaption", {}, this.title, this.hint),
      el("div", { class: "chart-wrap" }, this.box, this.emptyNote));
  }

  draw(members, best, paths, names) {
    const metric = this.metric;
    const name = METRIC_NAMES[metric];
    this.title.textContent = `Swept values against the final ${name}`;
    this.hint.textContent = `pruned and running members at their last ${name}; colour: the ${name}`;
    const valueOf = (m) => metricValue(m, metric);
    const shown = members.filter((m) => Number.isFinite(valueOf(m))).sort((a, b) => a.index - b.index);
    this.box.dataset.lines = String(shown.length);
    this.box.dataset.metric = metric;
    if (!shown.length || !this.box.isConnected) return;
    this.emptyNote.hidden = true;
    if (!this.chart) this.start();
    const axisText = { color: "#64748b", fontSize: 11 };
    const axes = paths.map((path, dim) => {
      const values = shown.map((m) => m.values[path]);
      const name = names[path];
      if (values.every((v) => typeof v === "number")) {
        return { dim, name, type: numberAxisType(values), scale: true,
          axisLabel: { ...axisText, formatter: (v) => fmt(v) } };
      }
      const categories = [...new Set(values.map(valueText))];
      return { dim, name, type: "category", data: categories, axisLabel: axisText };
    });
    const scores = shown.map(valueOf);
    const logScale = numberAxisType(scores, 10) === "log";
    axes.push({ dim: paths.length, name: `final ${name}`, type: logScale ? "log" : "value",
      scale: true, axisLabel: { ...axisText, formatter: (v) => fmt(v) },
      nameTextStyle: { color: "#0f172a", fontSize: 12, fontWeight: 600 } });
    // The colour's dimension: the metric, or its log10 on a log axis (not an axis of its own).
    const colourOf = (v) => (logScale ? Math.log10(v) : v);
    const low = Math.min(...scores.map(colourOf)), high = Math.max(...scores.map(colourOf));
    this.index = new Map(shown.map((m, i) => [m.id, i]));
    this.members = shown;
    this.names = names;
    const data = shown.map((m) => {
      const pruned = m.status === "pruned";
      const top = m === best;
      const value = paths.map((path, dim) => (axes[dim].type === "category"
        ? valueText(m.values[path]) : m.values[path]));
      value.push(valueOf(m), colourOf(valueOf(m)));
      return { name: m.label, value, lineStyle: {
        width: top ? 3.5 : pruned ? 1.2 : 1.8, opacity: top ? 1 : pruned ? PRUNED_OPACITY : 0.85 } };
    });
    // Best on top: ECharts draws the data in order.
    if (best && this.index.has(best.id)) data.push(data.splice(this.index.get(best.id), 1)[0]);
    this.order = data.map((d) => d.name);
    this.chart.setOption({
      parallelAxis: axes,
      visualMap: [{ type: "continuous", id: "metric", seriesIndex: 0, dimension: paths.length + 1,
        min: low, max: high > low ? high : low + 1, inRange: { color: METRIC_COLOURS },
        calculable: false, realtime: false, orient: "vertical", right: 8, top: "middle",
        itemWidth: 10, itemHeight: 110, text: [`worse`, `better`],
        textStyle: { color: "#64748b", fontSize: 11 },
        formatter: (v) => fmt(logScale ? 10 ** v : v) }],
      series: [{ type: "parallel", id: "members", data, smooth: false, inactiveOpacity: 0.1,
        activeOpacity: 1, emphasis: { lineStyle: { width: 4, opacity: 1 } } }],
    }, { replaceMerge: ["parallelAxis", "visualMap", "series"] });
    this.box.dataset.axes = axes.map((axis) => axis.type).join(",");
  }

  start() {
    this.chart = echarts.init(this.box, null, { renderer: "canvas" });
    this.chart.setOption({
      animation: false,
      textStyle: { fontFamily: "Inter, system-ui, sans-serif" },
      parallel: { left: 50, right: 150, top: 36, bottom: 24,
        parallelAxisDefault: { nameLocation: "end", nameGap: 12,
          nameTextStyle: { color: "#334155", fontSize: 12, fontWeight: 600 },
          axisLine: { lineStyle: { color: "#94a3b8" } }, axisTick: { lineStyle: { color: "#94a3b8" } },
          splitLine: { show: false } } },
      tooltip: { trigger: "item", confine: true, formatter: (p) => this.tooltip(p) },
    });
    this.resizer = new ResizeObserver(() => this.chart.resize());
    this.resizer.observe(this.box);
  }

  tooltip(p) {
    const m = this.members.find((member) => member.label === p.name);
    if (!m) return "";
    return `<div class="tip-head">${escapeHtml(m.label)} <i>${escapeHtml(m.status)}</i></div>` +
      `<div>${escapeHtml(valuesText(m.values, this.names))}</div>` +
      `<div class="tip-row"><span>${METRIC_NAMES[this.metric]}</span>` +
      `<b>${fmt(p.value[p.value.length - 2])}</b></div>`;
  }

  highlight(id, on) {
    const m = this.members && this.members.find((member) => member.id === id);
    if (this.chart && m) {
      this.chart.dispatchAction({ type: on ? "highlight" : "downplay", seriesIndex: 0,
        dataIndex: this.order.indexOf(m.label) });
    }
  }

  dispose() {
    if (this.resizer) this.resizer.disconnect();
    if (this.chart) this.chart.dispose();
  }
}
