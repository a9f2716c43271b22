// Captures microphone audio in the audio thread, resamples to 16 kHz if the context runs at another
// rate, and posts 20 ms frames of 16-bit little-endian PCM (640 bytes) to the main thread.
class VoxlogCapture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.target = (options.processorOptions && options.processorOptions.targetRate) || 16000;
    this.step = sampleRate / this.target;
    this.position = 0;
    this.frame = new Int16Array(this.target / 50);
    this.filled = 0;
  }

  process(inputs) {
    const input = inputs[0] && inputs[0][0];
    if (!input) return true;
    for (; this.position < input.length; this.position += this.step) {
      const s = Math.max(-1, Math.min(1, input[Math.floor(this.position)]));
      this.frame[this.filled++] = s < 0 ? s * 0x8000 : s * 0x7fff;
      if (this.filled === this.frame.length) {
        this.port.postMessage(this.frame.buffer.slice(0));
        this.filled = 0;
      }
    }
    this.position -= input.length;
    return true;
  }
}

registerProcessor("voxlog-capture", VoxlogCapture);
