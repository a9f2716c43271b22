// voxlog voice widget: embed with
//   <div id="voxlog-widget" data-key="YOUR-WIDGET-KEY"></div>
//   <script src="https://YOUR-VOXLOG/widget/voxlog-widget.js"></script>
//   <script>VoxlogWidget.mount(document.getElementById("voxlog-widget"))</script>
// It captures the microphone (getUserMedia + AudioWorklet), streams 16 kHz 16-bit PCM in 20 ms
// frames over a WebSocket to /widget/ws, plays the agent's audio as it arrives and shows the live
// transcript. Protocol: text frames are JSON control messages, binary frames are PCM audio; a mark
// is sent back when playback reaches it (streams/channels/widget_protocol.py).
(function () {
  "use strict";
  const RATE = 16000;
  // Where this script came from: read now, while it runs; when mount() is called from an inline
  // <script>, document.currentScript is that script, which has no src.
  const SCRIPT_ORIGIN = document.currentScript && document.currentScript.src ? new URL(document.currentScript.src).origin : null;

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text) node.textContent = text;
    return node;
  }

  function mount(root, options) {
    options = options || {};
    const base = options.base || SCRIPT_ORIGIN || location.origin;
    const key = options.key || root.dataset.key;
    const controls = el("div", "vx-controls");
    const button = el("button", "vx-start", "Start call");
    const status = el("span", "vx-status", "ready");
    const transcript = el("div", "vx-transcript");
    transcript.setAttribute("aria-live", "polite");
    controls.append(button, status);
    root.append(controls, transcript);

    let socket = null, context = null, stream = null, playHead = 0, sources = [], marks = [], interim = null;

    function say(speaker, text, final) {
      if (interim && interim.dataset.speaker === speaker) { interim.remove(); interim = null; }
      const line = el("div", "vx-line vx-" + speaker + (final ? "" : " vx-interim"), (speaker === "agent" ? "Agent: " : "You: ") + text);
      line.dataset.speaker = speaker;
      transcript.append(line);
      if (!final) interim = line;
    }

    function play(buffer) {
      const samples = new Int16Array(buffer);
      const audio = context.createBuffer(1, samples.length, RATE);
      const channel = audio.getChannelData(0);
      for (let i = 0; i < samples.length; i++) channel[i] = samples[i] / 32768;
      const source = context.createBufferSource();
      source.buffer = audio;
      source.connect(context.destination);
      playHead = Math.max(playHead, context.currentTime + 0.05);
      source.start(playHead);
      playHead += audio.duration;
      sources.push(source);
      source.onended = () => { sources = sources.filter((s) => s !== source); };
    }

    function acknowledge(name) {
      if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify({ type: "mark", name: name }));
    }

    // A mark is answered once the audio queued before it has played.
    function mark(name) {
      const entry = { name: name };
      entry.timer = setTimeout(() => { marks = marks.filter((m) => m !== entry); acknowledge(name); },
        Math.max(0, playHead - context.currentTime) * 1000);
      marks.push(entry);
    }

    function clearPlayback() {
      sources.forEach((s) => { try { s.stop(); } catch (e) { /* already stopped */ } });
      sources = [];
      playHead = context ? context.currentTime : 0;
      // The audio before these marks will never play: they are answered now.
      marks.forEach((m) => { clearTimeout(m.timer); acknowledge(m.name); });
      marks = [];
    }

    async function start() {
      button.disabled = true;
      status.textContent = "connecting…";
      context = new AudioContext({ sampleRate: RATE });
      stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true } });
      await context.audioWorklet.addModule(base + "/widget/capture-worklet.js");
      const input = context.createMediaStreamSource(stream);
      const capture = new AudioWorkletNode(context, "voxlog-capture", { processorOptions: { targetRate: RATE } });
      input.connect(capture);
      const wsUrl = base.replace(/^http/, "ws") + "/widget/ws";
      socket = new WebSocket(wsUrl);
      socket.binaryType = "arraybuffer";
      socket.onopen = () => socket.send(JSON.stringify({ type: "start", key: key, page: location.href }));
      socket.onmessage = (message) => {
        if (typeof message.data !== "string") { play(message.data); return; }
        const msg = JSON.parse(message.data);
        if (msg.type === "started") { status.textContent = "connected"; root.dataset.callId = msg.call_id; }
        else if (msg.type === "transcript") say(msg.speaker, msg.text, msg.final);
        else if (msg.type === "clear") clearPlayback();
        else if (msg.type === "mark") mark(msg.name);
        else if (msg.type === "end") { status.textContent = "call ended (" + msg.reason + ")"; stop(); }
        else if (msg.type === "error") { status.textContent = "error: " + msg.message; }
        else if (msg.type === "busy") { status.textContent = "all lines are busy, please try again shortly"; stop(); }
      };
      socket.onclose = () => { if (status.textContent === "connected") status.textContent = "disconnected"; stop(); };
      capture.port.onmessage = (event) => { if (socket && socket.readyState === WebSocket.OPEN) socket.send(event.data); };
    }

    function stop() {
      if (stream) stream.getTracks().forEach((t) => t.stop());
      if (socket && socket.readyState === WebSocket.OPEN) socket.close();
      stream = null;
      button.disabled = false;
    }

    button.addEventListener("click", () => start().catch((err) => { status.textContent = "error: " + err.message; button.disabled = false; }));
    return { start: start, stop: stop };
  }

  window.VoxlogWidget = { mount: mount };
})();
