// Live workers (device, current job, heartbeat age) and the jobs waiting in each queue.
import { api, el, fmtAge, shortId, showError } from "./common.js";

export function workersPage() {
  const workers = el("tbody");
  const queues = el("tbody");
  const head = (...names) => el("thead", {}, el("tr", {}, ...names.map((name) => el("th", {}, name))));
  const none = el("p", { class: "empty-row", id: "workers-empty", hidden: true },
    "No live worker: start one with `gradstream worker --device cpu`.");
  document.getElementById("view").replaceChildren(
    el("div", { class: "page-head" }, el("h2", {}, "Workers")),
    el("div", { class: "split" },
      el("section", { class: "card flush" }, el("h3", {}, "Live workers"),
        el("table", { id: "workers", class: "grid" },
          head("worker", "device", "queues", "current job", "memory", "heartbeat"), workers), none),
      el("section", { class: "card flush narrow" }, el("h3", {}, "Queues"),
        el("table", { id: "queues", class: "grid" }, head("queue", "waiting jobs"), queues))));

  async function refresh() {
    try {
      const list = await api("/v1/workers");
      const now = Date.now();
      workers.replaceChildren(...list.workers.map((worker) => el("tr", { "data-worker": worker.name },
        el("td", { class: "id" }, worker.name),
        el("td", {}, worker.device, worker.device_name
          ? el("span", { class: "muted" }, ` ${worker.device_name}`) : null),
        el("td", {}, worker.queues.join(", ")),
        el("td", { class: "id" }, worker.current_job
          ? el("a", { href: `#/jobs/${worker.current_job}` }, shortId(worker.current_job))
          : el("span", { class: "muted" }, "idle")),
        el("td", { class: "num" }, worker.memory_bytes
          ? `${(worker.memory_bytes / 2 ** 30).toFixed(1)} GiB` : "—"),
        el("td", { class: "age" }, fmtAge(worker.heartbeat_at, now)))));
      none.hidden = list.workers.length > 0;
      queues.replaceChildren(...(list.queues || []).map((queue) => el("tr", { "data-queue": queue.name },
        el("td", {}, queue.name), el("td", { class: "num depth" }, String(queue.depth)))));
      showError(null);
    } catch (error) { showError(error); }
  }
  refresh();
  const timer = setInterval(refresh, 1000);
  return () => clearInterval(timer);
}
