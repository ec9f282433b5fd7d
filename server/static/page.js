// The browser page: live transcription from the microphone over the Realtime WebSocket (OpenAI's GA transcription
// session protocol), and file transcription with timestamps over POST /v1/audio/transcriptions. Plain JS, no build.

const $ = (id) => document.getElementById(id);
const RATE = 24000; // the Realtime API's audio/pcm rate
const KEY_STORE = "canary-server-api-key";
const page = { model: null, key: sessionStorage.getItem(KEY_STORE), timestamps: false };

// --- HTTP --------------------------------------------------------------------------------------------------------

function url(path) {
  return new URL(path, document.baseURI); // relative: works behind a router that adds a path prefix
}

function authHeaders() {
  return page.key ? { Authorization: `Bearer ${page.key}` } : {};
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (_) { /* not JSON: fall through */ }
  return `${response.status} ${response.statusText}`;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

// --- Model and settings ------------------------------------------------------------------------------------------

async function loadModel() {
  const response = await fetch(url("v1/models"), { headers: authHeaders() });
  if (response.status === 401) {
    $("key-form").hidden = false;
    $("model").textContent = "API key needed";
    if (page.key) showError(await errorMessage(response));
    return;
  }
  if (!response.ok) {
    showError(await errorMessage(response));
    return;
  }
  $("key-form").hidden = true;
  showError("");
  const card = (await response.json()).data[0];
  page.model = card.id;
  page.timestamps = Boolean(card.timestamps);
  $("model").textContent = card.family ? `${card.id} (${card.family})` : card.id;
  fillLanguages(card.languages || []);
  $("mic").disabled = false;
}

function fillLanguages(codes) {
  const names = window.Intl && Intl.DisplayNames
    ? new Intl.DisplayNames([navigator.language, "en"], { type: "language" })
    : null;
  const label = (code) => {
    try {
      return names ? `${names.of(code)} (${code})` : code;
    } catch (_) {
      return code; // a code Intl does not know
    }
  };
  for (const select of [$("language"), $("target")]) {
    const keep = select.options[0];
    select.replaceChildren(keep);
    for (const code of codes) select.add(new Option(label(code), code));
  }
}

$("target").addEventListener("change", () => { $("live-note").hidden = !$("target").value; });

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  page.key = $("api-key").value.trim();
  sessionStorage.setItem(KEY_STORE, page.key);
  loadModel();
});

// --- File: POST /v1/audio/transcriptions, verbose_json with segment (and word) times -----------------------------

function clock(seconds) {
  const m = Math.floor(seconds / 60);
  return `${m}:${(seconds - m * 60).toFixed(2).padStart(5, "0")}`;
}

async function transcribeFile(file) {
  if (!page.model) return;
  showError("");
  $("file-state").textContent = `Transcribing ${file.name}…`;
  $("file-text").textContent = "";
  $("segments").replaceChildren();
  $("words-box").hidden = true;
  const form = new FormData();
  form.append("file", file);
  form.append("model", page.model);
  form.append("response_format", "verbose_json");
  form.append("timestamp_granularities[]", "segment");
  if (page.timestamps) form.append("timestamp_granularities[]", "word");
  if ($("language").value !== "auto") form.append("language", $("language").value);
  if ($("target").value) form.append("target_language", $("target").value);
  const started = performance.now();
  const response = await fetch(url("v1/audio/transcriptions"), { method: "POST", headers: authHeaders(), body: form });
  if (!response.ok) {
    $("file-state").textContent = "";
    showError(await errorMessage(response));
    return;
  }
  showResult(file.name, await response.json(), (performance.now() - started) / 1000);
}

function showResult(name, body, seconds) {
  $("file-state").textContent =
    `${name}: ${body.duration.toFixed(1)} s of audio, language ${body.language}, ${seconds.toFixed(1)} s to transcribe`;
  $("file-text").textContent = body.text;
  for (const seg of body.segments || []) {
    const item = document.createElement("li");
    const time = document.createElement("span");
    time.className = "time";
    time.textContent = `${clock(seg.start)} – ${clock(seg.end)}`;
    const text = document.createElement("span");
    text.textContent = seg.text;
    item.append(time, text);
    $("segments").append(item);
  }
  const words = body.words || [];
  $("words").replaceChildren(...words.map(wordSpan));
  $("words-box").hidden = words.length === 0;
}

function wordSpan(word) {
  const span = document.createElement("span");
  span.textContent = word.word;
  const time = document.createElement("small");
  time.textContent = `${word.start.toFixed(2)}–${word.end.toFixed(2)}`;
  span.append(time);
  return span;
}

const drop = $("drop");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  if (event.dataTransfer.files.length) transcribeFile(event.dataTransfer.files[0]);
});
$("file-input").addEventListener("change", () => {
  const input = $("file-input");
  if (input.files.length) transcribeFile(input.files[0]);
  input.value = ""; // choosing the same file again (say, with other options) is a change too
});

// --- Microphone: the Realtime WebSocket ---------------------------------------------------------------------------

const live = { ws: null, audio: null, stream: null, speaking: false, closing: false, pending: [], lines: new Map() };

function realtimeUrl() {
  const u = url("v1/realtime?intent=transcription");
  u.protocol = u.protocol === "https:" ? "wss:" : "ws:";
  return u;
}

function sessionUpdate(rate) {
  const transcription = { model: page.model };
  if ($("language").value !== "auto") transcription.language = $("language").value;
  return {
    type: "session.update",
    session: {
      type: "transcription",
      audio: {
        input: {
          format: { type: "audio/pcm", rate },
          transcription,
          turn_detection: { type: "server_vad", threshold: 0.5, prefix_padding_ms: 300, silence_duration_ms: 500 },
        },
      },
    },
  };
}

