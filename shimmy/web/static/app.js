// shimmy's chat page: talks to this server's /api/models and /v1/chat/completions.
//
// Everything the model writes is untrusted text: it only ever reaches the page through
// textContent / Text nodes, never as HTML.

import { SseParser } from "./sse.js";

const STORAGE = {
  settings: "shimmy.chat.settings",
  apiKey: "shimmy.chat.apiKey",
  model: "shimmy.chat.model",
};

const DEFAULTS = Object.freeze({
  temperature: 0.7,
  top_p: 0.9,
  max_tokens: 512,
  seed: "",
  system: "",
});

const $ = (id) => document.getElementById(id);

const ui = {
  app: $("app"),
  model: $("model"),
  settingsToggle: $("settings-toggle"),
  settings: $("settings"),
  temperature: $("temperature"),
  topP: $("top-p"),
  maxTokens: $("max-tokens"),
  seed: $("seed"),
  system: $("system-prompt"),
  resetSettings: $("reset-settings"),
  forgetKey: $("forget-key"),
  newChat: $("new-chat"),
  conversation: $("conversation"),
  empty: $("empty"),
  keyForm: $("key-form"),
  keyMessage: $("key-message"),
  apiKey: $("api-key"),
  composer: $("composer"),
  prompt: $("prompt"),
  send: $("send"),
  stop: $("stop"),
  status: $("status"),
};

const state = {
  history: [], // {role, content} turns of this conversation, as sent to the server
  controller: null, // AbortController of the running request
  modelsLoaded: false,
  retry: null, // what to do again once an API key has been entered
};

// --- storage (may be unavailable: private windows, disabled storage) -------------------------

function readStored(key) {
  try {
    return window.localStorage.getItem(key);
  } catch {
    return null;
  }
}

function writeStored(key, value) {
  try {
    if (value === null || value === "") window.localStorage.removeItem(key);
    else window.localStorage.setItem(key, value);
  } catch {
    // Settings then last only as long as the page: nothing better to do.
  }
}

// --- settings ---------------------------------------------------------------------------------

const settingInputs = [
  ["temperature", ui.temperature],
  ["top_p", ui.topP],
  ["max_tokens", ui.maxTokens],
  ["seed", ui.seed],
  ["system", ui.system],
];

function loadSettings() {
  let saved = {};
  try {
    saved = JSON.parse(readStored(STORAGE.settings) || "{}") || {};
  } catch {
    saved = {};
  }
  for (const [name, input] of settingInputs) {
    const value = name in saved ? saved[name] : DEFAULTS[name];
    input.value = value === null || value === undefined ? "" : String(value);
  }
}

function saveSettings() {
  const values = {};
  for (const [name, input] of settingInputs) values[name] = input.value;
  writeStored(STORAGE.settings, JSON.stringify(values));
}

// A number from an input, or the fallback when it is empty or out of its bounds.
function numberFrom(input, fallback, { integer = false } = {}) {
  const raw = input.value.trim();
  if (raw === "" || !input.checkValidity()) return fallback;
  const value = Number(raw);
  if (!Number.isFinite(value) || (integer && !Number.isInteger(value))) return fallback;
  return value;
}

function samplingOptions() {
  const options = {
    temperature: numberFrom(ui.temperature, DEFAULTS.temperature),
    top_p: numberFrom(ui.topP, DEFAULTS.top_p),
    max_tokens: numberFrom(ui.maxTokens, DEFAULTS.max_tokens, { integer: true }),
  };
  const seed = numberFrom(ui.seed, null, { integer: true });
  if (seed !== null) options.seed = seed;
  return options;
}

// --- API access -------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(message, status = 0) {
    super(message);
    this.status = status;
  }
}

