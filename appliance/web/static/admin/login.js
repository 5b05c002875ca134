import { api, say } from "./common.js";

const form = document.getElementById("login-form");
form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const button = document.getElementById("login-button");
  button.disabled = true;
  try {
    const next = new URLSearchParams(window.location.search).get("next") ?? "/admin";
    const result = await api("POST", "/admin/api/login", {
      password: document.getElementById("password").value,
      next,
    });
    window.location.assign(result.next);
  } catch (error) {
    say(error.message, "error");
    document.getElementById("password").select();
  } finally {
    button.disabled = false;
  }
});
