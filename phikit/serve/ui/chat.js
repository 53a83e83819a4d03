// The chat page of `phikit serve`: streams replies from /v1/chat/completions, keeps conversations in this
// browser's localStorage. Model output is untrusted: it is only ever put into the page as text
// (textContent, createElement); the Markdown below builds elements itself and never parses HTML, and the
// server's Content-Security-Policy runs no script but this file.
"use strict";

(() => {
  const STORE = "phikit.conversations";
  const SETTINGS = "phikit.settings";
  const KEY = "phikit.apiKey"; // sessionStorage: forgotten when the tab closes
  const $ = (id) => document.getElementById(id);

  let store = loadStore();
  let settings = loadSettings();
  let running = null; // {controller, message} while a reply streams
  const elements = new WeakMap(); // message -> its element on the page (not kept in the store)

  // ---- storage ----

  function loadStore() {
    try {
      const s = JSON.parse(localStorage.getItem(STORE));
      if (s && Array.isArray(s.conversations)) {
        for (const c of s.conversations) { // a reply the last page left streaming was cut there
          c.messages = c.messages.filter((m) => m.state !== "streaming" || m.content);
          for (const m of c.messages) if (m.state === "streaming") m.state = "stopped";
        }
        return s;
      }
    } catch (e) { /* a damaged store starts afresh */ }
    return { conversations: [], current: null };
  }

  function save() {
    try {
      localStorage.setItem(STORE, JSON.stringify(store));
    } catch (e) {
      showError("could not keep the conversation in this browser: " + e.message);
    }
  }

  function loadSettings() {
    const defaults = { model: "", temperature: 0.7, top_p: 1, max_tokens: "", json: false, schema: "" };
    try {
      return Object.assign(defaults, JSON.parse(localStorage.getItem(SETTINGS)) || {});
    } catch (e) {
      return defaults;
    }
  }

  function saveSettings() {
    settings.model = $("model").value;
    settings.temperature = $("temperature").value;
    settings.top_p = $("top-p").value;
    settings.max_tokens = $("max-tokens").value;
    settings.json = $("json-mode").checked;
    settings.schema = $("json-schema").value;
    $("json-schema-row").hidden = !settings.json;
    localStorage.setItem(SETTINGS, JSON.stringify(settings));
  }

  function current() {
    return store.conversations.find((c) => c.id === store.current) || null;
  }

  function newConversation() {
    const c = { id: String(Date.now()) + Math.random().toString(16).slice(2, 8), title: "New chat",
                created: new Date().toISOString(), system: "", messages: [] };
    store.conversations.unshift(c);
    store.current = c.id;
    save();
    return c;
  }

  // ---- the server ----

  function headers() {
    const h = { "Content-Type": "application/json" };
    const key = sessionStorage.getItem(KEY);
    if (key) h.Authorization = "Bearer " + key; // a header, never the URL
    return h;
  }

  async function errorOf(response) {
    let message = response.status + " " + response.statusText;
    let body = null;
    try {
      body = await response.json();
      if (body && body.error && body.error.message) message = body.error.message;
    } catch (e) { /* not JSON */ }
    const error = new Error(message);
    error.status = response.status;
    error.code = body && body.error ? body.error.code : null;
    return error;
  }

  async function loadModels() {
    const select = $("model");
    let response;
    try {
      response = await fetch("v1/models", { headers: headers() });
    } catch (e) {
      return status("server unreachable: " + e.message);
    }
    if (response.status === 401) {
      $("api-key-row").hidden = false;
      $("settings").hidden = false;
      return status(sessionStorage.getItem(KEY) ? "the API key was refused" : "this server needs an API key");
    }
    if (!response.ok) return status((await errorOf(response)).message);
    const names = (await response.json()).data.map((m) => m.id);
    select.textContent = "";
    for (const name of names) {
      const option = document.createElement("option");
      option.value = option.textContent = name;
      select.appendChild(option);
    }
    if (names.includes(settings.model)) select.value = settings.model;
    status(names.length > 1 ? names.length + " models (the base and its adapters)" : "ready");
  }

  const BUSY = "a reply is streaming: wait for it, or press Stop";
  let idleStatus = ""; // what the status said before BUSY, said again when the reply ends

  function status(text) {
    $("server-status").textContent = text;
    if (text !== BUSY) idleStatus = text;
  }

  function showError(text) {
    $("error").hidden = !text;
    $("error").textContent = text || "";
  }

  function requestBody(conversation) {
    const messages = [];
    if (conversation.system.trim()) messages.push({ role: "system", content: conversation.system });
    for (const m of conversation.messages) {
      if (m.role === "user" || (m.role === "assistant" && m.content && m.state !== "streaming")) {
        messages.push({ role: m.role, content: m.content });
      }
    }
    const body = { model: $("model").value || undefined, messages, stream: true, stream_options: { include_usage: true } };
    // an empty field is the server's default (max tokens: what fits the context)
    for (const [id, key] of [["temperature", "temperature"], ["top-p", "top_p"], ["max-tokens", "max_tokens"]]) {
      const text = $(id).value.trim();
      if (text) body[key] = key === "max_tokens" ? Math.round(Number(text)) : Number(text);
    }
    const format = responseFormat();
    if (format) body.response_format = format;
    return body;
  }

  // JSON mode's response_format (undefined when off); a schema that is not JSON throws, saying so.
  function responseFormat() {
    if (!$("json-mode").checked) return undefined;
    const text = $("json-schema").value.trim();
    if (!text) return { type: "json_object" };
    let schema;
    try {
      schema = JSON.parse(text);
    } catch (e) {
      throw new Error("the JSON schema is not valid JSON: " + e.message);
    }
    return { type: "json_schema", json_schema: { name: "reply", schema, strict: true } };
  }

  // Streams one assistant reply into `message`, which is already part of the conversation; `body` is the
  // request, built before the message was added.
  async function stream(conversation, message, body) {
    const controller = new AbortController();
    running = { controller, message };
    setBusy(true);
    const started = performance.now();
    let first = null;
    let saved = started;
    message.state = "streaming";
    message.chunks = 0;
    message.model = body.model || "";
    try {
      const response = await fetch("v1/chat/completions", {
        method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
      });
      if (!response.ok) throw await errorOf(response);
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const event = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          for (const line of event.split("\n")) {
            if (!line.startsWith("data:")) continue;
            const data = line.slice(5).trim();
            if (data === "[DONE]") continue;
            const chunk = JSON.parse(data);
            if (chunk.error) throw new Error(chunk.error.message);
            if (chunk.usage) message.usage = chunk.usage;
            const choice = chunk.choices && chunk.choices[0];
            if (!choice) continue;
            if (choice.delta && choice.delta.content) {
              first = first || performance.now();
              message.content += choice.delta.content;
              message.chunks += 1;
              updateMessage(message);
              if (performance.now() - saved > 500) { // a reload midway keeps what came
                saved = performance.now();
                save();
              }
            }
            if (choice.finish_reason) message.finish = choice.finish_reason;
          }
        }
      }
      message.state = "done";
    } catch (e) {
      if (e.name === "AbortError") {
        message.state = "stopped";
      } else {
        message.state = "error";
        message.error = e.code === "context_length_exceeded"
          ? "this conversation no longer fits the model's context: lower Max tokens in Settings, start a new " +
            "chat, or edit an earlier message to shorten it (" + e.message + ")"
          : e.message;
        if (e.status === undefined) loadModels(); // the server may be gone: say so at the top
      }
    } finally {
      const ended = performance.now();
      message.stats = { seconds: (ended - started) / 1000,
                        first_token_s: first === null ? null : (first - started) / 1000 };
      const tokens = message.usage ? message.usage.completion_tokens : message.chunks;
      if (first !== null && tokens > 1 && ended > first) message.stats.tokens_per_s = (tokens - 1) / ((ended - first) / 1000);
      running = null;
      setBusy(false);
      if ($("server-status").textContent === BUSY) status(idleStatus);
      if (message.state === "error" && !message.content) failed(conversation, message);
      save();
      updateMessage(message);
    }
  }

  // A reply that failed before any text (a refused request, an unreachable server) leaves no turn behind:
  // the error shows above the composer, and the conversation ends with the user's message, which the
  // next message joins or Regenerate answers.
  // A reply refused before any text: it leaves no turn behind, and the message it answered goes back to the
  // composer (where the composer is empty) to be changed or sent again, not glued to the next one.
  function failed(conversation, message) {
    conversation.messages.splice(conversation.messages.indexOf(message), 1);
    const last = conversation.messages[conversation.messages.length - 1];
    if (current() === conversation && last && last.role === "user" && !$("input").value.trim()) {
      conversation.messages.pop();
      $("input").value = last.content;
    }
    showError(message.error);
    if (current() === conversation) render();
  }

  function setBusy(busy) {
    $("send").hidden = busy;
    $("stop").hidden = !busy;
    for (const b of document.querySelectorAll(".message .actions button")) b.disabled = busy;
  }

  // ---- actions ----

  // Sends the composer's text; false when nothing could be sent (the text stays in the composer).
  function send(text) {
    if (running || !text.trim()) return false;
    try {
      responseFormat(); // a bad schema is said before anything is added
    } catch (e) {
      showError(e.message);
      return false;
    }
    showError("");
    const conversation = current() || newConversation();
    if (!conversation.messages.length) conversation.title = text.trim().slice(0, 48);
    const last = conversation.messages[conversation.messages.length - 1];
    if (last && last.role === "user") last.content += "\n\n" + text; // its reply failed: one turn, not two
    else conversation.messages.push({ role: "user", content: text });
    reply(conversation);
    return true;
  }

  function reply(conversation) {
    const message = { role: "assistant", content: "", state: "streaming" };
    let body;
    try {
      body = requestBody(conversation);
    } catch (e) {
      showError(e.message);
      save();
      render();
      return;
    }
    showError("");
    conversation.messages.push(message);
    save();
    render();
    stream(conversation, message, body);
  }

  function regenerate() {
    const conversation = current();
    if (running || !conversation) return;
    const last = conversation.messages[conversation.messages.length - 1];
    if (last && last.role === "assistant") conversation.messages.pop();
    reply(conversation);
  }

  function edit(index, element) {
    const conversation = current();
    const content = element.querySelector(".content");
    const box = document.createElement("textarea");
    box.className = "edit";
    box.value = conversation.messages[index].content;
    const saveButton = button("Save and send", () => {
      if (!box.value.trim()) return;
      conversation.messages[index].content = box.value;
      conversation.messages.length = index + 1; // what followed answered the old text
      if (index === 0) conversation.title = box.value.trim().slice(0, 48);
      reply(conversation);
    });
    const cancel = button("Cancel", render);
    content.replaceWith(box);
    box.after(saveButton, cancel);
    box.focus();
  }

  function download(name, data) {
    const blob = new Blob([JSON.stringify(data, null, 2)], { type: "application/json" });
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = name;
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 1000);
  }

  function exported(conversations) {
    return { format: "phikit-chat", version: 1, exported: new Date().toISOString(), conversations };
  }

  // ---- drawing ----

  function button(label, onClick) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = label;
    b.addEventListener("click", onClick);
    return b;
  }

  function render() {
    renderList();
    renderConversation();
  }

  function renderList() {
    const list = $("conversations");
    list.textContent = "";
    for (const c of store.conversations) {
      const li = document.createElement("li");
      li.className = c.id === store.current ? "current" : "";
      const title = document.createElement("span");
      title.className = "title";
      title.textContent = c.title;
      li.appendChild(title);
      li.appendChild(button("×", (event) => {
        event.stopPropagation();
        if (running && current() === c) running.controller.abort();
        store.conversations = store.conversations.filter((x) => x !== c);
        if (store.current === c.id) store.current = store.conversations.length ? store.conversations[0].id : null;
        save();
        render();
      }));
      li.lastChild.title = "delete this conversation";
      const open = () => {
        if (running) return status(BUSY);
        store.current = c.id;
        save();
        render();
      };
      li.addEventListener("click", open);
      title.tabIndex = 0; // the title: reachable with Tab, opened with Enter or Space, as a button is
      title.setAttribute("role", "button");
      if (c.id === store.current) title.setAttribute("aria-current", "true");
      title.addEventListener("keydown", (event) => {
        if (event.key === "Enter" || event.key === " ") {
          event.preventDefault();
          open();
          $("conversations").querySelector("li.current .title")?.focus(); // the keyboard stays on the list
        }
      });
      list.appendChild(li);
    }
  }

  function renderConversation() {
    const conversation = current();
    $("system").value = conversation ? conversation.system : "";
    const messages = $("messages");
    messages.textContent = "";
    if (!conversation || !conversation.messages.length) {
      const empty = document.createElement("p");
      empty.className = "empty";
      empty.textContent = "Send a message to start.";
      messages.appendChild(empty);
      return;
    }
    conversation.messages.forEach((m, i) => messages.appendChild(messageElement(conversation, m, i)));
    messages.scrollTop = messages.scrollHeight;
    setBusy(Boolean(running));
  }

  function messageElement(conversation, m, index) {
    const el = document.createElement("div");
    el.className = "message " + m.role;
    const head = document.createElement("div");
    head.className = "role";
    head.textContent = m.role === "user" ? "You" : "Assistant";
    const actions = document.createElement("span");
    actions.className = "actions";
    if (m.role === "user") actions.appendChild(button("Edit", () => edit(index, el)));
    if (index === conversation.messages.length - 1) actions.appendChild(button("Regenerate", regenerate));
    head.appendChild(actions);
    const content = document.createElement("div");
    content.className = "content";
    const stats = document.createElement("div");
    stats.className = "stats";
    el.append(head, content, stats);
    elements.set(m, el);
    updateMessage(m);
    return el;
  }

  function updateMessage(m) {
    const el = elements.get(m);
    if (!el) return;
    el.dataset.state = m.role === "assistant" ? m.state || "done" : "done";
    el.dataset.chunks = String(m.chunks || 0);
    el.classList.toggle("error", m.state === "error");
    const content = el.querySelector(".content");
    if (content) {
      if (m.role === "assistant") renderMarkdown(m.content, content);
      else content.textContent = m.content;
    }
    el.querySelector(".stats").textContent = m.role === "assistant" ? statsLine(m) : "";
    if (el.isConnected) $("messages").scrollTop = $("messages").scrollHeight;
  }

  function statsLine(m) {
    const parts = [];
    if (m.usage) parts.push(m.usage.completion_tokens + " tokens", "prompt " + m.usage.prompt_tokens);
    else if (m.chunks) parts.push("~" + m.chunks + " tokens");
    if (m.model) parts.unshift(m.model);
    if (m.stats && m.stats.tokens_per_s) parts.push(m.stats.tokens_per_s.toFixed(1) + " tok/s");
    if (m.stats && m.stats.first_token_s !== null && m.stats.first_token_s !== undefined) {
      parts.push("first token " + m.stats.first_token_s.toFixed(2) + " s");
    }
    if (m.state === "stopped") parts.push("stopped");
    else if (m.finish === "length") parts.push("cut at max tokens");
    if (m.state === "error") parts.push("error: " + m.error);
    return parts.join(" · ");
  }

  // ---- Markdown, as elements and text nodes only ----

  function renderMarkdown(text, into) {
    into.textContent = "";
    const lines = text.split("\n");
    let i = 0;
    const gather = (test, strip) => {
      const out = [];
      while (i < lines.length && test(lines[i])) out.push(lines[i++].replace(strip, ""));
      return out;
    };
    while (i < lines.length) {
      const line = lines[i];
      const fence = line.match(/^\s*(`{3,}|~{3,})\s*([\w+#.-]*)/);
      if (fence) {
        i += 1;
        const code = [];
        while (i < lines.length && !lines[i].trim().startsWith(fence[1])) code.push(lines[i++]);
        i += 1; // the closing fence (a reply still streaming may not have one yet)
        const pre = document.createElement("pre");
        const el = document.createElement("code");
        if (fence[2]) el.className = "language-" + fence[2];
        el.textContent = code.join("\n");
        pre.appendChild(el);
        into.appendChild(pre);
      } else if (/^#{1,6}\s/.test(line)) {
        const level = line.match(/^#+/)[0].length;
        const h = document.createElement("h" + Math.min(6, level + 2));
        inline(line.replace(/^#+\s+/, ""), h);
        into.appendChild(h);
        i += 1;
      } else if (/^\s*[-*+]\s+/.test(line)) {
        into.appendChild(list("ul", gather((l) => /^\s*[-*+]\s+/.test(l), /^\s*[-*+]\s+/)));
      } else if (/^\s*\d{1,9}[.)]\s+/.test(line)) {
        const start = parseInt(line, 10);
        const ol = list("ol", gather((l) => /^\s*\d{1,9}[.)]\s+/.test(l), /^\s*\d+[.)]\s+/));
        if (start > 1) ol.start = start;
        into.appendChild(ol);
      } else if (/^>/.test(line)) {
        const quote = document.createElement("blockquote");
        inline(gather((l) => /^>/.test(l), /^>\s?/).join("\n"), quote);
        into.appendChild(quote);
      } else if (!line.trim()) {
        i += 1;
      } else {
        const p = document.createElement("p");
        const special = /^(\s*(`{3,}|~{3,})|#{1,6}\s|\s*[-*+]\s+|\s*\d{1,9}[.)]\s+|>)/;
        inline(gather((l) => l.trim() && !special.test(l), /$^/).join("\n"), p);
        into.appendChild(p);
      }
    }
  }

  function list(tag, items) {
    const el = document.createElement(tag);
    for (const item of items) {
      const li = document.createElement("li");
      inline(item, li);
      el.appendChild(li);
    }
    return el;
  }

  // `code`, **bold**, *italic* / _italic_, and [links](https://...) (http and https only); the rest is text
  const INLINE = /(`+)([\s\S]*?[^`])\1(?!`)|\*\*([^*]+)\*\*|\*([^*\s][^*]*)\*|\b_([^_]+)_\b|\[([^\]]+)\]\((https?:\/\/[^\s)]+)\)/g;

  function inline(text, parent) {
    let last = 0;
    for (const m of text.matchAll(INLINE)) {
      textWithBreaks(text.slice(last, m.index), parent);
      let el;
      if (m[1]) {
        el = document.createElement("code");
        el.textContent = m[2];
      } else if (m[3] !== undefined) {
        el = document.createElement("strong");
        el.textContent = m[3];
      } else if (m[4] !== undefined || m[5] !== undefined) {
        el = document.createElement("em");
        el.textContent = m[4] !== undefined ? m[4] : m[5];
      } else {
        el = document.createElement("a");
        el.href = m[7];
        el.textContent = m[6];
        el.rel = "noopener noreferrer nofollow";
        el.target = "_blank";
      }
      parent.appendChild(el);
      last = m.index + m[0].length;
    }
    textWithBreaks(text.slice(last), parent);
  }

  function textWithBreaks(text, parent) {
    text.split("\n").forEach((piece, j) => {
      if (j) parent.appendChild(document.createElement("br"));
      if (piece) parent.appendChild(document.createTextNode(piece));
    });
  }

  // ---- wiring ----

  function start() {
    $("temperature").value = settings.temperature;
    $("top-p").value = settings.top_p;
    $("max-tokens").value = settings.max_tokens;
    $("json-mode").checked = Boolean(settings.json);
    $("json-schema").value = settings.schema;
    $("json-schema-row").hidden = !settings.json;
    $("api-key").value = sessionStorage.getItem(KEY) || "";
    for (const id of ["model", "temperature", "top-p", "max-tokens", "json-mode", "json-schema"]) {
      $(id).addEventListener("change", saveSettings);
    }
    $("api-key-row").addEventListener("submit", (event) => event.preventDefault()); // Enter: keep the page
    $("api-key").addEventListener("change", () => {
      const key = $("api-key").value.trim();
      if (key) sessionStorage.setItem(KEY, key);
      else sessionStorage.removeItem(KEY);
      loadModels();
    });
    $("system").addEventListener("input", () => {
      let conversation = current();
      if (!conversation) {
        conversation = newConversation();
        renderList();
      }
      conversation.system = $("system").value;
      save();
    });
    $("composer").addEventListener("submit", (event) => {
      event.preventDefault();
      if (send($("input").value)) $("input").value = "";
    });
    $("input").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        $("composer").requestSubmit();
      }
    });
    $("stop").addEventListener("click", () => running && running.controller.abort());
    $("new-chat").addEventListener("click", () => {
      if (running) return status(BUSY);
      newConversation();
      render();
      $("input").focus();
    });
    $("settings-toggle").addEventListener("click", () => {
      $("settings").hidden = !$("settings").hidden;
      $("settings-toggle").setAttribute("aria-expanded", String(!$("settings").hidden));
    });
    $("export").addEventListener("click", () => {
      const c = current();
      if (c) download("phikit-chat-" + c.id + ".json", exported([c]));
      else showError("no conversation to export yet");
    });
    $("export-all").addEventListener("click", () => download("phikit-chats.json", exported(store.conversations)));
    render();
    loadModels();
  }

  window.phikitChat = { renderMarkdown, store: () => store };
  document.addEventListener("DOMContentLoaded", start);
})();
