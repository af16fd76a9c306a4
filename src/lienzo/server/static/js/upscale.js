// The Upscale tab: one picture enlarged by an upscaler (POST /api/v1/upscale, A1111's extras), shown, then
// downloaded or saved to the gallery (POST /api/v1/gallery/import keeps its text: its parameters and the step).
import { api, blobToDataURL, dropTarget } from "./api.js";

const $ = (id) => document.getElementById(id);

export function initUpscale({ toast }) {
  const state = { image: null, result: null, url: null, name: "image" };
  const error = (message) => ($("up-error").textContent = message);

  async function load() {
    try {
      // Latent modes enlarge a generation's latents (the hires fix): they cannot upscale a picture.
      const upscalers = (await api.get("/upscalers")).filter((u) => !u.latent && u.name !== "None");
      $("up-upscaler").replaceChildren(...upscalers.map((u) => new Option(u.scale ? `${u.name} (${u.scale}×)` : u.name, u.name)));
      $("up-upscaler").value = "Lanczos";
    } catch (err) {
      error(err.message);
    }
  }

  async function useFile(file) {
    if (!file) return;
    if (!file.type.startsWith("image/")) return error(`${file.name} is not an image`);
    error("");
    state.image = await blobToDataURL(file);
    state.name = file.name.replace(/\.[^.]*$/, "") || "image";
    $("up-source").src = state.image;
    $("up-source").hidden = false;
    $("up-hint").hidden = true;
  }

  async function run() {
    if (!state.image) return error("Drop or choose an image first.");
    error("");
    $("up-run").disabled = true;
    $("up-status").textContent = "Upscaling…";
    try {
      const blob = await api.image("/upscale", { image: state.image, upscaler: $("up-upscaler").value, scale: Number($("up-scale").value) });
      if (state.url) URL.revokeObjectURL(state.url);
      state.result = blob;
      state.url = URL.createObjectURL(blob);
      $("up-result").src = state.url;
      await $("up-result").decode();
      $("up-size").textContent = `${$("up-result").naturalWidth}×${$("up-result").naturalHeight}`;
      $("up-download").href = state.url;
      $("up-download").download = `${state.name}-${$("up-upscaler").value}-x${$("up-scale").value}.png`;
      $("up-result-box").hidden = false;
      $("up-status").textContent = "";
    } catch (err) {
      $("up-status").textContent = "";
      error(err.message);
    } finally {
      $("up-run").disabled = false;
    }
  }

  async function save() {
    const form = new FormData();
    form.append("files", state.result, $("up-download").download);
    try {
      const answer = await api.upload("/gallery/import", form);
      if (answer.errors.length) throw new Error(answer.errors[0].detail);
      toast("Saved to the gallery.");
    } catch (err) {
      error(`Not saved: ${err.message}`);
    }
  }

  const drop = $("up-drop");
  $("up-file").addEventListener("change", (e) => useFile(e.target.files[0]));
  $("up-source").addEventListener("click", () => $("up-file").click()); // another picture
  dropTarget(drop, useFile);
  document.addEventListener("paste", (e) => {
    const file = [...(e.clipboardData?.files ?? [])].find((f) => f.type.startsWith("image/"));
    if (file && !$("view-upscale").hidden) useFile(file);
  });
  $("up-scale").addEventListener("input", () => (document.querySelector('output[for="up-scale"]').textContent = $("up-scale").value));
  $("up-run").addEventListener("click", run);
  $("up-save").addEventListener("click", save);
  load();
}
