/** The job page's "Privacy audit" card: per audit, each attack's token recovery with its 95 % interval, exact
 * sequences, ROUGE-L and tokens, the strongest attack highlighted, the (ε, δ) of the activation noise; progress
 * while an audit runs, the error when it failed; admins start a new audit of the job's current settings. */

import { get, post } from "../api.js";
import { badge, fill, formatNumber, formatTime, h } from "../dom.js";

const SHOWN = 5; // the newest audits listed
const ATTACKS = {
  known_weights_inversion: "Known-weights inversion",
  learned_inverter: "Learned inverter",
  gradient_next_token: "Next tokens from the gradient",
};
const ACTIVE = new Set(["queued", "running"]);

const percent = (share) => `${formatNumber(100 * share, 1)} %`;
const interval = ([low, high]) => `[${formatNumber(100 * low, 1)}, ${formatNumber(100 * high, 1)}] %`;

function epsilonText(epsilon) {
  if (epsilon === null || epsilon === undefined) return "no activation noise: no (ε, δ) guarantee";
  return `ε = ${formatNumber(epsilon, epsilon >= 100 ? 0 : 2)} at δ = 1e-5, per h0 vector`;
}

function attackTable(result) {
  const rows = result.attacks.map((attack) => {
    const strongest = attack.attack === result.strongest_attack;
    const cell = (testid, text) => h("td", { "data-testid": testid }, text);
    return h(
      "tr",
      { class: strongest ? "strongest" : null, "data-attack": attack.attack, "data-strongest": strongest ? "true" : "false" },
      h("td", {}, h("strong", {}, ATTACKS[attack.attack] || attack.attack), strongest ? h("span", { class: "chip" }, "strongest") : null, h("div", { class: "help" }, `on ${attack.target}`)),
      cell("token-recovery", percent(attack.token_recovery)),
      cell("token-recovery-ci", interval(attack.token_recovery_ci)),
      cell("exact-sequences", percent(attack.exact_sequences)),
      cell("rouge-l", formatNumber(attack.rouge_l, 3)),
      cell("tokens", formatNumber(attack.tokens)),
    );
  });
  return h(
    "table",
    {},
    h("caption", { class: "visually-hidden" }, "Recovery per attack"),
    h("thead", {}, h("tr", {}, ["Attack", "Token recovery", "95 % interval", "Exact sequences", "ROUGE-L", "Tokens"].map((name) => h("th", { scope: "col" }, name)))),
    h("tbody", {}, rows),
  );
}

function progressOf(audit) {
  if (audit.status === "queued") return h("p", { class: "help" }, "Queued: waiting for a worker to take it.");
  const progress = audit.progress;
  if (!progress) return h("p", { class: "help" }, "Starting…");
  const fraction = progress.total > 0 ? Math.min(1, progress.done / progress.total) : 0;
  const pct = Math.round(fraction * 100);
  return h(
    "div",
    { "data-testid": "audit-progress" },
    h("p", { class: "help" }, `${progress.stage}: ${progress.done} / ${progress.total}`),
    h(
      "div",
      { class: "progress", role: "progressbar", "aria-label": `Audit ${audit.id}: ${progress.stage}`, "aria-valuemin": "0", "aria-valuemax": "100", "aria-valuenow": String(pct) },
      h("div", { class: "progress-fill", style: `width: ${pct}%` }),
    ),
  );
}

function auditBlock(audit) {
  const request = audit.request;
  const text = audit.own_texts ? `${audit.own_texts} given texts` : `the ${request.corpus} corpus`;
  const head = h(
    "p",
    { class: "audit-head" },
    badge(audit.status),
    ` Audit #${audit.id} by ${audit.created_by}, ${formatTime(audit.created_at)} · ${request.sequences} sequences × ${request.seq_len} tokens of ${text}`,
    audit.matches_job_settings ? null : h("span", { class: "muted" }, " · audited settings differ from the job's current ones"),
  );
  let detail = null;
  if (ACTIVE.has(audit.status)) detail = progressOf(audit);
  else if (audit.status === "failed") detail = h("p", { class: "audit-error", "data-testid": "audit-error" }, `Failed: ${audit.error}`);
  else if (audit.result) {
    const result = audit.result;
    const strongest = result.strongest_attack ? `${ATTACKS[result.strongest_attack] || result.strongest_attack}: ${percent(result.strongest_token_recovery)} of the tokens` : "no attack ran";
    detail = [
      attackTable(result),
      h(
        "dl",
        { class: "facts audit-facts" },
        h("dt", {}, "Strongest attack"),
        h("dd", { "data-testid": "strongest" }, strongest),
        h("dt", {}, "Activation noise"),
        h("dd", { "data-testid": "epsilon" }, epsilonText(result.activation_epsilon)),
        h("dt", {}, "Text attacked"),
        h("dd", {}, result.text_source),
      ),
    ];
  }
  return h("article", { class: "audit", "data-testid": `privacy-audit-${audit.id}`, "data-status": audit.status }, head, detail);
}

/** The card and its `refresh()` (the job page calls it on every poll). */
export function privacyAuditCard(jobId, { isAdmin, showError }) {
  const body = h("div", {}, h("p", { class: "empty" }, "Loading audits…"));
  const button = isAdmin ? h("button", { type: "button", class: "primary", onclick: start }, "Run audit") : null;
  // How much text to attack (the API's bounds; its defaults): more is a tighter interval and a longer audit.
  const sequences = h("input", { id: `audit-sequences-${jobId}`, type: "number", min: "1", max: "256", value: "64", class: "narrow" });
  const seqLen = h("input", { id: `audit-seq-len-${jobId}`, type: "number", min: "4", max: "256", value: "64", class: "narrow" });
  const sizes = isAdmin
    ? [h("label", { for: sequences.id }, "Sequences"), sequences, h("label", { for: seqLen.id }, "Tokens each"), seqLen]
    : null;
  const element = h(
    "section",
    { class: "card span-3", "aria-labelledby": "privacy-audit-title" },
    h("h2", { id: "privacy-audit-title" }, "Privacy audit"),
    h("p", { class: "help" }, "What a curious server could recover of the training text from the tensors it receives under this job's settings, attacked at the first step (the weakest moment of every defence)."),
    button ? h("div", { class: "toolbar" }, sizes, button) : null,
    body,
  );
  let starting = false;
  let loading = false;
  let active = false;
  let shown = "";

  function updateButton() {
    if (!button) return;
    button.disabled = starting || active;
    button.title = active ? "An audit of this job is running; one runs at a time." : "";
  }

  async function start() {
    starting = true;
    updateButton();
    try {
      await post(`/jobs/${jobId}/privacy-audits`, { sequences: Number(sequences.value), seq_len: Number(seqLen.value) });
      await refresh();
    } catch (error) {
      showError(error);
    } finally {
      starting = false;
      updateButton();
    }
  }

  async function refresh() {
    if (loading) return;
    loading = true;
    try {
      const page = await get(`/jobs/${jobId}/privacy-audits?limit=${SHOWN}`);
      active = page.items.some((audit) => ACTIVE.has(audit.status));
      updateButton();
      const signature = JSON.stringify(page);
      if (signature === shown) return; // unchanged: keep the DOM (and any focus in it) as it is
      shown = signature;
      const more = page.total > page.items.length ? h("p", { class: "help" }, `The newest ${page.items.length} of ${page.total} audits.`) : null;
      fill(body, page.items.length ? [page.items.map(auditBlock), more] : h("p", { class: "empty" }, "This job's settings were never audited."));
    } catch (error) {
      showError(error);
    } finally {
      loading = false;
    }
  }

  return { element, refresh };
}
