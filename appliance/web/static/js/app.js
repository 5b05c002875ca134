// The main page: tabs (keyboard: arrows, Home, End) and the three panels.
import { initFiles } from "./files.js";
import { initHistory } from "./history.js";
import { initLive } from "./live.js";

const tabs = [...document.querySelectorAll('[role="tab"]')];

function select(tab, focus = true) {
  for (const t of tabs) {
    const selected = t === tab;
    t.setAttribute("aria-selected", String(selected));
    t.tabIndex = selected ? 0 : -1;
    document.getElementById(t.getAttribute("aria-controls")).hidden = !selected;
  }
  if (focus) tab.focus();
  const name = tab.id.replace("tab-", "");
  if (location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
  document.dispatchEvent(new CustomEvent("panel-shown", { detail: name }));
}

for (const tab of tabs) {
  tab.addEventListener("click", () => select(tab));
  tab.addEventListener("keydown", (event) => {
    const i = tabs.indexOf(tab);
    const next = {
      ArrowRight: tabs[(i + 1) % tabs.length],
      ArrowLeft: tabs[(i - 1 + tabs.length) % tabs.length],
      Home: tabs[0],
      End: tabs[tabs.length - 1],
    }[event.key];
    if (next) {
      event.preventDefault();
      select(next);
    }
  });
}

initFiles();
initLive();
initHistory();

const fromHash = document.getElementById(`tab-${location.hash.slice(1)}`);
if (fromHash) select(fromHash, false);
document.body.dataset.ready = "true";
