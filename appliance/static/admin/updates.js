import { api, fill, say, when } from "./common.js";

async function check() {
  try {
    const r = await api("GET", "/admin/check-updates");
    fill(document.getElementById("update-info"), [
      ["Running version", r.current_version],
      ["Latest release", r.latest_version ?? "unknown"],
      ["Update available", r.update_available ? "yes" : "no"],
      ["Release notes", r.notes],
      ["Source", r.source ?? "not configured"],
      ["Checked", when(r.checked_at)],
    ]);
    say(r.error ?? (r.update_available ? `Version ${r.latest_version} is available.` : "Up to date."),
      r.error ? "error" : "ok");
  } catch (error) {
    say(error.message, "error");
  }
}

document.getElementById("check-updates").addEventListener("click", check);
check();
