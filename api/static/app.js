// The gradstream dashboard: routing between its pages, and the API key.
//   #/            the caller's jobs          #/jobs/<id>       one job, live
//   #/compare/a,b loss curves overlaid       #/workers         workers and queues
//   #/sweeps      the caller's sweeps        #/sweeps/<id>     one sweep, live
// A link may carry the key in its fragment (never sent to a server): /#key=...&/jobs/<id>;
// it is kept in this browser and dropped from the address bar.
import { apiKey, el, setApiKey } from "./common.js";
import { jobPage } from "./job.js";
import { comparePage, jobsPage } from "./jobs.js";
import { sweepPage, sweepsPage } from "./sweeps.js";
import { workersPage } from "./workers.js";

const ID = "[0-9a-f]{32}";
let stopPage = () => {};

function route() {
  takeLinkedKey();
  stopPage();
  let match;
  const hash = location.hash;
  if ((match = hash.match(new RegExp(`^#/jobs/(${ID})$`)))) stopPage = jobPage(match[1]);
  else if ((match = hash.match(new RegExp(`^#/compare/(${ID}(?:,${ID})*)$`)))) {
    stopPage = comparePage(match[1].split(","));
  } else if ((match = hash.match(new RegExp(`^#/sweeps/(${ID})$`)))) stopPage = sweepPage(match[1]);
  else if (hash === "#/sweeps") stopPage = sweepsPage();
  else if (hash === "#/workers") stopPage = workersPage();
  else stopPage = jobsPage();
  const page = hash.startsWith("#/workers") ? "workers" : hash.startsWith("#/sweeps") ? "sweeps" : "jobs";
  for (const link of document.querySelectorAll("nav a")) {
    link.classList.toggle("active", link.dataset.nav === page);
  }
}

const keyInput = document.getElementById("key");

// On load, and when such a link is opened in a tab already showing the dashboard.
function takeLinkedKey() {
  const linked = location.hash.match(/^#key=([^&]*)(?:&(.*))?$/);
  if (linked) {
    setApiKey(decodeURIComponent(linked[1]));
    history.replaceState(null, "", location.pathname + (linked[2] ? `#${linked[2]}` : ""));
  }
  keyInput.value = apiKey();
}
takeLinkedKey();
keyInput.addEventListener("change", () => { setApiKey(keyInput.value); route(); });

if (typeof window.echarts === "undefined") {
  // /static/vendor/echarts.min.js answered 503: the checkout has no node_modules yet.
  document.getElementById("view").replaceChildren(el("section", { class: "card notice", id: "no-charts" },
    el("h2", {}, "The chart library is missing"),
    el("p", {}, "The API found no Apache ECharts to serve. Run ", el("code", {}, "make setup"),
      " (it runs ", el("code", {}, "npm ci"), ") and reload this page.")));
} else {
  window.addEventListener("hashchange", route);
  route();
}
