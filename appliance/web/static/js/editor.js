// Transcript editor of the History panel: edit the text of segments, split and merge them,
// nudge their times, rename speakers, undo/redo, compare with the original (or any revision)
// and save as a new revision. Saving sends the revision the edit started from: when another
// tab saved first, the server answers 409 and nothing is overwritten without asking.
import { clock, el, errorMessage, speakerClass } from "./dom.js";

const STEP = 0.1; // seconds per nudge
const UNDO_LIMIT = 500;
const TYPING_PAUSE_MS = 1200; // typing after such a pause is a new undo step

/** Uploads still open in this tab, by history id (the history keeps text, not audio). */
export const keptAudio = new Map();

const round = (t) => Math.round(t * 1000) / 1000;
const $text = (s) => (s.text || "").trim();

export const SHORTCUTS = [
  ["Enter", "split the segment at the caret"],
  ["Backspace at the start", "merge with the segment above"],
  ["Delete at the end", "merge with the segment below"],
  ["Alt+← / Alt+→", `start ${STEP} s earlier / later`],
  ["Alt+Shift+← / Alt+Shift+→", `end ${STEP} s earlier / later`],
  ["Ctrl+Enter", "play the segment"],
  ["Ctrl+Z / Ctrl+Shift+Z (Ctrl+Y)", "undo / redo"],
  ["Ctrl+S", "save"],
];

export class Editor {
  /**
   * @param {HTMLElement} root where the editor is built (emptied first)
   * @param {object} entry GET /api/history/{id}
   * @param {{onSaved?: (entry: object) => void}} options
   */
  constructor(root, entry, options = {}) {
    this.root = root;
    this.id = entry.id;
    this.onSaved = options.onSaved || (() => {});
    this.undoStack = [];
    this.redoStack = [];
    this.typing = null;
    this.typingTimer = null;
    this.focus = null;
    this.compare = null;
    this.stopAt = null;
    this.saving = false;
    this.load(entry);
    this.build();
    this.render();
    this.loadRevisions(0).catch((error) => this.updateStatus(`Could not load the revisions: ${error.message}`));
    this.onUnload = (event) => {
      if (this.dirty()) event.preventDefault();
    };
    window.addEventListener("beforeunload", this.onUnload);
  }

  load(entry) {
    this.revision = entry.revision || 0;
    this.duration = Math.max(Number(entry.duration) || 0, ...entry.segments.map((s) => Number(s.end) || 0));
    this.state = {
      segments: entry.segments.map((s) => ({
        id: s.id,
        start: Number(s.start) || 0,
        end: Number(s.end) || 0,
        text: $text(s),
        speaker: s.speaker || null,
      })),
      speakers: { ...(entry.speakers || {}) },
    };
    this.saved = JSON.stringify(this.state);
  }

  destroy() {
    window.removeEventListener("beforeunload", this.onUnload);
    if (this.audio && this.audio.src) URL.revokeObjectURL(this.audio.src);
    this.root.replaceChildren();
  }

  dirty() {
    return JSON.stringify(this.state) !== this.saved;
  }

  // ---- layout ---------------------------------------------------------------------------

