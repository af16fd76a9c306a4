// lienzo studio: create (txt2img, img2img, inpaint, outpaint) and the gallery, on /api/v1.
import { api, ApiError, blobToDataURL, followJob } from "./api.js";
import { ImageEditor, loadImage } from "./canvas.js";
import { initGallery, tile } from "./gallery.js";
import { initPromptHelper } from "./prompt.js";
import { initViewer } from "./viewer.js";

const $ = (id) => document.getElementById(id);
const form = $("generate-form");
const state = { models: [], samplers: [], lastSeed: null, job: null, results: [] };

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

// Show a server error next to the field that caused it (the API names it), else under the button.
function showError(message, field) {
  const name = field?.split(".")[0];
  const holder = name && document.querySelector(`[data-field="${name}"]`);
  const slot = holder && (holder.classList.contains("error") ? holder : holder.querySelector(".error"));
  if (slot) {
    holder.classList.add("invalid");
    slot.textContent = message;
    if (holder.tagName === "DETAILS") holder.open = true;
    holder.scrollIntoView({ block: "nearest", behavior: "smooth" });
  } else {
    $("form-error").textContent = message;
  }
}

// ---- parameters -----------------------------------------------------------------------------
const mode = () => form.querySelector('input[name="mode"]:checked').value;

function bindOutput(inputId, outputEl, format = (v) => v) {
  const input = $(inputId);
  const update = () => (outputEl.textContent = format(input.value));
  input.addEventListener("input", update);
  update();
  return update;
}
const updateWidth = bindOutput("width", $("width-out"), (v) => `${v}px`);
const updateHeight = bindOutput("height", $("height-out"), (v) => `${v}px`);
const updateCfg = bindOutput("cfg_scale", $("cfg-out"));
const updateStrength = bindOutput("denoising_strength", document.querySelector('output[for="denoising_strength"]'));

function setValue(id, value) {
  const el = $(id);
  if (value === undefined || value === null || !el) return;
  if (el.type === "checkbox") el.checked = Boolean(value);
  else el.value = value;
}

function currentModel() {
  return state.models.find((m) => m.name === $("model").value);
}

// Width and height go in steps of 64 from 256 to 1024, reaching down to a smaller model's own size.
function applyNativeSize(model, set) {
  const native = model?.native_size || 512;
  for (const id of ["width", "height"]) {
    $(id).min = Math.min(256, native);
    if (set) $(id).value = native;
  }
  $("native-size").textContent = `Native size ${native}×${native}`;
  $("native-size").onclick = () => {
    $("width").value = $("height").value = native;
    updateWidth();
    updateHeight();
  };
  updateWidth();
  updateHeight();
}

function fillSchedules(samplerName, schedule) {
  const sampler = state.samplers.find((s) => s.name === samplerName) ?? state.samplers[0];
  const select = $("schedule");
  select.replaceChildren(...sampler.schedules.map((s) => new Option(s === "Automatic" ? `Automatic (${sampler.automatic})` : s, s)));
  select.value = sampler.schedules.includes(schedule) ? schedule : "Automatic";
}

async function loadChoices() {
  const [models, samplers] = await Promise.all([api.get("/models"), api.get("/samplers")]);
  state.models = models;
  state.samplers = samplers;
  const select = $("model");
  // A file that cannot be read is shown with the reason, and cannot be chosen.
  select.replaceChildren(
    ...models.map((m) =>
      Object.assign(new Option(`${m.name}${m.architecture ? ` · ${m.architecture}` : ""}`, m.name), { disabled: Boolean(m.error), title: m.error ?? "" }),
    ),
  );
  const current = models.find((m) => m.current) ?? models.find((m) => !m.error);
  if (current) select.value = current.name;
  if (!current) showError("No model found: put a checkpoint in the models folder, or reinstall lienzo for its built-in model.", "model");
  applyNativeSize(current, true);
  $("sampler").replaceChildren(...samplers.map((s) => new Option(s.name, s.name)));
  $("sampler").value = samplers.some((s) => s.name === "DPM++ 2M") ? "DPM++ 2M" : samplers[0]?.name;
  fillSchedules($("sampler").value);
}

$("sampler").addEventListener("change", () => fillSchedules($("sampler").value));
$("model").addEventListener("change", async () => {
  clearErrors();
  try {
    await api.put("/models/current", { name: $("model").value });
    applyNativeSize(currentModel(), true);
    toast(`Model: ${$("model").value}`);
  } catch (err) {
    showError(err.message, "model");
  }
});

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
};

function outpaintAmounts() {
  const value = (id) => Math.max(0, parseInt($(id).value, 10) || 0);
  return { left: value("outpaint_left"), right: value("outpaint_right"), up: value("outpaint_up"), down: value("outpaint_down") };
}

