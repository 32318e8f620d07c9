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
    activation_noise: h("input", { type: "number", step: "any", min: "0", max: "1000", value: "0", required: true }),
    activation_clip: h("input", { type: "number", step: "any", min: "0.001", max: "100", value: "1", required: true }),
    gradient_noise: h("input", { type: "number", step: "any", min: "0", max: "1000", value: "0", required: true }),
    private_front: h("input", { type: "checkbox" }),
    private_init_scale: h("input", { type: "number", step: "any", min: "0", max: "10", value: "0", required: true }),
    decorrelation: h("input", { type: "number", step: "any", min: "0", max: "100", value: "0", required: true }),
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
      privacy: {
        wire_dtype: inputs.wire_dtype.value,
        activation_noise: Number(inputs.activation_noise.value),
        activation_clip: Number(inputs.activation_clip.value),
        gradient_noise: Number(inputs.gradient_noise.value),
        private_front: inputs.private_front.checked,
        // Only meaningful with a private input block; the API refuses them without one.
        private_init_scale: inputs.private_front.checked ? Number(inputs.private_init_scale.value) : 0,
        decorrelation: inputs.private_front.checked ? Number(inputs.decorrelation.value) : 0,
      },
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
      field("wire_dtype", "Wire dtype", inputs.wire_dtype, "Precision of the hidden states and gradients sent to the server."),
      field(
        "activation_noise",
        "Activation noise m",
        inputs.activation_noise,
        "Each client clips every token's hidden state h0 to the clip norm, then adds Gaussian noise of norm about m × the clip norm before sending it. 0 turns clipping and noise off; the job page shows the resulting ε.",
      ),
      field(
        "activation_clip",
        "Activation clip c",
        inputs.activation_clip,
        "Per-token clip norm of h0, as a multiple of the public input block's median output norm (used only when m > 0).",
      ),
      field(
        "gradient_noise",
        "Gradient noise",
        inputs.gradient_noise,
        "Gaussian noise on the gradient dL/dh1 each client sends: std per coordinate = this × the gradient's RMS. 0 turns it off.",
      ),
      field(
        "private_front",
        "Private input block",
        inputs.private_front,
        "Each client draws its input-block adapters from its own secret seed and never uploads or averages them; only output-block adapters are averaged. The export then holds the public input block.",
      ),
      field(
        "private_init_scale",
        "Private init scale s",
        inputs.private_init_scale,
        "Private input block only: the adapted weights start s × ‖W‖ away from the public ones, so the server does not know the input block even at the first step.",
      ),
      field(
        "decorrelation",
        "Decorrelation λ",
        inputs.decorrelation,
        "Private input block only: weight of the NoPeek penalty (distance correlation between token embeddings and h0) in each client's input-block objective.",
      ),
    ),
    h("fieldset", { class: "wide" }, h("legend", { id: "clients-legend" }, "Invited clients"), clientList),
    h("div", { class: "actions wide" }, submit, h("a", { class: "button secondary", href: "#/jobs" }, "Cancel")),
  );
  return { element: h("section", {}, h("div", { class: "page-head" }, h("h1", {}, "New job")), form) };
}
