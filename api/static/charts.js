// Line charts over steps, drawn by Apache ECharts (loaded by index.html as window.echarts).
//
// A chart keeps its series itself and hands them to ECharts at most five times a second, in
// an animation frame: a job streams thousands of steps a second, and 5 × 20 000 parameter
// points redrawn per step would not keep up. ECharts thins a line to about a point per pixel
// (sampling: "lttb", which keeps peaks); a line series has no progressive or large mode.
import { el, fmt } from "./common.js";

export const PALETTE = ["#2563eb", "#e11d48", "#059669", "#d97706", "#7c3aed", "#0891b2",
  "#db2777", "#65a30d", "#475569", "#ea580c", "#4f46e5", "#0d9488"];
const MAX_SHOWN = 10;  // more series than this: a picker chooses which are drawn
const REDRAW_MS = 200;

// TensorBoard's smoothing: an exponential moving average, debiased at the start.
export function smooth(points, weight) {
  const out = new Array(points.length);
  let last = 0, count = 0;
  for (let i = 0; i < points.length; i++) {
    const [x, y] = points[i];
    if (y === null || !Number.isFinite(y)) { out[i] = [x, y]; continue; }
    last = last * weight + (1 - weight) * y;
    count++;
    out[i] = [x, last / (1 - weight ** count)];
  }
  return out;
}

export class LineChart {
  // id: the chart element's id (it carries data-points and data-series, what it holds, and
  // data-drawn and data-scale, what it shows);
  // log / smoothing: offer those toggles (logScale: the log scale on from the start);
  // empty: what shows before the first point.
  constructor({ id, title, log = false, logScale = false, smoothing = false, xName = "step",
    empty = "Waiting for the first step…" }) {
    this.id = id;
    this.xName = xName;
    this.series = new Map();  // name -> [[x, y], ...] (y null where it was not finite)
    this.styles = new Map();  // name -> { color, dashed }, for series declared with a style
    this.shown = new Set();  // the names drawn when there are more than MAX_SHOWN
    this.log = log && logScale;
    this.weight = 0;  // smoothing; 0 is off
    this.points = 0;
    this.timer = null;
    this.chart = null;
    this.box = el("div", { id, class: "chart", "data-points": "0" });
    this.emptyNote = el("div", { class: "empty", id: `${id}-empty` }, empty);
    const controls = el("div", { class: "controls" });
    if (log) {
      controls.append(el("label", {}, el("input", {
        type: "checkbox", id: `${id}-log`, checked: this.log,
        onchange: (event) => { this.log = event.target.checked; this.redraw(); },
      }), " log scale"));
    }
    if (smoothing) {
      const weight = el("input", {
        type: "range", id: `${id}-smooth-weight`, min: "0.5", max: "0.99", step: "0.01",
        value: "0.9", disabled: true, title: "smoothing weight",
        oninput: () => { this.weight = Number(weight.value); this.redraw(); },
      });
      controls.append(el("label", {}, el("input", {
        type: "checkbox", id: `${id}-smooth`,
        onchange: (event) => {
          weight.disabled = !event.target.checked;
          this.weight = event.target.checked ? Number(weight.value) : 0;
          this.redraw();
        },
      }), " smoothing"), weight);
    }
    this.picker = el("details", { class: "picker", id: `${id}-picker`, hidden: true });
    controls.append(this.picker);
    this.figure = el("figure", { class: "card chart-card" },
      el("figcaption", {}, el("h3", {}, title), controls),
      el("div", { class: "chart-wrap" }, this.box, this.emptyNote));
  }

  // A series, before its first point: series keep the order (and colour) they are declared
  // in, unless `style` gives a colour; style.dashed draws it dashed. A series may have points
  // at some steps only (val_loss at evaluated steps): its line joins the points it has.
  declare(name, style = null) {
    if (this.series.has(name)) return this.series.get(name);
    const points = [];
    this.series.set(name, points);
    if (style) this.styles.set(name, style);
    if (this.shown.size < MAX_SHOWN) this.shown.add(name);
    this.pickerStale = true;
    return points;
  }

  colour(name) {
    const style = this.styles.get(name);
    if (style && style.color) return style.color;
    return PALETTE[[...this.series.keys()].indexOf(name) % PALETTE.length];
  }

  add(name, x, y) {
    this.declare(name).push([x, Number.isFinite(y) ? y : null]);
    this.points++;
  }

  // After adding points: count them now, draw soon (at most every REDRAW_MS).
  update() {
    this.box.dataset.points = String(this.points);
    this.box.dataset.series = String(this.series.size);
    this.redraw();
  }

  redraw() {
    if (this.timer !== null) return;
    const wait = Math.max(0, (this.drawnAt || 0) + REDRAW_MS - performance.now());
    this.timer = setTimeout(() => requestAnimationFrame(() => {
      this.timer = null;
      this.drawnAt = performance.now();
      this.draw();
    }), wait);
  }

  dispose() {
    clearTimeout(this.timer);
    if (this.resizer) this.resizer.disconnect();
    if (this.chart) this.chart.dispose();
  }