  build() {
    this.status = el("p", { class: "editor-status", role: "status", "aria-live": "polite" });
    this.undoButton = el("button", { type: "button", class: "ghost", onclick: () => this.undo() }, "Undo");
    this.redoButton = el("button", { type: "button", class: "ghost", onclick: () => this.redo() }, "Redo");
    this.saveButton = el("button", { type: "button", class: "primary", onclick: () => this.save() }, "Save");
    const failed = (what) => (error) => this.updateStatus(`${what}: ${error.message}`);
    this.revisionSelect = el("select", {
      id: "editor-compare",
      onchange: () => this.showRevision().catch(failed("Could not load the revision")),
    });
    this.restoreButton = el(
      "button",
      { type: "button", class: "ghost", onclick: () => this.restore().catch(failed("Not restored")) },
      "Restore this revision",
    );
    this.conflictBox = el("div", { class: "notice editor-conflict", hidden: true });
    this.speakersBox = el("fieldset", { class: "editor-speakers" });
    this.list = el("ol", { class: "editor-segments", "aria-label": "Segments" });
    this.audio = el("audio", { controls: true, preload: "metadata", hidden: true });
    this.audio.addEventListener("timeupdate", () => {
      if (this.stopAt !== null && this.audio.currentTime >= this.stopAt) {
        this.audio.pause();
        this.stopAt = null;
      }
    });
    const picker = el("input", { type: "file", id: "editor-audio-file", accept: "audio/*,video/*" });
    picker.addEventListener("change", () => picker.files[0] && this.useAudio(picker.files[0]));
    this.audioNote = el(
      "p",
      { class: "muted" },
      "The history keeps the text, not the audio. To play segments, choose the original file " +
        "(it stays in this browser): ",
      el("label", { for: "editor-audio-file", class: "visually-hidden" }, "Audio file"),
      picker,
    );
    const kept = keptAudio.get(this.id);
    if (kept) this.useAudio(kept);

    this.root.replaceChildren(
      el(
        "div",
        { class: "editor-toolbar" },
        this.undoButton,
        this.redoButton,
        this.saveButton,
        el("label", { for: "editor-compare" }, "Compare with"),
        this.revisionSelect,
        this.restoreButton,
      ),
      this.status,
      this.conflictBox,
      this.speakersBox,
      this.audioNote,
      this.audio,
      el(
        "details",
        { class: "editor-help" },
        el("summary", {}, "Keyboard shortcuts"),
        el("dl", {}, SHORTCUTS.flatMap(([keys, what]) => [el("dt", {}, el("kbd", {}, keys)), el("dd", {}, what)])),
      ),
      el(
        "div",
        { class: "editor-columns", "aria-hidden": "true" },
        el("span", {}, "Time · speaker"),
        el("span", {}, "Edited text"),
        (this.compareHead = el("span", {}, "Original")),
      ),
      this.list,
    );
    this.root.addEventListener("keydown", (event) => this.onKey(event));
    this.list.addEventListener("beforeinput", (event) => {
      const index = this.indexOf(event.target);
      if (index !== null && event.target.matches("textarea")) this.startTyping(`text:${index}`);
    });
    this.list.addEventListener("input", (event) => {
      const index = this.indexOf(event.target);
      if (index === null || !event.target.matches("textarea")) return;
      this.state.segments[index].text = event.target.value;
      this.markChanged(event.target.closest("li"), index);
      this.updateStatus();
    });
  }

  useAudio(file) {
    if (this.audio.src) URL.revokeObjectURL(this.audio.src);
    this.audio.src = URL.createObjectURL(file);
    this.audio.hidden = false;
    this.audioNote.hidden = true;
  }

  indexOf(node) {
    const row = node && node.closest && node.closest("li[data-index]");
    return row ? Number(row.dataset.index) : null;
  }

  labels() {
    const seen = new Set(Object.keys(this.state.speakers));
    for (const s of this.state.segments) if (s.speaker) seen.add(s.speaker);
    return [...seen].sort();
  }

  speakerName(label) {
    return this.state.speakers[label] || label;
  }

  colour(label) {
    return speakerClass(label, this.labels());
  }

  renderSpeakers() {
    const labels = this.labels();
    this.speakersBox.hidden = labels.length === 0;
    this.speakersBox.replaceChildren(
      el("legend", {}, "Speakers"),
      ...labels.map((label, i) => {
        const input = el("input", {
          type: "text",
          id: `editor-speaker-${i}`,
          class: "speaker-name",
          value: this.state.speakers[label] || "",
          placeholder: label,
          maxlength: 100,
          dataset: { label },
        });
        input.addEventListener("beforeinput", () => this.startTyping(`speaker:${label}`));
        input.addEventListener("input", () => {
          const name = input.value.trim();
          if (name) this.state.speakers[label] = name;
          else delete this.state.speakers[label];
          for (const chip of this.list.querySelectorAll("select.speaker")) {
            const option = [...chip.options].find((o) => o.value === label);
            if (option) option.textContent = this.speakerName(label);
          }
          this.updateStatus();
        });
        return el(
          "span",
          { class: "speaker-field" },
          el("label", { for: input.id, class: `chip ${this.colour(label)}` }, label),
          input,
        );
      }),
    );
  }

  /** Each segment of the compared revision goes next to the edited segment it overlaps most. */
  matchCompare() {
    this.compareTexts = this.state.segments.map(() => []);
    if (!this.compare) return;
    const segments = this.state.segments;
    for (const other of this.compare.segments) {
      let best = -1;
      let bestOverlap = -Infinity;
      for (let i = 0; i < segments.length; i++) {
        const overlap = Math.min(other.end, segments[i].end) - Math.max(other.start, segments[i].start);
        if (overlap > bestOverlap) {
          best = i;
          bestOverlap = overlap;
        }
        if (segments[i].start > other.end) break;
      }
      if (best >= 0) this.compareTexts[best].push($text(other));
    }
  }

  compareText(index) {
    return (this.compareTexts && this.compareTexts[index] ? this.compareTexts[index] : []).join(" ");
  }

