/** The dashboard shell: sign-in state, hash routes (#/jobs, #/jobs/7, #/clients, #/tokens, #/audit), error banner. */

import { ApiError, get, session } from "./api.js";
import { fill, h } from "./dom.js";
import { renderAudit } from "./views/audit.js";
import { renderClients } from "./views/clients.js";
import { renderJob } from "./views/job.js";
import { renderJobForm } from "./views/job_form.js";
import { renderJobs } from "./views/jobs.js";
import { renderSignIn } from "./views/signin.js";
import { renderTokens } from "./views/tokens.js";

const ROUTES = [
  { pattern: /^#\/jobs\/new$/, view: renderJobForm, adminOnly: true },
  { pattern: /^#\/jobs\/(\d+)$/, view: renderJob },
  { pattern: /^#\/jobs$/, view: renderJobs },
  { pattern: /^#\/clients$/, view: renderClients },
  { pattern: /^#\/tokens$/, view: renderTokens, adminOnly: true },
  { pattern: /^#\/audit$/, view: renderAudit, adminOnly: true },
];

const main = document.getElementById("main");
const alertBox = document.getElementById("alert");
let principal = null;
let stopCurrentView = null;

export function showError(error) {
  const message = error instanceof ApiError || error instanceof Error ? error.message : String(error);
  fill(
    alertBox,
    h("span", {}, message),
    h("button", { class: "link", type: "button", onclick: clearError, "aria-label": "Dismiss message" }, "Dismiss"),
  );
  alertBox.hidden = false;
  if (error instanceof ApiError && error.status === 401) signOut();
}

export function clearError() {
  alertBox.hidden = true;
  alertBox.replaceChildren();
}

function signOut() {
  session.clear();
  principal = null;
  if (location.hash !== "#/signin") location.hash = "#/signin";
  else route();
}

async function signIn(token) {
  session.save(token);
  try {
    principal = await get("/auth/me");
  } catch (error) {
    session.clear();
    throw error;
  }
  if (principal.role === "client") {
    session.clear();
    principal = null;
    throw new Error("That is a client agent's credential; sign in with an operator API token.");
  }
  clearError();
  location.hash = "#/jobs";
}

function renderChrome() {
  const nav = document.getElementById("nav");
  const whoami = document.getElementById("whoami");
  if (!principal) {
    nav.replaceChildren();
    whoami.replaceChildren();
    return;
  }
  const link = (href, label) =>
    h("a", { href, "aria-current": location.hash.startsWith(href) ? "page" : null }, label);
  fill(
    nav,
    link("#/jobs", "Jobs"),
    link("#/clients", "Clients"),
    principal.role === "admin" ? link("#/tokens", "API tokens") : null,
    principal.role === "admin" ? link("#/audit", "Audit log") : null,
  );
  fill(
    whoami,
    h("span", { class: `role role-${principal.role}`, "data-testid": "role" }, principal.role),
    h("span", { class: "who" }, principal.name),
    h("button", { type: "button", class: "secondary small", onclick: signOut }, "Sign out"),
  );
}

async function route() {
  if (stopCurrentView) stopCurrentView();
  stopCurrentView = null;
  if (!principal && session.token()) {
    try {
      principal = await get("/auth/me");
    } catch (error) {
      session.clear();
      showError(error);
    }
  }
  if (!principal) {
    renderChrome();
    fill(main, renderSignIn({ signIn, showError }));
    return;
  }
  if (!location.hash || location.hash === "#/signin" || location.hash === "#/") {
    location.hash = "#/jobs";
    return;
  }
  renderChrome();
  const match = ROUTES.map((r) => ({ r, m: location.hash.match(r.pattern) })).find((x) => x.m);
  if (!match) {
    fill(main, h("h1", {}, "Page not found"), h("p", {}, h("a", { href: "#/jobs" }, "Back to the jobs")));
    return;
  }
  if (match.r.adminOnly && principal.role !== "admin") {
    fill(main, h("h1", {}, "Admins only"), h("p", {}, "Your token has the viewer role: you can look, not change."));
    return;
  }
  const context = { principal, params: match.m.slice(1), showError, clearError };
  const view = match.r.view(context);
  fill(main, view.element);
  stopCurrentView = view.stop || null;
}

window.addEventListener("hashchange", async () => {
  // Going to sign-in after a 401 keeps the message that explains why.
  if (location.hash !== "#/signin") clearError();
  await route();
  // Screen readers and keyboard users start reading the new page, not where the old link was.
  if (principal) main.focus({ preventScroll: true });
});
route();
