import { api, el, say } from "./common.js";

const form = document.getElementById("settings-form");
const numbers = ["history_retention_days", "history_max_rows", "live_max_sessions", "live_max_minutes"];
let current = {};

async function load() {
  const [settings, models] = await Promise.all([
    api("GET", "/admin/api/settings"),
    api("GET", "/admin/api/models"),
  ]);
  current = settings.values;
  const select = form.elements.default_model;
  const usable = models.models.filter((m) => m.state !== "not_downloaded" && m.state !== "downloading");
  select.replaceChildren(...usable.map((m) => el("option", { value: m.name }, m.name)));
  select.value = current.default_model;
  form.elements.default_language.value = current.default_language;
  form.elements.max_upload_size.value = current.max_upload_size;
  for (const name of numbers) form.elements[name].value = current[name];
  form.elements.require_api_key.checked = current.require_api_key;
  form.elements.allowed_origins.value = current.allowed_origins.join("\n");
  form.elements.default_callback_url.value = current.default_callback_url || "";
  document.getElementById("webhook_secret").value = (settings.webhook || {}).secret || "";
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const size = form.elements.max_upload_size.value.trim();
  const wanted = {
    default_model: form.elements.default_model.value,
    default_language: form.elements.default_language.value.trim(),
    max_upload_size: /^\d+$/.test(size) ? Number(size) : size,
    require_api_key: form.elements.require_api_key.checked,
    allowed_origins: form.elements.allowed_origins.value.split(/\s+/).filter(Boolean),
    default_callback_url: form.elements.default_callback_url.value.trim(),
  };
  for (const name of numbers) wanted[name] = Number(form.elements[name].value);
  const changes = {};
  for (const [key, value] of Object.entries(wanted)) {
    if (JSON.stringify(value) !== JSON.stringify(current[key])) changes[key] = value;
  }
  try {
    const result = await api("PUT", "/admin/api/settings", changes);
    current = result.values;
    say(Object.keys(changes).length ? "Settings saved." : "Nothing changed.");
  } catch (error) {
    say(error.message, "error");
  }
});

load().catch((error) => say(error.message, "error"));
