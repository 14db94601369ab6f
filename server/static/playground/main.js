// The playground page: three streamed columns (base alone, expert alone, proxy-tuned), the proxy's tokens
// coloured by the tuning's shift, every model's top-k on hover or tap, and the paper's summary.
import { ApiError, listModels, stream } from "./api.js";
import { percent, roles, shiftColour, summarize, visible } from "./analysis.js";

const KEY_STORAGE = "proxy-serve-playground-key"; // the tab's session only: never written to disk by the page
const $ = (selector) => document.querySelector(selector);

const state = {
  cards: [],
  runs: {}, // column -> AbortController of its request in flight
  entries: [], // the proxy column's model_logprobs entries, in order
};

function key() {
  return $("#api-key").value.trim();
}

function setStatus(text, isError = false) {
  const status = $("#status");
  status.textContent = text;
  status.classList.toggle("error", isError);
}

// ------------------------------------------------------------------ models and alpha sliders

function fillSelect(select, ids, preferred) {
  select.replaceChildren(...ids.map((id) => new Option(id, id)));
  if (ids.includes(preferred)) select.value = preferred;
}

function buildAlphaSliders(defaults) {
  const box = $("#alphas");
  box.replaceChildren();
  defaults.forEach((value, pair) => {
    const label = document.createElement("label");
    label.className = "alpha";
    const name = defaults.length > 1 ? `α (pair ${pair + 1})` : "α";
    const input = Object.assign(document.createElement("input"), {
      type: "range", min: "0", max: "2", step: "0.05", value: String(value), id: `alpha-${pair}`,
    });
    input.dataset.pair = String(pair);
    const output = document.createElement("output");
    output.htmlFor = input.id;
    output.textContent = Number(value).toFixed(2);
    input.addEventListener("input", () => { output.textContent = Number(input.value).toFixed(2); });
    // A new strength re-runs the proxy-tuned column (the other two do not depend on it).
    input.addEventListener("change", () => runProxy().catch((error) => setStatus(error.message, true)));
    label.append(`${name} `, input, output);
    box.append(label);
  });
}

async function loadModels() {
  try {
    state.cards = await listModels(key());
  } catch (error) {
    const hint = error instanceof ApiError && error.status === 401 ? " (type the server's API key)" : "";
    setStatus(`cannot list the models: ${error.message}${hint}`, true);
    return;
  }
  const ids = state.cards.map((card) => card.id);
  const proxy = state.cards[0];
  fillSelect($("#model-proxy"), ids, proxy.id);
  fillSelect($("#model-base"), ids, `${proxy.id}:base`);
  fillSelect($("#model-expert"), ids, `${proxy.id}:expert`);
  buildAlphaSliders(proxy.alpha && proxy.alpha.length ? proxy.alpha : [1]);
  setStatus("ready");
}

// ------------------------------------------------------------------ requests

function number(selector) {
  return Number($(selector).value);
}

function requestFor(model) {
  const mode = document.querySelector("input[name=mode]:checked").value;
  const prompt = $("#prompt").value;
  const body = {
    model,
    temperature: number("#temperature"),
    top_p: number("#top-p"),
    max_tokens: number("#max-tokens"),
  };
  if (mode === "chat") return ["/v1/chat/completions", { ...body, messages: [{ role: "user", content: prompt }] }];
  return ["/v1/completions", { ...body, prompt }];
}

function alphas() {
  return [...document.querySelectorAll("#alphas input")].map((input) => Number(input.value));
}

function column(name) {
  const section = $(`#column-${name}`);
  return { section, text: section.querySelector(".text"), finish: section.querySelector(".finish") };
}

function resetColumn(name, model) {
  const { section, text, finish } = column(name);
  section.dataset.state = "running";
  section.querySelector(".model-id").textContent = model;
  text.replaceChildren();
  finish.textContent = "";
}

