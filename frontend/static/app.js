// The MuseTalk page: a conversational session, watched over WebRTC (WHEP). The avatar is on
// screen, idle, as soon as the page opens; a file or the microphone is spoken into the session
// through its speech socket; Interrupt cuts the speech. No build step, nothing from other hosts.
// A service with API keys needs one: typed in, or given as #key=... in the address (kept in this
// tab only, and never sent but as a header). The session's viewer and speaker tokens carry the rest.

const $ = (id) => document.getElementById(id);
const video = $("video");
const RATE = 16000; // the PCM the page sends
// ?ice=relay: media through the session's TURN relay only (checks a TURN setup from any network).
const ICE_POLICY = new URLSearchParams(location.search).get("ice") === "relay" ? "relay" : "all";

// What the page sees, for people (the stats) and for the browser tests (window.musetalk).
const state = (window.musetalk = {
  session: null, state: "connecting", presented: 0, fps: null, latencies: [], segmentsSent: 0,
  error: null, events: [],
});

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
  if (isError) state.error = text;
}

// -- the API key ------------------------------------------------------------------------------
let apiKey = sessionStorage.getItem("musetalk-key");
const fromAddress = new URLSearchParams(location.hash.slice(1)).get("key");
if (fromAddress) {
  apiKey = fromAddress;
  sessionStorage.setItem("musetalk-key", apiKey);
  history.replaceState(null, "", location.pathname + location.search); // not in the address bar any more
}
const bearer = (credential) => (credential ? { Authorization: `Bearer ${credential}` } : {});
const withKey = (init = {}) => ({ ...init, headers: { ...(init.headers ?? {}), ...bearer(apiKey) } });

$("key-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  apiKey = $("api-key").value.trim();
  sessionStorage.setItem("musetalk-key", apiKey);
  $("key-form").hidden = true;
  await start();
});

async function json(answer) {
  const body = await answer.json().catch(() => ({}));
  if (!answer.ok) throw new Error(body.error ?? answer.statusText);
  return body;
}

// -- the session and its video ----------------------------------------------------------------
let pc = null, viewer = null, speech = null;

async function openSession() {
  await closeSession();
  state.state = "connecting";
  $("state").textContent = "connecting...";
  const session = await json(await fetch("/sessions", withKey({
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ avatar_id: $("avatar").value || null, fps: Number($("fps").value) }),
  })));
  state.session = session;
  pc = new RTCPeerConnection({ iceServers: session.ice_servers, iceTransportPolicy: ICE_POLICY });
  state.pc = pc; // for the stats of the connection (which candidates carry it)
  pc.addTransceiver("video", { direction: "recvonly" });
  pc.addTransceiver("audio", { direction: "recvonly" });
  const stream = new MediaStream();
  pc.ontrack = ({ track }) => { stream.addTrack(track); video.srcObject = stream; };
  await pc.setLocalDescription(await pc.createOffer());
  await gathered(pc); // WHEP without trickle: every candidate goes in the offer
  const answer = await fetch(session.whep, { // a viewer needs no more than the session's viewer token
    method: "POST", headers: { "Content-Type": "application/sdp", ...bearer(session.viewer_token) },
    body: pc.localDescription.sdp,
  });
  if (answer.status !== 201) throw new Error((await answer.json()).error ?? answer.statusText);
  viewer = answer.headers.get("Location");
  await pc.setRemoteDescription({ type: "answer", sdp: await answer.text() });
  video.play().catch(() => { video.muted = true; video.play(); });
  setState("idle");
  setStatus(`session ${session.id}: ${session.width}x${session.height} at ${session.fps} fps`);
}

function gathered(connection) {
  if (connection.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => connection.addEventListener("icegatheringstatechange", () => {
    if (connection.iceGatheringState === "complete") resolve();
  }));
}

async function closeSession() {
  speech?.close();
  speech = null;
  pc?.close();
  pc = null;
  if (state.session) fetch(`/sessions/${state.session.id}`, withKey({ method: "DELETE", keepalive: true }));
  state.session = null;
}

function setState(value) {
  state.state = value;
  $("state").textContent = value;
}

