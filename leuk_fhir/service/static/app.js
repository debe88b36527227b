// leuk-fhir clinician page: live analysis list (SSE), detail view with cell overlay, sign-off.
// Plain JS, no build step; talks only to this server's /v1 API.
"use strict";

const state = { token: sessionStorage.getItem("leukFhirToken") || "", model: null, events: null, current: null,
  demoSeen: false, wasLive: false, retryMs: 3000 };
const $ = (id) => document.getElementById(id);
const PALETTE = ["#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#ff7f0e"];
const BLAST = "#d62728", INDET = "#7f7f7f";

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (state.token) headers["Authorization"] = "Bearer " + state.token;
  let response;
  try { response = await fetch(path, Object.assign({}, options, { headers })); } catch (e) {
    const err = new Error("the server could not be reached (network down or server stopped)");
    err.status = 0; throw err;
  }
  if (response.status === 401) { showTokenPanel(); const err = new Error("a token is required"); err.status = 401; throw err; }
  if (!response.ok) {
    let detail = response.statusText;
    try { const p = await response.json(); detail = p.detail || p.title || detail; } catch (e) { /* not JSON */ }
    const err = new Error(detail || ("HTTP " + response.status)); err.status = response.status; throw err;
  }
  return response;
}

function withToken(path, params = {}) {
  const query = new URLSearchParams(params);
  if (state.token) query.set("access_token", state.token);
  const text = query.toString();
  return text ? path + "?" + text : path;
}

function showTokenPanel() { $("token-panel").hidden = false; }

function fmtTime(iso) { return iso ? new Date(iso).toLocaleString() : ""; }
function fmtPct(v) { return v === null || v === undefined ? "–" : v.toFixed(1) + " %"; }
function badge(text, cls) { return el("span", { class: "badge " + (cls || text || "") }, text || "–"); }

function classColour(cls, index) {
  if (!cls) return INDET;
  if (cls.is_blast) return BLAST;
  return PALETTE[index % PALETTE.length];
}

// The DEMO banner shows from the first paint (fail-safe) and is hidden only once the server says
// the loaded model is not a demo and no analysis on screen came from a demo model.
function setDemo(isDemo) {
  if (isDemo) state.demoSeen = true;
  $("demo-banner").hidden = !state.demoSeen && !isDemo;
}

async function loadModel() {
  try {
    const model = await (await api("/v1/model")).json();
    state.model = model;
    if (model.loaded) {
      $("model-label").textContent = "Model " + model.name + " " + model.version + (model.is_demo ? " (DEMO)" : "");
      setDemo(model.is_demo);
    } else {
      $("model-label").textContent = model.error ? "Model error" : "Model loading…";
      if (!model.error) setTimeout(loadModel, 2000);
    }
  } catch (e) { $("model-label").textContent = ""; }
}

// ---- list view -------------------------------------------------------------------------
async function loadList() {
  let data;
  try { data = await (await api("/v1/analyses?limit=100")).json(); } catch (e) { return; }
  const rows = $("analysis-rows");
  rows.replaceChildren();
  if (!data.analyses.length) {
    rows.append(el("tr", {}, el("td", { colspan: "7", class: "muted" }, "No analyses yet: submit an image above.")));
  }
  for (const a of data.analyses) {
    if (a.model && a.model.is_demo) setDemo(true);
    const tr = el("tr", { class: "row" + (a.outcome === "blasts-detected" ? " blasts" : "") + (a.status === "failed" ? " failed" : ""), "data-id": a.id },
      el("td", {}, fmtTime(a.created_at)),
      el("td", {}, el("a", { href: "#/analyses/" + a.id }, a.id.slice(0, 11))),
      el("td", {}, badge(a.status, a.status === "failed" ? "failed" : "")),
      el("td", { class: "outcome" }, a.outcome ? badge(a.outcome)
        : a.error ? el("span", { class: "error-text" }, el("strong", {}, "Failed: "), a.error.code + ": " + a.error.message) : "–"),
      el("td", {}, fmtPct(a.blast_percentage)),
      el("td", {}, a.report.status ? badge(a.report.status) : "–"),
      el("td", {}, a.model ? a.model.name + " " + a.model.version : "–", a.model && a.model.is_demo ? " " : "", a.model && a.model.is_demo ? badge("DEMO", "demo") : ""));
    tr.addEventListener("click", (ev) => { if (ev.target.tagName !== "A") location.hash = "#/analyses/" + a.id; });
    rows.append(tr);
  }
}

// ---- detail view -----------------------------------------------------------------------
async function blobUrl(path) {
  const blob = await (await api(path)).blob();
  return URL.createObjectURL(blob);
}

