import { api, el, say, when } from "./common.js";

const list = document.getElementById("keys");
let shownId = null; // the key whose clear text is on screen

async function refresh() {
  const data = await api("GET", "/admin/api/keys");
  list.replaceChildren(...data.keys.map((k) =>
    el("tr", { "data-key": k.id, class: k.revoked ? "state-revoked" : "" },
      el("td", {}, k.name),
      el("td", {}, el("code", {}, `${k.prefix}_…`)),
      el("td", {}, when(k.created)),
      el("td", {}, when(k.last_used)),
      el("td", {}, k.revoked ? `revoked ${when(k.revoked)}` : "active"),
      el("td", {}, k.revoked ? null : el("button", {
        type: "button", class: "small danger", "data-revoke": k.id,
        onclick: () => revoke(k),
      }, "Revoke")))));
}

async function revoke(key) {
  if (!window.confirm(`Revoke the key "${key.name}"? Programs using it stop working.`)) return;
  try {
    await api("DELETE", `/admin/api/keys/${key.id}`);
    if (key.id === shownId) document.getElementById("new-key").hidden = true;
    say(`Revoked ${key.prefix}.`);
  } catch (error) {
    say(error.message, "error");
  }
  await refresh();
}

document.getElementById("key-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const input = document.getElementById("key-name");
  try {
    const created = await api("POST", "/admin/api/keys", { name: input.value });
    document.getElementById("new-key-value").textContent = created.key;
    shownId = created.id;
    document.getElementById("new-key").hidden = false;
    input.value = "";
    say(`Created a key for ${created.name}.`);
  } catch (error) {
    say(error.message, "error");
  }
  await refresh();
});

document.getElementById("copy-key").addEventListener("click", async () => {
  const text = document.getElementById("new-key-value").textContent;
  try {
    await navigator.clipboard.writeText(text);
    say("Copied.");
  } catch {
    say("Select the key and copy it by hand.", "error");
  }
});

refresh().catch((error) => say(error.message, "error"));
