// tessera serve: the page. Plain JavaScript, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { sources: [], result: null, busy: false };

function esc(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

function setStatus(text, isError) {
  const el = $("status");
  el.textContent = text || "";
  el.classList.toggle("error", !!isError);
}

function errorText(body, response) {
  const e = body && body.error;
  let msg = e ? e.message : `HTTP ${response ? response.status : "error"}`;
  if (response && response.status === 429) {
    msg += ` (retry after ${response.headers.get("Retry-After") || "a few"} s)`;
  }
  return msg;
}

// ---------------------------------------------------------------- corpora and upload
async function loadCorpora(select) {
  const r = await fetch("/v1/corpora");
  const body = await r.json();
  const sel = $("corpus");
  const keep = select || sel.value || body.default;
  sel.innerHTML = "";
  for (const c of body.corpora) {
    const opt = document.createElement("option");
    opt.value = c.id;
    const size = c.passages != null ? ` · ${c.passages} passages` : "";
    opt.textContent = c.status === "ready" ? `${c.name}${size}` : `${c.name} (${c.status})`;
    opt.disabled = c.status !== "ready";
    sel.appendChild(opt);
  }
  sel.value = keep;
  return body;
}

async function upload() {
  const files = $("upload-files").files;
  const status = $("upload-status");
  const bar = $("upload-progress");
  if (!files.length) { status.textContent = "Choose one or more files first."; return; }
  const form = new FormData();
  for (const f of files) form.append("files", f, f.name);
  if ($("upload-name").value.trim()) form.append("name", $("upload-name").value.trim());
  $("upload-btn").disabled = true;
  bar.hidden = false; bar.value = 0;
  status.textContent = "Uploading…";
  try {
    const r = await fetch("/v1/corpora", { method: "POST", body: form });
    const body = await r.json();
    if (!r.ok) { status.textContent = errorText(body, r); bar.hidden = true; return; }
    const corpus = body.corpus;
    let job = body.job;
    while (job && job.status !== "done" && job.status !== "failed") {
      bar.value = job.progress;
      status.textContent = `Indexing ${corpus.id}: ${job.stage} (${Math.round(job.progress * 100)}%)`;
      await new Promise((res) => setTimeout(res, 300));
      job = await (await fetch(`/v1/jobs/${job.id}`)).json();
    }
    if (job && job.status === "failed") { status.textContent = `Indexing failed: ${job.error}`; return; }
    bar.value = 1;
    await loadCorpora(corpus.id);
    status.textContent = `Corpus ${corpus.id} is ready.`;
  } catch (err) {
    status.textContent = `Upload failed: ${err}`;
  } finally {
    $("upload-btn").disabled = false;
  }
}

// ---------------------------------------------------------------- sources and the passage viewer
function renderSources(sources) {
  state.sources = sources;
  const list = $("sources");
  list.innerHTML = "";
  if (!sources.length) { list.innerHTML = '<li class="placeholder">No passage matched the question.</li>'; return; }
  for (const s of sources) {
    const li = document.createElement("li");
    li.dataset.source = s.number;
    const flat = s.text.replace(/\s+/g, " ").trim();
    const snippet = flat.length > 170 ? flat.slice(0, 167).replace(/\s+\S*$/, "") + "…" : flat;
    li.innerHTML = `<span class="src-num">[${s.number}]</span><span class="src-title">${esc(s.title || s.doc_id)}</span>` +
      `<span class="src-id">${esc(s.doc_id)}</span><div class="src-snippet">${esc(snippet)}</div>`;
    li.addEventListener("click", () => openSource(s.number, [], ""));
    list.appendChild(li);
  }
}

// ranges: [{start, end}] in document characters; cls: the mark's class
function openSource(number, ranges, cls, label) {
  const s = state.sources.find((x) => x.number === number);
  if (!s) return;
  // reflow single line breaks (a newline becomes a space: same length, so offsets still hold)
  const text = s.text.replace(/([^\n])\n(?!\n)/g, "$1 ");
  const rel = ranges
    .map((r) => [Math.max(0, r.start - s.start), Math.min(text.length, r.end - s.start)])
    .filter(([a, b]) => b > a)
    .sort((x, y) => x[0] - y[0]);
  let html = "", at = 0;
  for (const [a, b] of rel) {
    if (a < at) continue;
    html += esc(text.slice(at, a)) + `<mark class="${cls}">${esc(text.slice(a, b))}</mark>`;
    at = b;
  }
  html += esc(text.slice(at));
  $("viewer-title").textContent = `[${s.number}] ${s.title || s.doc_id}`;
  $("viewer-meta").textContent = `${s.doc_id} · characters ${s.start}–${s.end}` + (label ? ` · ${label}` : "");
  $("viewer-text").innerHTML = html;
  $("viewer").hidden = false;
  const first = $("viewer-text").querySelector("mark");
  if (first) first.scrollIntoView({ block: "nearest" });
}

function chip(label, title, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = "chip";
  b.textContent = label;
  b.title = title;
  b.addEventListener("click", (ev) => {
    document.querySelectorAll(".chip.active").forEach((c) => c.classList.remove("active"));
    b.classList.add("active");
    onClick(ev);
  });
  return b;
}

// ---------------------------------------------------------------- the answer
function renderResult(res) {
  state.result = res;
  const box = $("answer");
  box.classList.remove("streaming");
  box.innerHTML = "";
  const copied = res.spans.filter((s) => s.source);
  if (res.statements.length) {
    for (const st of res.statements) {
      const p = document.createElement("p");
      p.className = "statement";
      // a statement that NEST copied from the corpus is marked as such, with a chip to the copied text
      const norm = (x) => x.replace(/\s+/g, " ").trim();
      const from = copied.find((sp) => norm(sp.text).includes(norm(st.text)) || norm(st.text).includes(norm(sp.text)));
      if (from) {
        const span = document.createElement("span");
        span.className = "copied";
        span.textContent = st.text;
        span.title = `copied by NEST from ${from.source.doc_id}`;
        p.appendChild(span);
        if (from.source.source != null) {
          const b = chip(`copied [${from.source.source}]`, `NEST copied this from ${from.source.doc_id}`, () =>
            openSource(from.source.source, [from.source], "copied-src", "copied span"));
          b.classList.add("copy-chip");
          p.appendChild(b);
        }
      } else {
        p.appendChild(document.createTextNode(st.text));
      }
      if (!st.citations.length) {
        const none = document.createElement("span");
        none.className = "chip none";
        none.textContent = "no citation";
        p.appendChild(none);
      }
      for (const c of st.citations) {
        const ids = c.sentence_ids.join(", ");
        const b = chip(`[${c.source}]`, `${c.title || c.doc_id}: sentence ${ids}`, () =>
          openSource(c.source, c.sentences, "cited", `cited sentence${c.sentences.length > 1 ? "s" : ""} ${ids}`));
        b.dataset.source = c.source;
        b.dataset.sentences = JSON.stringify(c.sentences.map((x) => x.text));
        p.appendChild(b);
      }
      box.appendChild(p);
    }
  } else if (copied.length) {
    const p = document.createElement("p");
    p.className = "statement";
    for (const sp of res.spans) {
      if (!sp.source) { p.appendChild(document.createTextNode(sp.text)); continue; }
      const span = document.createElement("span");
      span.className = "copied";
      span.textContent = sp.text;
      span.title = `copied from ${sp.source.doc_id}`;
      p.appendChild(span);
      if (sp.source.source != null) {
        p.appendChild(chip(`[${sp.source.source}]`, `copied from ${sp.source.doc_id}`, () =>
          openSource(sp.source.source, [sp.source], "copied-src", "copied span")));
      }
    }
    box.appendChild(p);
  } else {
    box.textContent = res.answer || "(empty answer)";
  }
  const legend = $("legend");
  if (res.decode === "nest") {
    const pct = Math.round((res.attribution_ratio || 0) * 100);
    legend.innerHTML = `NEST: <span class="copied">${pct}% of the answer's tokens</span> were copied from the sources` +
      (copied.length ? `: ${copied.length} span${copied.length > 1 ? "s" : ""}.` : ".");
    if (res.statements.length && copied.length) {
      legend.innerHTML += " Chips: <span class=\"chip\">[n]</span> SelfCite citation, <span class=\"chip copy-chip\">copied [n]</span> NEST source.";
    }
    legend.hidden = false;
  } else {
    legend.hidden = true;
  }
  renderTimings(res);
}

function renderTimings(res) {
  const t = res.timings;
  const ms = (x) => (x == null ? "–" : x < 1 ? `${Math.round(x * 1000)} ms` : `${x.toFixed(2)} s`);
  const rows = [["retrieval", t.retrieve_s], ["generation", t.generate_s], ["first token", t.time_to_first_token_s]];
  if (t.keys_s != null) rows.push(["NEST token keys", t.keys_s]);
  if (t.cite_s != null) rows.push(["citation scoring", t.cite_s]);
  rows.push(["waiting in queue", t.queue_s], ["total", t.total_s]);
  const tb = $("timings").querySelector("tbody");
  tb.innerHTML = rows.map(([k, v]) => `<tr><td>${k}</td><td class="v">${ms(v)}</td></tr>`).join("") +
    `<tr><td>tokens</td><td class="v">${res.new_tokens}</td></tr>`;
  $("timings").hidden = false;
}

function parseEvents(buffer, onEvent) {
  let idx;
  while ((idx = buffer.indexOf("\n\n")) >= 0) {
    const block = buffer.slice(0, idx);
    buffer = buffer.slice(idx + 2);
    let event = "message", data = "";
    for (const line of block.split("\n")) {
      if (line.startsWith("event:")) event = line.slice(6).trim();
      else if (line.startsWith("data:")) data += line.slice(5).trim();
    }
    if (data) onEvent(event, JSON.parse(data));
  }
  return buffer;
}

async function ask(ev) {
  ev.preventDefault();
  if (state.busy) return;
  const question = $("question").value.trim();
  if (!question) { setStatus("Write a question first.", true); return; }
  const body = {
    question, corpus: $("corpus").value || null, retriever: $("retriever").value, decode: $("decode").value,
    cite: $("cite").checked, k: parseInt($("k").value, 10) || 3,
  };
  state.busy = true;
  $("ask").disabled = true;
  $("viewer").hidden = true;
  $("timings").hidden = true;
  $("legend").hidden = true;
  const box = $("answer");
  box.textContent = "";
  delete box.dataset.done;
  box.classList.add("streaming");
  setStatus("sending…");
  let streamed = "";
  try {
    const r = await fetch("/v1/ask/stream", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    if (!r.ok) {
      let err = null;
      try { err = await r.json(); } catch (_) { /* not JSON */ }
      throw new Error(errorText(err, r));
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "", done = false, failed = null;
    const onEvent = (event, data) => {
      if (event === "queued") setStatus(data.position > 0 ? `waiting in queue (${data.position} ahead)…` : "retrieving…");
      else if (event === "sources") { renderSources(data.sources); setStatus("generating…"); }
      else if (event === "token") { streamed += data.text; box.textContent = streamed; }
      else if (event === "answer") setStatus(data.citing ? "scoring citations (SelfCite)…" : "finishing…");
      else if (event === "result") { renderSources(data.sources); renderResult(data); done = true; }
      else if (event === "error") failed = data.error ? data.error.message : "the server failed";
    };
    for (;;) {
      const { value, done: end } = await reader.read();
      if (end) break;
      buffer = parseEvents(buffer + decoder.decode(value, { stream: true }), onEvent);
    }
    parseEvents(buffer + "\n\n", onEvent);
    if (failed) throw new Error(failed);
    if (!done) throw new Error("the stream ended before the answer was complete");
    setStatus("done");
    box.dataset.done = "1";
  } catch (err) {
    box.classList.remove("streaming");
    if (!streamed) box.textContent = "";
    setStatus(String(err.message || err), true);
  } finally {
    state.busy = false;
    $("ask").disabled = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("ask-form").addEventListener("submit", ask);
  $("question").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("ask-form").requestSubmit(); }
  });
  $("upload-toggle").addEventListener("click", () => {
    const panel = $("upload-panel");
    panel.hidden = !panel.hidden;
    $("upload-toggle").setAttribute("aria-expanded", String(!panel.hidden));
  });
  $("upload-btn").addEventListener("click", upload);
  $("viewer-close").addEventListener("click", () => { $("viewer").hidden = true; });
  loadCorpora().catch((e) => setStatus(`could not list corpora: ${e}`, true));
});