  draw() {
    if (this.points === 0 || !this.box.isConnected) return;
    this.emptyNote.hidden = true;
    if (!this.chart) this.start();
    if (this.pickerStale) this.fillPicker();
    const names = [...this.series.keys()];
    const drawn = names.length > MAX_SHOWN ? names.filter((name) => this.shown.has(name)) : names;
    const series = [];
    for (const name of drawn) {
      const color = this.colour(name);
      const dashed = Boolean((this.styles.get(name) || {}).dashed);
      let points = this.series.get(name);
      if (this.log) points = points.map(([x, y]) => [x, y !== null && y > 0 ? y : null]);
      if (this.weight > 0) {
        series.push(line(`${name}:raw`, `${name} (raw)`, points, color, 0.25, dashed));
        series.push(line(name, name, smooth(points, this.weight), color, 1, dashed));
      } else {
        series.push(line(name, name, points, color, 1, dashed));
      }
    }
    this.chart.setOption({
      legend: { data: drawn },
      yAxis: this.yAxis(),
      series,
    }, { replaceMerge: ["series"] });
    // What the chart shows now (the tests wait on these): points drawn and the y scale.
    this.box.dataset.drawn = String(this.points);
    this.box.dataset.scale = this.log ? "log" : "linear";
  }

  // The whole y axis each time: ECharts rebuilds an axis whose type changes (linear, log)
  // from the option given with the change, and would drop the label formatter.
  yAxis() {
    return { ...baseOption(this.xName).yAxis, type: this.log ? "log" : "value" };
  }

  start() {
    this.chart = echarts.init(this.box, null, { renderer: "canvas" });
    const option = baseOption(this.xName);
    option.tooltip.formatter = (params) => this.tooltip(params);
    option.yAxis = this.yAxis();
    this.chart.setOption(option);
    this.resizer = new ResizeObserver(() => this.chart.resize());
    this.resizer.observe(this.box);
  }

  // The axis tooltip has the series with a point at the pointer's step; a series with points
  // at some steps only (val_loss) adds its last point before it, labelled with its step.
  tooltip(params) {
    const text = tooltip(params, this.xName);
    if (!text) return text;
    const x = params[0].value[0];
    const here = new Set(params.map((p) => p.seriesId));
    const rows = [];
    for (const name of this.series.keys()) {
      if (here.has(name) || (this.series.size > MAX_SHOWN && !this.shown.has(name))) continue;
      const point = this.before(name, x);
      if (!point || point[1] === null) continue;
      rows.push(`<div class="tip-row">${echarts.format.getTooltipMarker(this.colour(name))}` +
        `<span>${escapeHtml(name)} <i>at ${this.xName} ${point[0]}</i></span>` +
        `<b>${fmt(point[1])}</b></div>`);
    }
    return text + rows.join("");
  }

  // The last point of a series at or before x; null if none.
  before(name, x) {
    const points = this.series.get(name) || [];
    let low = 0, high = points.length;  // points are in step order: the first past x
    while (low < high) {
      const mid = (low + high) >> 1;
      if (points[mid][0] <= x) low = mid + 1; else high = mid;
    }
    return low ? points[low - 1] : null;
  }

  // More than MAX_SHOWN series: a checkbox per series in a drop-down.
  fillPicker() {
    this.pickerStale = false;
    const names = [...this.series.keys()];
    if (names.length <= MAX_SHOWN) return;
    const summary = el("summary", {}, `${this.shown.size} of ${names.length} series`);
    const boxes = names.map((name) => el("label", {}, el("input", {
      type: "checkbox", value: name, checked: this.shown.has(name),
      onchange: (event) => {
        if (event.target.checked) this.shown.add(name); else this.shown.delete(name);
        summary.textContent = `${this.shown.size} of ${names.length} series`;
        this.redraw();
      },
    }), ` ${name}`));
    this.picker.replaceChildren(summary, el("div", { class: "picker-list" }, ...boxes));
    this.picker.hidden = false;
  }
}

function line(id, name, data, color, opacity, dashed = false) {
  return {
    type: "line", id, name, data, color,
    showSymbol: false, symbol: "none", sampling: "lttb", connectNulls: false,
    lineStyle: { width: 1.6, opacity, type: dashed ? "dashed" : "solid" },
    emphasis: { disabled: true }, z: opacity < 1 ? 1 : 2,
  };
}

function tooltip(params, xName) {
  if (!params.length) return "";
  const rows = params.map((p) => {
    return `<div class="tip-row">${p.marker}<span>${escapeHtml(p.seriesName)}</span>` +
      `<b>${fmt(p.value[1])}</b></div>`;
  });
  return `<div class="tip-head">${xName} ${params[0].value[0]}</div>${rows.join("")}`;
}

export function escapeHtml(text) {
  return String(text).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);
}

export function baseOption(xName) {
  const axisText = { color: "#64748b", fontSize: 11 };
  const grid = { lineStyle: { color: "#e2e8f0" } };
  return {
    animation: false,
    textStyle: { fontFamily: "Inter, system-ui, sans-serif" },
    grid: { left: 12, right: 20, top: 36, bottom: 58, containLabel: true },
    legend: { type: "scroll", top: 2, left: 4, right: 4, icon: "roundRect", itemWidth: 12,
      itemHeight: 4, textStyle: { color: "#334155", fontSize: 12 } },
    tooltip: { trigger: "axis", confine: true, axisPointer: { type: "line" },
      formatter: (params) => tooltip(params, xName) },
    xAxis: { type: "value", name: xName, nameLocation: "middle", nameGap: 24,
      nameTextStyle: axisText, min: "dataMin", max: "dataMax",
      axisLabel: { ...axisText, formatter: (v) => fmt(v), hideOverlap: true },
      splitLine: { show: true, ...grid }, axisLine: { lineStyle: { color: "#94a3b8" } } },
    yAxis: { type: "value", scale: true, axisLabel: { ...axisText, formatter: (v) => fmt(v) },
      splitLine: { show: true, ...grid } },
    dataZoom: [
      { type: "inside", xAxisIndex: 0, filterMode: "weakFilter" },
      { type: "slider", xAxisIndex: 0, height: 14, bottom: 6, filterMode: "weakFilter",
        showDetail: false, borderColor: "#e2e8f0" },
    ],
  };
}
