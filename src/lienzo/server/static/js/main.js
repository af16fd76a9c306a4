// lienzo studio: create (txt2img, img2img, inpaint, outpaint) and the gallery, on /api/v1.
import { api, ApiError, blobToDataURL, dropTarget, followJob } from "./api.js";
import { ImageEditor, loadImage } from "./canvas.js";
import { initControlNet } from "./control.js";
import { initExplore } from "./explore.js";
import { initGallery, tile } from "./gallery.js";
import { initPromptHelper } from "./prompt.js";
import { initQueue } from "./queue.js";
import { initUpscale } from "./upscale.js";
import { imageItems, initViewer } from "./viewer.js";

const $ = (id) => document.getElementById(id);
const form = $("generate-form");
const state = { models: [], samplers: [], family: null, lastSeed: null, job: null, results: [], references: [] };
let controlNet = null; // the ControlNet panel, once its choices have loaded

// ---- messages -------------------------------------------------------------------------------
let toastTimer;
function toast(message, bad = false) {
  const box = $("toast");
  box.textContent = message;
  box.classList.toggle("bad", bad);
  box.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => (box.hidden = true), bad ? 8000 : 3500);
}

function clearErrors() {
  document.querySelectorAll(".invalid").forEach((el) => el.classList.remove("invalid"));
  document.querySelectorAll("[data-field] .error, .error[data-field], #form-error").forEach((el) => (el.textContent = ""));
}

// The element that shows a field's errors: the closest one a name's parts lead to ("controlnets.0.weight":
// its unit's, "reference_images.1": the field's).
function fieldHolder(field) {
  const parts = field?.split(".") ?? [];
  for (let n = parts.length; n > 0; n--) {
    const holder = document.querySelector(`[data-field="${parts.slice(0, n).join(".")}"]`);
    if (holder) return holder;
  }
  return null;
}

// Show a server error next to the field that caused it (the API names it), else under the button.
function showError(message, field) {
  const holder = fieldHolder(field);
  const slot = holder && (holder.classList.contains("error") ? holder : holder.querySelector(".error"));
  if (slot) {
    holder.classList.add("invalid");
    slot.textContent = message;
    const details = holder.closest("details");
    if (details) details.open = true;
    holder.scrollIntoView({ block: "nearest", behavior: "smooth" });
  } else {
    $("form-error").textContent = message;
  }
}

// ---- parameters -----------------------------------------------------------------------------
const mode = () => form.querySelector('input[name="mode"]:checked').value;

// The request's fields with their labels, help, limits, defaults and controls (GET /api/v1/fields).
// A control this page lays out itself is found by its id; the others are made in the Parameters aside.
const fields = await api.get("/fields").catch((err) => {
  showError(err.message, err.field);
  return [];
});
const field = Object.fromEntries(fields.map((f) => [f.name, f]));

const INPUT_TYPES = { check: "checkbox", number: "number", range: "range", text: "text" };

function makeControl({ name, widget, choices }) {
  const box = Object.assign(document.createElement("div"), { className: "field" });
  box.dataset.field = name;
  const label = Object.assign(document.createElement("label"), { htmlFor: name });
  let control;
  if (widget.kind === "select") {
    control = document.createElement("select");
    control.append(...(choices ?? []).map((c) => new Option(c, c)));
  } else {
    control = Object.assign(document.createElement("input"), { type: INPUT_TYPES[widget.kind] });
  }
  control.id = name;
  if (widget.kind === "check") {
    label.className = "check";
    label.append(control);
    box.append(label);
  } else {
    box.append(label, control);
  }
  if (widget.kind === "range") {
    const output = document.createElement("output");
    output.setAttribute("for", name);
    label.append(output);
  }
  const error = Object.assign(document.createElement("p"), { className: "error" });
  error.setAttribute("role", "alert");
  box.append(error);
  // The hires fix's fields under their heading: the switch first, the rest shown once it is on.
  if (name === "enable_hr") $("hires-more").before(box);
  else if (name.startsWith("hr_")) $("hires-more").append(box);
  else $("hires-box").before(box);
  return control;
}