async function runColumn(name, model, extra, onChoice) {
  state.runs[name]?.abort();
  const controller = new AbortController();
  state.runs[name] = controller;
  resetColumn(name, model);
  const { section, finish } = column(name);
  const [endpoint, body] = requestFor(model);
  try {
    await stream(endpoint, { ...body, ...extra }, key(), (chunk) => {
      if (state.runs[name] !== controller) return; // a newer run owns the column now
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) return; // the usage chunk
      onChoice(choice);
      if (choice.finish_reason) finish.textContent = `finish: ${choice.finish_reason}`;
    }, controller.signal);
    if (state.runs[name] === controller) section.dataset.state = "done";
  } catch (error) {
    if (controller.signal.aborted) return; // replaced by a newer run, or stopped
    section.dataset.state = "error";
    finish.textContent = error.message;
    throw error;
  }
}

function plainColumn(name, model) {
  const { text } = column(name);
  return runColumn(name, model, {}, (choice) => {
    const delta = choice.delta ? choice.delta.content : choice.text;
    if (delta) text.append(delta);
  });
}

function runProxy() {
  state.entries = [];
  renderSummary();
  hideDetails();
  const { text } = column("proxy");
  const extra = { model_logprobs: number("#top-k"), alpha: alphas() };
  return runColumn("proxy", $("#model-proxy").value, extra, (choice) => {
    const delta = (choice.delta ? choice.delta.content : choice.text) || "";
    const entries = choice.model_logprobs || [];
    if (!entries.length && delta) text.append(delta);
    for (const entry of entries) {
      // A stop token ends the answer without adding text: shown apart, since the tuning often moves it most.
      const special = delta === "" && entry.token !== "";
      text.append(tokenSpan(entry, state.entries.length, special));
      state.entries.push(entry);
    }
    if (entries.length) renderSummary();
  });
}

async function runAll() {
  setStatus("running…");
  const started = performance.now();
  const runs = [
    plainColumn("base", $("#model-base").value),
    plainColumn("expert", $("#model-expert").value),
    runProxy(),
  ];
  const results = await Promise.allSettled(runs);
  const failed = results.find((r) => r.status === "rejected");
  if (failed) setStatus(failed.reason.message, true);
  else setStatus(`done in ${((performance.now() - started) / 1000).toFixed(1)} s`);
}

function stopAll() {
  for (const controller of Object.values(state.runs)) controller.abort();
  for (const name of ["base", "expert", "proxy"]) {
    const { section } = column(name);
    if (section.dataset.state === "running") section.dataset.state = "stopped";
  }
  setStatus("stopped");
}

// ------------------------------------------------------------------ tokens, details, summary

function tokenSpan(entry, index, special) {
  const span = document.createElement("span");
  span.className = special ? "tok special" : "tok";
  span.textContent = special ? `⟨${entry.token}⟩` : visible(entry.token);
  span.tabIndex = 0;
  span.dataset.index = String(index);
  span.dataset.token = entry.token; // its exact text (the display makes whitespace visible)
  span.style.setProperty("background-color", shiftColour(entry.shift));
  span.setAttribute("aria-describedby", "details");
  return span;
}

function distribution(entry, role) {
  const model = entry.models[role];
  const box = document.createElement("div");
  box.className = "dist";
  box.dataset.role = role;
  const title = document.createElement("h4");
  title.textContent = role.replace("_", "-");
  const table = document.createElement("table");
  for (const top of model.top_logprobs) {
    const row = table.insertRow();
    if (top.token_id === entry.token_id) row.className = "chosen";
    row.insertCell().textContent = visible(top.token);
    const bar = row.insertCell();
    const fill = document.createElement("span");
    fill.className = "bar";
    fill.style.setProperty("width", `${Math.max(1, Math.exp(top.logprob) * 100)}%`);
    bar.append(fill);
    row.insertCell().textContent = percent(top.logprob);
  }
  const chosen = document.createElement("p");
  chosen.className = "chosen-p";
  chosen.textContent = `chosen token: ${percent(model.logprob)}`;
  box.append(title, table, chosen);
  return box;
}

