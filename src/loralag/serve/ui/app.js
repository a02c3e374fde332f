// loralag's routing explorer: asks the server it is served by (GET /v1/models for the model, its libraries and
// routers; POST /v1/completions or /v1/chat/completions with stream: true and return_routing: "tokens" for an
// answer and its routing) and shows what comes back. Plain JS, no dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "loralag-api-key";
let card = null; // the served model's card (GET /v1/models)

// Colours: each (library, adapter) keeps the colour it first got, so two panels colour an adapter alike.
const PALETTE = [
  "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac",
  "#1f77b4", "#aec7e8", "#ffbb78", "#98df8a", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5", "#393b79",
];
const colours = new Map();
function colourOf(lib, adapter) {
  const key = lib + "\u0000" + adapter;
  if (!colours.has(key)) {
    const used = [...colours.keys()].filter((k) => k.startsWith(lib + "\u0000")).length;
    let colour = PALETTE[used % PALETTE.length];
    if (used >= PALETTE.length) {
      let h = 2166136261; // FNV-1a of the name: a stable hue beyond the palette
      for (const ch of adapter) h = Math.imul(h ^ ch.codePointAt(0), 16777619) >>> 0;
      colour = `hsl(${h % 360}, 60%, 55%)`;
    }
    colours.set(key, colour);
  }
  return colours.get(key);
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "style") node.style.cssText = v;
    else if (k.includes("-") || k === "role") node.setAttribute(k, v); // data-*, aria-*
    else node[k] = v;
  }
  for (const c of children) node.append(c);
  return node;
}

function setStatus(id, text, error = false) {
  const node = $(id);
  node.textContent = text;
  node.classList.toggle("error", error);
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return `${response.status}: ${body.error.message}`;
  } catch (e) {
    /* not JSON */
  }
  return `${response.status} ${response.statusText}`;
}

// -- the server: model, libraries, routers ------------------------------------------------------------------------
async function connect() {
  setStatus("server-status", "connecting…");
  $("run").disabled = true;
  let response;
  try {
    response = await fetch("/v1/models", { headers: headers() });
  } catch (e) {
    setStatus("server-status", `cannot reach the server: ${e.message}`, true);
    return;
  }
  if (response.status === 401) {
    setStatus("server-status", "This server wants an API key: type it above and press Connect.", true);
    $("api-key").focus();
    return;
  }
  if (!response.ok) {
    setStatus("server-status", await errorText(response), true);
    return;
  }
  card = (await response.json()).data[0];
  const key = $("api-key").value.trim();
  if (key) sessionStorage.setItem(KEY_STORE, key);
  const libs = card.libraries || [];
  const routers = (card.routers || ["lag"]).filter((r) => r !== "fixed"); // fixed wants named adapters
  const first = libs.length ? libs[0] : { router: "lag", k: 20 };
  for (const [id, keepBlank] of [["router", false], ["router-b", true]]) {
    const select = $(id);
    const blank = keepBlank ? select.querySelector('option[value=""]') : null;
    select.replaceChildren(...(blank ? [blank] : []));
    for (const r of routers) select.append(el("option", { value: r, textContent: r }));
    if (!keepBlank) select.value = routers.includes(first.router) ? first.router : routers[0];
  }
  $("k").value = first.k || 20;
  const box = $("libraries");
  box.replaceChildren(el("legend", { textContent: "Libraries" }));
  for (const lib of libs) {
    const input = el("input", { type: "checkbox", value: lib.name, checked: true });
    box.append(el("label", {}, input, `${lib.name} (${lib.adapters} adapters; default ${lib.router})`));
  }
  if (!libs.length) box.append(el("span", { textContent: "no library attached: the base model alone" }));
  const summary = libs.map((l) => `${l.name} · ${l.adapters} adapters`).join(" | ");
  setStatus("server-status", `${card.id} — context ${card.max_model_len} tokens${summary ? " — " + summary : ""}`);
  $("run").disabled = false;
}

