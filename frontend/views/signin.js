/** Sign-in: paste an operator API token (admin or viewer); it is kept in this tab's sessionStorage only. */

import { h } from "../dom.js";

export function renderSignIn({ signIn, showError }) {
  const input = h("input", {
    id: "token",
    name: "token",
    type: "password",
    autocomplete: "off",
    required: true,
    spellcheck: "false",
    "aria-describedby": "token-help",
  });
  const button = h("button", { type: "submit", class: "primary" }, "Sign in");
  const form = h(
    "form",
    {
      class: "card signin",
      onsubmit: async (event) => {
        event.preventDefault();
        button.disabled = true;
        try {
          await signIn(input.value.trim());
        } catch (error) {
          showError(error);
        } finally {
          button.disabled = false;
        }
      },
    },
    h("h1", {}, "Sign in"),
    h("label", { for: "token" }, "API token"),
    input,
    h(
      "p",
      { id: "token-help", class: "help" },
      // Where `flglm serve` wrote it: `<data_dir>/admin_token` (backend.app), data_dir from --data-dir or
      // FLGLM_DATA_DIR, else ~/.flglm of the user running the server; no file when the token was configured.
      "An admin token: ",
      h("code", {}, "flglm serve"),
      " prints one on its first start and writes it to ",
      h("code", {}, "admin_token"),
      " in its data directory (",
      h("code", {}, "--data-dir"),
      " or ",
      h("code", {}, "FLGLM_DATA_DIR"),
      "; by default ",
      h("code", {}, "~/.flglm"),
      " of the user running the server), unless ",
      h("code", {}, "FLGLM_BOOTSTRAP_ADMIN_TOKEN"),
      " set one. Or a viewer token from ",
      h("code", {}, "flglm token create NAME"),
      ". It stays in this browser tab only.",
    ),
    button,
  );
  setTimeout(() => input.focus(), 0);
  return form;
}
