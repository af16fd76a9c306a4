// The Queue tab: what runs and waits on the server, in the order it will run, with the scheduler's controls
// (pause, to the front or back, priority, cancel), the workers, and the history of finished jobs.
// It polls GET /queue while the tab is shown and the page visible: one request a beat, however many jobs
// wait, where an event stream per job would hold a connection open for every waiting job.
import { queueApi } from "./api.js";
import { imageItems } from "./viewer.js";

const $ = (id) => document.getElementById(id);
const POLL = 1500; // ms between two reads of the queue
const PAGE = 20; // history jobs a page
const EXCERPT = 90; // characters of a prompt shown in a row; the whole prompt is its tooltip
const UNFINISHED = new Set(["queued", "running"]);
const PRIORITY = { min: -100, max: 100 };

function element(tag, props = {}, ...children) {
  const el = Object.assign(document.createElement(tag), props);
  el.append(...children);
  return el;
}

// A button that says what it does to which job to a screen reader: "To front" alone names no job.
function button(text, className, label) {
  const b = element("button", { type: "button", className: `secondary ${className}`, textContent: text });
  b.setAttribute("aria-label", label);
  return b;
}

const excerpt = (text) => (!text ? "(no prompt)" : text.length > EXCERPT ? `${text.slice(0, EXCERPT - 1)}…` : text);
const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;

function stepText(job) {
  const p = job.progress;
  if (!p.total_steps) return "Starting…"; // loading the model, or before the first step
  return `Step ${p.step}/${p.total_steps}${p.batch_count > 1 ? `, batch ${p.batch + 1}/${p.batch_count}` : ""}`;
}

function metaText(job) {
  const parts = [job.owner ?? "anonymous", job.model ?? "default model", `priority ${job.priority ?? 0}`];
  if (job.worker) parts.push(`on ${job.worker}`);
  if (job.attempts > 1) parts.push(`attempt ${job.attempts}`);
  return parts.join(" · ");
}