  markChanged(row, index) {
    const segment = this.state.segments[index];
    row.classList.toggle("changed", Boolean(this.compare) && this.compareText(index) !== segment.text.trim());
  }

  row(segment, index) {
    const n = index + 1;
    const nudge = (edge, delta, label, text) =>
      el(
        "button",
        {
          type: "button",
          class: "ghost nudge",
          title: label,
          "aria-label": `Segment ${n}: ${label}`,
          onclick: () => this.nudge(index, edge, delta),
        },
        text,
      );
    const area = el("textarea", {
      rows: 2,
      maxlength: 2000,
      spellcheck: "true",
      "aria-label": `Segment ${n} text, ${clock(segment.start, true)} to ${clock(segment.end, true)}`,
    });
    area.value = segment.text;
    const labels = this.labels();
    let speaker = null;
    if (labels.length) {
      speaker = el(
        "select",
        {
          class: `speaker ${segment.speaker ? this.colour(segment.speaker) : ""}`,
          "aria-label": `Segment ${n} speaker`,
        },
        el("option", { value: "" }, "—"),
        labels.map((label) => el("option", { value: label, selected: label === segment.speaker }, this.speakerName(label))),
      );
      speaker.addEventListener("change", () => {
        this.checkpoint();
        segment.speaker = speaker.value || null;
        this.focus = { index, caret: null };
        this.render();
      });
    }
    const row = el(
      "li",
      { class: "editor-segment", dataset: { index: String(index) } },
      el(
        "div",
        { class: "editor-times" },
        nudge("start", -STEP, `start ${STEP} s earlier`, "◂"),
        el("span", { class: "time start" }, clock(segment.start, true)),
        nudge("start", STEP, `start ${STEP} s later`, "▸"),
        el("span", { class: "muted" }, "→"),
        nudge("end", -STEP, `end ${STEP} s earlier`, "◂"),
        el("span", { class: "time end" }, clock(segment.end, true)),
        nudge("end", STEP, `end ${STEP} s later`, "▸"),
        el(
          "button",
          { type: "button", class: "ghost play", "aria-label": `Play segment ${n}`, onclick: () => this.play(index) },
          "▶",
        ),
        speaker,
      ),
      area,
      el("p", { class: "editor-compare" }, this.compareText(index)),
    );
    this.markChanged(row, index);
    return row;
  }

  render() {
    const focus = this.focus || this.currentFocus();
    this.renderSpeakers();
    this.matchCompare();
    this.list.replaceChildren(...this.state.segments.map((s, i) => this.row(s, i)));
    this.focus = null;
    if (focus) this.restoreFocus(focus);
    this.updateStatus();
  }

  currentFocus() {
    const active = document.activeElement;
    const index = this.indexOf(active);
    if (index === null || !this.list.contains(active)) return null;
    return { index, caret: active.matches("textarea") ? active.selectionStart : null };
  }

  restoreFocus({ index, caret }) {
    const rows = this.list.children;
    if (!rows.length) return;
    const row = rows[Math.max(0, Math.min(index, rows.length - 1))];
    const area = row.querySelector("textarea");
    area.focus();
    if (caret !== null && caret !== undefined) area.setSelectionRange(caret, caret);
  }

  updateStatus(message) {
    const dirty = this.dirty();
    this.saveButton.disabled = !dirty || this.saving;
    this.undoButton.disabled = this.undoStack.length === 0;
    this.redoButton.disabled = this.redoStack.length === 0;
    if (message !== undefined) this.status.textContent = message;
    else if (dirty) this.status.textContent = `Unsaved changes (editing revision ${this.revision})`;
    else if (!this.status.textContent.startsWith("Saved")) this.status.textContent = `Revision ${this.revision}`;
    this.root.dataset.dirty = String(dirty);
    this.root.dataset.revision = String(this.revision);
  }

  // ---- undo / redo ----------------------------------------------------------------------

  snapshot() {
    return { state: JSON.stringify(this.state), focus: this.currentFocus() };
  }

  /** Remember the state before a change (one undo step). */
  checkpoint() {
    this.typing = null;
    this.undoStack.push(this.snapshot());
    if (this.undoStack.length > UNDO_LIMIT) this.undoStack.shift();
    this.redoStack = [];
  }

  /** Typing in one field is one undo step until another action or a pause. */
  startTyping(key) {
    clearTimeout(this.typingTimer);
    if (this.typing !== key) {
      this.checkpoint();
      this.typing = key;
    }
    this.typingTimer = setTimeout(() => {
      this.typing = null;
    }, TYPING_PAUSE_MS);
  }

