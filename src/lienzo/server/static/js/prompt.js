// The prompt helper: the formula "kind of image · subject · place · time · style or artist"
// as fields, modifier chips, and style presets saved on the server (/api/v1/presets).
import { api } from "./api.js";

const MODIFIERS = [
  "highly detailed", "trending on ArtStation", "oil painting", "watercolour", "concept art", "sharp focus",
  "studio lighting", "volumetric light", "octane render", "8k", "bokeh", "pastel colours", "flat colours",
  "thick outlines", "matte painting", "cinematic",
];

const $ = (id) => document.getElementById(id);

export function assemble({ kind, subject, place, time, style }, modifiers) {
  const head = [kind, subject].map((s) => s.trim()).filter(Boolean).join(" ");
  const parts = [head, place.trim(), time.trim(), style.trim(), ...modifiers].filter(Boolean);
  return parts.join(", ");
}

export function initPromptHelper({ prompt, negative, toast }) {
  const chips = $("chips");
  for (const text of MODIFIERS) {
    const chip = document.createElement("button");
    chip.type = "button";
    chip.className = "chip";
    chip.textContent = text;
    chip.setAttribute("aria-pressed", "false");
    chip.addEventListener("click", () => chip.setAttribute("aria-pressed", chip.getAttribute("aria-pressed") === "true" ? "false" : "true"));
    chips.append(chip);
  }

  $("h-build").addEventListener("click", () => {
    const fields = { kind: $("h-kind").value, subject: $("h-subject").value, place: $("h-place").value, time: $("h-time").value, style: $("h-style").value };
    const modifiers = [...chips.querySelectorAll('[aria-pressed="true"]')].map((c) => c.textContent);
    const text = assemble(fields, modifiers);
    if (!text) {
      toast("Fill in at least the subject, or pick a modifier.", true);
      return;
    }
    prompt.value = text;
    prompt.focus();
  });

  const list = $("preset-list");
  let presets = [];
  async function refresh(select) {
    try {
      presets = await api.get("/presets");
    } catch (err) {
      toast(`Presets: ${err.message}`, true);
      return;
    }
    list.replaceChildren(new Option("Style presets…", ""), ...presets.map((p) => new Option(p.name, p.name)));
    if (select) list.value = select;
  }

  $("preset-apply").addEventListener("click", () => {
    const preset = presets.find((p) => p.name === list.value);
    if (!preset) return toast("Pick a preset first.", true);
    // A preset is a style: its prompt is appended to the subject already written, its negative replaces.
    const current = prompt.value.trim();
    prompt.value = current && preset.prompt ? `${current}, ${preset.prompt}` : current || preset.prompt;
    if (preset.negative_prompt) {
      negative.value = preset.negative_prompt;
      $("negative-box").open = true;
    }
  });

  $("preset-save").addEventListener("click", async () => {
    const name = window.prompt("Name this style preset (it saves the current prompt and negative prompt):");
    if (!name) return;
    try {
      await api.put(`/presets/${encodeURIComponent(name)}`, { prompt: prompt.value, negative_prompt: negative.value });
      await refresh(name);
      toast(`Saved preset “${name}”.`);
    } catch (err) {
      toast(`Preset not saved: ${err.message}`, true);
    }
  });

  $("preset-delete").addEventListener("click", async () => {
    if (!list.value) return toast("Pick a preset first.", true);
    const name = list.value;
    if (!window.confirm(`Delete the preset “${name}”?`)) return;
    try {
      await api.del(`/presets/${encodeURIComponent(name)}`);
      await refresh();
      toast(`Deleted preset “${name}”.`);
    } catch (err) {
      toast(`Preset not deleted: ${err.message}`, true);
    }
  });

  refresh();
  // Read each time the helper opens: a job tells the server which embeddings its model can use.
  $("helper").addEventListener("toggle", () => $("helper").open && listEmbeddings(prompt, toast));
}

// Put ``text`` into the textarea where its cursor is (over a selection), spaced from the words beside it.
export function insertAtCursor(area, text) {
  const { selectionStart: start, selectionEnd: end, value } = area;
  const before = start > 0 && !/[\s,(]$/.test(value.slice(0, start)) ? " " : "";
  const after = end < value.length && !/^[\s,)]/.test(value.slice(end)) ? " " : "";
  area.setRangeText(`${before}${text}${after}`, start, end, "end");
  area.focus();
}

// The textual-inversion embeddings (GET /api/v1/embeddings), as chips that write their name into the prompt.
async function listEmbeddings(prompt, toast) {
  let embeddings;
  try {
    embeddings = await api.get("/embeddings");
  } catch (err) {
    toast(`Embeddings: ${err.message}`, true);
    return;
  }
  const chips = embeddings.map((e) => {
    const chip = Object.assign(document.createElement("button"), { type: "button", className: "chip", textContent: e.name });
    chip.title = e.fits === false ? "The current model cannot use it: its text encoders are another width" : `${e.short_hash}: click to add it to the prompt`;
    chip.classList.toggle("unfit", e.fits === false);
    chip.addEventListener("click", () => insertAtCursor(prompt, e.name));
    return chip;
  });
  $("embeddings").replaceChildren(...chips);
  $("embeddings-box").hidden = !chips.length;
}