function applyMode() {
  const m = mode();
  $("source-box").hidden = m === "txt2img";
  $("mask-tools").hidden = m !== "inpaint";
  $("outpaint-tools").hidden = m !== "outpaint";
  // The output takes the input image's size in the image modes; the sliders then do nothing.
  for (const id of ["width", "height"]) $(id).disabled = m !== "txt2img";
  $("native-size").hidden = m !== "txt2img";
  editor.setMode(m);
  editor.setOutpaint(outpaintAmounts());
}
form.querySelectorAll('input[name="mode"]').forEach((r) => r.addEventListener("change", applyMode));
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
drop.addEventListener("dragover", (e) => {
  e.preventDefault();
  drop.classList.add("over");
});
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  useFile(e.dataTransfer.files[0]);
});
document.addEventListener("paste", (e) => {
  const file = [...(e.clipboardData?.files ?? [])].find((f) => f.type.startsWith("image/"));
  if (file && mode() !== "txt2img") useFile(file);
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
  const number = (id) => Number($(id).value);
  const fields = {
    prompt: $("prompt").value,
    negative_prompt: $("negative_prompt").value,
    steps: number("steps"),
    cfg_scale: number("cfg_scale"),
    batch_size: number("batch_size"),
    sampler: $("sampler").value,
    schedule: $("schedule").value,
    seed: number("seed"),
    fast: $("fast").checked,
  };
  if (m === "txt2img") {
    fields.width = number("width");
    fields.height = number("height");
    return fields;
  }
  if (!editor.hasImage) throw new ApiError(0, "Drop or choose an image first.", "init_image");
  fields.init_image = editor.imageDataURL();
  fields.denoising_strength = number("denoising_strength");
  if (m === "inpaint") {
    if (editor.maskIsEmpty()) throw new ApiError(0, "Paint a mask over the part to repaint first.", "init_image");
    fields.mask = editor.maskDataURL();
    fields.mask_blur = number("mask_blur");
    fields.inpaint_only_masked = $("inpaint_only_masked").checked;
  }
  if (m === "outpaint") {
    const a = outpaintAmounts();
    Object.assign(fields, { outpaint_left: a.left, outpaint_right: a.right, outpaint_up: a.up, outpaint_down: a.down });
  }
  return fields;
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
  const made = job.images.map((image) => ({
    url: image.url,
    gallery_id: image.gallery_id,
    infotext: image.infotext,
    prompt: job.parameters.prompt,
    parameters: { ...job.parameters, seed: image.seed, model: job.model },
  }));
  state.results = [...made, ...state.results];
  const open = (item) => viewer.open(state.results, state.results.indexOf(item));
  $("results").replaceChildren(...state.results.map((item) => tile(item, open)));
}

async function generate() {
  if (state.job) return;
  clearErrors();
  let fields;
  try {
    fields = body();
  } catch (err) {
    return showError(err.message, err.field);
  }
  const m = mode();
  $("generate").disabled = true;
  $("cancel").hidden = false;
  $("preview-box").hidden = true;
  try {
    const job = await api.post(`/${m}`, { ...fields, model: $("model").value || null });
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
function reuse(parameters) {
  location.hash = "#create";
  const fields = ["prompt", "negative_prompt", "steps", "cfg_scale", "seed", "batch_size", "denoising_strength"];
  for (const key of fields) setValue(key, parameters[key]);
  $("fast").checked = Boolean(parameters.fast); // absent: the image was made in the normal mode
  if (parameters.negative_prompt) $("negative-box").open = true;
  if (parameters.sampler && state.samplers.some((s) => s.name === parameters.sampler)) {
    $("sampler").value = parameters.sampler;
    fillSchedules(parameters.sampler, parameters.schedule);
  }
  const model = state.models.find((m) => m.name === parameters.model);
  if (model && model.name !== $("model").value) {
    $("model").value = model.name;
    $("model").dispatchEvent(new Event("change"));
  }
  if (parameters.width && parameters.height) {
    form.querySelector('input[name="mode"][value="txt2img"]').checked = true;
    applyMode();
    setValue("width", parameters.width);
    setValue("height", parameters.height);
  }
  updateWidth();
  updateHeight();
  updateCfg();
  updateStrength();
  toast("Parameters loaded: generate to remake the image.");
  $("prompt").focus();
}

// ---- views and keys ---------------------------------------------------------------------------
const gallery = initGallery({ openViewer: (items, i) => viewer.open(items, i), toast });
const viewer = initViewer({ onReuse: reuse, onSend: sendTo, gallery, toast });
initPromptHelper({ prompt: $("prompt"), negative: $("negative_prompt"), toast });

function route() {
  const view = location.hash === "#gallery" ? "gallery" : "create";
  $("view-create").hidden = view !== "create";
  $("view-gallery").hidden = view !== "gallery";
  $("tab-create").setAttribute("aria-selected", String(view === "create"));
  $("tab-gallery").setAttribute("aria-selected", String(view === "gallery"));
  if (view === "gallery") gallery.show();
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
