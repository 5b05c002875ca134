import { api, el, say, upload } from "./common.js";

const body = document.getElementById("models");
let timer = null;

function action(label, handler, cls = "small secondary") {
  return el("button", { type: "button", class: cls, onclick: handler }, label);
}

async function run(label, request) {
  try {
    await request();
    say(label);
  } catch (error) {
    say(error.message, "error");
  }
  await refresh();
}

function row(model, defaultModel) {
  const name = model.name;
  const onDisk = model.state !== "not_downloaded" && model.state !== "downloading";
  const state =
    model.state === "downloading"
      ? `downloading ${Math.round(model.download_percent ?? 0)} %`
      : model.state.replace("_", " ");
  const actions = [];
  if (model.state === "not_downloaded") {
    actions.push(action("Download", () =>
      run(`Downloading ${name}…`, () => api("POST", `/admin/api/models/${encodeURIComponent(name)}/download`))));
  }
  if (onDisk && model.state !== "loaded") {
    actions.push(action("Load", () =>
      run(`Loading ${name}…`, () => api("POST", `/admin/api/models/${encodeURIComponent(name)}/load`))));
  }
  if (onDisk && name !== defaultModel) {
    actions.push(el("button", {
      type: "button", class: "small", "data-default": name,
      onclick: () => run(`${name} is now the default model.`,
        () => api("PUT", "/admin/api/settings", { default_model: name })),
    }, "Set default"));
  }
  if (onDisk && !model.bundled && name !== defaultModel) {
    actions.push(action("Delete", () => {
      if (window.confirm(`Delete the files of ${name}?`)) {
        run(`Deleted ${name}.`, () => api("DELETE", `/admin/api/models/${encodeURIComponent(name)}`));
      }
    }, "small danger"));
  }
  return el("tr", { "data-model": name },
    el("td", {}, el("strong", {}, name), name === defaultModel ? " (default)" : "",
      el("br"), el("span", { class: "hint" }, model.description)),
    el("td", { class: `state-${model.state}` }, state, model.error ? el("div", { class: "hint" }, model.error) : null),
    el("td", {}, model.size_mb ? `${model.size_mb} MB` : "–"),
    el("td", {}, model.ram_mb ? `${model.ram_mb} MB used` : model.ram_mb_needed ? `~${model.ram_mb_needed} MB` : "–"),
    el("td", {}, model.languages),
    el("td", {}, ...actions));
}

async function refresh() {
  try {
    const data = await api("GET", "/admin/api/models");
    body.replaceChildren(...data.models.map((m) => row(m, data.default_model)));
    body.dataset.defaultModel = data.default_model;
    const busy = data.models.some((m) => m.state === "downloading");
    clearTimeout(timer);
    timer = setTimeout(refresh, busy ? 1000 : 5000);
  } catch (error) {
    say(error.message, "error");
  }
}

document.getElementById("import-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const form = event.target;
  const progress = document.getElementById("import-progress");
  const data = new FormData();
  data.append("name", form.elements.name.value.trim());
  data.append("file", form.elements.file.files[0]);
  upload("/admin/api/models/import", data, progress).then(({ ok, status, reply }) => {
    if (ok) {
      say(`Imported ${reply.name}.`);
      form.reset();
    } else {
      say(reply.error?.message ?? `Import failed (HTTP ${status})`, "error");
    }
    refresh();
  });
});

refresh();