const BOUNDS = {
  range: ({ widget, limits }) => ({ min: widget.low ?? limits.minimum, max: widget.high ?? limits.maximum, step: widget.step }),
  number: ({ widget, limits, type }) => ({
    min: limits.minimum,
    max: limits.maximum,
    step: widget.step ?? limits.multipleOf ?? (type === "integer" ? 1 : "any"),
  }),
  text: ({ limits }) => ({ maxLength: limits.maxLength }),
};

// Label, tooltip and limits from the table; a range's <output> shows its value.
function describe(f, control) {
  const caption = control.labels[0] ?? control.closest("details")?.querySelector("summary");
  if (caption) {
    if (control.type === "checkbox") caption.append(` ${f.label}`);
    else caption.prepend(`${f.label} `);
    caption.title = f.help;
  }
  control.title = f.help;
  for (const [key, value] of Object.entries(BOUNDS[f.widget.kind]?.(f) ?? {})) if (value !== undefined) control[key] = value;
  const output = document.querySelector(`output[for="${f.name}"]`);
  if (output) control.addEventListener("input", () => (output.textContent = control.value + (output.dataset.unit ?? "")));
}

const controls = fields.filter((f) => f.widget).map((f) => ({ field: f, control: $(f.name) ?? makeControl(f) }));
for (const { field: f, control } of controls) describe(f, control);

// The hires fix's settings show once it is switched on (a reused picture's parameters switch it too).
const hiresSwitch = $("enable_hr");
const showHires = () => ($("hires-more").hidden = !hiresSwitch?.checked);
hiresSwitch?.addEventListener("input", showHires);
hiresSwitch?.addEventListener("change", showHires);

// A control's value as the request wants it; a nullable field's empty choice is null (the hires sampler's
// "same as the first pass").
function read(f, control) {
  if (f.type === "boolean") return control.checked;
  if (f.nullable && control.tagName === "SELECT" && control.value === "") return null;
  if (f.type === "integer" || f.type === "number") return Number(control.value);
  return control.value;
}

function setValue(control, value) {
  if (value === undefined || value === null) return;
  if (control.tagName === "SELECT" && ![...control.options].some((o) => o.value === String(value))) return;
  if (control.type === "checkbox") control.checked = Boolean(value);
  else control.value = value;
  control.dispatchEvent(new Event("input"));
}

// The fields the table leaves to the model's family (null there): GET /models gives each model's.
const FAMILY_DEFAULTS = ["steps", "cfg_scale", "sampler", "distilled_cfg_scale"];

const familyDecides = (f) => f.default === null && FAMILY_DEFAULTS.includes(f.name);

function defaultFor(f, m) {
  const value = f.mode_defaults[m] ?? f.default;
  return familyDecides(f) ? state.family?.[f.name] ?? null : value;
}

// Each control starts at its field's default for the mode and the model's family; a mode or model
// change moves the controls the user has not changed to the new defaults (e.g. a stronger denoising
// for outpainting, Flux.1's CFG scale 1). ``defaults`` holds what the page last put in each control;
// ``serverDecides`` the family's fields for a model of no known family, left out of requests until
// the user sets them.
const defaults = new Map();
const serverDecides = new Set();
const untouched = (f, control) => !defaults.has(f.name) || read(f, control) === defaults.get(f.name);

function applyDefaults(m) {
  for (const { field: f, control } of controls) {
    if (!untouched(f, control)) continue;
    const value = defaultFor(f, m);
    setValue(control, value);
    defaults.set(f.name, value ?? read(f, control));
    if (value === null && familyDecides(f)) serverDecides.add(f.name);
    else serverDecides.delete(f.name);
  }
}

function currentModel() {
  return state.models.find((m) => m.name === $("model").value);
}

// Width and height go over their sliders' range, reaching down to a smaller model's own size.
function applyNativeSize(model, set) {
  const native = model?.native_size || 512;
  const sides = ["width", "height"];
  for (const id of sides) {
    $(id).min = Math.min(field[id].widget.low, native);
    if (set) setValue($(id), native);
  }
  $("native-size").textContent = `Native size ${native}×${native}`;
  $("native-size").onclick = () => sides.forEach((id) => setValue($(id), native));
}

