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
      "An admin token (first start prints one and writes it to ~/.flglm/admin_token) or a viewer token ",
      "from ",
      h("code", {}, "flglm token create NAME"),
      ". It stays in this browser tab only.",
    ),
    button,
  );
  setTimeout(() => input.focus(), 0);
  return form;
}