function showDetails(span) {
  const entry = state.entries[Number(span.dataset.index)];
  if (!entry) return;
  const details = $("#details");
  const heading = document.createElement("p");
  heading.className = "heading";
  const sign = entry.shift >= 0 ? "+" : "−";
  heading.textContent = `“${visible(entry.token)}”: proxy − base = ${sign}${Math.abs(entry.shift).toFixed(2)} ` +
    `nats (proxy ${percent(entry.models.proxy.logprob)}, base ${percent(entry.models.base.logprob)})`;
  const grid = document.createElement("div");
  grid.className = "dists";
  grid.append(...roles(entry).map((role) => distribution(entry, role)));
  details.replaceChildren(heading, grid);
  details.hidden = false;
  const rect = span.getBoundingClientRect();
  const width = details.offsetWidth;
  details.style.setProperty("left", `${Math.max(8, Math.min(rect.left, window.innerWidth - width - 8))}px`);
  const below = rect.bottom + 6;
  const top = below + details.offsetHeight > window.innerHeight ? rect.top - details.offsetHeight - 6 : below;
  details.style.setProperty("top", `${Math.max(8, top)}px`);
}

function hideDetails() {
  $("#details").hidden = true;
}

function renderSummary() {
  const box = $("#summary");
  if (!state.entries.length) {
    box.replaceChildren();
    return;
  }
  const summary = summarize(state.entries);
  const heading = document.createElement("h2");
  heading.textContent = "What the tuning changed";
  const share = document.createElement("p");
  share.className = "share";
  const where = summary.changed.length ? ` (at token ${summary.changed.map((p) => p + 1).join(", ")})` : "";
  share.textContent = `The proxy's top token differs from the base's on ${summary.changed.length} of ` +
    `${summary.tokens} tokens: ${(summary.share * 100).toFixed(0)}%${where}. ` +
    "The paper found 13–25% of steps, mostly early in the response.";
  const list = document.createElement("ol");
  list.className = "shifted";
  for (const item of summary.mostShifted) {
    const li = document.createElement("li");
    const token = document.createElement("span");
    token.className = "tok";
    token.textContent = visible(item.token);
    token.style.setProperty("background-color", shiftColour(item.shift));
    const sign = item.shift >= 0 ? "+" : "−";
    li.append(token, ` ${sign}${Math.abs(item.shift).toFixed(2)} nats, token ${item.position + 1}`);
    list.append(li);
  }
  const listTitle = document.createElement("h3");
  listTitle.textContent = "Most-shifted tokens (proxy log-probability − base's)";
  box.replaceChildren(heading, share, listTitle, list);
}

// ------------------------------------------------------------------ wiring

function init() {
  const saved = sessionStorage.getItem(KEY_STORAGE);
  if (saved) $("#api-key").value = saved;
  $("#api-key").addEventListener("change", () => {
    sessionStorage.setItem(KEY_STORAGE, key());
    loadModels();
  });
  $("#controls").addEventListener("submit", (event) => {
    event.preventDefault();
    runAll();
  });
  $("#stop").addEventListener("click", stopAll);
  const tokens = $("#column-proxy .text");
  const target = (event) => event.target.closest && event.target.closest(".tok");
  tokens.addEventListener("mouseover", (event) => { if (target(event)) showDetails(target(event)); });
  tokens.addEventListener("focusin", (event) => { if (target(event)) showDetails(target(event)); });
  tokens.addEventListener("click", (event) => { if (target(event)) showDetails(target(event)); }); // touch
  tokens.addEventListener("mouseleave", hideDetails);
  document.addEventListener("keydown", (event) => { if (event.key === "Escape") hideDetails(); });
  loadModels();
}

init();