// The samplers that run on the selected model, with the schedules they run there.
const samplerChoices = () => state.family?.samplers ?? state.samplers;

function fillSchedules(samplerName, schedule) {
  const choices = samplerChoices();
  const sampler = choices.find((s) => s.name === samplerName) ?? choices[0];
  const select = $("schedule");
  select.replaceChildren(...sampler.schedules.map((s) => new Option(s === "Automatic" ? `Automatic (${sampler.automatic})` : s, s)));
  select.value = sampler.schedules.includes(schedule) ? schedule : "Automatic";
}

// The hires fix's upscaler: the latent modes, then the picture upscalers (built in and the models dir's files).
function fillHiresUpscalers(upscalers) {
  const select = $("hr_upscaler");
  if (!select) return;
  select.replaceChildren(...upscalers.map((u) => new Option(u.scale ? `${u.name} (${u.scale}×)` : u.name, u.name)));
  setValue(select, defaults.get("hr_upscaler") ?? field.hr_upscaler.default);
}

// The refiner: none, or any model that loads (the server checks that it fits the chosen one).
function fillRefiners(models) {
  const select = $("refiner");
  if (!select) return;
  select.replaceChildren(new Option("None", ""), ...models.filter((m) => !m.error).map((m) => new Option(m.name, m.name)));
  select.value = "";
}

// The hires fix's schedule types: those of its sampler (the first pass's when it has none of its own).
function fillHiresSchedules() {
  const select = $("hr_schedule");
  if (!select) return;
  const choices = samplerChoices();
  const name = $("hr_sampler")?.value || $("sampler").value;
  const sampler = choices.find((s) => s.name === name) ?? choices[0];
  if (!sampler) return;
  const kept = select.value || field.hr_schedule.default;
  select.replaceChildren(...sampler.schedules.map((s) => new Option(s, s)));
  select.value = sampler.schedules.includes(kept) ? kept : "Automatic";
}

async function loadChoices() {
  const [models, samplers, upscalers] = await Promise.all([api.get("/models"), api.get("/samplers"), api.get("/upscalers")]);
  state.models = models;
  state.samplers = samplers;
  fillHiresUpscalers(upscalers);
  const select = $("model");
  // A file that cannot be read is shown with the reason, and cannot be chosen.
  select.replaceChildren(
    ...models.map((m) =>
      Object.assign(new Option(`${m.name}${m.architecture ? ` · ${m.architecture}` : ""}`, m.name), { disabled: Boolean(m.error), title: m.error ?? "" }),
    ),
  );
  fillRefiners(models);
  const current = models.find((m) => m.current) ?? models.find((m) => !m.error);
  if (current) select.value = current.name;
  if (!current) showError("No model found: put a checkpoint in the models folder, or reinstall lienzo for its built-in model.", "model");
  applyNativeSize(current, true);
  applyFamily(current);
}

// The controls follow the model's family: its samplers, its defaults where the user set none, the
// distilled CFG slider for a network that takes one (Flux.1 dev).
function applyFamily(model) {
  state.family = model?.family ?? null;
  const select = $("sampler");
  const chosen = select.value;
  const choices = samplerChoices();
  select.replaceChildren(...choices.map((s) => new Option(s.name, s.name)));
  if (choices.some((s) => s.name === chosen)) select.value = chosen;
  else defaults.delete("sampler"); // the user's sampler does not run on this model: the family's replaces it
  const hires = $("hr_sampler");
  if (hires) {
    const kept = hires.value;
    hires.replaceChildren(new Option("Same as the first pass", ""), ...choices.map((s) => new Option(s.name, s.name)));
    hires.value = choices.some((s) => s.name === kept) ? kept : "";
  }
  document.querySelector('[data-field="distilled_cfg_scale"]').hidden = state.family?.distilled_cfg_scale == null;
  showReferences();
  applyDefaults(mode());
  fillSchedules(select.value, $("schedule").value);
  fillHiresSchedules(); // after the family's sampler is in place
}

// At CFG scale 1 no negative pass runs: the negative prompt would change nothing.
function showNegative() {
  const off = Number($("cfg_scale").value) === 1;
  $("negative-box").hidden = off;
  $("negative-off").hidden = !off;
}
$("cfg_scale").addEventListener("input", showNegative);

