// History panel: list (newest first), full-text search, open, edit, export, delete.
import { FORMATS, api, clock, duration, el, speakerClass } from "./dom.js";
import { Editor } from "./editor.js";

const PAGE = 30;
const $ = (id) => document.getElementById(id);

let query = "";
let offset = 0;
let loaded = false;
let timer = null;
let editor = null;

function title(item) {
  if (item.filename) return item.filename;
  return item.source === "live" ? "Live session" : "Transcript";
}

function when(created) {
  return new Date(created * 1000).toLocaleString();
}

function exportLinks(item) {
  return FORMATS.map((fmt) =>
    el(
      "a",
      { class: "button ghost", href: `/api/history/${item.id}/export?format=${fmt}`, download: `${title(item)}.${fmt}` },
      fmt.toUpperCase(),
    ),
  );
}

function row(item) {
  const snippet = item.text.length > 240 ? `${item.text.slice(0, 240)}…` : item.text;
  return el(
    "li",
    { class: "card history-item", dataset: { id: item.id, source: item.source } },
    el(
      "div",
      { class: "card-head" },
      el("strong", { class: "name" }, title(item)),
      el("span", { class: `badge source-${item.source}` }, item.source),
      el("span", { class: "muted" }, `${when(item.created)} · ${duration(item.duration)} · ${item.model}`),
    ),
    el("p", { class: "snippet" }, snippet || "(no speech)"),
    el(
      "div",
      { class: "actions" },
      el("button", { type: "button", onclick: () => open(item) }, "Open"),
      el("span", { class: "muted" }, "Export:"),
      exportLinks(item),
      el("button", { type: "button", class: "ghost danger", onclick: () => remove(item) }, "Delete"),
    ),
  );
}

async function load(reset = true) {
  if (reset) offset = 0;
  const params = new URLSearchParams({ q: query, limit: String(PAGE), offset: String(offset) });
  const list = $("history-list");
  try {
    const page = await api(`/api/history?${params}`);
    const rows = page.items.map(row);
    if (reset) list.replaceChildren(...rows);
    else list.append(...rows);
    offset += page.items.length;
    $("history-more").hidden = offset >= page.total;
    $("history-count").textContent = query
      ? `${page.total} match${page.total === 1 ? "" : "es"} for “${query}”`
      : `${page.total} transcript${page.total === 1 ? "" : "s"}`;
    loaded = true;
  } catch (error) {
    $("history-count").textContent = `Could not load the history: ${error.message}`;
  }
}

function showEntry(entry) {
  const names = entry.speakers || {};
  const labels = [...new Set([...Object.keys(names), ...entry.segments.map((s) => s.speaker).filter(Boolean)])].sort();
  $("history-dialog-title").textContent = title(entry);
  $("history-dialog-meta").textContent =
    `${entry.source} · ${when(entry.created)} · ${duration(entry.duration)} · ${entry.model} · ${entry.language}` +
    (entry.revision ? ` · edited (revision ${entry.revision})` : "");
  $("history-dialog-actions").replaceChildren(
    el("button", { type: "button", id: "history-edit", onclick: () => edit(entry) }, "Edit"),
    el("span", { class: "muted" }, "Export:"),
    ...exportLinks(entry),
  );
  $("history-dialog-segments").replaceChildren(
    ...entry.segments.map((s) =>
      el(
        "li",
        {},
        el("span", { class: "time" }, `${clock(s.start, true)} → ${clock(s.end, true)}`),
        " ",
        s.speaker
          ? el("strong", { class: `speaker-label ${speakerClass(s.speaker, labels)}`, dataset: { speaker: s.speaker } }, `${names[s.speaker] || s.speaker}: `)
          : "",
        s.text.trim(),
      ),
    ),
  );
}

function closeEditor() {
  if (editor) editor.destroy();
  editor = null;
  $("history-editor").hidden = true;
  $("history-dialog-segments").hidden = false;
  $("history-dialog").classList.remove("editing");
}

function edit(entry) {
  closeEditor();
  $("history-dialog-segments").hidden = true;
  $("history-editor").hidden = false;
  $("history-dialog").classList.add("editing");
  $("history-edit").disabled = true;
  editor = new Editor($("history-editor"), entry, {
    onSaved: (saved) => {
      showEntry(saved);
      $("history-edit").disabled = true;
      document.dispatchEvent(new CustomEvent("history-changed"));
    },
  });
  $("history-editor").querySelector("textarea")?.focus();
}

/** Close the dialog, asking first when the editor has unsaved changes. */
function mayClose() {
  if (editor && editor.dirty() && !window.confirm("Close the editor and drop your unsaved edits?")) return false;
  closeEditor();
  return true;
}

async function open(item) {
  const dialog = $("history-dialog");
  try {
    const entry = await api(`/api/history/${item.id}`);
    closeEditor();
    showEntry(entry);
    dialog.showModal();
  } catch (error) {
    $("history-count").textContent = error.message;
  }
}

async function remove(item) {
  if (!window.confirm(`Delete “${title(item)}” from the history?`)) return;
  try {
    await api(`/api/history/${item.id}`, { method: "DELETE" });
    await load();
  } catch (error) {
    $("history-count").textContent = error.message;
  }
}

export function initHistory() {
  $("history-form").addEventListener("submit", (event) => {
    event.preventDefault();
    query = $("history-search").value.trim();
    load();
  });
  $("history-search").addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(() => {
      query = $("history-search").value.trim();
      load();
    }, 250);
  });
  $("history-more").addEventListener("click", () => load(false));
  $("history-dialog-close").addEventListener("click", () => {
    if (mayClose()) $("history-dialog").close();
  });
  $("history-dialog").addEventListener("cancel", (event) => {
    if (!mayClose()) event.preventDefault();
  });
  document.addEventListener("panel-shown", (event) => {
    if (event.detail === "history") load();
  });
  document.addEventListener("history-changed", () => {
    if (loaded && !$("panel-history").hidden) load();
    else loaded = false;
  });
}
