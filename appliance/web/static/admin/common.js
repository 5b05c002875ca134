// Shared helpers of the admin pages: API calls with the CSRF token, messages, small DOM builder.
const csrf = document.querySelector('meta[name="csrf-token"]')?.content ?? "";

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/** fetch() a JSON admin API; throws ApiError with the server's message; 401 -> login page. */
export async function api(method, url, body) {
  const init = { method, headers: { "X-CSRF-Token": csrf }, credentials: "same-origin" };
  if (body instanceof FormData) {
    init.body = body;
  } else if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(url, init);
  const data = await response.json().catch(() => ({}));
  if (response.status === 401 && !url.endsWith("/login")) {
    window.location.assign(`/admin/login?next=${encodeURIComponent(window.location.pathname)}`);
  }
  if (!response.ok) {
    const error = data.error ?? {};
    throw new ApiError(response.status, error.code ?? "error", error.message ?? response.statusText);
  }
  return data;
}

/** POST a FormData showing upload progress in the <progress> `bar` (fetch has none);
 * resolves to {ok, status, reply} (reply: the JSON answer, {} if none). */
export function upload(url, data, bar) {
  return new Promise((resolve) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", url);
    xhr.setRequestHeader("X-CSRF-Token", csrf);
    xhr.upload.addEventListener("progress", (e) => {
      if (e.lengthComputable) bar.value = (100 * e.loaded) / e.total;
    });
    xhr.addEventListener("loadend", () => {
      bar.hidden = true;
      let reply = {};
      try { reply = JSON.parse(xhr.responseText); } catch { /* not JSON */ }
      resolve({ ok: xhr.status >= 200 && xhr.status < 300, status: xhr.status, reply });
    });
    bar.hidden = false;
    bar.value = 0;
    xhr.send(data);
  });
}

/** Show a status line above the page content; kind is "ok" or "error". */
export function say(text, kind = "ok") {
  const box = document.getElementById("message");
  if (!box) return;
  box.textContent = text;
  box.className = kind;
  box.hidden = !text;
}

/** el("td", {class: "x"}, "text", child) — text is always set as text, never as HTML. */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (value === true) node.setAttribute(name, "");
    else if (value !== false && value != null) node.setAttribute(name, String(value));
  }
  for (const child of children) {
    if (child == null) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function fill(list, entries) {
  list.replaceChildren(
    ...entries.flatMap(([term, value]) => [el("dt", {}, term), el("dd", {}, value ?? "–")]),
  );
}

export function when(timestamp) {
  return timestamp ? new Date(timestamp * 1000).toLocaleString() : "never";
}

export function duration(seconds) {
  const s = Math.floor(seconds);
  const d = Math.floor(s / 86400);
  const h = Math.floor((s % 86400) / 3600);
  const m = Math.floor((s % 3600) / 60);
  return d ? `${d} d ${h} h` : h ? `${h} h ${m} min` : `${m} min ${s % 60} s`;
}

document.getElementById("logout")?.addEventListener("click", async () => {
  try {
    await api("POST", "/admin/api/logout");
  } finally {
    window.location.assign("/admin/login");
  }
});