// Frames shown, frames/s, and the first frame of each segment (its speech-start latency).
let waitingForFirstFrame = null; // {sentAt} of a segment whose speech_started has come
const shown = [];
function onFrame(now, metadata) {
  state.presented = metadata.presentedFrames;
  shown.push(now);
  while (shown.length && now - shown[0] > 1000) shown.shift();
  state.fps = shown.length;
  $("frames").textContent = String(metadata.presentedFrames);
  $("fps-shown").textContent = String(shown.length);
  if (waitingForFirstFrame) {
    const latency = metadata.presentationTime - waitingForFirstFrame.sentAt;
    waitingForFirstFrame = null;
    state.latencies.push(latency);
    const sorted = [...state.latencies].sort((a, b) => a - b);
    $("latency").textContent = `${latency.toFixed(0)} ms (median ${sorted[Math.floor(sorted.length / 2)].toFixed(0)} ms ` +
      `over ${sorted.length})`;
  }
  video.requestVideoFrameCallback(onFrame);
}
video.requestVideoFrameCallback(onFrame);

$("sound-button").addEventListener("click", () => { video.muted = false; video.play(); });

// -- speaking into the session ------------------------------------------------------------------
const segments = new Map(); // segment number (the server's) -> when its first audio was sent
let sendingSince = null; // when the current segment's first PCM was sent