function authHeaders() {
  const key = readStored(STORAGE.apiKey);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// The readable message of an error body: OpenAI's {"error": {"message"}} or shimmy's native
// {"error": {"code", "message", "details"}}.
function errorMessage(body) {
  const error = body && typeof body === "object" ? body.error : null;
  if (!error) return null;
  if (typeof error === "string") return error;
  const message = typeof error.message === "string" ? error.message : "";
  const details = typeof error.details === "string" ? error.details : "";
  if (message && details && !message.includes(details)) return `${message}: ${details}`;
  return message || details || null;
}

async function apiError(response) {
  let message = null;
  try {
    message = errorMessage(await response.json());
  } catch {
    // Not JSON (a proxy's error page, for instance): fall back to the status line.
  }
  message = message || `The server answered ${response.status} ${response.statusText}`.trim();
  const retryAfter = response.headers.get("Retry-After");
  if (retryAfter && (response.status === 429 || response.status === 503)) {
    message += ` (try again in ${retryAfter} s)`;
  }
  return new ApiError(message, response.status);
}

async function apiFetch(path, init = {}) {
  let response;
  try {
    response = await fetch(path, {
      ...init,
      headers: { ...(init.headers || {}), ...authHeaders() },
      cache: "no-store",
    });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError("Cannot reach the shimmy server. Is it still running?");
  }
  if (!response.ok) throw await apiError(response);
  return response;
}

// --- API key prompt ---------------------------------------------------------------------------

function askForKey(message, retry) {
  state.retry = retry;
  const stored = readStored(STORAGE.apiKey);
  ui.keyMessage.textContent = stored
    ? `The saved API key was refused (${message}). Enter a valid key.`
    : "This server requires an API key. Enter it to continue.";
  ui.keyForm.hidden = false;
  ui.apiKey.value = "";
  ui.apiKey.focus();
  setStatus("Waiting for an API key");
}

ui.keyForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const key = ui.apiKey.value.trim();
  if (!key) return;
  writeStored(STORAGE.apiKey, key);
  ui.apiKey.value = "";
  ui.keyForm.hidden = true;
  updateForgetKey();
  const retry = state.retry;
  state.retry = null;
  setStatus("");
  if (retry) retry();
  ui.prompt.focus();
});

function updateForgetKey() {
  ui.forgetKey.hidden = !readStored(STORAGE.apiKey);
}

ui.forgetKey.addEventListener("click", () => {
  writeStored(STORAGE.apiKey, null);
  updateForgetKey();
  setStatus("API key forgotten");
});

// --- models -----------------------------------------------------------------------------------

function formatSize(bytes) {
  if (!bytes) return "";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit += 1;
  }
  return `${value >= 10 || unit === 0 ? value.toFixed(0) : value.toFixed(1)} ${units[unit]}`;
}

async function loadModels() {
  ui.model.disabled = true;
  let data;
  try {
    data = await (await apiFetch("/api/models")).json();
  } catch (err) {
    if (err.status === 401) {
      askForKey(err.message, loadModels);
      return;
    }
    replaceOptions([["", "No models"]]);
    showError(`Could not list the models: ${err.message}`);
    updateControls();
    return;
  }
  const models = (Array.isArray(data.models) ? data.models : []).filter((m) => m.usable !== false);
  if (models.length === 0) {
    replaceOptions([["", "No models found"]]);
    setStatus("No usable model found: put a .gguf file in the models folder and reload.");
    state.modelsLoaded = false;
    updateControls();
    return;
  }
  replaceOptions(
    models.map((m) => {
      const size = formatSize(m.size_bytes);
      return [m.id, size ? `${m.id} · ${size}` : m.id];
    }),
  );
  const ids = models.map((m) => m.id);
  const chosen = readStored(STORAGE.model);
  if (chosen && ids.includes(chosen)) ui.model.value = chosen;
  else if (data.default && ids.includes(data.default)) ui.model.value = data.default;
  else ui.model.value = ids[0];
  ui.model.disabled = false;
  state.modelsLoaded = true;
  updateControls();
}

function replaceOptions(pairs) {
  ui.model.replaceChildren(
    ...pairs.map(([value, label]) => {
      const option = document.createElement("option");
      option.value = value;
      option.textContent = label;
      return option;
    }),
  );
}

ui.model.addEventListener("change", () => writeStored(STORAGE.model, ui.model.value));

// --- conversation view ------------------------------------------------------------------------

function nearBottom() {
  const c = ui.conversation;
  return c.scrollHeight - c.scrollTop - c.clientHeight < 80;
}

function scrollToBottom() {
  ui.conversation.scrollTop = ui.conversation.scrollHeight;
}

function addMessage(role, text, label) {
  ui.empty.hidden = true;
  const article = document.createElement("article");
  article.className = `message ${role}`;
  const who = document.createElement("div");
  who.className = "who";
  who.textContent = label;
  const content = document.createElement("div");
  content.className = "content";
  const textNode = document.createTextNode(text);
  content.append(textNode);
  const meta = document.createElement("div");
  meta.className = "meta";
  article.append(who, content, meta);
  ui.conversation.append(article);
  scrollToBottom();
  return { article, content, textNode, meta };
}

function showError(message) {
  ui.empty.hidden = true;
  const box = document.createElement("div");
  box.className = "error";
  box.setAttribute("role", "alert");
  box.textContent = message;
  ui.conversation.append(box);
  scrollToBottom();
}

const HINT = "Enter to send, Shift+Enter for a new line, Esc to stop";

function setStatus(text) {
  ui.status.textContent = text || HINT;
}

