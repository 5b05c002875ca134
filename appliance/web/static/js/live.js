// Live panel: microphone -> AudioWorklet (16 kHz PCM) -> /ws/live; partial text (grey) that
// turns into final text per utterance. Protocol: docs/reference/live-protocol.md.
import { clock, el } from "./dom.js";

const $ = (id) => document.getElementById(id);

const MESSAGES = {
  insecure:
    "This page is not a secure context, so the browser will not give it the microphone.",
  denied: "The microphone was denied, so live transcription cannot start.",
  nodevice: "No microphone was found. Connect one (or enable it in the system settings) and press Start again.",
  busy: "The microphone is in use by another application or could not be opened.",
};

class LiveUI {
  constructor() {
    this.button = $("live-toggle");
    this.status = $("live-status");
    this.finals = $("live-finals");
    this.partial = $("live-partial");
    this.stable = this.partial.querySelector(".stable");
    this.unstable = this.partial.querySelector(".unstable");
    this.levelBar = $("live-level-bar");
    this.elapsed = $("live-elapsed");
    this.speaking = $("live-speaking");
    this.chunkSamples = Number(document.body.dataset.chunkSamples) || 3200;
    this.running = false;
    this.button.addEventListener("click", () => (this.running ? this.stop() : this.start()));
    if (!window.isSecureContext || !navigator.mediaDevices?.getUserMedia) this.showInsecure();
  }

  notice(kind, detail = "") {
    const box = $("live-notice");
    box.hidden = false;
    box.dataset.kind = kind;
    $("live-notice-text").textContent = `${MESSAGES[kind] || kind}${detail ? ` (${detail})` : ""}`;
    $("live-insecure-help").hidden = kind !== "insecure";
    $("live-denied-help").hidden = kind !== "denied";
  }

  clearNotice() {
    $("live-notice").hidden = true;
  }

  showInsecure() {
    const url = new URL(location.href);
    url.protocol = "https:";
    $("live-https-url").textContent = url.origin + "/";
    this.notice("insecure");
  }

  setStatus(text) {
    this.status.textContent = text;
  }

  setRunning(running) {
    this.running = running;
    this.button.textContent = running ? "Stop" : "Start";
    this.button.setAttribute("aria-pressed", String(running));
    this.button.classList.toggle("danger", running);
    for (const id of ["live-model", "live-language"]) $(id).disabled = running;
    if (!running) {
      this.levelBar.style.width = "0%";
      this.speaking.hidden = true;
      clearInterval(this.timer);
    }
  }