export function initQueue({ openViewer, toast }) {
  const list = $("q-jobs");
  const error = $("q-error");
  const rows = new Map(); // job id -> its row's parts, kept across polls so that focus and typing survive
  let active = false;
  let timer = null;
  let asked = 0; // reads of the queue sent, and the newest one shown: a late answer never overwrites a newer one
  let shown = 0;
  let unread = false; // the last read failed: its error shows until a read succeeds

  function fail(err) {
    error.textContent = err.field ? `${err.field}: ${err.message}` : err.message;
  }

  // Run one control, then read the queue again to show its effect.
  async function act(call) {
    try {
      const answer = await call();
      error.textContent = "";
      return answer;
    } catch (err) {
      fail(err);
      return null;
    } finally {
      await refresh();
    }
  }

  function makeRow(job) {
    const name = excerpt(job.parameters?.prompt);
    const prompt = element("span", { className: "q-prompt", textContent: name, title: job.parameters?.prompt ?? "" });
    const place = element("span", { className: "q-place" });
    const meta = element("span", { className: "q-meta muted" });
    const fill = element("div", { className: "q-fill" });
    const step = element("span", { className: "q-step muted" });
    const progress = element("div", { className: "q-progress" }, element("div", { className: "bar" }, fill), step);
    const front = button("To front", "q-front", `Move to the front: ${name}`);
    const back = button("To back", "q-back", `Move to the back: ${name}`);
    const priority = element("input", { type: "number", className: "q-priority", min: PRIORITY.min, max: PRIORITY.max, step: 1 });
    priority.setAttribute("aria-label", `Priority of ${name} (${PRIORITY.min} to ${PRIORITY.max}, higher runs sooner)`);
    const cancel = button("Cancel", "q-cancel danger", `Cancel: ${name}`);
    const controls = element("div", { className: "q-controls row" }, front, back, element("label", { className: "q-priority-box" }, "Priority ", priority), cancel);
    const row = element("li", { className: "q-job" }, element("div", { className: "q-head row" }, place, prompt), meta, progress, controls);
    row.dataset.id = job.id;

    front.addEventListener("click", () => act(() => queueApi.move(job.id, "front")));
    back.addEventListener("click", () => act(() => queueApi.move(job.id, "back")));
    cancel.addEventListener("click", () => act(() => queueApi.cancel(job.id)));
    priority.addEventListener("change", () => {
      const value = Number(priority.value);
      if (priority.value === "" || !Number.isInteger(value) || value < PRIORITY.min || value > PRIORITY.max) {
        fail({ field: "priority", message: `a whole number from ${PRIORITY.min} to ${PRIORITY.max}` });
        return;
      }
      act(() => queueApi.priority(job.id, value));
    });
    return { row, place, meta, fill, step, progress, front, back, priority };
  }

  function paintRow(parts, job, index) {
    const running = job.status === "running";
    parts.row.classList.toggle("running", running);
    parts.place.textContent = running ? "Running" : `#${index}`;
    parts.meta.textContent = metaText(job);
    parts.progress.hidden = !running;
    parts.fill.style.width = `${Math.round(job.progress.fraction * 100)}%`;
    parts.step.textContent = stepText(job);
    // A running job has left the order: only cancel applies to it.
    parts.front.hidden = parts.back.hidden = parts.priority.parentElement.hidden = running;
    if (document.activeElement !== parts.priority) parts.priority.value = job.priority ?? 0;
  }

  function paintJobs(jobs) {
    const ids = new Set(jobs.map((j) => j.id));
    const left = [...rows.keys()].filter((id) => !ids.has(id));
    for (const id of left) {
      rows.get(id).row.remove();
      rows.delete(id);
    }
    let waiting = 0;
    for (const job of jobs) {
      if (!rows.has(job.id)) rows.set(job.id, makeRow(job));
      paintRow(rows.get(job.id), job, job.status === "running" ? 0 : ++waiting);
    }
    // Reorder only when the order changed: moving a row takes the focus off its buttons.
    const order = jobs.map((j) => rows.get(j.id).row);
    if (order.some((row, i) => list.children[i] !== row)) {
      const focused = document.activeElement;
      list.append(...order);
      if (focused && list.contains(focused)) focused.focus();
    }
    $("q-empty").hidden = jobs.length > 0;
    return left.length > 0;
  }

  function paintWorkers(workers) {
    $("q-workers").replaceChildren(
      ...workers.map((w) => {
        const state = element("span", { className: `q-state ${w.busy ? "busy" : "idle"}`, textContent: w.busy ? "busy" : "idle" });
        const models = element("span", { className: "muted", textContent: w.models.length ? w.models.join(", ") : "no model loaded" });
        // A worker named after its device ("cuda:0") need not say it twice.
        const device = w.device === w.name ? "" : w.device;
        const item = element("li", { className: "q-worker" }, element("strong", { textContent: w.name }), device, state, models);
        item.dataset.name = w.name;
        return item;
      }),
    );
  }

  function paint(state) {
    const pause = $("q-pause");
    pause.textContent = state.paused ? "Resume" : "Pause";
    pause.setAttribute("aria-label", state.paused ? "Resume the queue" : "Pause the queue: no new job starts");
    pause.dataset.paused = String(state.paused);
    const running = state.running ? "1 running" : "nothing running";
    $("q-summary").textContent = `${state.paused ? "Paused · " : ""}${running} · ${state.waiting} waiting (at most ${state.max_queue})`;
    paintWorkers(state.workers ?? []);
    // A job that left the queue has finished: it belongs in the history now.
    if (paintJobs(state.jobs)) past.reload();
  }

  async function refresh() {
    const mine = ++asked;
    try {
      const state = await queueApi.state();
      if (mine < shown) return;
      shown = mine;
      paint(state);
      if (unread) error.textContent = "";
      unread = false;
    } catch (err) {
      fail(err);
      unread = true;
    }
  }

  // One read at a time, the next POLL ms after the last answered; none while hidden.
  function schedule() {
    clearTimeout(timer);
    if (active && !document.hidden) timer = setTimeout(tick, POLL);
  }
  async function tick() {
    await refresh();
    schedule();
  }
  document.addEventListener("visibilitychange", () => (active && !document.hidden ? tick() : clearTimeout(timer)));

  const past = initHistory({ openViewer, fail });

  $("q-pause").addEventListener("click", () => act(() => ($("q-pause").dataset.paused === "true" ? queueApi.resume() : queueApi.pause())));
  $("q-cancel-mine").addEventListener("click", async () => {
    if (!window.confirm("Cancel all your waiting and running jobs? Finished images are kept.")) return;
    const answer = await act(() => queueApi.cancelAll());
    if (answer) toast(`Cancelled ${plural(answer.cancelled, "job")}.`);
  });

  return {
    show() {
      active = true;
      tick();
      past.reload();
    },
    hide() {
      active = false;
      clearTimeout(timer);
    },
  };
}

