/** One job, live: progress, loss curves, throughput, traffic, clients, replicas, evaluation, privacy, export. */

import { download, get, post } from "../api.js";
import { badge, fill, formatAgo, formatBytes, formatNumber, h, table } from "../dom.js";
import { LossChart } from "./loss_chart.js";
import { privacyAuditCard } from "./privacy_audit.js";

const POLL_MS = 1500; // the issue asks for updates at least every 2 s
const METRICS_PAGE = 500;
const ENDED = new Set(["completed", "failed", "cancelled"]); // no live throughput once a job is over

// Which admin buttons each job status offers (the backend's lifecycle decides; this only hides dead ends).
const ACTIONS = {
  draft: [["open", "Open for consent"], ["cancel", "Cancel"]],
  waiting_for_clients: [["start", "Start"], ["cancel", "Cancel"]],
  running: [["pause", "Pause"], ["cancel", "Cancel"]],
  paused: [["resume", "Resume"], ["cancel", "Cancel"]],
};

function stat(label, valueNode, testid, note = null) {
  return h(
    "div",
    { class: "stat" },
    h("div", { class: "stat-label" }, label),
    h("div", { class: "stat-value", "data-testid": testid }, valueNode),
    note ? h("div", { class: "stat-note" }, note) : null,
  );
}

// The adapter agents and workers build from a job's `adapter` reads `method` (specs may write `kind`, the same
// thing) and fills in what the spec leaves out with these defaults (flglm's adapter settings).
const ADAPTER_DEFAULTS = { kind: "lora", r: 8, alpha: 16 };

/** The job's adapter in words, every value from its spec; one the spec leaves out is the default, said so. */
function adapterText(adapter) {
  const given = { kind: adapter.method ?? adapter.kind, r: adapter.r, alpha: adapter.alpha };
  const value = (key) => (given[key] === undefined || given[key] === null ? `${ADAPTER_DEFAULTS[key]} (default)` : `${given[key]}`);
  return `${value("kind")} r=${value("r")} α=${value("alpha")}`;
}

/** A step as people count it: the API's steps are 0-based within a round, the page says "step 1" for the
 * first. Every step number on the page (header, client rows, chart) goes through here. */
export function stepNumber(step) {
  return step + 1;
}

const percent = (value) => formatNumber(100 * value, 1);
const COUNT_KEYS = /(^|_)(examples|count|n)$/; // whole numbers sent as floats (`eval_examples 6.0`)

/** One client's evaluation metrics in words: accuracy with its 95 % interval in %, counts as whole numbers. */
export function evalMetricsText(metrics) {
  const parts = [];
  const { accuracy, accuracy_ci_low: low, accuracy_ci_high: high, ...rest } = metrics;
  if (accuracy !== undefined) {
    const interval = low !== undefined && high !== undefined ? ` (95 % CI [${percent(low)}, ${percent(high)}] %)` : "";
    parts.push(`accuracy ${percent(accuracy)} %${interval}`);
  }
  for (const [key, value] of Object.entries(rest)) {
    const whole = COUNT_KEYS.test(key) && Number.isInteger(Number(value));
    parts.push(`${key} ${formatNumber(value, whole ? 0 : 3)}`);
  }
  return parts.join(" · ");
}

function progressBar(label, fraction) {
  const pct = Math.round(Math.min(1, Math.max(0, fraction)) * 100);
  return h(
    "div",
    { class: "progress", role: "progressbar", "aria-label": label, "aria-valuemin": "0", "aria-valuemax": "100", "aria-valuenow": String(pct) },
    h("div", { class: "progress-fill", style: `width: ${pct}%` }),
  );
}

