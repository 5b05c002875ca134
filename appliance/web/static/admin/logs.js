import { api, el, say } from "./common.js";

const form = document.getElementById("logs-form");
const list = document.getElementById("log");
let timer = null;

async function refresh() {
  clearTimeout(timer);
  const params = new URLSearchParams({
    level: form.elements.level.value,
    lines: form.elements.lines.value || "200",
  });
  try {
    const data = await api("GET", `/admin/api/logs?${params}`);
    list.replaceChildren(...data.entries.map((e) =>
      el("li", { class: `level-${e.level}` },
        `${e.ts} ${e.level.padEnd(7)} [${e.request_id}] ${e.logger}: ${e.msg}${e.exc ? `\n${e.exc}` : ""}`)));
    if (!data.entries.length) list.replaceChildren(el("li", {}, "nothing at this level"));
    say("");
  } catch (error) {
    say(error.message, "error");
  }
  if (document.getElementById("follow").checked) timer = setTimeout(refresh, 3000);
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  refresh();
});
form.elements.level.addEventListener("change", refresh);
document.getElementById("follow").addEventListener("change", refresh);
refresh();