// Finished jobs, newest first, a page at a time ("More" follows X-Next-Cursor), filtered by their state.
function initHistory({ openViewer, fail }) {
  const list = $("q-history");
  const more = $("q-more");
  let cursor = null;
  let generation = 0; // bumps on every reload, so that a late page of an old one is dropped

  function thumbnail(job) {
    const image = job.images[0];
    const name = excerpt(job.parameters?.prompt);
    if (!image) return element("span", { className: "q-thumb empty", textContent: "no image" });
    // The gallery's small WebP where the image is indexed; the PNG itself otherwise.
    const src = image.gallery_id == null ? image.url : `/api/v1/gallery/${image.gallery_id}/thumb?size=128`;
    const open = element("button", { type: "button", className: "q-thumb" }, element("img", { src, alt: name, loading: "lazy" }));
    open.setAttribute("aria-label", `Open the image: ${name}`);
    open.addEventListener("click", () => openViewer(imageItems(job), 0));
    return open;
  }

  function pastRow(job) {
    const when = job.finished ? new Date(job.finished * 1000).toLocaleString() : "";
    const text = element(
      "div",
      { className: "q-past-text" },
      element("span", { className: "q-prompt", textContent: excerpt(job.parameters?.prompt), title: job.parameters?.prompt ?? "" }),
      element("span", { className: "q-meta muted", textContent: [job.owner ?? "anonymous", job.model ?? "default model", plural(job.images.length, "image"), when].join(" · ") }),
    );
    if (job.error) text.append(element("span", { className: "error", textContent: job.error }));
    const row = element("li", { className: "q-past" }, thumbnail(job), text, element("span", { className: `q-status ${job.status}`, textContent: job.status }));
    row.dataset.id = job.id;
    return row;
  }

  async function load(mine) {
    const params = new URLSearchParams({ limit: PAGE });
    const state = $("q-state-filter").value;
    if (state) params.set("state", state);
    if (cursor) params.set("cursor", cursor);
    more.disabled = true;
    try {
      const page = await queueApi.history(params);
      if (mine !== generation) return;
      // "All" asks for every state: the running and waiting jobs are the list above, not history.
      list.append(...page.items.filter((job) => !UNFINISHED.has(job.status)).map(pastRow));
      cursor = page.next;
      more.hidden = !cursor;
      $("q-history-empty").hidden = list.children.length > 0 || Boolean(cursor);
    } catch (err) {
      if (mine === generation) fail(err);
    } finally {
      more.disabled = false;
    }
  }

  function reload() {
    generation += 1;
    cursor = null;
    list.replaceChildren();
    load(generation);
  }

  more.addEventListener("click", () => load(generation));
  $("q-state-filter").addEventListener("change", reload);
  return { reload };
}
