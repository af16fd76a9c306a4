// The ControlNet panel: units as sd-webui-controlnet has them (a picture, a preprocessor and its sliders, a
// model, a weight, a start and end, a control mode, a resize mode, pixel perfect), each with a live preview
// of its control map (POST /api/v1/controlnet/detect), sent with the job as ``controlnets``.
// The choices and limits come from the API: GET /controlnet/preprocessors, /controlnet/models, /controlnet/unit.
import { api, ApiError, blobToDataURL, dropTarget } from "./api.js";

const $ = (id) => document.getElementById(id);
const PREVIEW_DELAY = 350; // ms after the last change: a slider dragged asks for one map, not fifty

function element(tag, props = {}, ...children) {
  const el = Object.assign(document.createElement(tag), props);
  el.append(...children);
  return el;
}

// A labelled control: ``<label>Text <control><output></label>``; a range shows its value.
function labelled(text, control, help) {
  const label = element("label", { className: "unit-field", title: help ?? "" }, `${text} `);
  label.append(control);
  if (control.type === "range") {
    const output = element("output", { textContent: control.value });
    control.addEventListener("input", () => (output.textContent = control.value));
    label.append(output);
  }
  return label;
}

function range({ minimum, maximum }, step, value) {
  return element("input", { type: "range", min: minimum, max: maximum, step, value });
}

