// The MuseTalk page: pick or prepare an avatar, speak (a file or the microphone), watch it
// while it is generated. Fragmented MP4 from POST /onnx-infer?stream=true or WebSocket
// /ws/live is played with Media Source Extensions. No build step, nothing from other hosts.

const $ = (id) => document.getElementById(id);
const video = $("video");

// What the page did, for people (the stats) and for the browser tests (window.musetalk).
const state = (window.musetalk = { runs: 0 });

function resetRun(kind) {
  Object.assign(state, {
    kind, runs: state.runs + 1, started: performance.now(), firstFrameAt: null, playingAt: null,
    doneAt: null, frames: null, error: null, bytes: 0, latency: null,
  });
  for (const id of ["ttff", "frames", "fps-out", "latency"]) $(id).textContent = "-";
  $("download").hidden = true;
  setStatus(kind === "live" ? "listening..." : "generating...");
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function seconds(ms) { return `${(ms / 1000).toFixed(2)} s`; }

// -- avatars -------------------------------------------------------------------------------
async function loadAvatars(select) {
  const answer = await (await fetch("/avatars")).json();
  const list = $("avatar");
  list.replaceChildren(...answer.avatars.filter((a) => (a.status ?? "ready") === "ready").map((a) => {
    const option = new Option(`${a.id} (${a.width}x${a.height}, ${a.frames} frame${a.frames === 1 ? "" : "s"})`, a.id);
    option.dataset.width = a.width;
    return option;
  }));
  list.value = select ?? answer.default;
  if (!list.value && list.options.length) list.selectedIndex = 0;
}

async function showInfo() {
  const info = await (await fetch("/info")).json();
  $("synthetic").hidden = info.synthetic_weights !== true;
}

$("prepare").addEventListener("submit", async (event) => {
  event.preventDefault();
  const id = $("new-id").value, status = $("prepare-status"), bar = $("prepare-progress");
  const form = new FormData();
  form.append("avatar_id", id);
  form.append("file", $("new-file").files[0]);
  status.textContent = "uploading...";
  status.classList.remove("error");
  bar.hidden = false;
  bar.removeAttribute("value");
  try {
    let answer = await fetch("/avatars", { method: "POST", body: form });
    let body = await answer.json();
    while (answer.status === 202 || body.status === "preparing") { // a job: follow its progress
      if (body.frames_total) { bar.max = body.frames_total; bar.value = body.frames_done ?? 0; }
      status.textContent = `preparing: ${body.frames_done ?? 0} of ${body.frames_total ?? "?"} frames`;
      await new Promise((resolve) => setTimeout(resolve, 500));
      answer = await fetch(`/avatars/${encodeURIComponent(id)}`);
      body = await answer.json();
    }
    if (!answer.ok || body.status === "failed") throw new Error(body.error ?? body.reason ?? answer.statusText);
    status.textContent = `avatar "${id}" is ready` + (body.faceless_frames ? ` (${body.faceless_frames} frames without a face are shown as they are)` : "");
    await loadAvatars(id);
  } catch (error) {
    status.textContent = `could not prepare the avatar: ${error.message}`;
    status.classList.add("error");
  } finally {
    bar.hidden = true;
  }
});

// -- playing fragmented MP4 ------------------------------------------------------------------
// Splits the byte stream into top-level boxes: media boxes go to the SourceBuffer, the
// `free` box starting "musetalk:" is the stream's trailer (its final status).
class Mp4Player {
  constructor(onTrailer) {
    this.tail = Promise.resolve(); // pushes run one after the other, in arrival order
    this.pending = new Uint8Array(0);
    this.queue = [];
    this.chunks = [];
    this.onTrailer = onTrailer;
    this.source = new MediaSource();
    this.ready = new Promise((resolve) => this.source.addEventListener("sourceopen", resolve, { once: true }));
    video.src = URL.createObjectURL(this.source);
  }

  push(bytes) {
    this.tail = this.tail.then(() => this.split(bytes));
    return this.tail;
  }

  async split(bytes) {
    this.chunks.push(bytes);
    state.bytes += bytes.length;
    const data = new Uint8Array(this.pending.length + bytes.length);
    data.set(this.pending);
    data.set(bytes, this.pending.length);
    let offset = 0;
    while (data.length - offset >= 8) {
      const view = new DataView(data.buffer, data.byteOffset + offset);
      const size = view.getUint32(0);
      const type = String.fromCharCode(...data.subarray(offset + 4, offset + 8));
      if (size < 8 || data.length - offset < size) break;
      const box = data.subarray(offset, offset + size);
      offset += size;
      const text = type === "free" ? new TextDecoder().decode(box.subarray(8)) : "";
      if (text.startsWith("musetalk:")) this.onTrailer(JSON.parse(text.slice(9)));
      else await this.append(box, type);
    }
    this.pending = data.slice(offset);
  }

  async append(box, type) {
    if (!this.buffer) {
      if (type !== "ftyp" && type !== "moov") return;
      this.head = [...(this.head ?? []), box];
      if (type !== "moov") return;
      await this.ready;
      this.buffer = this.source.addSourceBuffer(`video/mp4; codecs="${codecsOf(box)}, mp4a.40.2"`);
      this.buffer.mode = "segments";
      this.buffer.addEventListener("updateend", () => this.drain());
      for (const part of this.head) this.queue.push(part);
    } else {
      this.queue.push(box);
      if (type === "moof" && state.firstFrameAt === null) {
        state.firstFrameAt = performance.now();
        $("ttff").textContent = seconds(state.firstFrameAt - state.started);
      }
    }
    this.drain();
  }

  drain() {
    if (!this.buffer || this.buffer.updating || !this.queue.length) return;
    this.buffer.appendBuffer(this.queue.shift());
    if (video.paused && state.firstFrameAt !== null) video.play().catch(() => { video.muted = true; video.play(); });
  }

  async end() {
    await this.tail;
    while (this.queue.length || this.buffer?.updating) await new Promise((resolve) => setTimeout(resolve, 20));
    if (this.source.readyState === "open") this.source.endOfStream();
    const link = $("download");
    link.href = URL.createObjectURL(new Blob(this.chunks, { type: "video/mp4" }));
    link.hidden = false;
  }
}

// avc1.PPCCLL from the avcC box inside the init segment's moov.
function codecsOf(moov) {
  for (let i = 4; i + 8 < moov.length; i++) {
    if (moov[i] === 0x61 && moov[i + 1] === 0x76 && moov[i + 2] === 0x63 && moov[i + 3] === 0x43) { // "avcC"
      return "avc1." + [moov[i + 5], moov[i + 6], moov[i + 7]].map((b) => b.toString(16).padStart(2, "0")).join("");
    }
  }
  return "avc1.64001f";
}

video.addEventListener("playing", () => { if (state.playingAt === null) state.playingAt = performance.now(); });

function finish(status) {
  state.doneAt = performance.now();
  state.frames = status.frames;
  $("frames").textContent = String(status.frames);
  const elapsed = (state.doneAt - state.started) / 1000;
  $("fps-out").textContent = (status.frames / elapsed).toFixed(1);
  if (status.status === "error" || status.type === "error") {
    state.error = status.error;
    setStatus(`stopped: ${status.error}`, true);
  } else {
    setStatus(`done: ${status.frames} frames in ${elapsed.toFixed(2)} s`);
  }
}

// -- speech from a file: POST /onnx-infer with stream=true -------------------------------------
$("upload").addEventListener("submit", async (event) => {
  event.preventDefault();
  resetRun("file");
  const form = new FormData();
  form.append("audio_file", $("audio-file").files[0]);
  form.append("avatar_id", $("avatar").value);
  form.append("fps", $("fps").value);
  form.append("stream", "true");
  let trailer = null;
  const player = new Mp4Player((status) => { trailer = status; });
  try {
    const answer = await fetch("/onnx-infer", { method: "POST", body: form });
    if (!answer.ok) throw new Error((await answer.json()).error ?? answer.statusText);
    const reader = answer.body.getReader();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      await player.push(value);
      $("frames").textContent = `${Math.round(state.bytes / 1024)} kB so far`;
    }
    await player.end();
    finish(trailer ?? { status: "error", error: "the stream was cut short", frames: 0 });
  } catch (error) {
    finish({ status: "error", error: error.message, frames: 0 });
  }
});

