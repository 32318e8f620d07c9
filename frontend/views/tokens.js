/** Operators' API tokens (admins): who has one, when it was last used; create one (secret shown once), revoke. */

import { del, get, post } from "../api.js";
import { badge, fill, formatAgo, formatTime, h, table } from "../dom.js";

export function renderTokens({ principal, showError }) {
  const body = h("div", {}, h("p", { class: "empty" }, "Loading tokens…"));
  const created = h("div", { "aria-live": "polite" });

  async function revoke(token) {
    const yours = token.id === principal.id ? " This is the token you are signed in with." : "";
    if (!confirm(`Revoke API token "${token.name}"? Every request with it is refused from now on.${yours}`)) return;
    try {
      await del(`/tokens/${token.id}`);
      await load();
    } catch (error) {
      showError(error);
    }
  }

  async function load() {
    try {
      const page = await get("/tokens?limit=500");
      const rows = page.items.map((t) => [
        h("strong", {}, t.name),
        t.role,
        badge(t.revoked_at ? "revoked" : "active"),
        formatTime(t.created_at),
        formatAgo(t.last_used_at),
        t.revoked_at
          ? formatTime(t.revoked_at)
          : h("button", { type: "button", class: "danger small", onclick: () => revoke(t), "aria-label": `Revoke ${t.name}` }, "Revoke"),
      ]);
      fill(body, table("API tokens", ["Name", "Role", "Status", "Created", "Last used", "Revoked"], rows, "No API tokens."));
    } catch (error) {
      showError(error);
    }
  }
  load();

  const nameInput = h("input", { id: "token-name", type: "text", required: true, maxlength: "200" });
  const roleSelect = h("select", { id: "token-role" }, h("option", { value: "viewer" }, "viewer (read-only)"), h("option", { value: "admin" }, "admin"));
  const createForm = h(
    "form",
    {
      class: "card inline-form",
      onsubmit: async (event) => {
        event.preventDefault();
        try {
          const token = await post("/tokens", { name: nameInput.value.trim(), role: roleSelect.value });
          nameInput.value = "";
          fill(
            created,
            h("p", {}, `API token for ${token.name} (${token.role}), shown this once only:`),
            h("code", { class: "secret", "data-testid": "new-token" }, token.token),
          );
          await load();
        } catch (error) {
          showError(error);
        }
      },
    },
    h("h2", {}, "Create an API token"),
    h("div", { class: "field" }, h("label", { for: "token-name" }, "Token name"), nameInput),
    h("div", { class: "field" }, h("label", { for: "token-role" }, "Role"), roleSelect),
    h("button", { type: "submit", class: "primary" }, "Create token"),
    created,
  );

  const element = h("section", {}, h("div", { class: "page-head" }, h("h1", {}, "API tokens")), h("div", { class: "card" }, body), createForm);
  return { element };
}