// ``source()``: the image mode's input picture as a data URL (a unit without its own picture reads it), or null.
export async function initControlNet({ source, mode, toast }) {
  const [modules, models, schema] = await Promise.all([
    api.get("/controlnet/preprocessors"),
    api.get("/controlnet/models"),
    api.get("/controlnet/unit"),
  ]);
  const spec = schema.properties;
  const units = [];

  function renumber() {
    units.forEach((unit, i) => {
      unit.box.dataset.field = `controlnets.${i}`;
      unit.title.textContent = `Unit ${i + 1}`;
    });
    $("cn-count").textContent = units.length ? `(${units.length})` : "";
  }

  function addUnit() {
    const unit = { image: null, preview: 0, timer: null, url: null };
    const moduleSelect = element("select", { className: "cn-module" });
    moduleSelect.append(...modules.map((p) => new Option(p.alias === p.name ? p.name : `${p.alias} (${p.name})`, p.name)));
    moduleSelect.value = "none";
    const modelSelect = element("select", { className: "cn-model" });
    if (models.length) modelSelect.append(...models.map((m) => new Option(m.title, m.name)));
    else modelSelect.append(Object.assign(new Option("No ControlNet models: put them in the models folder's ControlNet folder", ""), { disabled: true }));
    const weight = range(spec.weight, 0.05, spec.weight.default);
    weight.className = "cn-weight";
    const start = range(spec.guidance_start, 0.01, spec.guidance_start.default);
    start.className = "cn-start";
    const end = range(spec.guidance_end, 0.01, spec.guidance_end.default);
    end.className = "cn-end";
    const controlMode = element("select", { className: "cn-control-mode" });
    controlMode.append(...spec.control_mode.enum.map((v) => new Option(v, v)));
    controlMode.value = spec.control_mode.default;
    const resizeMode = element("select", { className: "cn-resize-mode" });
    resizeMode.append(...spec.resize_mode.enum.map((v) => new Option(v, v)));
    resizeMode.value = spec.resize_mode.default;
    const pixelPerfect = element("input", { type: "checkbox", className: "cn-pixel-perfect", checked: spec.pixel_perfect.default });
    const sliders = element("div", { className: "cn-sliders" });

    const file = element("input", { type: "file", accept: "image/*", hidden: true, className: "cn-file" });
    const picture = element("img", { className: "cn-image", alt: "The unit's picture", title: "Click to choose another picture", hidden: true });
    const hint = element("p", { className: "drop-hint" }, "Drop a picture here or ");
    hint.append(element("label", { className: "link" }, "choose a file", file));
    const drop = element("div", { className: "drop cn-drop", tabIndex: 0 }, hint, picture);
    const map = element("img", { className: "cn-map", alt: "Control map preview", hidden: true });
    const mapNote = element("p", { className: "muted cn-map-note" });
    const remove = element("button", { type: "button", className: "icon cn-remove", title: "Remove this unit", textContent: "✕" });
    remove.setAttribute("aria-label", "Remove this unit");
    unit.title = element("strong");
    const error = element("p", { className: "error" });
    error.setAttribute("role", "alert");
    unit.box = element(
      "div",
      { className: "unit" },
      element("div", { className: "row" }, unit.title, element("span", { className: "grow" }), remove),
      element(
        "div",
        { className: "unit-grid" },
        element("div", { className: "unit-pictures" }, drop, element("figure", { className: "cn-map-box" }, map, mapNote)),
        element(
          "div",
          { className: "unit-params" },
          labelled("Preprocessor", moduleSelect, spec.module.description),
          sliders,
          labelled("Model", modelSelect, spec.model.description),
          labelled("Weight", weight, spec.weight.description),
          labelled("Start", start, spec.guidance_start.description),
          labelled("End", end, spec.guidance_end.description),
          labelled("Control mode", controlMode),
          labelled("Resize mode", resizeMode),
          Object.assign(labelled("Pixel perfect", pixelPerfect, spec.pixel_perfect.description), { className: "unit-field check" }),
        ),
      ),
      error,
    );

    const chosen = () => modules.find((p) => p.name === moduleSelect.value);

    // The module's sliders: the resolution (processor_res) first when it has one, then threshold_a and threshold_b.
    function showSliders() {
      const p = chosen();
      const names = p.resolution ? ["processor_res", "threshold_a", "threshold_b"] : ["threshold_a", "threshold_b"];
      unit.sliders = p.sliders.map((s, i) => {
        const control = element("input", { type: "range", min: s.min, max: s.max, step: s.step, value: s.value, className: `cn-${names[i]}` });
        control.dataset.name = names[i];
        control.addEventListener("input", schedulePreview);
        return labelled(s.name, control);
      });
      sliders.replaceChildren(...unit.sliders);
    }

    // The map as the ControlNet will read it, made again a moment after the picture, module or sliders change.
    function schedulePreview() {
      clearTimeout(unit.timer);
      unit.timer = setTimeout(preview, PREVIEW_DELAY);
    }

    async function preview() {
      const p = chosen();
      const image = unit.image ?? source();
      const ticket = ++unit.preview; // an older answer arriving late is not shown over a newer one
      map.hidden = true;
      if (!image) return (mapNote.textContent = "The map shows here once the unit has a picture.");
      if (p.takes_mask) return (mapNote.textContent = `${p.alias} reads the inpaint mask: its map is made with the job.`);
      if (p.image_prompt) return (mapNote.textContent = `${p.alias}: the IP-Adapter reads the picture itself (an image prompt), no map.`);
      mapNote.textContent = "Making the map…";
      const body = { image, module: p.name };
      for (const slider of sliders.querySelectorAll("input")) body[slider.dataset.name] = Number(slider.value);
      try {
        const blob = await api.image("/controlnet/detect", body);
        if (ticket !== unit.preview) return;
        if (unit.url) URL.revokeObjectURL(unit.url);
        unit.url = URL.createObjectURL(blob);
        map.src = unit.url;
        map.hidden = false;
        mapNote.textContent = `${p.alias} map`;
      } catch (err) {
        if (ticket === unit.preview) mapNote.textContent = err.message;
      }
    }

    async function usePicture(blob) {
      if (!blob?.type.startsWith("image/")) return toast("That is not an image.", true);
      unit.image = await blobToDataURL(blob);
      picture.src = unit.image;
      picture.hidden = false;
      hint.hidden = true;
      error.textContent = "";
      schedulePreview();
    }

    file.addEventListener("change", () => usePicture(file.files[0]));
    picture.addEventListener("click", () => file.click()); // another picture
    dropTarget(drop, usePicture);
    moduleSelect.addEventListener("change", () => {
      showSliders();
      schedulePreview();
    });
    remove.addEventListener("click", () => {
      clearTimeout(unit.timer);
      if (unit.url) URL.revokeObjectURL(unit.url);
      units.splice(units.indexOf(unit), 1);
      unit.box.remove();
      renumber();
    });

    // The unit as the submit bodies take it; ``index`` names its fields in errors.
    unit.request = (index) => {
      if (!unit.image && mode() === "txt2img") {
        throw new ApiError(0, `Unit ${index + 1} has no picture: drop or choose one.`, `controlnets.${index}.image`);
      }
      if (!modelSelect.value) throw new ApiError(0, "No ControlNet model to use: put one in the models folder's ControlNet folder.", `controlnets.${index}.model`);
      const body = {
        image: unit.image,
        module: moduleSelect.value,
        model: modelSelect.value,
        weight: Number(weight.value),
        guidance_start: Number(start.value),
        guidance_end: Number(end.value),
        control_mode: controlMode.value,
        resize_mode: resizeMode.value,
        pixel_perfect: pixelPerfect.checked,
      };
      for (const slider of sliders.querySelectorAll("input")) body[slider.dataset.name] = Number(slider.value);
      return body;
    };
    unit.refresh = schedulePreview;

    showSliders();
    units.push(unit);
    $("cn-units").append(unit.box);
    renumber();
    preview();
  }

  $("cn-add").addEventListener("click", addUnit);
  renumber();
  return {
    // Every unit, for the job; an ApiError naming the unit's field when one is not ready.
    units: () => units.map((unit, i) => unit.request(i)),
    // The input picture changed: units without their own picture show its map.
    sourceChanged: () => units.filter((unit) => !unit.image).forEach((unit) => unit.refresh()),
  };
}
