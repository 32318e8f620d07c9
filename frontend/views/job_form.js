/** The admin's "New job" form: model, split, adapters, parallel mode, rounds, privacy and invited clients. */

import { get, post } from "../api.js";
import { fill, h } from "../dom.js";

function field(id, label, input, help) {
  input.id = id;
  input.name = id;
  if (help) input.setAttribute("aria-describedby", `${id}-help`);
  return h(
    "div",
    { class: "field" },
    h("label", { for: id }, label),
    input,
    help ? h("p", { id: `${id}-help`, class: "help" }, help) : null,
  );
}

const number = (value, attrs = {}) => h("input", { type: "number", value: String(value), required: true, ...attrs });
const select = (options, value) =>
  h("select", {}, options.map(([v, text]) => h("option", { value: v, selected: v === value }, text)));

export function renderJobForm({ showError }) {
  const inputs = {
    name: h("input", { type: "text", required: true, maxlength: "200", value: "news-classifier" }),
    model_ref: h("input", { type: "text", required: true, value: "smollm2-135m" }),
    task_type: select([["generation", "Generation (prompt → completion)"], ["classification", "Classification (text → label)"]], "classification"),
    front_layers: number(1, { min: "1" }),
    back_layers: number(1, { min: "1" }),
    adapter_kind: select([["lora", "LoRA"]], "lora"),
    adapter_r: number(8, { min: "1" }),
    adapter_alpha: number(16, { min: "1" }),
    parallel_mode: select(
      [
        ["sequential", "Sequential (one client at a time)"],
        ["client_batch", "Client-batching (one replica, clients batched)"],
        ["server_hierarchical", "Server-hierarchical (one replica per client group)"],
      ],
      "client_batch",
    ),
    replicas: number(1, { min: "1" }),
    rounds: number(3, { min: "1" }),
    steps_per_round: number(20, { min: "1" }),
    min_clients: number(1, { min: "1" }),
    lr: h("input", { type: "number", step: "any", min: "0", value: "0.0001", required: true }),
    batch_size: number(8, { min: "1" }),
    noise: h("input", { type: "number", step: "any", min: "0", value: "0", required: true }),
    wire_dtype: select([["float32", "float32"], ["bfloat16", "bfloat16"], ["float16", "float16"]], "float32"),
  };
  const clientList = h("div", { class: "checklist", role: "group", "aria-labelledby": "clients-legend" }, "Loading clients…");
  get("/clients?limit=500")
    .then((page) => {
      const usable = page.items.filter((c) => c.status !== "revoked");
      fill(
        clientList,
        usable.length
          ? usable.map((c) =>
              h(
                "label",
                { class: "check" },
                h("input", { type: "checkbox", name: "clients", value: c.name }),
                ` ${c.name} `,
                h("span", { class: "muted" }, `(${c.status}, ${c.example_count} examples)`),
              ),
            )
          : h("p", { class: "empty" }, "No client agents enrolled yet; you can invite them later."),
      );
    })
    .catch(showError);

  function spec() {
    const int = (key) => Number.parseInt(inputs[key].value, 10);
    return {
      name: inputs.name.value.trim(),
      model_ref: inputs.model_ref.value.trim(),
      task_type: inputs.task_type.value,
      split_plan: { front_layers: int("front_layers"), back_layers: int("back_layers") },
      adapter: { kind: inputs.adapter_kind.value, r: int("adapter_r"), alpha: int("adapter_alpha") },
      hyperparameters: { lr: Number(inputs.lr.value), batch_size: int("batch_size") },
      parallel_mode: inputs.parallel_mode.value,
      replicas: int("replicas"),
      rounds: int("rounds"),
      steps_per_round: int("steps_per_round"),
      min_clients: int("min_clients"),
      privacy: { activation_noise_std: Number(inputs.noise.value), wire_dtype: inputs.wire_dtype.value },
      clients: [...clientList.querySelectorAll("input[name=clients]:checked")].map((el) => el.value),
    };
  }

  const submit = h("button", { type: "submit", class: "primary" }, "Create job");
  const form = h(
    "form",
    {
      class: "card form-grid",
      onsubmit: async (event) => {
        event.preventDefault();
        submit.disabled = true;
        try {
          const job = await post("/jobs", spec());
          location.hash = `#/jobs/${job.id}`;
        } catch (error) {
          showError(error);
        } finally {
          submit.disabled = false;
        }
      },
    },
    h(
      "fieldset",
      {},
      h("legend", {}, "Model"),
      field("name", "Job name", inputs.name),
      field("model_ref", "Model", inputs.model_ref, "A model id or local directory the worker and agents can load."),
      field("task_type", "Task", inputs.task_type),
    ),
    h(
      "fieldset",
      {},
      h("legend", {}, "Split and adapters"),
      field("front_layers", "Blocks kept on the client (input side)", inputs.front_layers),
      field("back_layers", "Blocks kept on the client (output side)", inputs.back_layers),
      field("adapter_kind", "Adapter", inputs.adapter_kind),
      field("adapter_r", "LoRA rank r", inputs.adapter_r),
      field("adapter_alpha", "LoRA alpha", inputs.adapter_alpha),
    ),
    h(
      "fieldset",
      {},
      h("legend", {}, "Training"),
      field("parallel_mode", "Parallel mode", inputs.parallel_mode),
      field("replicas", "Server replicas", inputs.replicas, "More than 1 only with server-hierarchical."),
      field("rounds", "Rounds", inputs.rounds),
      field("steps_per_round", "Steps per round", inputs.steps_per_round),
      field("min_clients", "Minimum clients", inputs.min_clients),
      field("lr", "Learning rate", inputs.lr),
      field("batch_size", "Batch size", inputs.batch_size),
    ),
    h(
      "fieldset",
      {},
      h("legend", {}, "Privacy"),
      field("noise", "Activation noise (std)", inputs.noise, "Gaussian noise the client adds to h0; 0 turns it off."),
      field("wire_dtype", "Wire dtype", inputs.wire_dtype),
    ),
    h("fieldset", { class: "wide" }, h("legend", { id: "clients-legend" }, "Invited clients"), clientList),
    h("div", { class: "actions wide" }, submit, h("a", { class: "button secondary", href: "#/jobs" }, "Cancel")),
  );
  return { element: h("section", {}, h("div", { class: "page-head" }, h("h1", {}, "New job")), form) };
}
