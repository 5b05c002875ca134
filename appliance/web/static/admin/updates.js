// The Updates page: check, apply, upload, roll back; the updater's progress is polled from
// GET /admin/api/updates while a request is pending or running. On a cluster (PostgreSQL) the
// Cluster card lists the nodes and starts a rolling update (GET /admin/api/cluster, polled too).
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

function cluster(state) {
  document.getElementById("cluster-card").hidden = !state.cluster;
  if (!state.cluster) return false;
  document.getElementById("cluster-nodes").replaceChildren(...state.nodes.map((n) =>
    el("tr", { "data-state": n.alive ? n.state : "gone" },
      el("td", {}, el("code", {}, n.node), n.node === state.node ? " (this node)" : ""),
      el("td", {}, n.hostname),
      el("td", {}, n.version),
      el("td", {}, n.alive ? n.state : "not answering"),
      el("td", {}, `${Math.round(n.age)} s ago`))));
  const update = state.update;
  const line = document.getElementById("cluster-progress");
  line.dataset.state = update?.state ?? "none";
  if (!update) {
    line.textContent = "No cluster update yet.";
  } else {
    const done = update.plan.filter((n) => update.nodes[n]?.state === "done").length;
    const counts = `${done} of ${update.plan.length} nodes updated`;
    if (update.state === "running") {
      const turn = update.current_node ? `: ${update.current_node} is ${update.nodes[update.current_node]?.state ?? "starting"}` : "";
      line.textContent = `Updating the cluster from ${update.source} (${counts})${turn}`;
    } else if (update.state === "done") {
      line.textContent = `Cluster updated to ${update.target_version} (${counts}).`;
    } else {
      line.textContent = `Cluster update stopped (${counts}): ${update.error}`;
    }
  }
  const running = update?.state === "running";
  document.querySelector("#cluster-form button[type=submit]").disabled = running;
  return running;
}

async function refresh() {
  const state = await api("GET", "/admin/api/updates");
  const clusterBusy = cluster(await api("GET", "/admin/api/cluster"));
  info(state);
  progressLine(state);
  history(state.history);
  releases(state);
  const busy = state.state !== "idle";
  for (const id of ["apply-update"]) document.getElementById(id).disabled = busy;
  for (const form of ["upload-form", "rollback-form"]) {
    document.querySelector(`#${form} button[type=submit]`).disabled = busy;
  }
  if ((busy || clusterBusy) && polling === null) polling = window.setInterval(poll, POLL_MS);
  if (!busy && !clusterBusy && polling !== null) {
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

/** Upload a release bundle (the <progress> `barId` shows how far), then say how it went. */
function sendBundle(url, form, data, barId, done) {
  upload(url, data, document.getElementById(barId)).then(({ ok, status, reply }) => {
    if (ok) {
      say(done);
      form.reset();
    } else {
      say(reply.error?.message ?? `Upload failed (HTTP ${status})`, "error");
    }
    refresh().catch((error) => say(error.message, "error"));
  });
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

document.getElementById("cluster-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const form = event.target;
  const source = form.elements.source.value.trim();
  const file = form.elements.file.files[0];
  const drain = Number(form.elements.drain_seconds.value || 6);
  const target = file?.name ?? (source || "the update source's latest release");
  if (!window.confirm(`Update every node of the cluster, one at a time, to ${target}?`)) return;
  if (!file) {
    request("POST", "/admin/api/cluster/update", { ...(source ? { source } : {}), drain_seconds: drain },
      "Cluster update started.");
    return;
  }
  const data = new FormData();
  data.append("file", file);
  data.append("drain_seconds", String(drain));
  sendBundle("/admin/api/cluster/upload", form, data, "cluster-upload-progress",
    `Uploaded ${file.name}; cluster update started.`);
});

document.getElementById("upload-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const form = event.target;
  const file = form.elements.file.files[0];
  if (!file) return;
  if (!window.confirm(`Install ${file.name}? The service restarts.`)) return;
  const data = new FormData();
  data.append("file", file);
  sendBundle("/admin/api/updates/upload", form, data, "upload-progress",
    `Uploaded ${file.name}; update requested.`);
});

refresh().then(check).catch((error) => say(error.message, "error"));