function speechSocket() {
  if (speech && speech.readyState <= WebSocket.OPEN) return Promise.resolve(speech);
  // A browser cannot set headers on a WebSocket: the session's speaker token goes in the query.
  const token = state.session.speaker_token ? `&token=${encodeURIComponent(state.session.speaker_token)}` : "";
  const socket = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}` +
    `${state.session.speech}?sample_rate=${RATE}${token}`);
  socket.binaryType = "arraybuffer";
  socket.onmessage = ({ data }) => onEvent(JSON.parse(data));
  socket.onclose = ({ code, reason }) => { if (code >= 4000) setStatus(`speech refused: ${reason}`, true); };
  speech = socket;
  return new Promise((resolve, reject) => {
    socket.onopen = () => resolve(socket);
    socket.onerror = () => reject(new Error("the speech socket did not open"));
  });
}

function onEvent(event) {
  state.events.push(event);
  if (event.type === "speech_started") {
    setState("speaking");
    // The segments are numbered by the server in the order they were sent.
    waitingForFirstFrame = { sentAt: segments.get(event.segment) ?? performance.now() };
  } else if (event.type === "speech_finished") {
    setState("idle");
    setStatus(`segment ${event.segment}: ${event.played_seconds} s played` + (event.interrupted ? " (interrupted)" : ""));
  } else if (event.type === "progress") {
    $("behind").textContent = event.behind_seconds ? `${event.behind_seconds} s` : "-";
  } else if (event.type === "error") {
    setStatus(event.error, true);
  } else if (event.type === "going_away") { // the replica shuts down: a new session, on another one
    setStatus("the server is moving this session...");
    openSession().catch((e) => setStatus(e.message, true));
  }
}

function pcm16(samples) {
  const out = new Int16Array(samples.length);
  for (let i = 0; i < samples.length; i++) out[i] = Math.max(-1, Math.min(1, samples[i])) * 32767;
  return out;
}

function beginSegment() {
  state.segmentsSent += 1;
  segments.set(state.segmentsSent, performance.now());
}

// A file: decoded and resampled by the browser, sent as fast as a TTS would (then played in real time).
$("upload").addEventListener("submit", async (event) => {
  event.preventDefault();
  try {
    const decoded = await new AudioContext().decodeAudioData(await $("audio-file").files[0].arrayBuffer());
    const offline = new OfflineAudioContext(1, Math.ceil(decoded.duration * RATE), RATE);
    const source = offline.createBufferSource();
    source.buffer = decoded;
    source.connect(offline.destination);
    source.start();
    const samples = pcm16((await offline.startRendering()).getChannelData(0));
    const socket = await speechSocket();
    beginSegment();
    for (let i = 0; i < samples.length; i += RATE / 10) socket.send(samples.slice(i, i + RATE / 10).buffer);
    socket.send(JSON.stringify({ type: "segment_end" }));
    setStatus(`sent ${(samples.length / RATE).toFixed(1)} s of speech`);
  } catch (error) {
    setStatus(`could not speak the file: ${error.message}`, true);
  }
});

// The microphone: sent as it is spoken; "Done speaking" ends the segment.
let microphone = null;
$("mic-button").addEventListener("click", async () => {
  const context = new AudioContext({ sampleRate: RATE });
  try {
    const stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1, echoCancellation: true } });
    await context.audioWorklet.addModule("/static/pcm-worklet.js");
    const capture = new AudioWorkletNode(context, "pcm-capture");
    const socket = await speechSocket();
    let blocks = [];
    let started = false;
    capture.port.onmessage = ({ data }) => { // 128-sample frames; sent about every 40 ms
      blocks.push(data);
      if (blocks.length * 128 < RATE * 0.04 || socket.readyState !== WebSocket.OPEN) return;
      const samples = new Float32Array(blocks.reduce((n, b) => n + b.length, 0));
      let k = 0;
      for (const block of blocks) { samples.set(block, k); k += block.length; }
      blocks = [];
      if (!started) { beginSegment(); started = true; }
      socket.send(pcm16(samples).buffer);
    };
    context.createMediaStreamSource(stream).connect(capture);
    microphone = { context, stream, socket };
    $("mic-button").disabled = true;
    $("stop-button").disabled = false;
    setStatus("listening... (the avatar speaks what you say)");
  } catch (error) {
    context.close();
    setStatus(`no microphone: ${error.message}`, true);
  }
});

$("stop-button").addEventListener("click", () => {
  if (!microphone) return;
  microphone.stream.getTracks().forEach((track) => track.stop());
  microphone.context.close();
  if (microphone.socket.readyState === WebSocket.OPEN) microphone.socket.send(JSON.stringify({ type: "segment_end" }));
  microphone = null;
  $("mic-button").disabled = false;
  $("stop-button").disabled = true;
});

$("interrupt-button").addEventListener("click", async () => {
  (await speechSocket()).send(JSON.stringify({ type: "interrupt" }));
});

// -- avatars ----------------------------------------------------------------------------------
async function loadAvatars(select) {
  const answer = await json(await fetch("/avatars", withKey()));
  const list = $("avatar");
  list.replaceChildren(...answer.avatars.filter((a) => (a.status ?? "ready") === "ready").map((a) =>
    new Option(`${a.id} (${a.width}x${a.height}, ${a.frames} frame${a.frames === 1 ? "" : "s"})`, a.id)));
  list.value = select ?? answer.default;
  if (!list.value && list.options.length) list.selectedIndex = 0;
}

async function showInfo() {
  const info = await (await fetch("/info")).json();
  $("synthetic").hidden = info.synthetic_weights !== true;
  return info;
}

$("avatar").addEventListener("change", () => openSession().catch((e) => setStatus(e.message, true)));
$("fps").addEventListener("change", () => openSession().catch((e) => setStatus(e.message, true)));

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
    let answer = await fetch("/avatars", withKey({ method: "POST", body: form }));
    let body = await answer.json();
    while (answer.status === 202 || body.status === "preparing" || body.status === "queued") { // a job
      if (body.frames_total) { bar.max = body.frames_total; bar.value = body.frames_done ?? 0; }
      status.textContent = `preparing: ${body.frames_done ?? 0} of ${body.frames_total ?? "?"} frames`;
      await new Promise((resolve) => setTimeout(resolve, 500));
      answer = await fetch(`/avatars/${encodeURIComponent(id)}`, withKey());
      body = await answer.json();
    }
    if (!answer.ok || body.status === "failed") throw new Error(body.error ?? body.reason ?? answer.statusText);
    status.textContent = `avatar "${id}" is ready` + (body.faceless_frames ? ` (${body.faceless_frames} frames without a face are shown as they are)` : "");
    await loadAvatars(id);
    await openSession();
  } catch (error) {
    status.textContent = `could not prepare the avatar: ${error.message}`;
    status.classList.add("error");
  } finally {
    bar.hidden = true;
  }
});

window.addEventListener("pagehide", closeSession);

async function start() {
  try {
    await loadAvatars();
    await openSession();
  } catch (error) {
    setState("no session");
    setStatus(error.message, true);
    if (/API key/.test(error.message)) $("key-form").hidden = false; // a wrong or old key: ask again
  }
}

const info = await showInfo();
if (info.api_keys && !apiKey) {
  $("key-form").hidden = false;
  setState("no session");
  setStatus("this service needs an API key");
} else {
  await start();
}
