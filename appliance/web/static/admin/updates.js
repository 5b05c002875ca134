// The Updates page: check, apply, upload, roll back; the updater's progress is polled from
// GET /admin/api/updates while a request is pending or running.
import { api, el, fill, say, upload, when } from "./common.js";

const POLL_MS = 2000;
const DONE = { succeeded: "ok", rolled_back: "error", failed: "error", refused: "error", rollback_failed: "error" };
let polling = null;
let lastCheck = null;

function progressLine(state) {
  const line = document.getElementById("update-progress");
  const status = state.status;
  let text = "No update requested.";
  if (state.state === "pending") {
    const what = state.pending?.action === "rollback" ? "Rollback" : "Update";
    text = `${what} requested; waiting for the updater to start…`;
  } else if (state.state === "running") {
    text = `Running: ${status?.message ?? "the updater is working"} (the service restarts; this page keeps asking)`;
  } else if (status) {
    const versions = [status.from_version, status.to_version].filter(Boolean).join(" → ");
    text = `Last request ${status.state.replace("_", " ")}${versions ? ` (${versions})` : ""}: ${status.message}`;
  }
  line.textContent = text;
  line.dataset.state = state.state === "idle" ? (status?.state ?? "idle") : state.state;
  line.className = state.state === "idle" && status ? `state-${DONE[status.state] ?? "ok"}` : "";
}

function history(rows) {
  document.getElementById("update-history").replaceChildren(...rows.map((h) =>
    el("tr", { "data-status": h.status },
      el("td", {}, when(h.started)),
      el("td", {}, h.action),
      el("td", {}, h.from_version ?? "–"),
      el("td", {}, h.to_version ?? "–"),
      el("td", {}, el("code", {}, h.source ?? "–")),
      el("td", {}, h.status.replace("_", " ")),
      el("td", {}, h.message ?? ""))));
}

function releases(state) {
  const select = document.getElementById("rollback-to");
  const chosen = select.value;
  const others = state.releases.filter((v) => v !== state.current_version).reverse();
  select.replaceChildren(el("option", { value: "" }, "the previous release"),
    ...others.map((v) => el("option", { value: v }, v)));
  if (others.includes(chosen)) select.value = chosen;
}

function info(state) {
  fill(document.getElementById("update-info"), [
    ["Running version", state.current_version],
    ["Installed releases", state.releases.join(", ") || "none found"],
    ["Latest release", lastCheck ? (lastCheck.latest_version ?? "unknown") : "not checked"],
    ["Update available", lastCheck ? (lastCheck.update_available ? "yes" : "no") : "not checked"],
    ["Release notes", lastCheck?.notes],
    ["Source", lastCheck ? (lastCheck.source ?? "not configured") : null],
    ["Checked", lastCheck ? when(lastCheck.checked_at) : null],
  ]);
}

async function refresh() {
  const state = await api("GET", "/admin/api/updates");
  info(state);
  progressLine(state);
  history(state.history);
  releases(state);
  const busy = state.state !== "idle";
  for (const id of ["apply-update"]) document.getElementById(id).disabled = busy;
  for (const form of ["upload-form", "rollback-form"]) {
    document.querySelector(`#${form} button[type=submit]`).disabled = busy;
  }
  if (busy && polling === null) polling = window.setInterval(poll, POLL_MS);
  if (!busy && polling !== null) {
    window.clearInterval(polling);
    polling = null;
    const status = state.status;
    if (status) {
      const what = status.action === "rollback" ? "Rollback" : "Update";
      say(`${what} ${status.state.replace("_", " ")}: ${status.message}`, DONE[status.state] ?? "ok");
    }
  }
  return state;
}

async function poll() {
  try {
    await refresh();
  } catch {
    // the service restarts during an update: keep asking until it answers again
    document.getElementById("update-progress").textContent = "Waiting for the service to come back…";
  }
}

async function check() {
  try {
    lastCheck = await api("GET", "/admin/check-updates");
    say(lastCheck.error ?? (lastCheck.update_available
      ? `Version ${lastCheck.latest_version} is available.` : "Up to date."),
    lastCheck.error ? "error" : "ok");
    await refresh();
  } catch (error) {
    say(error.message, "error");
  }
}

async function request(method, url, body, done) {
  try {
    await api(method, url, body);
    say(done);
  } catch (error) {
    say(error.message, "error");
  }
  await refresh().catch((error) => say(error.message, "error"));
}

document.getElementById("check-updates").addEventListener("click", check);

document.getElementById("apply-update").addEventListener("click", () => {
  const target = lastCheck?.latest_version ? ` ${lastCheck.latest_version}` : "";
  if (!window.confirm(`Install the release${target} from the update source? The service restarts.`)) return;
  request("POST", "/admin/api/updates/apply", {}, "Update requested.");
});

document.getElementById("rollback-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const to = document.getElementById("rollback-to").value;
  const target = to || "the previous release";
  if (!window.confirm(`Roll back to ${target}? The service restarts and the database goes back to that release's backup.`)) return;
  request("POST", "/admin/api/updates/rollback", to ? { to_version: to } : {}, "Rollback requested.");
});

document.getElementById("upload-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const form = event.target;
  const file = form.elements.file.files[0];
  if (!file) return;
  if (!window.confirm(`Install ${file.name}? The service restarts.`)) return;
  const progress = document.getElementById("upload-progress");
  const data = new FormData();
  data.append("file", file);
  upload("/admin/api/updates/upload", data, progress).then(({ ok, status, reply }) => {
    if (ok) {
      say(`Uploaded ${file.name}; update requested.`);
      form.reset();
    } else {
      say(reply.error?.message ?? `Upload failed (HTTP ${status})`, "error");
    }
    refresh().catch((error) => say(error.message, "error"));
  });
});

refresh().then(check).catch((error) => say(error.message, "error"));