  async start() {
    if (!window.isSecureContext || !navigator.mediaDevices?.getUserMedia) {
      this.showInsecure();
      return;
    }
    this.clearNotice();
    this.button.disabled = true;
    this.setStatus("Opening the microphone…");
    try {
      this.stream = await navigator.mediaDevices.getUserMedia({
        audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: true },
      });
    } catch (error) {
      this.button.disabled = false;
      this.setStatus("");
      const kind = {
        NotAllowedError: "denied",
        SecurityError: "denied",
        NotFoundError: "nodevice",
        OverconstrainedError: "nodevice",
        NotReadableError: "busy",
        AbortError: "busy",
      }[error.name];
      this.notice(kind || "busy", error.message);
      return;
    }
    try {
      await this.openAudio();
      this.openSocket();
    } catch (error) {
      this.cleanupAudio();
      this.button.disabled = false;
      this.setStatus(`Could not start: ${error.message}`);
      return;
    }
    this.button.disabled = false;
    this.setRunning(true);
    this.startedAt = performance.now();
    this.timer = setInterval(() => {
      this.elapsed.textContent = clock((performance.now() - this.startedAt) / 1000);
    }, 250);
  }

  async openAudio() {
    this.context = new AudioContext();
    await this.context.audioWorklet.addModule(new URL("./pcm-worklet.js", import.meta.url));
    this.source = this.context.createMediaStreamSource(this.stream);
    this.node = new AudioWorkletNode(this.context, "pcm-capture", {
      processorOptions: { chunkSamples: this.chunkSamples },
    });
    // the worklet only runs while connected to the destination: through a muted gain
    this.mute = new GainNode(this.context, { gain: 0 });
    this.source.connect(this.node).connect(this.mute).connect(this.context.destination);
    this.pending = []; // frames captured before the server said "ready"
    this.node.port.onmessage = (event) => this.onAudio(event.data);
    if (this.context.state === "suspended") await this.context.resume();
  }

  onAudio(data) {
    if (data.level !== undefined) {
      const level = Math.min(1, Math.sqrt(data.level) * 1.8);
      this.levelBar.style.width = `${Math.round(level * 100)}%`;
      return;
    }
    if (this.flushed) return; // stop was sent: the rest is the silence of a closed microphone
    if (data.pcm.byteLength) {
      if (this.ready && this.socket?.readyState === WebSocket.OPEN) this.socket.send(data.pcm);
      else if (!this.ready) this.pending.push(data.pcm);
    }
    if (data.last && this.socket?.readyState === WebSocket.OPEN) {
      this.flushed = true;
      this.socket.send(JSON.stringify({ type: "stop" }));
    }
  }

  openSocket() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const socket = new WebSocket(`${scheme}//${location.host}/ws/live`);
    socket.binaryType = "arraybuffer";
    this.socket = socket;
    this.ready = false;
    this.flushed = false;
    this.lastError = null;
    socket.addEventListener("open", () => {
      socket.send(
        JSON.stringify({
          type: "start",
          model: $("live-model").value,
          language: $("live-language").value,
          task: "transcribe",
          sample_rate: 16000,
        }),
      );
      this.setStatus("Connecting…");
    });
    socket.addEventListener("message", (event) => {
      if (typeof event.data === "string") this.onMessage(JSON.parse(event.data));
    });
    socket.addEventListener("close", (event) => this.onClose(event));
  }

  onMessage(message) {
    switch (message.type) {
      case "ready":
        this.ready = true;
        for (const pcm of this.pending) this.socket.send(pcm);
        this.pending = [];
        this.setStatus(`Listening — ${message.model}`);
        break;
      case "vad":
        this.speaking.hidden = !message.speech;
        break;
      case "partial":
        this.partial.dataset.utterance = message.utterance;
        this.stable.textContent = message.stable;
        this.unstable.textContent = message.unstable;
        break;
      case "final":
        if (message.text) {
          this.finals.append(
            el(
              "p",
              { class: "final", dataset: { start: message.start, end: message.end } },
              el("span", { class: "time" }, clock(message.start)),
              " ",
              el("span", { class: "text" }, message.text),
            ),
          );
        }
        this.stable.textContent = "";
        this.unstable.textContent = "";
        this.finals.parentElement.scrollTop = this.finals.parentElement.scrollHeight;
        break;
      case "lag":
        this.setStatus(`The appliance is ${message.seconds} s behind — showing final text only`);
        break;
      case "error":
        this.lastError = message.message;
        this.setStatus(message.message);
        break;
      case "end":
        this.ended = message;
        this.setStatus(message.history_id ? "Saved to history" : "Nothing was transcribed");
        if (message.history_id) document.dispatchEvent(new CustomEvent("history-changed"));
        break;
      default:
        break;
    }
  }

  onClose(event) {
    const wasRunning = this.running;
    this.cleanupAudio();
    this.setRunning(false);
    this.ready = false;
    if (event.code !== 1000) {
      const why = this.lastError || event.reason || `connection closed (${event.code})`;
      this.setStatus(`Live session ended: ${why}`);
    } else if (!this.ended && wasRunning) {
      this.setStatus("Live session ended");
    }
    this.ended = null;
  }

  stop() {
    this.setStatus("Finishing…");
    this.button.disabled = true;
    const socket = this.socket;
    // the worklet sends what it still holds, then "last" makes us send stop
    if (this.node) this.node.port.postMessage("flush");
    else if (socket?.readyState === WebSocket.OPEN) socket.send(JSON.stringify({ type: "stop" }));
    this.stopMicrophone();
    setTimeout(() => {
      this.button.disabled = false;
      if (socket && socket.readyState === WebSocket.OPEN && this.running) socket.close(1000);
    }, 30000);
    socket?.addEventListener("close", () => {
      this.button.disabled = false;
    });
  }

  stopMicrophone() {
    for (const track of this.stream?.getTracks() || []) track.stop();
  }

  cleanupAudio() {
    this.stopMicrophone();
    this.stream = null;
    if (this.context && this.context.state !== "closed") this.context.close().catch(() => {});
    this.context = null;
    this.node = null;
  }
}

export function initLive() {
  return new LiveUI();
}