function drawOverlay(analysis) {
  const svg = $("overlay");
  svg.replaceChildren();
  const f = analysis.findings, img = f && f.image;
  const legend = $("legend");
  legend.replaceChildren();
  if (!f || !img) return;
  svg.setAttribute("viewBox", "0 0 " + img.width + " " + img.height);
  const classes = f.model.classes;
  const indexOf = (name) => classes.findIndex((c) => c.name === name);
  const ns = "http://www.w3.org/2000/svg";
  f.cells.forEach((cell, i) => {
    if (!cell.box || cell.frame !== 0) return;
    const cls = classes[indexOf(cell.label)];
    const colour = classColour(cls, indexOf(cell.label));
    const [x, y, w, h] = cell.box.map((v) => v * img.scale);
    const rect = document.createElementNS(ns, "rect");
    const sw = Math.max(2, img.width / 200);
    Object.entries({ x, y, width: w, height: h, fill: "none", stroke: colour, "stroke-width": sw,
      "data-label": cell.label, class: "cell-box" + (cls && cls.is_blast ? " blast" : "") }).forEach(([k, v]) => rect.setAttribute(k, v));
    if (cls && cls.is_blast) rect.setAttribute("stroke-dasharray", (sw * 4) + " " + (sw * 2));  // not colour alone
    const title = document.createElementNS(ns, "title");
    title.textContent = "#" + (i + 1) + " " + cell.display + " " + (cell.confidence * 100).toFixed(0) + " %";
    rect.append(title);
    svg.append(rect);
    if (f.cells.length > 1 || (cls && cls.is_blast)) {
      const t = document.createElementNS(ns, "text");
      Object.entries({ x: x + 3, y: y + Math.max(12, img.width / 60), fill: colour, "font-size": Math.max(11, img.width / 55), "font-weight": "700" })
        .forEach(([k, v]) => t.setAttribute(k, v));
      t.textContent = String(i + 1) + (cls && cls.is_blast ? " B" : "");
      svg.append(t);
    }
  });
  classes.forEach((c, i) => {
    const item = el("span", { class: c.is_blast ? "blast" : "" }, c.display + (c.is_blast && !/blast/i.test(c.display) ? " (blast)" : "") + (c.is_blast ? " – dashed, “B”" : ""));
    item.style.setProperty("--c", classColour(c, i));
    legend.append(item);
  });
  const ind = el("span", {}, "indeterminate");
  ind.style.setProperty("--c", INDET);
  legend.append(ind);
}

function renderSummary(a) {
  const dl = $("summary");
  dl.replaceChildren();
  const f = a.findings;
  const add = (k, v) => dl.append(el("dt", {}, k), el("dd", {}, v));
  add("Outcome", a.outcome ? badge(a.outcome) : a.status);
  add("Blast percentage", fmtPct(a.blast_percentage));
  if (f) {
    add("Cells classified", f.classified_count + " of " + f.cells.length);
    add("Blasts", String(f.blast_count));
    add("Mean confidence", (f.confidence * 100).toFixed(1) + " %");
    add("Model", f.model.name + " " + f.model.version + (f.model.is_demo ? " (DEMO)" : ""));
  }
  const patient = a.order && a.order.patient;
  if (patient && (patient.name || patient.identifier)) {
    add("Patient", [patient.name ? patient.name.replace(/\^/g, " ") : "", patient.identifier ? "(" + patient.identifier + ")" : ""].filter(Boolean).join(" "));
  }
  if (a.filename) add("File", a.filename);
  add("Scope", a.scope || "–");
  if (a.order && a.order.ordering_practitioner) add("Ordering clinician", a.order.ordering_practitioner);
  if (a.error) add("Failed because", el("span", { class: "error-text" }, a.error.code + ": " + a.error.message));
}

function renderCells(a) {
  const rows = $("cell-rows");
  rows.replaceChildren();
  const f = a.findings;
  if (!f) return;
  const classes = f.model.classes;
  f.cells.forEach((cell, i) => {
    const idx = classes.findIndex((c) => c.name === cell.label);
    const isBlast = !!(classes[idx] && classes[idx].is_blast);
    const swatch = el("span", { class: "badge swatch" + (isBlast ? " blast" : "") }, (isBlast ? "⚠ " : "") + cell.display);
    swatch.style.setProperty("--c", classColour(classes[idx], idx));
    const probs = Object.entries(cell.probabilities).sort((p, q) => q[1] - p[1]).slice(0, 4)
      .map(([k, v]) => k + " " + (v * 100).toFixed(1) + "%").join(", ");
    rows.append(el("tr", { class: "cell-row" },
      el("td", {}, String(i + 1)), el("td", {}, swatch),
      cell.indeterminate_reason
        ? el("td", { title: cell.indeterminate_reason }, "– (" + cell.indeterminate_reason.split(":")[0] + ")")
        : el("td", {}, (cell.confidence * 100).toFixed(1) + " %"),
      el("td", {}, probs), el("td", {}, cell.box ? cell.box.join(", ") : "whole image")));
  });
}