// -- one answer, streamed -----------------------------------------------------------------------------------------
function requestBody(router) {
  const body = {
    model: card.id,
    stream: true,
    return_routing: "tokens",
    router,
    k: Math.max(1, parseInt($("k").value, 10) || 1),
    libraries: [...document.querySelectorAll("#libraries input:checked")].map((i) => i.value),
    max_tokens: Math.max(1, parseInt($("max-tokens").value, 10) || 1),
    temperature: Math.min(2, Math.max(0, parseFloat($("temperature").value) || 0)),
  };
  const prompt = $("prompt").value;
  if ($("endpoint").value === "chat") body.messages = [{ role: "user", content: prompt }];
  else body.prompt = prompt;
  return body;
}

function makePanel(router) {
  const panel = el("section", { class: "panel", "data-router": router });
  panel.append(
    el("h2", { textContent: `router ${router}` }),
    el("div", { class: "answer", "aria-label": "answer" }),
    el("p", { class: "meta" }),
    el("div", { class: "libraries" }),
  );
  $("results").append(panel);
  return panel;
}

async function answer(panel, body) {
  const url = body.messages ? "/v1/chat/completions" : "/v1/completions";
  const out = panel.querySelector(".answer");
  const meta = panel.querySelector(".meta");
  meta.textContent = "waiting for the first token…";
  let response;
  try {
    response = await fetch(url, { method: "POST", headers: headers(), body: JSON.stringify(body) });
  } catch (e) {
    meta.textContent = `cannot reach the server: ${e.message}`;
    meta.classList.add("error");
    return false;
  }
  if (!response.ok) {
    meta.textContent = await errorText(response);
    meta.classList.add("error");
    return false;
  }
  meta.textContent = "streaming…";
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let ok = true;
  const handle = (data) => {
    if (data === "[DONE]") return;
    const chunk = JSON.parse(data);
    if (chunk.error) {
      meta.textContent = `error: ${chunk.error.message}`;
      meta.classList.add("error");
      ok = false;
      return;
    }
    for (const choice of chunk.choices || []) {
      const text = choice.delta ? choice.delta.content : choice.text;
      if (text) out.textContent += text;
      if (choice.finish_reason) meta.textContent = `finished: ${choice.finish_reason}`;
      if (choice.token_routing) renderRouting(panel, choice.token_routing, choice.routing || {});
    }
  };
  for (;;) {
    const { value, done } = await reader.read();
    if (value) buffer += decoder.decode(value, { stream: true });
    let at;
    while ((at = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, at);
      buffer = buffer.slice(at + 2);
      for (const line of event.split("\n")) if (line.startsWith("data: ")) handle(line.slice(6));
    }
    if (done) break;
  }
  return ok;
}

// -- routing: the vote, the legend, the tokens × modules heatmap ------------------------------------------------------
function shownToken(t) {
  if (t === "") return "∅";
  return t.replace(/ /g, "·").replace(/\n/g, "⏎").replace(/\t/g, "⇥");
}

