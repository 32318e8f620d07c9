/** The audit log (admins), newest first: filter by object type and id on the server, by actor or action in the page. */

import { get, query } from "../api.js";
import { fill, formatTime, h, table } from "../dom.js";

const PAGE_SIZE = 50;

export function renderAudit({ showError }) {
  const objectType = h(
    "select",
    { id: "audit-type" },
    ["", "job", "client", "api_token"].map((t) => h("option", { value: t }, t || "any type")),
  );
  const objectId = h("input", { id: "audit-id", type: "text", inputmode: "numeric", placeholder: "any", size: "8" });
  const text = h("input", { id: "audit-text", type: "search", placeholder: "actor or action contains…" });
  const body = h("div", { "aria-live": "polite" });
  const pager = h("div", { class: "pager" });
  let pageIndex = 0; // 0 = the newest events
  let lastPage = null;

  function renderRows() {
    if (!lastPage) return;
    const needle = text.value.trim().toLowerCase();
    const items = [...lastPage.items].reverse().filter((e) => !needle || `${e.actor} ${e.action}`.toLowerCase().includes(needle));
    const rows = items.map((e) => [
      formatTime(e.at),
      h("code", {}, e.action),
      e.actor,
      `${e.object_type}${e.object_id ? ` ${e.object_id}` : ""}`,
      h("code", { class: "detail" }, JSON.stringify(e.detail)),
    ]);
    fill(body, table("Audit events", ["When", "Action", "Actor", "Object", "Detail"], rows, "No events match these filters."));
    const first = pageIndex * PAGE_SIZE;
    const last = first + lastPage.items.length;
    fill(
      pager,
      h("span", {}, lastPage.total ? `newest ${first + 1}–${last} of ${lastPage.total}` : "0 events"),
      h("button", { type: "button", class: "secondary small", disabled: pageIndex === 0, onclick: () => load(pageIndex - 1) }, "Newer"),
      h("button", { type: "button", class: "secondary small", disabled: last >= lastPage.total, onclick: () => load(pageIndex + 1) }, "Older"),
    );
  }

  async function load(newPageIndex = 0) {
    pageIndex = newPageIndex;
    const filters = { object_type: objectType.value, object_id: objectId.value.trim() };
    try {
      // The API lists oldest first; count first, then fetch the slice that holds this page of newest events.
      const { total } = await get(`/audit${query({ ...filters, limit: 1 })}`);
      const end = Math.max(0, total - pageIndex * PAGE_SIZE);
      const offset = Math.max(0, end - PAGE_SIZE);
      lastPage = end > 0 ? await get(`/audit${query({ ...filters, limit: end - offset, offset })}`) : { items: [], total };
      renderRows();
    } catch (error) {
      showError(error);
    }
  }
  load();

  const filters = h(
    "form",
    { class: "card toolbar filters", onsubmit: (event) => { event.preventDefault(); load(0); } },
    h("div", { class: "field" }, h("label", { for: "audit-type" }, "Object type"), objectType),
    h("div", { class: "field" }, h("label", { for: "audit-id" }, "Object id"), objectId),
    h("div", { class: "field grow" }, h("label", { for: "audit-text" }, "Actor or action"), text),
    h("button", { type: "submit", class: "primary" }, "Apply filters"),
  );
  text.addEventListener("input", renderRows);
  const element = h("section", {}, h("div", { class: "page-head" }, h("h1", {}, "Audit log")), filters, h("div", { class: "card" }, body, pager));
  return { element };
}