async function chooseModel() {
  clearErrors();
  try {
    await api.put("/models/current", { name: $("model").value });
    applyNativeSize(currentModel(), true);
    applyFamily(currentModel());
    toast(`Model: ${$("model").value}`);
  } catch (err) {
    showError(err.message, "model");
  }
}

$("sampler").addEventListener("change", () => {
  fillSchedules($("sampler").value);
  fillHiresSchedules();
});
$("hr_sampler")?.addEventListener("change", fillHiresSchedules);
$("model").addEventListener("change", chooseModel);

$("seed-random").addEventListener("click", () => ($("seed").value = -1));
$("seed-reuse").addEventListener("click", () => {
  if (state.lastSeed === null) return toast("No image made yet: there is no last seed to reuse.", true);
  $("seed").value = state.lastSeed;
});

// ---- source image (img2img, inpaint, outpaint) ------------------------------------------------
const editor = new ImageEditor($("canvas-wrap"), $("image-canvas"), $("mask-canvas"));
editor.onChange = () => {
  $("canvas-wrap").hidden = !editor.hasImage;
  document.querySelector(".drop-hint").hidden = editor.hasImage;
  controlNet?.sourceChanged();
};

function outpaintAmounts() {
  const value = (id) => Math.max(0, parseInt($(id).value, 10) || 0);
  return { left: value("outpaint_left"), right: value("outpaint_right"), up: value("outpaint_up"), down: value("outpaint_down") };
}

function applyMode() {
  const m = mode();
  $("source-box").hidden = m === "txt2img";
  $("explore").hidden = m !== "txt2img"; // a plot is of txt2img jobs
  $("mask-tools").hidden = m !== "inpaint";
  $("outpaint-tools").hidden = m !== "outpaint";
  // The output takes the input image's size in the image modes; the sliders then do nothing.
  for (const id of ["width", "height"]) $(id).disabled = m !== "txt2img";
  $("native-size").hidden = m !== "txt2img";
  $("hires-box").hidden = !field.enable_hr?.modes.includes(m);
  showReferences();
  applyDefaults(m);
  editor.setMode(m);
  editor.setOutpaint(outpaintAmounts());
}
form.querySelectorAll('input[name="mode"]').forEach((r) => r.addEventListener("change", applyMode));

// Reference images (Flux.2 Klein's editing): offered for a family that reads them, in the field's modes.
function showReferences() {
  const f = field.reference_images;
  $("reference-box").hidden = !(state.family?.reference_images && f?.modes.includes(mode()));
}
$("reference-hint").textContent = field.reference_images?.help ?? "";
$("reference_images").addEventListener("change", async (e) => {
  clearErrors();
  state.references = await Promise.all([...e.target.files].map(blobToDataURL));
});
for (const id of ["outpaint_left", "outpaint_right", "outpaint_up", "outpaint_down"]) $(id).addEventListener("input", () => editor.setOutpaint(outpaintAmounts()));
$("brush").addEventListener("input", (e) => (editor.brush = Number(e.target.value)));
$("eraser").addEventListener("change", (e) => (editor.eraser = e.target.checked));
$("mask-clear").addEventListener("click", () => editor.clearMask());
$("mask-invert").addEventListener("click", () => editor.invertMask());
$("source-clear").addEventListener("click", () => editor.clearImage());

async function useImage(src) {
  try {
    editor.setImage(await loadImage(src));
    clearErrors();
  } catch (err) {
    showError(err.message, "init_image");
  }
}

async function useFile(file) {
  if (!file) return;
  if (!file.type.startsWith("image/")) return showError(`${file.name} is not an image`, "init_image");
  await useImage(await blobToDataURL(file));
}

const drop = $("drop");
$("file").addEventListener("change", (e) => useFile(e.target.files[0]));
dropTarget(drop, useFile);
document.addEventListener("paste", (e) => {
  const file = [...(e.clipboardData?.files ?? [])].find((f) => f.type.startsWith("image/"));
  if (file && mode() !== "txt2img" && !$("view-create").hidden) useFile(file);
});

