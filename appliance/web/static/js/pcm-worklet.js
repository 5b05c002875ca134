// AudioWorklet: microphone samples (44.1/48 kHz, any channel count) -> 16 kHz mono s16le
// frames of `chunkSamples`, posted to the page as transferable ArrayBuffers, plus the input
// level for the meter. Resampling: a windowed-sinc low-pass below 8 kHz at the input rate,
// then linear interpolation at the 16 kHz output instants.
const TARGET_RATE = 16000;

function lowPass(ratio, taps) {
  const cutoff = 0.45 / ratio; // of the input rate: 7.2 kHz, under the 8 kHz Nyquist of 16 kHz
  const h = new Float32Array(taps);
  const mid = (taps - 1) / 2;
  let sum = 0;
  for (let i = 0; i < taps; i++) {
    const x = i - mid;
    const sinc = x === 0 ? 2 * cutoff : Math.sin(2 * Math.PI * cutoff * x) / (Math.PI * x);
    const window = 0.42 - 0.5 * Math.cos((2 * Math.PI * i) / (taps - 1)) + 0.08 * Math.cos((4 * Math.PI * i) / (taps - 1));
    h[i] = sinc * window;
    sum += h[i];
  }
  for (let i = 0; i < taps; i++) h[i] /= sum;
  return h;
}

class PcmCapture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = options.processorOptions || {};
    this.chunkSamples = opts.chunkSamples || 3200;
    this.ratio = sampleRate / TARGET_RATE;
    this.taps = this.ratio > 1 ? lowPass(this.ratio, 47) : new Float32Array([1]);
    this.history = new Float32Array(this.taps.length);
    this.historyPos = 0;
    this.previous = 0; // last filtered input sample
    this.inputIndex = -1; // index of `previous`
    this.nextOut = 0; // next output instant, in input samples
    this.frame = new Int16Array(this.chunkSamples);
    this.fill = 0;
    this.levelSum = 0;
    this.levelCount = 0;
    this.port.onmessage = (event) => {
      if (event.data === "flush") this.flush(true);
    };
  }

  filter(x) {
    const n = this.taps.length;
    this.history[this.historyPos] = x;
    let acc = 0;
    let j = this.historyPos;
    for (let i = 0; i < n; i++) {
      acc += this.taps[i] * this.history[j];
      j = j === 0 ? n - 1 : j - 1;
    }
    this.historyPos = (this.historyPos + 1) % n;
    return acc;
  }

  emit(value) {
    const clamped = Math.max(-1, Math.min(1, value));
    this.frame[this.fill++] = clamped < 0 ? clamped * 0x8000 : clamped * 0x7fff;
    if (this.fill === this.chunkSamples) this.flush(false);
  }

  flush(last) {
    const pcm = this.frame.slice(0, this.fill).buffer;
    this.fill = 0;
    this.port.postMessage({ pcm, last }, [pcm]);
  }

  process(inputs) {
    const input = inputs[0];
    if (!input || input.length === 0) return true;
    const channels = input.length;
    const length = input[0].length;
    for (let k = 0; k < length; k++) {
      let x = 0;
      for (let c = 0; c < channels; c++) x += input[c][k];
      x /= channels;
      this.levelSum += x * x;
      this.levelCount++;
      const y = this.filter(x);
      this.inputIndex++;
      while (this.nextOut <= this.inputIndex) {
        const t = this.nextOut - (this.inputIndex - 1); // 0..1 between previous and y
        this.emit(this.previous + (y - this.previous) * t);
        this.nextOut += this.ratio;
      }
      this.previous = y;
    }
    if (this.levelCount >= sampleRate / 20) {
      this.port.postMessage({ level: Math.sqrt(this.levelSum / this.levelCount) });
      this.levelSum = 0;
      this.levelCount = 0;
    }
    return true;
  }
}

registerProcessor("pcm-capture", PcmCapture);
