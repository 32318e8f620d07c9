/** Jobs list with status filter; admins get the "New job" button. Refreshes every 2 s. */

import { get, query } from "../api.js";
import { badge, fill, formatTime, h, table } from "../dom.js";

const STATUSES = ["", "draft", "waiting_for_clients", "running", "paused", "completed", "failed", "cancelled"];
const REFRESH_MS = 2000;

export function renderJobs({ principal, showError }) {
  const body = h("div", {}, h("p", { class: "empty" }, "Loading jobs…"));
  const statusFilter = h(
    "select",
    { id: "status-filter", onchange: () => load() },
    STATUSES.map((s) => h("option", { value: s }, s ? s.replaceAll("_", " ") : "all statuses")),
  );
  let timer = null;

  async function load() {
    clearTimeout(timer);
    try {
      const page = await get(`/jobs${query({ status: statusFilter.value, limit: 200 })}`);
      const rows = page.items
        .sort((a, b) => b.id - a.id)
        .map((job) => [
          h("a", { href: `#/jobs/${job.id}`, "aria-label": `Job ${job.id}` }, `#${job.id}`),
          h("a", { href: `#/jobs/${job.id}` }, job.name),
          badge(job.status),
          `${job.current_round} / ${job.rounds}`,
          job.parallel_mode.replaceAll("_", " "),
          job.model_ref,
          formatTime(job.created_at),
        ]);
      fill(body, table("Jobs", ["ID", "Job", "Status", "Round", "Parallel mode", "Model", "Created"], rows, "No jobs yet."));
    } catch (error) {
      showError(error);
    }
    timer = setTimeout(load, REFRESH_MS);
  }
  load();

  const element = h(
    "section",
    {},
    h(
      "div",
      { class: "page-head" },
      h("h1", {}, "Jobs"),
      h("div", { class: "toolbar" }, h("label", { for: "status-filter" }, "Show"), statusFilter),
      principal.role === "admin" ? h("a", { class: "button primary", href: "#/jobs/new" }, "New job") : null,
    ),
    h("div", { class: "card" }, body),
  );
  return { element, stop: () => clearTimeout(timer) };
}
