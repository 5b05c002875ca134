// Small DOM and API helpers shared by the panels.

/** Create an element: el("a", {href: "/x", class: "link"}, "text", child). */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on") && typeof value === "function") {
      node.addEventListener(key.slice(2), value);
    } else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** 75.3 -> "01:15.3"; 3725 -> "1:02:05". */
export function clock(seconds, tenths = false) {
  const s = Math.max(0, Number(seconds) || 0);
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const sec = s % 60;
  const secText = tenths ? sec.toFixed(1).padStart(4, "0") : String(Math.floor(sec)).padStart(2, "0");
  const mm = String(m).padStart(2, "0");
  return h ? `${h}:${mm}:${secText}` : `${mm}:${secText}`;
}

export function duration(seconds) {
  const s = Math.round(Number(seconds) || 0);
  if (s < 60) return `${s} s`;
  return `${Math.floor(s / 60)} min ${s % 60} s`;
}

/** The error message of an API error body, or a fallback. */
export async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch {
    /* not JSON */
  }
  return `${response.status} ${response.statusText}`;
}

/** fetch + JSON, throwing an Error with the API's message on failure. */
export async function api(url, options = {}) {
  const response = await fetch(url, { credentials: "same-origin", ...options });
  if (!response.ok) throw new Error(await errorMessage(response));
  return response.json();
}

export const FORMATS = ["txt", "srt", "vtt", "json", "tsv"];

/** Copy text; returns true when it worked. */
export async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    const area = el("textarea", { class: "visually-hidden" }, text);
    document.body.append(area);
    area.select();
    const ok = document.execCommand("copy");
    area.remove();
    return ok;
  }
}

export function announce(target, text) {
  target.textContent = text;
}

/** The colour class of a speaker label, the same in every view: "Speaker 3" -> "spk-2"
 * (8 colours, then they repeat); any other label by its place in `labels`. */
export function speakerClass(label, labels = []) {
  const numbered = /^Speaker (\d+)$/.exec(label || "");
  const index = numbered ? Number(numbered[1]) - 1 : Math.max(0, labels.indexOf(label));
  return `spk-${index % 8}`;
}
