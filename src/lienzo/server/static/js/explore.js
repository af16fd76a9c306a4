// Explore: an X/Y/Z plot of the current txt2img parameters (POST /api/v1/plot). Every cell is a
// queued job; the grid fills in as they finish, and a click opens a cell in the viewer.
import { api, ApiError, followJob } from "./api.js";
import { imageItems } from "./viewer.js";

const $ = (id) => document.getElementById(id);

const SEARCH_REPLACE = "Prompt S/R";
const AXES = ["x", "y", "z"];
const TYPES = new Set(["integer", "number", "boolean", "string", "choice"]);
// A cell is one image: the number of images per job is no axis.
const NOT_AXES = new Set(["batch_size"]);
const EXAMPLES = { integer: "10,20,30 or 10-30 (+10)", number: "4,7,10 or 4-10 (+3)", boolean: "false,true" };

function example(f) {
  if (!f) return "apple,pear,plum (the first is replaced)";
  return EXAMPLES[f.type] ?? (f.choices ? f.choices.join(",") : "one,two,three");
}

const FINISHED = { failed: "Failed", cancelled: "Cancelled", interrupted: "Interrupted", done: "No image" };
const isFinished = (job) => job.status in FINISHED;
const heading = (axis, index) => (axis.title ? `${axis.title}: ${axis.labels[index]}` : axis.labels[index]);

function element(tag, className, text) {
  const el = Object.assign(document.createElement(tag), { className });
  if (text !== undefined) el.textContent = text;
  return el;
}

// One axis row in #axes: its label, field menu, values box and error line (data-field "x", "y", "z").
function axisRow(axis) {
  const row = Object.assign(document.createElement("div"), { className: "axis" });
  row.dataset.field = axis;
  const select = Object.assign(document.createElement("select"), { id: `${axis}-field` });
  const label = Object.assign(document.createElement("label"), { htmlFor: select.id, textContent: axis.toUpperCase() });
  const values = Object.assign(document.createElement("input"), { id: `${axis}-values` });
  values.setAttribute("aria-label", `${axis.toUpperCase()} values`);
  const error = Object.assign(document.createElement("p"), { className: "error" });
  error.setAttribute("role", "alert");
  row.append(label, select, values, error);
  $("axes").append(row);
  return [select, values];
}

