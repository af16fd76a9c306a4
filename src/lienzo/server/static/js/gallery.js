// The gallery: every image lienzo made (UI, CLI or any API) or imported, newest first, with
// full-text search over prompts, filters, infinite scroll and PNG import by drag and drop.
import { api } from "./api.js";

const $ = (id) => document.getElementById(id);
const PAGE = 40;

export function tile(item, onOpen) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "tile";
  button.dataset.id = item.id;
  button.title = item.prompt || "(no prompt)";
  const img = document.createElement("img");
  img.loading = "lazy";
  img.src = item.thumb_url || item.url;
  img.alt = item.prompt || "image without a prompt";
  const caption = document.createElement("span");
  caption.className = "caption";
  caption.textContent = item.prompt || "(no prompt)";
  button.append(img, caption);
  if (item.favourite) {
    const star = document.createElement("span");
    star.className = "fav";
    star.textContent = "★";
    star.setAttribute("aria-label", "favourite");
    button.append(star);
  }
  if (item.source === "import") {
    const badge = document.createElement("span");
    badge.className = "badge";
    badge.textContent = "imported";
    button.append(badge);
  }
  button.addEventListener("click", () => onOpen(item));
  return button;
}

export function initGallery({ openViewer, toast }) {
  const grid = $("gallery-grid");
  const end = $("gallery-end");
  const error = $("gallery-error");
  let items = [];
  let cursor = null;
  let done = false;
  let loading = false;
  let generation = 0; // bumps on every new query, so a late page of an old query is dropped

  function query() {
    const params = new URLSearchParams({ limit: PAGE });
    const q = $("search").value.trim();
    if (q) params.set("q", q);
    if ($("filter-model").value) params.set("model", $("filter-model").value);
    if ($("filter-since").value) params.set("since", Date.parse(`${$("filter-since").value}T00:00:00`) / 1000);
    if ($("filter-until").value) params.set("until", Date.parse(`${$("filter-until").value}T23:59:59`) / 1000);
    if ($("filter-fav").checked) params.set("favourite", "true");
    if (cursor) params.set("cursor", cursor);
    return params;
  }

  const open = (item) => openViewer(items, items.indexOf(item), { fromGallery: true });

  async function loadMore() {
    if (loading || done) return;
    loading = true;
    const mine = generation;
    end.textContent = "Loading…";
    try {
      const page = await api.get(`/gallery?${query()}`);
      if (mine !== generation) return;
      error.textContent = "";
      items.push(...page.items);
      grid.append(...page.items.map((item) => tile(item, open)));
      cursor = page.next;
      done = !page.next;
      end.textContent = items.length ? (done ? `${items.length} image${items.length === 1 ? "" : "s"}` : "") : "Nothing here yet. Make something, or drop PNGs to import them.";
    } catch (err) {
      error.textContent = err.field ? `${err.field}: ${err.message}` : err.message;
      end.textContent = "";
      done = true;
    } finally {
      if (mine === generation) loading = false;
    }
    // A tall screen may show the sentinel without scrolling: keep filling.
    if (!done && end.getBoundingClientRect().top < window.innerHeight + 400) loadMore();
  }

  function reset() {
    generation += 1;
    items = [];
    cursor = null;
    done = false;
    loading = false;
    grid.replaceChildren();
    loadMore();
  }

  async function refreshModels() {
    try {
      const names = await api.get("/gallery/models");
      const select = $("filter-model");
      const current = select.value;
      select.replaceChildren(new Option("All models", ""), ...names.map((n) => new Option(n, n)));
      select.value = names.includes(current) ? current : "";
    } catch (err) {
      error.textContent = err.message;
    }
  }

  new IntersectionObserver((entries) => {
    if (entries.some((e) => e.isIntersecting)) loadMore();
  }, { rootMargin: "400px" }).observe(end);

  let timer;
  $("search").addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(reset, 250);
  });
  for (const id of ["filter-model", "filter-since", "filter-until", "filter-fav"]) $(id).addEventListener("change", reset);

  async function importFiles(files) {
    const images = [...files].filter((f) => f.type.startsWith("image/") || /\.png$/i.test(f.name));
    if (!images.length) return toast("Drop PNG images to import them.", true);
    const form = new FormData();
    for (const file of images) form.append("files", file, file.name);
    try {
      const result = await api.upload("/gallery/import", form);
      const bad = result.errors.map((e) => `${e.file}: ${e.detail}`).join("; ");
      toast(`Imported ${result.imported.length} image${result.imported.length === 1 ? "" : "s"}.${bad ? ` Not imported: ${bad}` : ""}`, Boolean(bad));
      refreshModels();
      reset();
    } catch (err) {
      toast(`Import failed: ${err.message}`, true);
    }
  }
  $("import-file").addEventListener("change", (e) => {
    importFiles(e.target.files);
    e.target.value = "";
  });
  const view = $("view-gallery");
  view.addEventListener("dragover", (e) => {
    e.preventDefault();
    view.classList.add("over");
  });
  view.addEventListener("dragleave", (e) => {
    if (e.target === view) view.classList.remove("over");
  });
  view.addEventListener("drop", (e) => {
    e.preventDefault();
    view.classList.remove("over");
    importFiles(e.dataTransfer.files);
  });

  return {
    show() {
      refreshModels();
      reset();
    },
    remove(id) {
      items = items.filter((i) => i.id !== id);
      grid.querySelector(`[data-id="${id}"]`)?.remove();
    },
    update(item) {
      const index = items.findIndex((i) => i.id === item.id);
      if (index < 0) return;
      items[index] = { ...items[index], ...item };
      grid.querySelector(`[data-id="${item.id}"]`)?.replaceWith(tile(items[index], open));
    },
    focusSearch() {
      $("search").focus();
    },
  };
}