function base64(buffer) {
  const bytes = new Uint8Array(buffer);
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(text);
}

function line(itemId) {
  let item = live.lines.get(itemId);
  if (!item) {
    item = document.createElement("li");
    item.className = "partial";
    live.lines.set(itemId, item);
    $("live-text").append(item);
  }
  return item;
}

function onEvent(event) {
  switch (event.type) {
    case "input_audio_buffer.speech_started":
      live.speaking = true;
      $("mic-state").textContent = "hearing speech…";
      line(event.item_id);
      break;
    case "input_audio_buffer.speech_stopped":
      live.speaking = false;
      $("mic-state").textContent = "listening";
      break;
    case "conversation.item.input_audio_transcription.delta":
      line(event.item_id).textContent += event.delta || "";
      break;
    case "conversation.item.input_audio_transcription.completed": {
      const item = line(event.item_id);
      item.textContent = event.transcript;
      item.className = "final";
      if (!event.transcript.trim()) item.remove(); // silence: nothing to show
      if (live.closing) stopSocket();
      break;
    }
    case "conversation.item.input_audio_transcription.failed": {
      const item = line(event.item_id);
      item.className = "failed";
      item.textContent = (event.error && event.error.message) || "transcription failed";
      break;
    }
    case "error":
      showError(event.error.message);
      break;
    default:
      break; // session.*, committed, conversation.item.*: nothing to show
  }
}

async function startMic() {
  showError("");
  if (!navigator.mediaDevices || !window.AudioWorkletNode) {
    showError("The microphone needs a secure page: open it as http://localhost:… or over https.");
    return;
  }
  $("mic").disabled = true;
  live.pending = [];
  try {
    live.stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1, echoCancellation: true } });
    live.audio = new AudioContext({ sampleRate: RATE }); // the browser resamples the microphone to 24 kHz
    try {
      await capture(live.audio);
    } catch (error) {
      if (error.name !== "NotSupportedError") throw error;
      // A browser that cannot resample a microphone into a 24 kHz context: the session is told the device's rate.
      live.audio.close();
      live.audio = new AudioContext();
      await capture(live.audio);
    }
  } catch (error) {
    stopAudio();
    $("mic").disabled = false;
    showError(`Microphone: ${error.message}`);
    return;
  }
  openSocket(live.audio.sampleRate);
}

async function capture(context) {
  await context.audioWorklet.addModule(url("static/pcm-worklet.js"));
  const node = new AudioWorkletNode(context, "pcm16-block");
  node.port.onmessage = (message) => sendAudio(message.data);
  // The node outputs silence; connected to the output it runs.
  context.createMediaStreamSource(live.stream).connect(node).connect(context.destination);
}

// Audio recorded while the connection opens waits (up to MAX_PENDING blocks) so the first word is not lost.
const MAX_PENDING = 100;

function sendAudio(buffer) {
  const ws = live.ws;
  if (live.closing || !ws || ws.readyState > WebSocket.OPEN) return;
  if (ws.readyState === WebSocket.CONNECTING || live.pending.length) {
    if (live.pending.length < MAX_PENDING) live.pending.push(buffer);
    return;
  }
  ws.send(JSON.stringify({ type: "input_audio_buffer.append", audio: base64(buffer) }));
}

function openSocket(rate) {
  // Browsers cannot set an Authorization header on a WebSocket: OpenAI's browser clients send the key as a
  // subprotocol, and "realtime" is the subprotocol the server answers with.
  const protocols = page.key ? ["realtime", `openai-insecure-api-key.${page.key}`] : ["realtime"];
  const ws = new WebSocket(realtimeUrl(), protocols);
  live.ws = ws;
  live.closing = false;
  ws.onopen = () => {
    ws.send(JSON.stringify(sessionUpdate(rate)));
    const waiting = live.pending;
    live.pending = [];
    for (const buffer of waiting) sendAudio(buffer);
    $("mic").textContent = "Stop";
    $("mic").classList.add("recording");
    $("mic").disabled = false;
    $("mic-state").textContent = "listening";
  };
  ws.onmessage = (message) => onEvent(JSON.parse(message.data));
  ws.onerror = () => live.ws === ws && showError("The live connection failed (see the server's log).");
  ws.onclose = (event) => {
    if (live.ws !== ws) return; // a session the page already ended (a new one may be starting)
    if (event.code !== 1000 && event.code !== 1005 && event.reason) {
      showError(`Live connection closed: ${event.reason}`);
    }
    stopAudio();
    live.ws = null;
    resetButton();
  };
}

function stopMic() {
  stopAudio();
  const ws = live.ws;
  if (!ws || ws.readyState !== WebSocket.OPEN) { resetButton(); return; }
  if (live.speaking) {
    // Speech was still going on: commit it and close once its final transcript arrives (or after 10 s).
    live.closing = true;
    ws.send(JSON.stringify({ type: "input_audio_buffer.commit" }));
    $("mic-state").textContent = "finishing…";
    $("mic").disabled = true;
    setTimeout(() => live.ws === ws && stopSocket(), 10000);
  } else {
    stopSocket();
  }
}

function stopSocket() {
  if (live.ws && live.ws.readyState <= WebSocket.OPEN) live.ws.close(1000);
  live.ws = null;
  resetButton();
}

function stopAudio() {
  if (live.stream) live.stream.getTracks().forEach((track) => track.stop());
  if (live.audio) live.audio.close();
  live.stream = live.audio = null;
}

function resetButton() {
  $("mic").textContent = "Start recording";
  $("mic").classList.remove("recording");
  $("mic").disabled = !page.model;
  $("mic-state").textContent = "";
}

$("mic").addEventListener("click", () => (live.ws ? stopMic() : startMic()));

loadModel().catch((error) => showError(`Cannot reach the server: ${error.message}`));
