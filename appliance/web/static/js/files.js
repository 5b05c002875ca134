// Files panel: drop or pick files; per file upload progress, queue position / ETA,
// transcription percent (job events), the result with clickable segments, copy, downloads
// and cancel.
import { FORMATS, api, clock, copyText, el, speakerClass } from "./dom.js";
import { keptAudio } from "./editor.js";

const list = () => document.getElementById("file-list");
let uploads = Promise.resolve(); // one upload at a time; transcription runs in the queue

function options() {
  const chosen = {
    model: document.getElementById("file-model").value,
    language: document.getElementById("file-language").value,
    task: document.getElementById("file-task").value,
    word_timestamps: document.getElementById("file-words").checked ? "true" : "false",
  };
  if (document.getElementById("file-diarize").checked) {
    chosen.diarize = "true";
    const speakers = document.getElementById("file-speakers").value.trim();
    if (speakers) chosen.num_speakers = speakers; // empty: the appliance estimates the count
  }
  return chosen;
}

class FileCard {
  constructor(file) {
    this.file = file;
    this.job = null;
    this.xhr = null;
    this.events = null;
    this.finished = false;
    this.state = el("span", { class: "state" }, "Waiting to upload");
    this.bar = el("progress", { max: "100", value: "0", "aria-label": `Progress of ${file.name}` });
    this.cancelButton = el("button", { type: "button", class: "ghost", onclick: () => this.cancel() }, "Cancel");
    this.body = el("div", { class: "result" });
    this.node = el(
      "li",
      { class: "card file-card", dataset: { state: "waiting" } },
      el("div", { class: "card-head" }, el("strong", { class: "name" }, file.name), this.state, this.cancelButton),
      this.bar,
      this.body,
    );
    list().prepend(this.node);
  }

  setState(state, text, percent) {
    this.node.dataset.state = state;
    this.state.textContent = text;
    if (percent === null) this.bar.removeAttribute("value");
    else if (percent !== undefined) this.bar.value = percent;
  }

  upload() {
    return new Promise((resolve) => {
      if (this.finished) return resolve();
      const form = new FormData();
      form.append("file", this.file, this.file.name);
      for (const [key, value] of Object.entries(options())) form.append(key, value);
      const xhr = new XMLHttpRequest();
      this.xhr = xhr;
      xhr.open("POST", "/api/jobs");
      xhr.responseType = "json";
      xhr.upload.addEventListener("progress", (event) => {
        if (event.lengthComputable) {
          const percent = Math.round((event.loaded / event.total) * 100);
          this.setState("uploading", `Uploading ${percent} %`, percent);
        }
      });
      xhr.addEventListener("load", () => {
        this.xhr = null;
        if (xhr.status === 202 && xhr.response) {
          this.job = xhr.response;
          this.follow();
        } else {
          const message = xhr.response?.error?.message || `upload failed (${xhr.status})`;
          this.fail(message);
        }
        resolve();
      });
      xhr.addEventListener("error", () => {
        this.fail("the upload failed: network error");
        resolve();
      });
      xhr.addEventListener("abort", () => {
        this.fail("cancelled");
        resolve();
      });
      this.setState("uploading", "Uploading 0 %", 0);
      xhr.send(form);
    });
  }

  follow() {
    this.showProgress(this.job);
    const events = new EventSource(`/api/jobs/${this.job.id}/events`);
    this.events = events;
    events.addEventListener("progress", (event) => this.showProgress(JSON.parse(event.data)));
    events.addEventListener("done", (event) => {
      events.close();
      this.done(JSON.parse(event.data));
    });
    events.addEventListener("error", () => {
      if (this.finished) return;
      events.close();
      this.poll(); // the stream broke (proxy, sleep): fall back to polling the job
    });
  }

  async poll() {
    while (!this.finished) {
      try {
        const job = await api(`/api/jobs/${this.job.id}`);
        if (["done", "failed", "cancelled"].includes(job.state)) return this.done(job);
        this.showProgress(job);
      } catch (error) {
        return this.fail(error.message);
      }
      await new Promise((r) => setTimeout(r, 1000));
    }
  }

  showProgress(job) {
    if (job.state === "queued") {
      const eta = job.eta_seconds != null ? ` — about ${Math.ceil(job.eta_seconds)} s` : "";
      const where = job.position ? `Queued, position ${job.position}` : "Queued";
      this.setState("queued", `${where}${eta}`, null);
    } else if (job.state === "running") {
      const eta = job.eta_seconds != null ? `, ${Math.ceil(job.eta_seconds)} s left` : "";
      this.setState("running", `Transcribing ${Math.round(job.percent)} %${eta}`, job.percent);
    }
  }

