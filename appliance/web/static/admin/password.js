import { api, say } from "./common.js";

const form = document.getElementById("password-form");
form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const current = document.getElementById("current").value;
  const next = document.getElementById("new").value;
  if (next !== document.getElementById("confirm").value) {
    say("The two new passwords differ.", "error");
    return;
  }
  try {
    await api("POST", "/admin/api/password", { current, new: next });
    form.reset();
    say("Password changed. Other sessions were logged out.");
  } catch (error) {
    say(error.message, "error");
  }
});
