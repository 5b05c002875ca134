import { api, duration, el, fill, say } from "./common.js";

async function refresh() {
  try {
    const s = await api("GET", "/admin/api/status");
    fill(document.getElementById("service"), [
      ["Version", s.version],
      ["Uptime", duration(s.uptime_seconds)],
      ["Engine", `${s.engine} (${s.compute_type})`],
      ["Default model", s.default_model],
    ]);
    fill(document.getElementById("queue"), [
      ["Queued", s.queue.queued],
      ["Running", s.queue.running],
      ["Workers", s.queue.workers],
      ["Queue limit", s.queue.max_queue],
      ["Speed", `${s.queue.realtime_factor}× real time`],
    ]);
    const sys = s.system;
    fill(document.getElementById("system"), [
      ["CPU", `${sys.cpu_percent} % of ${sys.cpu_count} cores`],
      ["Load", sys.load_average.join(" / ")],
      ["RAM free", `${sys.ram_available_mb} of ${sys.ram_total_mb} MB`],
      ["Service RAM", `${sys.process_rss_mb} MB`],
      ["Disk free", `${sys.disk_free_mb} of ${sys.disk_total_mb} MB`],
    ]);
    document.getElementById("loaded").replaceChildren(
      ...(s.loaded_models.length
        ? s.loaded_models.map((m) => el("li", {}, `${m.name} — ${m.ram_mb} MB, ${m.in_use} in use`))
        : [el("li", {}, "none")]),
    );
    document.getElementById("jobs").replaceChildren(
      ...(s.running_jobs.length
        ? s.running_jobs.map((j) =>
            el("tr", {}, el("td", {}, j.filename || j.id.slice(0, 8)), el("td", {}, j.model),
              el("td", {}, `${j.duration} s`), el("td", {}, `${j.percent} %`)))
        : [el("tr", {}, el("td", { colspan: 4, class: "hint" }, "none"))]),
    );
    document.getElementById("errors").replaceChildren(
      ...(s.recent_errors.length
        ? s.recent_errors.map((e) =>
            el("li", { class: `level-${e.level}` }, `${e.ts} ${e.level} ${e.logger}: ${e.msg}`))
        : [el("li", {}, "none")]),
    );
    document.getElementById("status").setAttribute("aria-busy", "false");
    document.getElementById("updated").textContent = `Updated ${new Date().toLocaleTimeString()}.`;
    say("");
  } catch (error) {
    say(`Status unavailable: ${error.message}`, "error");
  }
}

refresh();
setInterval(refresh, 2000);