export function renderJob({ principal, params, showError }) {
  const jobId = Number(params[0]);
  const isAdmin = principal.role === "admin";
  const regions = {
    head: h("div", { class: "page-head" }),
    controls: h("div", { class: "toolbar", "data-testid": "admin-controls" }),
    stats: h("div", { class: "stats" }),
    chart: h("div", {}),
    clients: h("div", {}),
    replicas: h("div", {}),
    evaluation: h("div", {}),
    privacy: h("div", {}),
    exported: h("div", {}),
  };
  const chartCard = h("section", { class: "card span-2", "aria-labelledby": "loss-title" }, h("h2", { id: "loss-title" }, "Loss"), regions.chart);
  const privacyAudit = privacyAuditCard(jobId, { isAdmin, showError });
  const element = h(
    "section",
    { class: "job-page" },
    regions.head,
    regions.stats,
    h(
      "div",
      { class: "grid" },
      chartCard,
      h(
        "div",
        { class: "side" },
        h("section", { class: "card", "aria-labelledby": "privacy-title" }, h("h2", { id: "privacy-title" }, "Privacy and split"), regions.privacy),
        h("section", { class: "card", "aria-labelledby": "export-title" }, h("h2", { id: "export-title" }, "Exported model"), regions.exported),
      ),
      h("section", { class: "card span-3", "aria-labelledby": "clients-title" }, h("h2", { id: "clients-title" }, "Clients"), regions.clients),
      h("section", { class: "card span-2", "aria-labelledby": "eval-title" }, h("h2", { id: "eval-title" }, "Evaluation per round"), regions.evaluation),
      h("section", { class: "card", "aria-labelledby": "replicas-title" }, h("h2", { id: "replicas-title" }, "Server replicas"), regions.replicas),
      privacyAudit.element,
    ),
  );

  let chart = null;
  let metricsSeen = 0;
  let timer = null;
  let stopped = false;
  let busy = false;
  let lastStatus = null;

  async function act(action) {
    if (action === "cancel" && !confirm("Cancel this job? A cancelled job cannot be resumed.")) return;
    busy = true;
    try {
      await post(`/jobs/${jobId}/${action}`);
      await refresh();
    } catch (error) {
      showError(error);
    } finally {
      busy = false;
      renderControls(lastStatus);
    }
  }

  function renderControls(status) {
    if (!isAdmin) return;
    fill(
      regions.controls,
      (ACTIONS[status] || []).map(([action, label]) =>
        h("button", { type: "button", class: action === "cancel" ? "danger" : "primary", disabled: busy, onclick: () => act(action) }, label),
      ),
    );
  }

  async function fetchNewMetrics(stepsPerRound, rounds) {
    // Step metrics come oldest first; ask only for the ones after those already drawn.
    for (;;) {
      const page = await get(`/metrics?job_id=${jobId}&limit=${METRICS_PAGE}&offset=${metricsSeen}`);
      metricsSeen += page.items.length;
      chart.add(page.items, stepsPerRound, rounds);
      if (page.items.length < METRICS_PAGE) return;
    }
  }

  async function refresh() {
    const [job, progress, rounds] = await Promise.all([
      get(`/jobs/${jobId}`),
      get(`/metrics/jobs/${jobId}/progress`),
      get(`/jobs/${jobId}/rounds`),
    ]);
    const names = new Map(progress.clients.map((c) => [c.client_id, c.client_name]));
    if (!chart) {
      chart = new LossChart(names);
      fill(regions.chart, chart.element, h("p", { class: "help" }, "Dashed: mean over the clients that reported that step. Dotted: a new round begins. Drag to zoom, double-click to reset."));
    }
    chart.clientNames = names;
    await fetchNewMetrics(job.steps_per_round, job.rounds);
    if (job.status !== lastStatus) {
      lastStatus = job.status;
      renderControls(job.status);
    }
    renderHead(job);
    renderStats(job, progress);
    renderClients(progress);
    renderReplicas(job, progress);
    renderEvaluation(rounds, names);
    renderPrivacy(job);
    renderExport(rounds);
    privacyAudit.refresh(); // its own request and errors: a slow audit list never holds up the page
  }

  function renderHead(job) {
    if (!regions.head.childElementCount) {
      fill(
        regions.head,
        h(
          "div",
          {},
          h("p", { class: "crumb" }, h("a", { href: "#/jobs" }, "Jobs"), " / ", `#${job.id}`),
          h("h1", { id: "job-title" }),
          h("p", { class: "help", id: "job-waiting-for", "data-testid": "waiting-for" }),
          h("ul", { class: "help", id: "job-client-failures", "data-testid": "client-failures" }),
        ),
        h("div", { class: "head-right" }, h("span", { id: "job-status" }), isAdmin ? regions.controls : null),
      );
    }
    fill(regions.head.querySelector("#job-title"), job.name);
    fill(regions.head.querySelector("#job-status"), badge(job.status));
    if (job.failure_reason) regions.head.querySelector("#job-status").append(h("span", { class: "muted" }, ` ${job.failure_reason}`));
    // What a waiting job waits for, and every client's reported fatal error, as the API says them.
    fill(regions.head.querySelector("#job-waiting-for"), job.waiting_for ? `Waiting for ${job.waiting_for}` : "");
    const failures = Object.entries(job.client_failures || {});
    fill(
      regions.head.querySelector("#job-client-failures"),
      ...failures.map(([name, reason]) => h("li", {}, h("strong", {}, name), ` reported a fatal error: ${reason}`)),
    );
  }

  function renderStats(job, progress) {
    const inRound = progress.clients.filter((c) => c.round_number === job.current_round && c.step !== null);
    // The furthest client's step, counted from 1: "step 3 / 3" is the round's third and last step, done.
    const stepsDone = inRound.length ? stepNumber(Math.max(...inRound.map((c) => c.step))) : 0;
    const roundsDone = Math.max(0, job.current_round - 1);
    const overall = (roundsDone * job.steps_per_round + stepsDone) / (job.rounds * job.steps_per_round);
    fill(
      regions.stats,
      stat("Round", h("span", {}, `${job.current_round} / ${job.rounds}`), "round-counter"),
      h(
        "div",
        { class: "stat stat-wide" },
        h("div", { class: "stat-label" }, "Step in this round"),
        h("div", { class: "stat-value", "data-testid": "step-counter" }, `${stepsDone} / ${job.steps_per_round}`),
        progressBar("Progress of the whole job", overall),
        h("div", { class: "stat-note" }, `${Math.round(overall * 100)} % of the job`),
      ),
      ENDED.has(job.status)
        ? stat("Tokens / s", "—", "tokens-per-s", `the job is ${job.status}`)
        : stat("Tokens / s", formatNumber(progress.tokens_per_s, 1), "tokens-per-s"),
      stat("Tokens", formatNumber(progress.tokens), "tokens"),
      stat("Bytes up", formatBytes(progress.wire_bytes_up), "bytes-up"),
      stat("Bytes down", formatBytes(progress.wire_bytes_down), "bytes-down"),
    );
  }

  function renderClients(progress) {
    const rows = progress.clients.map((c) => [
      h("strong", {}, c.client_name),
      c.consent === "approved" ? badge("approved") : badge(c.consent),
      h("span", { class: c.online ? "dot dot-on" : "dot dot-off" }, c.online ? "online" : "offline"),
      formatAgo(c.last_heartbeat_at),
      c.step === null ? "—" : h("span", { "data-testid": "client-step" }, `round ${c.round_number}, step ${stepNumber(c.step)} / ${progress.steps_per_round}`),
      formatNumber(c.last_loss, 3),
      c.replica === null ? "—" : `#${c.replica}`,
      formatBytes(c.wire_bytes_up),
      formatBytes(c.wire_bytes_down),
    ]);
    fill(
      regions.clients,
      table(
        "Clients of this job",
        ["Client", "Consent", "State", "Last heartbeat", "Current step", "Last loss", "Replica", "Sent", "Received"],
        rows,
        "No clients invited yet.",
      ),
    );
  }

  function renderReplicas(job, progress) {
    const rows = progress.replicas.map((r) => [
      `#${r.replica}`,
      r.client_ids.length ? r.client_ids.map((id) => progress.clients.find((c) => c.client_id === id)?.client_name ?? id).join(", ") : "—",
      h("span", { "data-testid": "replica-steps" }, formatNumber(r.steps_in_window)),
      formatNumber(r.tokens_per_s, 1),
    ]);
    fill(
      regions.replicas,
      h("p", { class: "help" }, `${job.parallel_mode.replaceAll("_", " ")} · load over the last ${progress.window_s} s`),
      table("Server replicas", ["Replica", "Clients", "Server steps", "Tokens / s"], rows),
    );
  }

  function renderEvaluation(rounds, names) {
    const rows = [];
    for (const round of rounds) {
      for (const p of round.participants) {
        const metrics = Object.entries(p.eval_metrics || {});
        rows.push([
          `${round.number}`,
          badge(round.status),
          names.get(p.client_id) || `client ${p.client_id}`,
          badge(p.status),
          metrics.length ? h("span", { "data-testid": "eval-metrics" }, evalMetricsText(p.eval_metrics)) : "—",
        ]);
      }
    }
    fill(regions.evaluation, table("Evaluation per round", ["Round", "Round status", "Client", "Client status", "Metrics"], rows, "No round has started yet."));
  }

  function renderPrivacy(job) {
    const dl = (pairs) => h("dl", { class: "facts" }, pairs.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
    const privacy = job.privacy || {};
    const m = Number(privacy.activation_noise || 0);
    const c = Number(privacy.activation_clip ?? 1);
    const gradient = Number(privacy.gradient_noise || 0);
    const epsilon = job.activation_epsilon;
    let activation = "off";
    if (m > 0) {
      const eps = epsilon == null ? "ε not known to the server (each agent shows it before consent)" : `ε = ${formatNumber(epsilon, epsilon >= 100 ? 0 : 2)} per h0 vector (δ = 1e-5)`;
      activation = `m = ${m} with clip c = ${c} × the public reference norm; ${eps}`;
    } else if (privacy.activation_noise_std !== undefined) {
      // Jobs from before the real settings: that value was shown but never applied.
      activation = `off (this job's activation_noise_std = ${privacy.activation_noise_std} was never applied)`;
    }
    let inputBlock = "shared: its adapters are averaged with FedAvg";
    if (privacy.private_front) {
      inputBlock = `private: adapters from each client's own secret seed, never uploaded or averaged; init scale s = ${Number(privacy.private_init_scale || 0)}, decorrelation λ = ${Number(privacy.decorrelation || 0)}`;
    }
    const recovery = job.audited_token_recovery;
    fill(
      regions.privacy,
      dl([
        ["Wire dtype", privacy.wire_dtype || "float32"],
        ["Activation noise", activation],
        ["Gradient noise", gradient > 0 ? `std = ${gradient} × the RMS of dL/dh1` : "off"],
        ["Input block", inputBlock],
        [
          "Audited token recovery",
          recovery == null ? "not audited" : `${formatNumber(100 * recovery, 1)} %${job.audited_attack ? ` (${job.audited_attack})` : ""}`,
        ],
        ["Encryption", "AES-256-GCM per client, inside HTTPS"],
        ["On each client", `input ${job.split_plan.front_layers} + output ${job.split_plan.back_layers} block(s)`],
        ["Adapter", h("span", { "data-testid": "adapter" }, adapterText(job.adapter || {}))],
        ["Model", job.model_ref],
      ]),
    );
  }

  async function downloadExport(status) {
    fill(status, "Preparing the bundle…");
    try {
      const { blob, filename } = await download(`/jobs/${jobId}/export`, `job-${jobId}-adapters.safetensors`);
      const url = URL.createObjectURL(blob);
      const link = h("a", { href: url, download: filename, hidden: true });
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10_000);
      fill(status, `Downloaded ${filename} (${formatBytes(blob.size)}).`);
    } catch (error) {
      // 409 before the workers checkpointed anything: say so here, next to the button.
      fill(status, error.status === 409 ? `Not available yet. ${error.message}` : error.message);
    }
  }

  function renderExport(rounds) {
    const ended = rounds.filter((r) => r.status === "closed").length;
    const state = `${ended > 0}`;
    if (regions.exported.dataset.state === state) return; // keep a download's message across polls
    regions.exported.dataset.state = state;
    if (!ended) {
      fill(regions.exported, h("p", { class: "empty", "data-testid": "export-state" }, "Not available yet: the model can be exported once its first round has ended."));
      return;
    }
    if (!isAdmin) {
      fill(regions.exported, h("p", { "data-testid": "export-state" }, "A round has ended: an admin can download the trained adapters (export is admin-only)."));
      return;
    }
    const status = h("p", { class: "help", "data-testid": "export-state", role: "status" });
    fill(
      regions.exported,
      h("button", { type: "button", class: "primary", onclick: () => downloadExport(status) }, "Download adapters"),
      h("p", { class: "help" }, "One safetensors bundle: server and global client adapters of the newest round. ", h("code", {}, "flglm job export"), " turns it into a PEFT adapter for the unsplit model."),
      status,
    );
  }

  async function loop() {
    if (stopped) return;
    try {
      await refresh();
    } catch (error) {
      showError(error);
      if (error.status === 404) {
        // Polling a job that does not exist would only repeat the same error.
        stopped = true;
        fill(element, h("h1", {}, "Job not found"), h("p", {}, h("a", { href: "#/jobs" }, "Back to the jobs")));
      }
    }
    if (!stopped) timer = setTimeout(loop, POLL_MS);
  }
  loop();

  return {
    element,
    stop: () => {
      stopped = true;
      clearTimeout(timer);
      if (chart) chart.destroy();
    },
  };
}
