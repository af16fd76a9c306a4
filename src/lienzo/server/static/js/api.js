// The studio is a client of lienzo's public native API (/api/v1), like any other.

export class ApiError extends Error {
  constructor(status, detail, field) {
    super(detail);
    this.status = status;
    this.field = field || null;
  }
}

async function request(method, path, body, { form = false, blob = false, page = false } = {}) {
  const init = { method, headers: {} };
  if (body !== undefined) {
    if (form) {
      init.body = body;
    } else {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
  }
  let response;
  try {
    response = await fetch(`/api/v1${path}`, init);
  } catch (err) {
    throw new ApiError(0, `The server cannot be reached (${err.message}). Is lienzo serve still running?`);
  }
  const type = response.headers.get("Content-Type") || "";
  if (blob && response.ok) return response.blob();
  const data = type.includes("json") ? await response.json() : null;
  if (!response.ok) {
    const detail = data?.detail ?? `${response.status} ${response.statusText}`;
    throw new ApiError(response.status, typeof detail === "string" ? detail : JSON.stringify(detail), data?.field);
  }
  // A paged list names its next page's cursor in a header, so that the body stays the plain list.
  if (page) return { items: data, next: response.headers.get("X-Next-Cursor") };
  return data;
}

export const api = {
  get: (path) => request("GET", path),
  post: (path, body) => request("POST", path, body),
  put: (path, body) => request("PUT", path, body),
  patch: (path, body) => request("PATCH", path, body),
  del: (path) => request("DELETE", path),
  upload: (path, formData) => request("POST", path, formData, { form: true }),
  // A route that answers an image (a control map, an upscale): the PNG as a Blob.
  image: (path, body) => request("POST", path, body, { blob: true }),
  // A paged GET: ``{items, next}``, ``next`` the cursor for the page after (null on the last).
  page: (path) => request("GET", path, undefined, { page: true }),
};

// The queue's controls (the Queue tab); each answers what the server says the job or queue is now.
const jobPath = (id) => `/jobs/${encodeURIComponent(id)}`;
export const queueApi = {
  state: () => api.get("/queue"),
  pause: () => api.post("/queue/pause"),
  resume: () => api.post("/queue/resume"),
  move: (id, to) => api.post(`${jobPath(id)}/move`, { to }),
  priority: (id, priority) => api.post(`${jobPath(id)}/priority`, { priority }),
  cancel: (id) => api.post(`${jobPath(id)}/cancel`),
  // ``owner`` null: the caller's own jobs.
  cancelAll: (owner = null) => api.post("/queue/cancel", { owner }),
  history: (params) => api.page(`/jobs?${params}`),
};

// Follow a job through its Server-Sent Events until it finishes; ``onUpdate`` gets every state.
export function followJob(job, onUpdate) {
  return new Promise((resolve) => {
    const finished = (j) => ["done", "failed", "cancelled", "interrupted"].includes(j.status);
    if (finished(job)) {
      onUpdate(job);
      resolve(job);
      return;
    }
    const source = new EventSource(`/api/v1/jobs/${job.id}/events`);
    let last = job;
    source.addEventListener("job", (event) => {
      last = JSON.parse(event.data);
      onUpdate(last);
      if (finished(last)) {
        source.close();
        resolve(last);
      }
    });
    source.onerror = async () => {
      // The stream ends when the job does; if it broke early, poll until the job finishes.
      source.close();
      while (!finished(last)) {
        try {
          last = await api.get(`/jobs/${job.id}`);
        } catch (err) {
          last = { ...last, status: "failed", error: err.message };
        }
        onUpdate(last);
        if (!finished(last)) await new Promise((r) => setTimeout(r, 1000));
      }
      resolve(last);
    };
  });
}

export async function blobToDataURL(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

// A drop zone: a file dragged onto ``element`` goes to ``onFile``, the zone marked while it hovers.
export function dropTarget(element, onFile) {
  element.addEventListener("dragover", (e) => {
    e.preventDefault();
    element.classList.add("over");
  });
  element.addEventListener("dragleave", () => element.classList.remove("over"));
  element.addEventListener("drop", (e) => {
    e.preventDefault();
    element.classList.remove("over");
    onFile(e.dataTransfer.files[0]);
  });
}