  travel(from, to, what) {
    const step = from.pop();
    if (!step) return this.updateStatus(`Nothing to ${what}`);
    to.push(this.snapshot());
    this.typing = null;
    this.state = JSON.parse(step.state);
    this.focus = step.focus;
    this.render();
    this.updateStatus(`${what === "undo" ? "Undone" : "Redone"}`);
  }

  undo() {
    this.travel(this.undoStack, this.redoStack, "undo");
  }

  redo() {
    this.travel(this.redoStack, this.undoStack, "redo");
  }

  // ---- edits ----------------------------------------------------------------------------

  split(index, from, to) {
    const segment = this.state.segments[index];
    const text = segment.text;
    const before = text.slice(0, from).trimEnd();
    const after = text.slice(to).trimStart();
    if (!before || !after) return this.updateStatus("Put the caret inside the text to split it");
    this.checkpoint();
    const at = round(segment.start + ((segment.end - segment.start) * from) / Math.max(1, text.length));
    const next = { id: segment.id, start: at, end: segment.end, text: after, speaker: segment.speaker };
    segment.text = before;
    segment.end = at;
    this.state.segments.splice(index + 1, 0, next);
    this.focus = { index: index + 1, caret: 0 };
    this.render();
    this.updateStatus(`Split segment ${index + 1} at ${clock(at, true)}`);
  }

  merge(index) {
    if (index <= 0 || index >= this.state.segments.length) return;
    this.checkpoint();
    const [segment] = this.state.segments.splice(index, 1);
    const previous = this.state.segments[index - 1];
    const caret = previous.text.length + (previous.text && segment.text ? 1 : 0);
    previous.text = [previous.text, segment.text].filter(Boolean).join(" ");
    previous.end = Math.max(previous.end, segment.end);
    this.focus = { index: index - 1, caret };
    this.render();
    this.updateStatus(`Merged segments ${index} and ${index + 1}`);
  }

  nudge(index, edge, delta) {
    const segments = this.state.segments;
    const segment = segments[index];
    let value;
    if (edge === "start") {
      const low = index > 0 ? segments[index - 1].start : 0;
      const high = Math.min(segment.end, index + 1 < segments.length ? segments[index + 1].start : Infinity);
      value = round(Math.max(low, Math.min(high, segment.start + delta)));
    } else {
      const high = this.duration > 0 ? this.duration : Infinity;
      value = round(Math.max(segment.start, Math.min(high, segment.end + delta)));
    }
    if (value === segment[edge]) return this.updateStatus(`The ${edge} cannot move further that way`);
    const focus = this.currentFocus() || { index, caret: null };
    this.checkpoint();
    segment[edge] = value;
    this.focus = focus;
    this.render();
    this.updateStatus(`Segment ${index + 1}: ${edge} ${clock(value, true)}`);
  }

  play(index) {
    const segment = this.state.segments[index];
    if (!this.audio.src) {
      this.updateStatus("No audio: the history does not keep it. Choose the original file to play segments.");
      return;
    }
    this.audio.currentTime = segment.start;
    this.stopAt = segment.end;
    this.audio.play().catch(() => {});
  }

  onKey(event) {
    const mod = event.ctrlKey || event.metaKey;
    const key = event.key.length === 1 ? event.key.toLowerCase() : event.key;
    const index = this.indexOf(event.target);
    const area = event.target.matches && event.target.matches("textarea") ? event.target : null;
    if (mod && !event.altKey && (key === "z" || key === "y")) {
      event.preventDefault();
      if (key === "y" || event.shiftKey) this.redo();
      else this.undo();
    } else if (mod && key === "s") {
      event.preventDefault();
      this.save();
    } else if (index === null) {
      return;
    } else if (mod && key === "Enter") {
      event.preventDefault();
      this.play(index);
    } else if (event.altKey && !mod && (key === "ArrowLeft" || key === "ArrowRight")) {
      event.preventDefault();
      this.nudge(index, event.shiftKey ? "end" : "start", key === "ArrowLeft" ? -STEP : STEP);
    } else if (area && key === "Enter" && !mod && !event.shiftKey && !event.altKey) {
      event.preventDefault();
      this.split(index, area.selectionStart, area.selectionEnd);
    } else if (area && key === "Backspace" && !mod && !event.altKey && area.selectionEnd === 0 && index > 0) {
      event.preventDefault();
      this.merge(index);
    } else if (
      area &&
      key === "Delete" &&
      !mod &&
      !event.altKey &&
      area.selectionStart === area.value.length &&
      index + 1 < this.state.segments.length
    ) {
      event.preventDefault();
      const caret = area.value.length;
      this.merge(index + 1);
      this.restoreFocus({ index, caret });
    }
  }