async function sendTo(url, targetMode, parameters) {
  location.hash = "#create";
  form.querySelector(`input[name="mode"][value="${targetMode}"]`).checked = true;
  applyMode();
  const blob = await (await fetch(url)).blob();
  await useImage(await blobToDataURL(blob));
  if (parameters?.prompt !== undefined) $("prompt").value = parameters.prompt;
  if (parameters?.negative_prompt) $("negative_prompt").value = parameters.negative_prompt;
  toast(targetMode === "inpaint" ? "Paint over what should change, then generate." : "Set the strength, then generate.");
}

// ---- generate -------------------------------------------------------------------------------
function body() {
  const m = mode();
  const request = {};
  // The mode's fields, less the controls that do not apply: width and height are disabled outside
  // txt2img (the output takes the input image's size), the mask tools hidden outside inpaint.
  for (const { field: f, control } of controls) {
    if (serverDecides.has(f.name) && untouched(f, control)) continue;
    if (control.tagName === "SELECT" && !control.options.length) continue; // choices not loaded: the server's default
    if (f.modes.includes(m) && !control.disabled && !control.closest("[hidden]")) request[f.name] = read(f, control);
  }
  if (state.references.length && !$("reference-box").hidden) request.reference_images = state.references;
  const units = controlNet?.units() ?? [];
  if (units.length) request.controlnets = units;
  if (m === "txt2img") return request;
  if (!editor.hasImage) throw new ApiError(0, "Drop or choose an image first.", "init_image");
  request.init_image = editor.imageDataURL();
  if (m === "inpaint") {
    if (editor.maskIsEmpty()) throw new ApiError(0, "Paint a mask over the part to repaint first.", "init_image");
    request.mask = editor.maskDataURL();
  }
  if (m === "outpaint") {
    const a = outpaintAmounts();
    Object.assign(request, { outpaint_left: a.left, outpaint_right: a.right, outpaint_up: a.up, outpaint_down: a.down });
  }
  return request;
}

function formatEta(seconds) {
  if (seconds === null || seconds === undefined) return "";
  if (seconds < 60) return `${Math.ceil(seconds)} s left`;
  return `${Math.floor(seconds / 60)} min ${Math.ceil(seconds % 60)} s left`;
}

function showProgress(job) {
  const p = job.progress;
  $("progress").hidden = false;
  $("progress-fill").style.width = `${Math.round(p.fraction * 100)}%`;
  let text;
  if (job.status === "queued") text = job.position ? `Waiting: ${job.position} job${job.position === 1 ? "" : "s"} ahead` : "Starting…";
  else if (job.status === "running") {
    text = `Step ${p.step}/${p.total_steps}${p.batch_count > 1 ? `, batch ${p.batch + 1}/${p.batch_count}` : ""}`;
    const eta = formatEta(p.eta);
    if (eta) text += ` · ${eta}`;
  } else text = { done: "Done", cancelled: "Cancelled", interrupted: "Interrupted" }[job.status] || "Failed";
  $("progress-text").textContent = text;
  if (p.preview_url && job.status === "running") {
    $("preview-box").hidden = false;
    $("preview").src = p.preview_url;
  }
}

function showResults(job) {
  state.results = [...imageItems(job), ...state.results];
  const open = (item) => viewer.open(state.results, state.results.indexOf(item));
  $("results").replaceChildren(...state.results.map((item) => tile(item, open)));
}

async function generate() {
  if (state.job) return;
  clearErrors();
  let request;
  try {
    request = body();
  } catch (err) {
    return showError(err.message, err.field);
  }
  const m = mode();
  $("generate").disabled = true;
  $("cancel").hidden = false;
  $("preview-box").hidden = true;
  try {
    const job = await api.post(`/${m}`, { ...request, model: $("model").value || null });
    state.job = job;
    const final = await followJob(job, showProgress);
    if (final.images.length) {
      state.lastSeed = final.images[0].seed;
      showResults(final);
    }
    if (final.status === "failed") showError(final.error, final.error_field);
    if (final.status === "cancelled") toast(`Cancelled${final.images.length ? `; kept ${final.images.length} finished image(s)` : ""}.`);
    if (final.status === "interrupted") toast(`Interrupted; kept ${final.images.length} image(s), the last one unfinished.`);
    const blocked = final.images.filter((i) => i.filtered).length;
    if (blocked) toast(`${blocked} image(s) ${final.images.find((i) => i.filtered).filtered} by the server's safety filter.`, true);
  } catch (err) {
    showError(err.message, err.field);
  } finally {
    state.job = null;
    $("generate").disabled = false;
    $("cancel").hidden = true;
    $("preview-box").hidden = true;
    if (!$("form-error").textContent && $("progress-text").textContent === "Done") setTimeout(() => ($("progress").hidden = true), 1500);
  }
}