function renderSignoff(a) {
  const r = a.report, box = $("signoff-state");
  box.replaceChildren();
  const form = $("signoff-form");
  if (r.status === "final") {
    box.append(badge("final"), " signed off by ", el("strong", {}, r.signed_off_by || "?"), " at " + fmtTime(r.signed_off_at),
      r.comment ? el("div", { class: "muted" }, "“" + r.comment + "”") : "");
    form.hidden = true;
  } else if (a.status === "completed") {
    box.append(badge("preliminary"), " AI-generated, awaiting review by a clinician.");
    form.hidden = false;
    // auth off: the page must say who signs; auth on: the token names the clinician
    $("signoff-name").hidden = $("signoff-name-label").hidden = !!state.token;
    $("signoff-name").required = !state.token;
  } else {
    box.append(el("span", { class: "muted" }, "Available once the analysis is complete."));
    form.hidden = true;
  }
}

function renderDeliveries(a) {
  const ul = $("deliveries");
  ul.replaceChildren();
  if (!a.deliveries || !a.deliveries.length) {
    ul.append(el("li", { class: "muted" }, a.status === "completed" ? "Not queued for an EHR." : "–"));
    return;
  }
  for (const d of a.deliveries) {
    ul.append(el("li", { class: "delivery" }, (d.kind || d.key) + ": ", badge(d.state || "unknown"),
      d.attempts ? " (" + d.attempts + " attempts)" : "", d.last_error ? el("div", { class: "muted" }, d.last_error) : ""));
  }
}

async function showDetail(id) {
  $("list-view").hidden = true;
  $("detail-view").hidden = false;
  if (state.current !== id) {  // a different analysis: clear what the previous one showed
    $("detail-image").removeAttribute("src");
    delete $("detail-image").dataset.analysis;
    $("overlay").replaceChildren();
    $("cell-rows").replaceChildren();
    $("signoff-form").reset();
    $("signoff-error").hidden = true;
    $("report-frame").src = "about:blank";
  }
  state.current = id;
  let a;
  try { a = await (await api("/v1/analyses/" + encodeURIComponent(id))).json(); } catch (e) {
    $("detail-title").textContent = "Analysis " + id + ": " + e.message; return;
  }
  if (state.current !== id) return;
  $("detail-title").textContent = "Analysis " + a.id;
  const demo = !!(a.model && a.model.is_demo);
  $("detail-demo").hidden = !demo;
  if (demo) setDemo(true);
  $("detail-status").replaceChildren(badge(a.status, a.status === "failed" ? "failed" : ""), " received " + fmtTime(a.created_at),
    a.report.status ? " · report " : "", a.report.status ? badge(a.report.status) : "");
  renderSummary(a); renderCells(a); renderSignoff(a); renderDeliveries(a);
  $("fhir-json").textContent = a.fhir_bundle ? JSON.stringify(a.fhir_bundle, null, 2) : "(no Bundle yet)";
  if (a.status === "completed") {
    try {
      const img = $("detail-image");
      if (img.dataset.analysis === a.id && img.complete && img.naturalWidth) {
        drawOverlay(a);
      } else {
        img.onload = () => drawOverlay(a);
        img.dataset.analysis = a.id;
        img.src = await blobUrl(a.links.image);
      }
    } catch (e) { drawOverlay(a); }
    // Frames and links cannot send headers: GETs may carry the token as ?access_token=.
    const reportUrl = withToken(a.links.report_html, { v: a.report.status || "" });  // reload once final
    if ($("report-frame").getAttribute("src") !== reportUrl) $("report-frame").src = reportUrl;
    $("pdf-link").href = withToken(a.links.report_pdf, { v: a.report.status || "" });
  } else {
    $("detail-image").removeAttribute("src");
    $("overlay").replaceChildren();
    $("report-frame").src = "about:blank";
  }
}

// ---- live events -----------------------------------------------------------------------
let listReload = null;
function scheduleListReload() {  // at most two list reloads a second, however busy the lab
  if (listReload) return;
  listReload = setTimeout(() => { listReload = null; loadList(); }, 500);
}

function showAlert(data) {
  const text = "Blasts detected" + (data.blast_percentage != null ? " (" + data.blast_percentage.toFixed(1) + " % of classified cells)" : "") +
    " in analysis " + data.id.slice(0, 11) + (data.communication_queued
      ? ": alert Communication" + (data.ordering_practitioner ? " to " + data.ordering_practitioner : "") + " queued for the EHR"
      : "");
  const close = el("button", { type: "button", "aria-label": "Dismiss alert for analysis " + data.id.slice(0, 11) }, "Dismiss");
  const box = el("div", { class: "alert", role: "alert", "data-id": data.id },
    el("span", {}, "⚠ " + text + " · ", el("a", { href: "#/analyses/" + data.id }, "open")), close);
  close.addEventListener("click", () => {
    // keep keyboard focus on the page: the next alert's Dismiss, else the main content
    const next = box.nextElementSibling || box.previousElementSibling;
    box.remove();
    const target = next ? next.querySelector("button") : (!$("detail-view").hidden ? $("detail-title") : $("list-title"));
    target.focus();
  });
  $("alerts").prepend(box);
}

