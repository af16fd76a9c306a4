// The enlarged view of one image, from the results or the gallery: its parameters and what can
// be done with it (reuse, send to img2img / inpaint, favourite, download, delete).
import { api } from "./api.js";

const $ = (id) => document.getElementById(id);

const HIDDEN = new Set(["prompt", "batch_count", "loras", "safety", "watermark"]);
const SOURCES = { cli: "the CLI", native: "the studio or lienzo's API", a1111: "the A1111 API", openai: "the OpenAI API", import: "imported" };

// A finished job's images as the viewer's items, each with the parameters that remake it.
export function imageItems(job) {
  return job.images.map((image) => ({
    url: image.url,
    gallery_id: image.gallery_id,
    infotext: image.infotext,
    prompt: job.parameters.prompt,
    parameters: { ...job.parameters, seed: image.seed, model: job.model },
  }));
}

// ``fields``: the request's field table (GET /api/v1/fields), for the parameters' labels.
export function initViewer({ fields, onReuse, onSend, gallery, toast }) {
  // Labels for the parameter table, in the order shown: the model, the request's fields in the
  // table's order, where the image came from; other keys follow as they come.
  const labels = { model: "Model", ...Object.fromEntries(fields.map((f) => [f.name, f.label])), created: "Made", source: "Made by" };
  const flags = fields.filter((f) => f.type === "boolean").map((f) => f.name);
  const dialog = $("viewer");
  const error = $("viewer-error");
  let list = [];
  let index = 0;
  let current = null; // {item, detail}

  function row(label, value) {
    const tr = document.createElement("tr");
    const th = document.createElement("th");
    th.textContent = label;
    const td = document.createElement("td");
    td.textContent = value;
    tr.append(th, td);
    return tr;
  }

  function paint(item, detail) {
    const params = { ...(detail?.parameters ?? item.parameters ?? {}) };
    for (const flag of flags) if (!params[flag]) delete params[flag]; // off is the normal mode: no row for it
    if (detail) {
      params.model = detail.model ?? params.model;
      params.created = new Date(detail.created * 1000).toLocaleString();
      params.source = SOURCES[detail.source] ?? detail.source;
    }
    $("viewer-img").src = item.url;
    $("viewer-img").alt = params.prompt || "generated image";
    $("viewer-prompt").textContent = params.prompt || detail?.prompt || "(no prompt)";
    const rows = [];
    const keys = [...Object.keys(labels), ...Object.keys(params).filter((k) => !(k in labels))];
    for (const key of keys) {
      const value = params[key];
      if (HIDDEN.has(key) || value === null || value === undefined || value === "" || (Array.isArray(value) && !value.length)) continue;
      rows.push(row(labels[key] ?? key.replaceAll("_", " "), typeof value === "object" ? JSON.stringify(value) : String(value)));
    }
    if (!detail && item.infotext) rows.push(row("Infotext", item.infotext));
    $("viewer-params").replaceChildren(...rows);
    const favourite = Boolean(detail?.favourite);
    $("act-fav").textContent = favourite ? "★ Favourite" : "☆ Favourite";
    $("act-fav").setAttribute("aria-pressed", String(favourite));
    $("act-fav").hidden = $("act-delete").hidden = !detail;
    $("act-download").href = detail ? `${detail.url}?download=true` : item.url;
    $("act-download").setAttribute("download", (item.url.split("/").pop() || "image") + ".png");
    $("viewer-prev").disabled = index <= 0;
    $("viewer-next").disabled = index >= list.length - 1;
  }

  async function show(i) {
    index = i;
    const item = list[i];
    error.textContent = "";
    current = { item, detail: null };
    paint(item, null);
    const id = item.gallery_id ?? item.id;
    if (id === undefined || id === null) return;
    try {
      const detail = await api.get(`/gallery/${id}`);
      if (current.item === item) {
        current.detail = detail;
        paint(item, detail);
      }
    } catch (err) {
      error.textContent = err.message;
    }
  }

  function open(items, i) {
    list = items;
    show(Math.max(0, i));
    if (!dialog.open) dialog.showModal();
  }

  const parameters = () => ({ ...(current.item.parameters ?? {}), ...(current.detail?.parameters ?? {}) });
  const imageUrl = () => current.detail?.url ?? current.item.url;

  $("viewer-close").addEventListener("click", () => dialog.close());
  $("viewer-prev").addEventListener("click", () => index > 0 && show(index - 1));
  $("viewer-next").addEventListener("click", () => index < list.length - 1 && show(index + 1));
  dialog.addEventListener("keydown", (e) => {
    if (e.key === "ArrowLeft" && index > 0) show(index - 1);
    if (e.key === "ArrowRight" && index < list.length - 1) show(index + 1);
  });
  dialog.addEventListener("click", (e) => {
    if (e.target === dialog) dialog.close(); // a click on the backdrop
  });
  $("act-reuse").addEventListener("click", () => {
    onReuse(parameters());
    dialog.close();
  });
  $("act-img2img").addEventListener("click", () => {
    onSend(imageUrl(), "img2img", parameters());
    dialog.close();
  });
  $("act-inpaint").addEventListener("click", () => {
    onSend(imageUrl(), "inpaint", parameters());
    dialog.close();
  });
  $("act-fav").addEventListener("click", async () => {
    const detail = current.detail;
    try {
      const updated = await api.patch(`/gallery/${detail.id}`, { favourite: !detail.favourite });
      current.detail = { ...detail, ...updated };
      paint(current.item, current.detail);
      gallery.update(current.detail);
    } catch (err) {
      error.textContent = err.message;
    }
  });
  $("act-delete").addEventListener("click", async () => {
    const detail = current.detail;
    if (!window.confirm("Delete this image? The file is removed from disk.")) return;
    try {
      await api.del(`/gallery/${detail.id}`);
      gallery.remove(detail.id);
      list.splice(index, 1);
      toast("Deleted.");
      if (list.length) show(Math.min(index, list.length - 1));
      else dialog.close();
    } catch (err) {
      error.textContent = err.message;
    }
  });

  return { open };
}
