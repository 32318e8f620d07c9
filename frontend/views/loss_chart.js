/** Loss curves per client and the global mean, drawn with the vendored uPlot; fed incrementally. */

import uPlot from "../vendor/uPlot.esm.js";
import { h } from "../dom.js";

// Okabe–Ito colours: distinguishable with the common colour-vision deficiencies.
const PALETTE = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442"];
const GLOBAL_COLOUR = "#1f2933";
// Steps are whole: the x axis only ever steps by these, so no tick falls between two steps.
const STEP_INCREMENTS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000];

export class LossChart {
  constructor(clientNames) {
    this.clientNames = clientNames; // client_id -> name
    this.points = new Map(); // global step -> Map(client_id -> loss)
    this.clientIds = [];
    this.stepsPerRound = 1;
    this.rounds = 1; // the job's round count: no boundary is drawn past its last round
    this.plot = null;
    this.frame = h("div", { class: "chart-frame" });
    this.element = h(
      "figure",
      { class: "chart", "data-testid": "loss-chart", "data-points": "0", "data-round-marks": "", "data-x-ticks": "" },
      this.frame,
      h("figcaption", { class: "visually-hidden" }, "Training loss per client and global mean, by step"),
    );
    this.resizeObserver = new ResizeObserver(() => this.plot && this.plot.setSize(this.size()));
    this.resizeObserver.observe(this.frame);
  }

  size() {
    return { width: Math.max(320, this.frame.clientWidth), height: 280 };
  }

  /** Add step metrics; the job's `stepsPerRound` turns (round, step) into one increasing x counted from 1
   * (the API's steps are 0-based within a round: round 1's first step is x = 1), and its `rounds` bound the
   * round boundaries drawn. */
  add(metrics, stepsPerRound, rounds) {
    this.stepsPerRound = stepsPerRound;
    this.rounds = rounds;
    for (const m of metrics) {
      if (m.loss === null || m.loss === undefined) continue;
      const x = (m.round_number - 1) * stepsPerRound + m.step + 1;
      if (!this.points.has(x)) this.points.set(x, new Map());
      this.points.get(x).set(m.client_id, m.loss);
    }
    this.draw();
  }

  data() {
    const xs = [...this.points.keys()].sort((a, b) => a - b);
    const ids = [...new Set(xs.flatMap((x) => [...this.points.get(x).keys()]))].sort((a, b) => a - b);
    const series = ids.map((id) => xs.map((x) => this.points.get(x).get(id) ?? null));
    const mean = xs.map((x) => {
      const values = [...this.points.get(x).values()];
      return values.reduce((a, b) => a + b, 0) / values.length;
    });
    return { ids, data: [xs, mean, ...series] };
  }

  draw() {
    const { ids, data } = this.data();
    this.element.dataset.points = String(data[0].length);
    if (!data[0].length) return;
    if (!this.plot || ids.join() !== this.clientIds.join()) {
      if (this.plot) this.plot.destroy();
      this.clientIds = ids;
      this.plot = new uPlot(this.options(ids), data, this.frame);
    } else {
      this.plot.setData(data);
    }
  }

  options(ids) {
    return {
      ...this.size(),
      scales: { x: { time: false, range: (u, min, max) => this.xRange(min, max) } },
      axes: [
        {
          label: "step (across rounds)",
          stroke: "#3e4c59",
          grid: { stroke: "#e4e7eb" },
          incrs: STEP_INCREMENTS,
          values: (u, splits) => this.stepTicks(splits),
        },
        { label: "loss", stroke: "#3e4c59", grid: { stroke: "#e4e7eb" } },
      ],
      legend: { live: false },
      cursor: { drag: { x: true, y: false } },
      hooks: { draw: [(u) => this.drawRoundBoundaries(u)] },
      series: [
        { label: "step" },
        { label: "global (mean)", stroke: GLOBAL_COLOUR, width: 2.5, dash: [6, 4], spanGaps: true },
        ...ids.map((id, i) => ({
          label: this.clientNames.get(id) || `client ${id}`,
          stroke: PALETTE[i % PALETTE.length],
          width: 1.5,
          spanGaps: true,
        })),
      ],
    };
  }

  /** The x tick labels: whole steps only (listed in `data-x-ticks`). */
  stepTicks(splits) {
    const labels = splits.map((v) => (Number.isInteger(v) ? String(v) : ""));
    this.element.dataset.xTicks = labels.filter(Boolean).join(" ");
    return labels;
  }

  /** The x range uPlot chose, kept within the job's steps (half a step of margin): uPlot widens a lone
   * point's range, so step 1 alone read 0 to 100 and round boundaries were drawn far past the job's end. */
  xRange(min, max) {
    if (min == null || max == null) return [min, max];
    const [first, last] = [0.5, this.rounds * this.stepsPerRound + 0.5];
    // A lone step: the whole job (uPlot widens a lone x by its magnitude: step 1 alone read 0 to 2).
    if (this.points.size <= 1) return [first, last];
    const low = Math.max(first, Math.min(min, last));
    const high = Math.min(last, Math.max(max, first));
    return low < high ? [low, high] : [first, last];
  }

  /** A dotted line and a label where each round of the job after the first begins, inside the x range
   * shown; never past the job's last round. The rounds marked are listed in `data-round-marks`. */
  drawRoundBoundaries(u) {
    const [xMin, xMax] = [u.scales.x.min, u.scales.x.max];
    const marked = [];
    const { ctx } = u;
    ctx.save();
    ctx.strokeStyle = "#7b8794";
    ctx.fillStyle = "#52606d";
    ctx.setLineDash([3, 4]);
    ctx.textAlign = "left";
    ctx.textBaseline = "alphabetic";
    ctx.font = `${12 * devicePixelRatio}px system-ui, sans-serif`;
    for (let round = 2; round <= this.rounds && (round - 1) * this.stepsPerRound + 0.5 <= xMax; round += 1) {
      const x = (round - 1) * this.stepsPerRound + 0.5;
      if (x < xMin) continue;
      marked.push(round);
      const px = u.valToPos(x, "x", true);
      ctx.beginPath();
      ctx.moveTo(px, u.bbox.top);
      ctx.lineTo(px, u.bbox.top + u.bbox.height);
      ctx.stroke();
      ctx.fillText(`round ${round}`, px + 4 * devicePixelRatio, u.bbox.top + 14 * devicePixelRatio);
    }
    ctx.restore();
    this.element.dataset.roundMarks = marked.join(" ");
  }

  destroy() {
    this.resizeObserver.disconnect();
    if (this.plot) this.plot.destroy();
  }
}