form.addEventListener("submit", (e) => {
  e.preventDefault();
  generate();
});
$("cancel").addEventListener("click", async () => {
  if (!state.job) return;
  try {
    await api.post(`/jobs/${state.job.id}/cancel`);
  } catch (err) {
    toast(err.message, true);
  }
});

// ---- reuse parameters -------------------------------------------------------------------------
async function reuse(parameters) {
  location.hash = "#create";
  if (parameters.width && parameters.height) {
    form.querySelector('input[name="mode"][value="txt2img"]').checked = true;
    applyMode();
  }
  // The model first: its family decides which samplers and controls there are.
  const model = state.models.find((m) => m.name === parameters.model);
  if (model && model.name !== $("model").value) {
    $("model").value = model.name;
    await chooseModel();
  }
  for (const { field: f, control } of controls) {
    // A flag missing from an older image's parameters was off.
    setValue(control, f.name in parameters ? parameters[f.name] : f.type === "boolean" ? f.default : undefined);
  }
  if (parameters.negative_prompt) $("negative-box").open = true;
  if (state.samplers.length) fillSchedules($("sampler").value, parameters.schedule ?? $("schedule").value);
  if ($("hr_schedule")) {
    fillHiresSchedules(); // for the hires sampler just set
    setValue($("hr_schedule"), parameters.hr_schedule);
  }
  toast("Parameters loaded: generate to remake the image.");
  $("prompt").focus();
}

// ---- views and keys ---------------------------------------------------------------------------
const gallery = initGallery({ openViewer: (items, i) => viewer.open(items, i), toast });
const viewer = initViewer({ fields, onReuse: reuse, onSend: sendTo, gallery, toast });
initPromptHelper({ prompt: $("prompt"), negative: $("negative_prompt"), toast });
initUpscale({ toast });
// A unit without its own picture reads the image modes' input picture: its preview too.
const inputPicture = () => (mode() !== "txt2img" && editor.hasImage ? editor.imageDataURL() : null);
initControlNet({ source: inputPicture, mode, toast })
  .then((panel) => (controlNet = panel))
  .catch((err) => showError(`ControlNet: ${err.message}`, "controlnets"));
initExplore({ fields, request: () => ({ ...body(), model: $("model").value || null }), clearErrors, showError, openViewer: viewer.open });
const queue = initQueue({ openViewer: viewer.open, toast });

const VIEWS = ["create", "upscale", "gallery", "queue"];

function route() {
  const view = VIEWS.find((v) => location.hash === `#${v}`) ?? "create";
  for (const v of VIEWS) {
    $(`view-${v}`).hidden = view !== v;
    $(`tab-${v}`).setAttribute("aria-selected", String(view === v));
  }
  if (view === "gallery") gallery.show();
  // The queue is read only while its tab is shown.
  if (view === "queue") queue.show();
  else queue.hide();
}
window.addEventListener("hashchange", route);

document.addEventListener("keydown", (e) => {
  if ((e.ctrlKey || e.metaKey) && e.key === "Enter" && !$("view-create").hidden) {
    e.preventDefault();
    generate();
  }
  const typing = ["INPUT", "TEXTAREA", "SELECT"].includes(document.activeElement?.tagName);
  if (e.key === "/" && !typing && !$("view-gallery").hidden) {
    e.preventDefault();
    gallery.focusSearch();
  }
});

route();
applyMode();
loadChoices().catch((err) => showError(err.message, err.field));