// -- speech from the microphone: WebSocket /ws/live ---------------------------------------------
let live = null;

$("mic-button").addEventListener("click", async () => {
  resetRun("live");
  const context = new AudioContext({ sampleRate: 16000 });
  try {
    const microphone = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1, echoCancellation: true } });
    await context.audioWorklet.addModule("/static/pcm-worklet.js");
    const capture = new AudioWorkletNode(context, "pcm-capture");
    const params = new URLSearchParams({ avatar_id: $("avatar").value, fps: $("fps").value, sample_rate: String(context.sampleRate) });
    const socket = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws/live?${params}`);
    socket.binaryType = "arraybuffer";
    const player = new Mp4Player(() => {});
    video.muted = true; // the speaker hears themself otherwise
    let samples = [];
    capture.port.onmessage = ({ data }) => { // 128-sample frames; send about every 40 ms
      samples.push(data);
      if (samples.length * 128 < context.sampleRate * 0.04 || socket.readyState !== WebSocket.OPEN) return;
      const pcm = new Int16Array(samples.reduce((n, s) => n + s.length, 0));
      let k = 0;
      for (const block of samples) for (const x of block) pcm[k++] = Math.max(-1, Math.min(1, x)) * 32767;
      samples = [];
      socket.send(pcm.buffer);
    };
    socket.onmessage = async ({ data }) => {
      if (typeof data !== "string") return player.push(new Uint8Array(data));
      const message = JSON.parse(data);
      if (message.type === "progress") {
        state.latency = message.latency_ms;
        $("frames").textContent = String(message.frames);
        $("latency").textContent = message.latency_ms.p50 === undefined ? "-" :
          `p50 ${message.latency_ms.p50} ms, p95 ${message.latency_ms.p95} ms; lag ${message.lag_seconds} s`;
      } else if (message.type === "done" || message.type === "error") {
        await player.end();
        finish(message);
      }
    };
    socket.onclose = () => stopMicrophone();
    context.createMediaStreamSource(microphone).connect(capture);
    live = { context, microphone, socket };
    $("mic-button").disabled = true;
    $("stop-button").disabled = false;
  } catch (error) {
    context.close();
    finish({ status: "error", error: error.message, frames: 0 });
  }
});

function stopMicrophone() {
  if (!live) return;
  live.microphone.getTracks().forEach((track) => track.stop());
  live.context.close();
  if (live.socket.readyState === WebSocket.OPEN) live.socket.send(JSON.stringify({ type: "end" }));
  live = null;
  $("mic-button").disabled = false;
  $("stop-button").disabled = true;
  setStatus("finishing the last frames...");
}

$("stop-button").addEventListener("click", stopMicrophone);

await Promise.all([loadAvatars(), showInfo()]);