  // ---- saving, revisions ----------------------------------------------------------------

  body() {
    return {
      base_revision: this.revision,
      segments: this.state.segments.map((s) => ({
        id: s.id,
        start: s.start,
        end: s.end,
        text: s.text,
        ...(s.speaker ? { speaker: s.speaker } : {}),
      })),
      speakers: this.state.speakers,
    };
  }

  async save() {
    if (this.saving) return;
    if (!this.dirty()) return this.updateStatus(`No changes to save (revision ${this.revision})`);
    this.saving = true;
    this.updateStatus("Saving…");
    try {
      const response = await fetch(`/api/history/${this.id}`, {
        method: "PATCH",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(this.body()),
      });
      if (response.status === 409) {
        const data = await response.json();
        this.conflict(data.error.current_revision);
        return;
      }
      if (!response.ok) {
        this.updateStatus(`Not saved: ${await errorMessage(response)}`);
        return;
      }
      this.accept(await response.json(), `Saved as revision`);
    } catch (error) {
      this.updateStatus(`Not saved: ${error.message}`);
    } finally {
      this.saving = false;
      this.updateStatus(this.status.textContent);
    }
  }

  /** The server's entry becomes the editor's state (after a save or a restore). */
  accept(entry, what) {
    const focus = this.currentFocus();
    this.load(entry);
    this.conflictBox.hidden = true;
    this.focus = focus;
    this.render();
    this.updateStatus(`${what} ${this.revision}`);
    this.loadRevisions(this.compare ? this.compare.revision : 0).catch(() => {});
    this.onSaved(entry);
  }

  conflict(current) {
    this.conflictBox.replaceChildren(
      el(
        "p",
        {},
        `This transcript was changed elsewhere (another tab or window) and is now at revision ${current}. ` +
          "Your edits are still here, not saved.",
      ),
      el(
        "div",
        { class: "actions" },
        el(
          "button",
          { type: "button", onclick: () => this.reload().catch((error) => this.updateStatus(error.message)) },
          `Load revision ${current} (drop my edits)`,
        ),
        el(
          "button",
          {
            type: "button",
            class: "ghost",
            onclick: () => {
              this.revision = current;
              this.conflictBox.hidden = true;
              this.save();
            },
          },
          "Save mine as a newer revision",
        ),
      ),
    );
    this.conflictBox.hidden = false;
    this.updateStatus(`Not saved: revision ${current} was saved elsewhere`);
  }

  async reload() {
    const response = await fetch(`/api/history/${this.id}`, { credentials: "same-origin" });
    if (!response.ok) return this.updateStatus(await errorMessage(response));
    this.undoStack = [];
    this.redoStack = [];
    this.accept(await response.json(), "Loaded revision");
  }

  async loadRevisions(selected) {
    const response = await fetch(`/api/history/${this.id}/revisions`, { credentials: "same-origin" });
    if (!response.ok) return;
    const { revisions } = await response.json();
    this.revisionSelect.replaceChildren(
      ...revisions.map((r) =>
        el(
          "option",
          { value: String(r.revision), selected: r.revision === selected },
          `${r.revision === 0 ? "Original" : `Revision ${r.revision}`}${r.note && r.revision ? ` (${r.note})` : ""}` +
            ` · ${new Date(r.created * 1000).toLocaleString()}${r.latest ? " · latest" : ""}`,
        ),
      ),
    );
    await this.showRevision();
  }

  async showRevision() {
    const n = Number(this.revisionSelect.value || 0);
    const response = await fetch(`/api/history/${this.id}/revisions/${n}`, { credentials: "same-origin" });
    if (!response.ok) return;
    this.compare = await response.json();
    this.compareHead.textContent = n === 0 ? "Original" : `Revision ${n}`;
    this.restoreButton.disabled = n === this.revision;
    this.matchCompare();
    for (const row of this.list.children) {
      const index = Number(row.dataset.index);
      row.querySelector(".editor-compare").textContent = this.compareText(index);
      this.markChanged(row, index);
    }
  }

  async restore() {
    const n = Number(this.revisionSelect.value || 0);
    if (this.dirty() && !window.confirm("Drop your unsaved edits and restore this revision?")) return;
    const response = await fetch(`/api/history/${this.id}/revisions/${n}/restore`, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ base_revision: this.revision }),
    });
    if (response.status === 409) {
      this.conflict((await response.json()).error.current_revision);
      return;
    }
    if (!response.ok) return this.updateStatus(`Not restored: ${await errorMessage(response)}`);
    this.checkpoint();
    this.accept(await response.json(), `Restored ${n === 0 ? "the original" : `revision ${n}`} as revision`);
  }
}
