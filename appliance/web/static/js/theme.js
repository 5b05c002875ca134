// Light/dark theme: follows the system until the user picks one (kept in localStorage).
const KEY = "whisper-appliance-theme";
const root = document.documentElement;

function systemDark() {
  return window.matchMedia("(prefers-color-scheme: dark)").matches;
}

function apply(theme) {
  if (theme) root.dataset.theme = theme;
  else delete root.dataset.theme;
  const dark = theme ? theme === "dark" : systemDark();
  const button = document.getElementById("theme-toggle");
  if (button) {
    button.setAttribute("aria-pressed", String(dark));
    button.textContent = dark ? "Light theme" : "Dark theme";
  }
}

let stored = null;
try {
  stored = localStorage.getItem(KEY);
} catch {
  stored = null;
}
apply(stored);

document.getElementById("theme-toggle")?.addEventListener("click", () => {
  const dark = root.dataset.theme ? root.dataset.theme === "dark" : systemDark();
  const next = dark ? "light" : "dark";
  try {
    localStorage.setItem(KEY, next);
  } catch {
    /* private mode: the choice lasts for this page */
  }
  apply(next);
});
