// parti-jax serve: the page's script. Prompts are untrusted text: every one is
// shown with textContent or as an attribute value, never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const FIELDS = ["prompt", "negative_prompt", "num_images", "guidance_scale", "temperature",
  "seed", "rerank"];
let polling = null;

function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "text") node.textContent = v;
    else if (k === "class") node.className = v;
    else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child);
  return node;
}

function say(text, kind = "") {
  const m = $("message");
  m.textContent = text;
  m.className = kind;
}

async function getJSON(url, options) {
  const response = await fetch(url, options);
  let body = {};
  try { body = await response.json(); } catch (e) { body = {error: response.statusText}; }
  return {status: response.status, body};
}

async function loadInfo() {
  const {body} = await getJSON("/api/info");
  const d = body.defaults, l = body.limits;
  $("num_images").value = d.num_images;
  $("num_images").max = l.max_images;
  $("guidance_scale").value = d.guidance_scale;
  $("temperature").value = d.temperature;
  $("seed").value = d.seed;
  $("prompt").maxLength = l.max_prompt_chars;
  $("negative_prompt").maxLength = l.max_prompt_chars;
  const select = $("rerank");
  for (const name of body.rerankers) select.append(el("option", {value: name, text: name}));
  select.value = d.rerank;
}

function settingsText(s) {
  return `${s.num_images} image(s), guidance ${s.guidance_scale}, temperature ` +
    `${s.temperature}, seed ${s.seed}, rerank ${s.rerank}` +
    (s.negative_prompt ? `, negative prompt: ${s.negative_prompt}` : "");
}

async function loadHistory() {
  const {body} = await getJSON("/api/history");
  const list = $("history");
  list.replaceChildren();
  for (const job of body.history || []) {
    const item = el("li", {"data-job": job.id}, [
      el("span", {class: "prompt", text: job.settings.prompt}),
      el("span", {class: "state", text: `${job.state} · ${settingsText(job.settings)}`}),
    ]);
    const again = el("button", {type: "button", text: job.has_images ? "show" : "reuse"});
    again.addEventListener("click", () => {
      for (const f of FIELDS) if ($(f)) $(f).value = job.settings[f] ?? "";
      if (job.has_images || job.state !== "done") follow(job.id);
    });
    item.append(again);
    list.append(item);
  }
}

function showResult(job) {
  $("result").hidden = false;
  $("result-prompt").textContent = job.settings.prompt;
  const secs = job.seconds !== undefined ? ` · ${job.seconds.toFixed(2)} s` : "";
  $("result-meta").textContent = settingsText(job.settings) + secs;
  const grid = $("grid");
  grid.replaceChildren();
  for (const image of job.images || []) {
    const img = el("img", {src: image.url, width: job.size[1], height: job.size[0]});
    img.alt = `${job.settings.prompt} (rank ${image.rank + 1})`;
    const score = image.score === null ? "draw " + image.sample_index :
      `score ${image.score.toFixed(3)}`;
    const link = el("a", {href: image.download, download: `parti_${job.settings.seed}_${image.rank}.png`,
      text: "PNG"});
    grid.append(el("figure", {"data-rank": image.rank}, [img, el("figcaption", {}, [
      el("span", {text: `#${image.rank + 1} · ${score}`}), link])]));
  }
}

function showProgress(job) {
  const bar = $("progress");
  bar.hidden = false;
  const p = job.progress;
  if (job.state === "queued") {
    bar.removeAttribute("value");
    say(`Waiting: ${job.ahead} job(s) ahead.`);
    return;
  }
  let fraction = p.rows_total ? p.rows_done / p.rows_total : 0;
  if (p.estimate_s) fraction = Math.max(fraction, Math.min(0.95, p.elapsed_s / p.estimate_s));
  bar.value = fraction;
  say(`Sampling ${p.rows_total} image(s)… ${p.elapsed_s.toFixed(1)} s` +
    (p.estimate_s ? ` of about ${p.estimate_s.toFixed(1)} s` : ""));
}

function follow(id) {
  if (polling) clearTimeout(polling);
  const tick = async () => {
    const {status, body} = await getJSON(`/api/jobs/${encodeURIComponent(id)}`);
    if (status !== 200) { say(body.error || "job not found", "error"); done(); return; }
    if (body.state === "done") {
      $("progress").hidden = true;
      say("");
      showResult(body);
      done();
    } else if (body.state === "failed") {
      say(`Sampling failed: ${body.error}`, "error");
      done();
    } else {
      showProgress(body);
      polling = setTimeout(tick, 250);
    }
  };
  $("submit").disabled = true;
  tick();
}

function done() {
  polling = null;
  $("submit").disabled = false;
  $("progress").hidden = true;
  loadHistory();
}

async function submit(event) {
  event.preventDefault();
  for (const f of FIELDS) $(f).classList.remove("invalid");
  const fields = {};
  for (const f of FIELDS) fields[f] = $(f).value;
  const {status, body} = await getJSON("/api/generate", {
    method: "POST",
    headers: {"Content-Type": "application/json", "Accept": "application/json"},
    body: JSON.stringify(fields),
  });
  if (status === 202) {
    loadHistory();
    follow(body.id);
  } else if (status === 429) {
    say(body.error, "busy");
  } else {
    say(body.error || `error ${status}`, "error");
    if (body.field && $(body.field)) $(body.field).classList.add("invalid");
  }
}

document.addEventListener("DOMContentLoaded", async () => {
  $("generate").addEventListener("submit", submit);
  await loadInfo();
  await loadHistory();
  const match = /^#job=([\w-]+)$/.exec(location.hash);
  if (match) follow(match[1]);
});