// ``request``: the txt2img request the controls make (with the model); ``showError(message, field)``
// puts an error next to its field, the axis rows included (data-field "x", "y", "z").
export function initExplore({ fields, request, clearErrors, showError, openViewer }) {
  const axisFields = fields.filter((f) => f.widget && TYPES.has(f.type) && f.modes.includes("txt2img") && !NOT_AXES.has(f.name));
  const byName = Object.fromEntries(axisFields.map((f) => [f.name, f]));
  const status = $("plot-status");
  let cells = [];

  for (const axis of AXES) {
    const [select, values] = axisRow(axis);
    if (axis !== "x") select.append(new Option("—", ""));
    select.append(...axisFields.map((f) => new Option(f.label, f.name)), new Option(SEARCH_REPLACE, SEARCH_REPLACE));
    select.value = axis === "x" && byName.steps ? "steps" : "";
    const describe = () => {
      values.disabled = !select.value;
      values.placeholder = select.value ? example(byName[select.value]) : "";
      select.title = byName[select.value]?.help ?? "";
    };
    select.addEventListener("change", describe);
    describe();
    values.addEventListener("keydown", (e) => {
      if (e.key !== "Enter") return;
      e.preventDefault(); // Enter plots; it does not submit the form (Generate)
      if (!$("plot").disabled) plot();
    });
  }

  // "steps=10,20,30" for each axis with a field; an axis with a field and no values is an error.
  function axes() {
    const sent = {};
    for (const axis of AXES) {
      const name = $(`${axis}-field`).value;
      const values = $(`${axis}-values`).value.trim();
      if (!name) continue;
      if (!values) throw new ApiError(0, `Give the values to plot, e.g. ${example(byName[name])}`, axis);
      sent[axis] = `${name}=${values}`;
    }
    return sent;
  }

  function cell(layout, c, width, height) {
    const button = element("button", "cell");
    button.type = "button";
    button.title = [[layout.x, c.x], [layout.y, c.y], [layout.z, c.z]].filter(([axis]) => axis).map(([axis, i]) => heading(axis, i)).join(", ");
    button.style.aspectRatio = `${width} / ${height}`;
    button.append(element("span", "cell-state", "Queued"));
    button.addEventListener("click", () => {
      const done = cells.filter((d) => d.item);
      const index = done.indexOf(c);
      if (index >= 0) openViewer(done.map((d) => d.item), index);
    });
    return button;
  }

  function draw(layout, sent) {
    const columns = layout.x.labels.length;
    const grids = (layout.z?.labels ?? [null]).map((_, zi) => {
      const section = element("section", "plot");
      if (layout.z) section.append(element("h3", "", heading(layout.z, zi)));
      const grid = element("div", "plot-grid");
      grid.style.setProperty("--columns", columns);
      grid.append(element("span", "plot-corner"));
      grid.append(...layout.x.labels.map((_, xi) => element("span", "plot-head col", heading(layout.x, xi))));
      section.append(grid);
      return { section, grid };
    });
    for (const c of cells) {
      const { grid } = grids[c.z];
      if (c.x === 0) grid.append(element("span", "plot-head row", layout.y ? heading(layout.y, c.y) : ""));
      c.button = cell(layout, c, sent.width ?? 1, sent.height ?? 1);
      grid.append(c.button);
    }
    $("plots").replaceChildren(...grids.map((g) => g.section));
  }

  function paint(c) {
    const job = c.job;
    const state = c.button.querySelector(".cell-state");
    if (job.status === "running") state.textContent = `Step ${job.progress.step}/${job.progress.total_steps}`;
    if (job.status === "done" && job.images.length) {
      [c.item] = imageItems(job);
      const img = element("img", "");
      img.src = c.item.url;
      img.alt = c.button.title;
      c.button.replaceChildren(img);
    } else if (isFinished(job)) {
      c.button.classList.add("failed");
      state.textContent = FINISHED[job.status];
      if (job.error) c.button.title += `: ${job.error}`;
    }
  }

  function count() {
    const finished = cells.filter((c) => isFinished(c.job));
    const failed = finished.filter((c) => !c.item).length;
    status.textContent = `${finished.length}/${cells.length} done${failed ? ` (${failed} without an image)` : ""}`;
  }

  async function plot() {
    clearErrors();
    let sent;
    try {
      sent = { ...request(), ...axes() };
    } catch (err) {
      return showError(err.message, err.field);
    }
    $("plot").disabled = true;
    try {
      const answer = await api.post("/plot", sent);
      cells = answer.cells.map((c) => ({ ...c, job: { id: c.job, status: "queued" } }));
      draw(answer, sent);
      $("plot-cancel").hidden = false;
      count();
      // The queue runs the jobs in order: follow one at a time (one event stream open, not one a cell).
      let reported = false;
      for (const c of cells) {
        c.job = await followJob(c.job, (job) => {
          c.job = job;
          paint(c);
        });
        count();
        if (c.job.status === "failed" && !reported) {
          reported = true;
          showError(c.job.error, c.job.error_field);
        }
      }
    } catch (err) {
      showError(err.message, err.field);
    } finally {
      $("plot").disabled = false;
      $("plot-cancel").hidden = true;
    }
  }

  $("plot").addEventListener("click", plot);
  $("plot-cancel").addEventListener("click", async () => {
    const waiting = cells.filter((c) => !isFinished(c.job));
    const answers = await Promise.allSettled(waiting.map((c) => api.post(`/jobs/${c.job.id}/cancel`)));
    answers.forEach((a, i) => {
      if (a.status === "fulfilled" && isFinished(a.value)) waiting[i].job = a.value;
    });
  });
}