function shortModule(name) {
  const layer = name.match(/(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\./);
  const last = name.split(".").slice(-1)[0];
  return layer ? `${layer[1]} ${last}` : name;
}

function renderRouting(panel, tr, summary) {
  const box = panel.querySelector(".libraries");
  box.replaceChildren();
  const T = tr.tokens.length;
  const prompt = tr.prompt_tokens;
  for (const [lib, r] of Object.entries(tr.libraries)) {
    const section = el("section", { class: "library", "data-library": lib });
    const how = r.router + (r.k !== undefined ? `, k ${r.k}` : "") + (r.adapter ? ` ${r.adapter}` : "");
    section.append(el("h3", { textContent: `${lib} — ${how}` }));
    box.append(section);
    if (!r.modules.length) {
      section.append(el("p", { class: "meta", textContent: "off for this request: no routing decisions" }));
      continue;
    }
    const vote = el("p", { class: "vote" });
    if (r.vote) {
      const strong = el("strong", { textContent: r.vote.adapter, style: `background:${colourOf(lib, r.vote.adapter)}` });
      vote.append(
        "Sequence vote: ",
        strong,
        ` — ${r.vote.decisions} of the prompt's token×module decisions (${(100 * r.vote.share).toFixed(1)}%)`,
      );
    } else {
      vote.textContent = "Sequence vote: no adapter chosen over the prompt";
    }
    section.append(vote);
    const legend = el("div", { class: "legend" });
    const shares = (summary[lib] && summary[lib].shares) || {};
    for (const name of [...r.adapters].sort()) colourOf(lib, name); // colours by name order, not by share
    const order = [...r.adapters].sort((a, b) => (shares[b] || 0) - (shares[a] || 0) || a.localeCompare(b));
    for (const name of order) {
      const share = shares[name] !== undefined ? ` ${(100 * shares[name]).toFixed(1)}%` : "";
      legend.append(el("span", {}, el("i", { class: "swatch", style: `background:${colourOf(lib, name)}` }), name + share));
    }
    section.append(legend);

    const grid = el("div", { class: "heatmap", role: "grid", "aria-label": `${lib}: tokens × modules` });
    grid.style.gridTemplateColumns = `max-content repeat(${T}, 10px)`;
    grid.append(el("div", { class: "corner" }));
    tr.tokens.forEach((tok, t) => {
      const kind = t < prompt ? "prompt" : "generated";
      grid.append(el("div", { class: `tok ${kind}${t === prompt ? " gap" : ""}`, textContent: shownToken(tok), "data-t": t }));
    });
    r.modules.forEach((module, m) => {
      grid.append(el("div", { class: "mod", textContent: shortModule(module), title: module }));
      for (let t = 0; t < T; t++) {
        const w = r.winners[m][t];
        const cell = el("div", { class: "cell" + (w === null ? " none" : "") + (t === prompt ? " gap" : "") });
        cell.dataset.m = m;
        cell.dataset.t = t;
        if (w !== null) cell.style.background = colourOf(lib, r.adapters[w]);
        grid.append(cell);
      }
    });
    grid.addEventListener("mousemove", (ev) => hover(ev, lib, r, tr));
    grid.addEventListener("mouseleave", () => ($("tooltip").hidden = true));
    section.append(el("div", { class: "heatmap-scroll" }, grid));
  }
}

function hover(ev, lib, r, tr) {
  const tip = $("tooltip");
  const cell = ev.target.closest(".cell");
  if (!cell) {
    tip.hidden = true;
    return;
  }
  const m = Number(cell.dataset.m);
  const t = Number(cell.dataset.t);
  const w = r.winners[m][t];
  const score = r.scores[m][t];
  const where = t < tr.prompt_tokens ? "prompt" : "generated";
  tip.replaceChildren(
    el("div", {}, `token ${JSON.stringify(tr.tokens[t])} (position ${t}, ${where})`),
    el("div", {}, `${lib} · ${r.modules[m]}`),
    el("div", {}, "adapter ", el("b", { className: "adapter", textContent: w === null ? "none" : r.adapters[w] })),
    el("div", {}, `score ${score === null ? "—" : score}`),
  );
  tip.hidden = false;
  const x = Math.min(ev.clientX + 14, window.innerWidth - tip.offsetWidth - 8);
  const y = Math.min(ev.clientY + 14, window.innerHeight - tip.offsetHeight - 8);
  tip.style.left = `${Math.max(0, x)}px`;
  tip.style.top = `${Math.max(0, y)}px`;
}

// -- the form ---------------------------------------------------------------------------------------------------------
async function run(ev) {
  ev.preventDefault();
  if (!card) return;
  if (!$("prompt").value.trim()) {
    setStatus("run-status", "type a prompt first", true);
    return;
  }
  const routers = [$("router").value];
  if ($("router-b").value) routers.push($("router-b").value);
  $("results").replaceChildren();
  $("run").disabled = true;
  setStatus("run-status", routers.length > 1 ? `answering with ${routers.join(" and ")}…` : "answering…");
  try {
    const results = await Promise.all(routers.map((r) => answer(makePanel(r), requestBody(r))));
    setStatus("run-status", results.every(Boolean) ? "done" : "failed: see the panel", !results.every(Boolean));
  } catch (e) {
    setStatus("run-status", `failed: ${e.message}`, true);
  } finally {
    $("run").disabled = false;
  }
}

$("controls").addEventListener("submit", run);
$("connect").addEventListener("click", connect);
$("api-key").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter") connect();
});
$("api-key").value = sessionStorage.getItem(KEY_STORE) || "";
connect();
