// petkit playground: one prompt, streamed side by side from the base and the chosen adapters.
// Plain JS, no build step. Talks only to this server's OpenAI-compatible endpoints.
"use strict";

const $ = (id) => document.getElementById(id);
let running = [];

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error ? body.error.message : response.statusText;
  } catch (e) {
    return response.status + " " + response.statusText;
  }
}

async function loadModels() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) {
    $("status").textContent = "cannot list models: " + (await errorText(response));
    return;
  }
  const models = (await response.json()).data;
  const box = $("models");
  box.replaceChildren();
  for (const model of models) {
    const label = document.createElement("label");
    const input = document.createElement("input");
    input.type = "checkbox";
    input.value = model.id;
    input.checked = model.parent === null;  // the base is on by default
    input.dataset.kind = model.parent === null ? "base" : "adapter";
    label.append(input, " " + model.id + (model.parent === null ? " (base)" : ""));
    box.append(label);
  }
  const adapters = models.filter((m) => m.parent !== null).length;
  $("status").textContent = `base ${models[0].id}, ${adapters} adapter${adapters === 1 ? "" : "s"}`;
}

function column(model, kind) {
  const card = document.createElement("article");
  card.className = "answer";
  card.dataset.model = model;
  card.dataset.state = "streaming";
  card.dataset.chunks = "0";  // text chunks received so far
  const title = document.createElement("h2");
  const tag = document.createElement("span");
  tag.className = "kind";
  tag.textContent = " " + kind;
  title.append(model, tag);
  const text = document.createElement("pre");
  const meta = document.createElement("div");
  meta.className = "meta";
  meta.textContent = "waiting…";
  card.append(title, text, meta);
  $("answers").append(card);
  return { card, text, meta };
}

// Reads "data: {...}" events off a fetch body; calls onChunk for each JSON chunk.
async function readEvents(body, onChunk) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        onChunk(JSON.parse(data));
      }
    }
  }
}

async function ask(model, kind, prompt, controller) {
  const { card, text, meta } = column(model, kind);
  const started = performance.now();
  let finish = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify({
        model, stream: true, messages: [{ role: "user", content: prompt }],
        max_tokens: Number($("max-tokens").value), temperature: Number($("temperature").value),
        seed: 0,
      }),
    });
    if (!response.ok) throw new Error(await errorText(response));
    await readEvents(response.body, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices[0];
      if (!choice) return;
      if (choice.delta && choice.delta.content) {
        text.textContent += choice.delta.content;
        card.dataset.chunks = String(Number(card.dataset.chunks) + 1);
      }
      if (choice.finish_reason) finish = choice.finish_reason;
      meta.textContent = "streaming…";
    });
    card.dataset.state = "done";
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    meta.textContent = `${finish || "done"}: ${card.dataset.chunks} chunks in ${seconds} s`;
  } catch (err) {
    card.dataset.state = controller.signal.aborted ? "stopped" : "error";
    meta.textContent = controller.signal.aborted ? "stopped" : "error";
    if (!controller.signal.aborted) text.textContent = String(err.message || err);
  }
}

async function send() {
  const prompt = $("prompt").value.trim();
  const chosen = [...document.querySelectorAll("#models input:checked")];
  if (!prompt || chosen.length === 0) {
    $("status").textContent = !prompt ? "type a prompt first" : "pick at least one model";
    return;
  }
  $("answers").replaceChildren();
  $("send").disabled = true;
  $("stop").disabled = false;
  running = chosen.map(() => new AbortController());
  await Promise.all(chosen.map((input, i) => ask(input.value, input.dataset.kind, prompt, running[i])));
  $("send").disabled = false;
  $("stop").disabled = true;
}

$("send").addEventListener("click", send);
$("stop").addEventListener("click", () => running.forEach((c) => c.abort()));
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) send();
});
$("api-key").addEventListener("change", loadModels);
loadModels();