function announce(text) { $("list-announce").textContent = text; }

function setLive(on, text) {
  $("live").textContent = text; $("live").classList.toggle("on", on);
}

function connectEvents() {
  if (state.events) state.events.close();
  const url = "/v1/events" + (state.token ? "?access_token=" + encodeURIComponent(state.token) : "");
  const es = new EventSource(url);
  state.events = es;
  es.addEventListener("hello", () => {
    setLive(true, "● live");
    state.retryMs = 3000;
    // events sent while we were away are lost: read the list (or the analysis shown) again
    if (state.wasLive) {
      loadModel();
      if (!$("list-view").hidden) loadList();
      if (state.current && !$("detail-view").hidden) showDetail(state.current);
    }
    state.wasLive = true;
  });
  es.onerror = () => {
    if (state.events !== es) return;
    setLive(false, "○ reconnecting…");
    // Refused (all live streams taken, or signed out): the browser gives up; try again later.
    if (es.readyState === EventSource.CLOSED) {
      setTimeout(() => { if (state.events === es) connectEvents(); }, state.retryMs);
      state.retryMs = Math.min(state.retryMs * 2, 30000);
    }
  };
  es.addEventListener("analysis", (ev) => {
    const data = JSON.parse(ev.data);
    announce("Analysis " + data.id.slice(0, 11) + " " + (data.status || "updated") + (data.error ? " (" + data.error + ")" : ""));
    if (!$("list-view").hidden) scheduleListReload();
    if (state.current === data.id && !$("detail-view").hidden) showDetail(data.id);
  });
  es.addEventListener("alert", (ev) => showAlert(JSON.parse(ev.data)));
}

// ---- forms and routing -----------------------------------------------------------------
function route(ev) {
  const m = location.hash.match(/^#\/analyses\/(.+)$/);
  if (m) {
    showDetail(decodeURIComponent(m[1]));
    if (ev) $("detail-title").focus();  // keyboard and screen-reader users land on the new view
    return;
  }
  state.current = null;
  $("detail-view").hidden = true;
  $("list-view").hidden = false;
  if (ev) $("list-title").focus();
  loadList();
}

function init() {
  $("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    state.token = $("token-input").value.trim();
    sessionStorage.setItem("leukFhirToken", state.token);
    $("token-panel").hidden = true;
    loadModel(); connectEvents(); route();
  });
  $("upload-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const form = new FormData();
    for (const f of $("upload-file").files) form.append("image", f);
    const orderer = $("upload-orderer").value.trim();
    if (orderer) form.append("ordering_practitioner", orderer);
    $("upload-status").textContent = "Uploading…";
    try {
      const body = await (await api("/v1/analyses", { method: "POST", body: form })).json();
      $("upload-status").textContent = "Queued " + body.analyses.length + " analysis(es).";
      $("upload-form").reset();
      loadList();
    } catch (e) { $("upload-status").textContent = "Not accepted: " + e.message; }
  });
  $("signoff-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const error = $("signoff-error"), button = $("signoff-button"), id = state.current;
    error.hidden = true;
    const body = { comment: $("signoff-comment").value.trim() || null };
    if (!state.token) {
      body.signed_off_by = $("signoff-name").value.trim();
      if (!body.signed_off_by) {  // whitespace only passes `required`
        $("signoff-name").value = "";
        $("signoff-name").reportValidity();
        $("signoff-name").focus();
        return;
      }
    }
    const label = button.textContent;
    button.disabled = true;
    button.textContent = "Signing off…";
    try {
      await api("/v1/analyses/" + encodeURIComponent(id) + "/sign-off", {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
      await showDetail(id);
    } catch (e) {
      const why = e.status === 409 ? "Not signed off: " + e.message.replace(/\.?$/, ".") + " The current state is shown above."
        : e.status === 0 ? "Not signed off: " + e.message + ". Check the connection and try again."
        : "Not signed off: " + e.message;
      if (e.status === 409) { try { await showDetail(id); } catch (e2) { /* shown by showDetail */ } }
      if (state.current === id) { error.textContent = why; error.hidden = false; }
    } finally {
      button.disabled = false;
      button.textContent = label;
    }
  });
  window.addEventListener("hashchange", route);
  loadModel(); connectEvents(); route();
}

document.addEventListener("DOMContentLoaded", init);