function formatMs(ms) {
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(2)} s`;
}

// The statistics line under an answer: [text, class] pairs.
function statsParts(run) {
  const parts = [];
  const usage = run.usage;
  const end = run.end ?? performance.now();
  if (run.stopped) parts.push([`stopped after ${formatMs(end - run.start)}`, "flag"]);
  if (usage) {
    parts.push([`${usage.completion_tokens} tokens`, ""]);
    const rate = tokensPerSecond(run, usage.completion_tokens, end);
    if (rate !== null) parts.push([`${rate.toFixed(1)} tok/s`, "rate"]);
  }
  if (run.firstToken !== null) {
    parts.push([`first token ${formatMs(run.firstToken - run.start)}`, ""]);
  }
  if (usage) {
    const cached = usage.prompt_tokens_details?.cached_tokens;
    const prompt = `prompt ${usage.prompt_tokens} tokens`;
    parts.push([cached ? `${prompt} (${cached} cached)` : prompt, ""]);
  }
  if (run.finishReason === "length") parts.push(["reached max tokens", "flag"]);
  return parts;
}

function showStats(view, run) {
  const nodes = [];
  for (const [text, className] of statsParts(run)) {
    if (nodes.length > 0) {
      const dot = document.createElement("span");
      dot.className = "sep";
      dot.setAttribute("aria-hidden", "true");
      dot.textContent = " · ";
      nodes.push(dot);
    }
    const span = document.createElement("span");
    if (className) span.className = className;
    span.textContent = text;
    nodes.push(span);
  }
  view.meta.replaceChildren(...nodes);
}

// Decoding speed: the first token's time belongs to the prompt (shown as time to first token),
// so the rate counts the tokens after it over the time after it.
function tokensPerSecond(run, tokens, end) {
  if (run.firstToken !== null && tokens > 1 && end > run.firstToken) {
    return ((tokens - 1) * 1000) / (end - run.firstToken);
  }
  if (tokens > 0 && end > run.start) return (tokens * 1000) / (end - run.start);
  return null;
}

function addCopyButton(view, text) {
  if (!text || !navigator.clipboard || !window.isSecureContext) return;
  const button = document.createElement("button");
  button.type = "button";
  button.className = "copy";
  button.textContent = "Copy";
  button.setAttribute("aria-label", "Copy this answer");
  button.addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(text);
      button.textContent = "Copied";
    } catch {
      button.textContent = "Copy failed";
    }
  });
  view.meta.append(button);
}

// --- chatting ---------------------------------------------------------------------------------

function busy() {
  return state.controller !== null;
}

function updateControls() {
  const generating = busy();
  ui.app.dataset.state = generating ? "busy" : state.modelsLoaded ? "ready" : "loading";
  ui.send.hidden = generating;
  ui.stop.hidden = !generating;
  ui.send.disabled = generating || !state.modelsLoaded || ui.prompt.value.trim() === "";
  ui.model.disabled = generating || !state.modelsLoaded;
}

function requestMessages() {
  const messages = [];
  const system = ui.system.value.trim();
  if (system) messages.push({ role: "system", content: system });
  return messages.concat(state.history);
}

// An out-of-range setting is pointed out rather than silently replaced by a default.
function settingsAreValid() {
  for (const [, input] of settingInputs) {
    if (!input.checkValidity()) {
      ui.settings.hidden = false;
      ui.settingsToggle.setAttribute("aria-expanded", "true");
      input.focus();
      input.reportValidity();
      return false;
    }
  }
  return true;
}

async function sendMessage() {
  const text = ui.prompt.value;
  if (busy() || !state.modelsLoaded || text.trim() === "") return;
  if (!settingsAreValid()) return;
  ui.prompt.value = "";
  autosize();
  state.history.push({ role: "user", content: text });
  const userView = addMessage("user", text, "You");
  await complete(userView, text);
}

// One assistant answer for the conversation as it stands (its last turn is the user's).
async function complete(userView, userText) {
  const model = ui.model.value;
  // "New chat" replaces the history array; a late ending of this request then lands in the
  // old one, out of the way.
  const history = state.history;
  const controller = new AbortController();
  state.controller = controller;
  updateControls();
  setStatus("Waiting for the model…");
  const view = addMessage("assistant", "", model);
  view.article.classList.add("pending");
  view.article.setAttribute("aria-busy", "true");
  const run = {
    start: performance.now(),
    firstToken: null,
    end: null,
    usage: null,
    finishReason: null,
    stopped: false,
  };
  let answer = "";
  // Text is painted at most once per frame: a fast model sends hundreds of pieces a second,
  // and laying the page out for each would make the page (and the Stop button) sluggish.
  let unpainted = "";
  let frame = null;
  const paint = () => {
    if (frame !== null) cancelAnimationFrame(frame);
    frame = null;
    if (unpainted === "") return;
    const follow = nearBottom();
    view.textNode.appendData(unpainted);
    unpainted = "";
    if (follow) scrollToBottom();
  };
  const handle = (data) => {
    if (data === "[DONE]") return true;
    const chunk = JSON.parse(data);
    const message = errorMessage(chunk);
    if (message) throw new ApiError(message);
    const choice = Array.isArray(chunk.choices) ? chunk.choices[0] : null;
    const piece = choice && choice.delta ? choice.delta.content : null;
    if (piece) {
      if (run.firstToken === null) {
        run.firstToken = performance.now();
        view.article.classList.remove("pending");
        setStatus("Generating…");
      }
      unpainted += piece;
      answer += piece;
      if (frame === null) frame = requestAnimationFrame(paint);
    }
    if (choice && choice.finish_reason) run.finishReason = choice.finish_reason;
    if (chunk.usage) run.usage = chunk.usage;
    return false;
  };
  try {
    const response = await apiFetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({
        model,
        messages: requestMessages(),
        stream: true,
        stream_options: { include_usage: true },
        ...samplingOptions(),
      }),
      signal: controller.signal,
    });
    const parser = new SseParser();
    const reader = response.body.getReader();
    let done = false;
    while (!done) {
      const { value, done: ended } = await reader.read();
      const events = ended ? parser.end() : parser.push(value);
      for (const data of events) done = handle(data) || done;
      if (ended) break;
    }
    paint();
    if (!done) throw new ApiError("The connection closed before the answer was complete.");
    run.end = performance.now();
    history.push({ role: "assistant", content: answer });
    showStats(view, run);
    addCopyButton(view, answer);
    setStatus("");
  } catch (err) {
    run.end = performance.now();
    paint(); // the page shows exactly the answer the history keeps
    if (controller.signal.aborted) {
      // Keep what was written: the next turn then continues from what the user saw.
      run.stopped = true;
      history.push({ role: "assistant", content: answer });
      view.article.classList.add("stopped");
      showStats(view, run);
      addCopyButton(view, answer);
      setStatus("Stopped");
    } else if (err.status === 401) {
      // Nothing was generated: undo the turn and send it again once the key is known.
      history.pop();
      view.article.remove();
      userView.article.remove();
      if (history.length === 0) ui.empty.hidden = false;
      ui.prompt.value = userText;
      autosize();
      askForKey(err.message, () => sendMessage());
    } else {
      // The turn failed: it leaves the history, and its text goes back into the composer.
      history.pop();
      if (answer === "") view.article.remove();
      else view.meta.textContent = "incomplete answer";
      userView.article.classList.add("failed");
      showError(err.message || String(err));
      if (ui.prompt.value.trim() === "") {
        ui.prompt.value = userText;
        autosize();
      }
      setStatus("");
    }
  } finally {
    view.article.classList.remove("pending");
    view.article.removeAttribute("aria-busy");
    // Closes the connection in every case, e.g. when an error event arrived mid-stream.
    controller.abort();
    if (state.controller === controller) state.controller = null;
    updateControls();
  }
}

function stopGeneration() {
  if (state.controller) state.controller.abort();
}

function newChat() {
  stopGeneration();
  state.history = [];
  for (const node of [...ui.conversation.children]) {
    if (node !== ui.empty) node.remove();
  }
  ui.empty.hidden = false;
  setStatus("");
  updateControls();
  ui.prompt.focus();
}

// --- wiring -----------------------------------------------------------------------------------

function autosize() {
  ui.prompt.style.height = "auto";
  ui.prompt.style.height = `${Math.min(ui.prompt.scrollHeight, 240)}px`;
}

ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  sendMessage();
});

ui.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    sendMessage();
  }
});

ui.prompt.addEventListener("input", () => {
  autosize();
  updateControls();
});

document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && busy()) stopGeneration();
});

ui.stop.addEventListener("click", stopGeneration);
ui.newChat.addEventListener("click", newChat);

ui.settingsToggle.addEventListener("click", () => {
  const open = ui.settings.hidden;
  ui.settings.hidden = !open;
  ui.settingsToggle.setAttribute("aria-expanded", String(open));
});

for (const [, input] of settingInputs) input.addEventListener("input", saveSettings);

ui.resetSettings.addEventListener("click", () => {
  writeStored(STORAGE.settings, null);
  loadSettings();
});

loadSettings();
updateForgetKey();
updateControls();
setStatus("");
loadModels();
ui.prompt.focus();
