/** Enrolled client agents: status, heartbeats, their jobs; admins enroll new ones and revoke (with confirmation). */

import { get, post } from "../api.js";
import { badge, fill, formatAgo, formatNumber, h, table } from "../dom.js";

const REFRESH_MS = 2000;
const JOBS_EVERY = 5; // the jobs column costs a call per job, so it refreshes every 5th pass (10 s)

export function renderClients({ principal, showError }) {
  const isAdmin = principal.role === "admin";
  const body = h("div", {}, h("p", { class: "empty" }, "Loading clients…"));
  const enrolled = h("div", { "aria-live": "polite" });
  let timer = null;
  let jobsByClient = new Map();
  let passes = 0;

  async function loadJobs() {
    // Which jobs each client is invited to: one participants call per job (fine for a dashboard's scale).
    const jobs = (await get("/jobs?limit=200")).items;
    const lists = await Promise.all(jobs.map((job) => get(`/jobs/${job.id}/participants`)));
    const map = new Map();
    jobs.forEach((job, i) => {
      for (const p of lists[i]) {
        if (!map.has(p.client_id)) map.set(p.client_id, []);
        map.get(p.client_id).push({ job, consent: p.consent });
      }
    });
    jobsByClient = map;
  }

  async function revoke(client) {
    if (!confirm(`Revoke client "${client.name}"? Its agent will be refused from now on; this cannot be undone.`)) return;
    try {
      await post(`/clients/${client.id}/revoke`);
      passes = 0;
      await load();
    } catch (error) {
      showError(error);
    }
  }

  async function load() {
    clearTimeout(timer);
    try {
      const [page] = await Promise.all([get("/clients?limit=500"), passes++ % JOBS_EVERY === 0 ? loadJobs() : null]);
      const rows = page.items.map((c) => [
        h("strong", {}, c.name),
        [badge(c.status), " ", h("span", { class: c.online ? "dot dot-on" : "dot dot-off", "data-testid": "client-online" }, c.online ? "online" : "offline")],
        // The count is the data owner's choice to share (opt-in); an agent that does not share it reads 0.
        c.example_count > 0 ? formatNumber(c.example_count) : h("span", { class: "muted", title: "the data owner does not share its example count" }, "not shared"),
        formatAgo(c.last_heartbeat_at),
        (jobsByClient.get(c.id) || []).map(({ job, consent }) =>
          h("span", { class: "chip" }, h("a", { href: `#/jobs/${job.id}` }, job.name), ` ${consent}`),
        ),
        isAdmin && c.status !== "revoked"
          ? h("button", { type: "button", class: "danger small", onclick: () => revoke(c), "aria-label": `Revoke ${c.name}` }, "Revoke")
          : "",
      ]);
      fill(
        body,
        table("Client agents", ["Client", "Status", "Examples", "Last heartbeat", "Jobs", isAdmin ? "Actions" : ""], rows, "No client agents enrolled yet."),
      );
    } catch (error) {
      showError(error);
    }
    timer = setTimeout(load, REFRESH_MS);
  }
  load();

  const nameInput = h("input", { id: "client-name", type: "text", required: true, pattern: "[A-Za-z0-9][A-Za-z0-9._-]*", "aria-describedby": "client-name-help" });
  const enrollForm = isAdmin
    ? h(
        "form",
        {
          class: "card inline-form",
          onsubmit: async (event) => {
            event.preventDefault();
            try {
              const created = await post("/clients/enrollment-tokens", { name: nameInput.value.trim() });
              nameInput.value = "";
              passes = 0;
              fill(
                enrolled,
                h("p", {}, `Enrollment token for ${created.name} (shown once, valid until ${new Date(created.expires_at).toLocaleString("en-GB")}):`),
                h("code", { class: "secret" }, created.token),
                h("p", { class: "help" }, "Give it to the data owner: ", h("code", {}, "flglm agent enroll --token …")),
              );
              await load();
            } catch (error) {
              showError(error);
            }
          },
        },
        h("h2", {}, "Enroll a client agent"),
        h("div", { class: "field" }, h("label", { for: "client-name" }, "Client name"), nameInput),
        h("p", { id: "client-name-help", class: "help" }, "Letters, digits, dot, dash and underscore."),
        h("button", { type: "submit", class: "primary" }, "Create enrollment token"),
        enrolled,
      )
    : null;

  const element = h("section", {}, h("div", { class: "page-head" }, h("h1", {}, "Clients")), h("div", { class: "card" }, body), enrollForm);
  return { element, stop: () => clearTimeout(timer) };
}