  async done(job) {
    this.job = job;
    if (job.state !== "done") {
      const message = job.state === "cancelled" ? "cancelled" : job.error?.message || "failed";
      return this.fail(message);
    }
    try {
      const result = await api(`/api/jobs/${job.id}/result?format=json`);
      this.finished = true;
      this.setState("done", `Done — ${result.language}, ${clock(result.duration)}`, 100);
      this.cancelButton.remove();
      this.render(result);
      if (result.id) keptAudio.set(result.id, this.file); // the editor plays segments from it
      document.dispatchEvent(new CustomEvent("history-changed"));
    } catch (error) {
      this.fail(error.message);
    }
  }

  fail(message) {
    this.finished = true;
    this.events?.close();
    this.setState(message === "cancelled" ? "cancelled" : "failed", message === "cancelled" ? "Cancelled" : "Failed");
    this.body.replaceChildren(el("p", { class: "error", role: "alert" }, message === "cancelled" ? "The transcription was cancelled." : message));
    this.cancelButton.remove();
  }

  async cancel() {
    if (this.finished) return;
    if (this.xhr) return this.xhr.abort();
    if (!this.job) {
      this.finished = true;
      return this.fail("cancelled");
    }
    try {
      await fetch(`/api/jobs/${this.job.id}`, { method: "DELETE", credentials: "same-origin" });
    } catch {
      /* the events stream reports the outcome */
    }
  }

  render(result) {
    const audio = el("audio", { controls: true, preload: "metadata", src: URL.createObjectURL(this.file) });
    let stopAt = null;
    audio.addEventListener("timeupdate", () => {
      if (stopAt !== null && audio.currentTime >= stopAt) {
        audio.pause();
        stopAt = null;
      }
    });
    const labels = [...new Set(result.segments.map((s) => s.speaker).filter(Boolean))].sort();
    const segments = el(
      "ol",
      { class: "segments" },
      result.segments.map((segment) =>
        el(
          "li",
          {},
          el(
            "button",
            {
              type: "button",
              class: "segment",
              title: "Play this part",
              onclick: () => {
                audio.currentTime = segment.start;
                stopAt = segment.end;
                audio.play().catch(() => {});
              },
            },
            el("span", { class: "time" }, `${clock(segment.start, true)} → ${clock(segment.end, true)}`),
            segment.speaker
              ? el(
                  "span",
                  { class: `speaker-label ${speakerClass(segment.speaker, labels)}`, dataset: { speaker: segment.speaker } },
                  segment.speaker,
                )
              : null,
            el("span", { class: "text" }, segment.text.trim()),
          ),
        ),
      ),
    );
    const copied = el("span", { class: "muted", role: "status" });
    const base = this.file.name.replace(/\.[^.]+$/, "");
    const downloads = FORMATS.map((fmt) =>
      el(
        "a",
        {
          class: "button ghost",
          href: result.id ? `/api/history/${result.id}/export?format=${fmt}` : `/api/jobs/${this.job.id}/result?format=${fmt}`,
          download: `${base}.${fmt}`,
        },
        fmt.toUpperCase(),
      ),
    );
    this.body.replaceChildren(
      el("p", { class: "transcript-text" }, result.text),
      el(
        "div",
        { class: "actions" },
        el(
          "button",
          {
            type: "button",
            onclick: async () => {
              copied.textContent = (await copyText(result.text)) ? "Copied" : "Copy failed";
            },
          },
          "Copy",
        ),
        el("span", { class: "muted" }, "Download:"),
        downloads,
        copied,
      ),
      audio,
      segments,
    );
  }
}

function addFiles(files) {
  for (const file of files) {
    const card = new FileCard(file);
    uploads = uploads.then(() => card.upload());
  }
}

export function initFiles() {
  const zone = document.getElementById("dropzone");
  const input = document.getElementById("file-input");
  zone.addEventListener("click", (event) => {
    if (event.target !== input) input.click();
  });
  zone.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      input.click();
    }
  });
  input.addEventListener("change", () => {
    addFiles([...input.files]);
    input.value = "";
  });
  for (const name of ["dragenter", "dragover"]) {
    zone.addEventListener(name, (event) => {
      event.preventDefault();
      zone.classList.add("over");
    });
  }
  for (const name of ["dragleave", "drop"]) {
    zone.addEventListener(name, () => zone.classList.remove("over"));
  }
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    addFiles([...(event.dataTransfer?.files || [])]);
  });
  // a file dropped outside the zone must not navigate away from the page
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());
}

