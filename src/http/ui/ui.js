// The page of image-replicator. It asks the API for the signed-in token's jobs when they
// change (GET /changes tells, asked once a second; nothing while the tab is hidden),
// shows them, and cancels or starts copies. Every string that
// comes from the server is set as text (textContent, option text, attributes), never parsed
// as HTML. The token lives in sessionStorage and leaves only as the X-Auth-Token header.
"use strict";

(function () {
  const JOBS = "/v2/extension/image_replicator/jobs";
  const IMAGES = "/v2/images";
  const CHANGES = "/v2/extension/image_replicator/changes";
  // The longest wait between two GET /changes of a page whose jobs do not move.
  const QUIET_MAX_MS = 5000;
  const POLL_MS = 1000;
  const IMAGES_EVERY_MS = 30000;
  const PAGE_LIMIT = 1000;
  const MAX_PAGES = 10;
  const MAX_DETAILS_PER_TICK = 10;
  // A running job's detail (rate, bytes) is asked for every 5 s; its ETA counts down between.
  const DETAIL_EVERY_MS = 5000;
  const CANCELLABLE = ["replicate_requested", "replicating"];
  const ACTIVE = ["replicating", "cancel_requested", "canceling"];
  const TERMINAL = ["replicated", "canceled", "error"];

  const $ = (id) => document.getElementById(id);
  const state = {
    token: null,
    filter: "",
    rows: new Map(), // job_id -> {tr, cells}
    details: new Map(), // job_id -> detail object (terminal ones are kept)
    samples: new Map(), // job_id -> [{t, progress}] for an ETA without the detail route
    detailAt: new Map(), // job_id -> when its detail was last asked for
    openJob: null,
    timer: null,
    lastTick: 0,
    running: false,
    again: false,
    session: 0, // changes at each sign-in and sign-out
    imagesAt: 0,
    imagesRoute: true, // false for a tenant whose images are in a Glance region
    tag: null, // the job list's tag from GET /changes, taken before the last round
    waiting: null, // the AbortController of the GET /changes under way
    unchanged: 0, // GET /changes answered the same tag this many times in a row
  };

  // ----- the API -----

  class Stale extends Error {}

  class ApiError extends Error {
    constructor(status, sentence) {
      super(sentence);
      this.status = status;
    }
  }

  // The sentence of the server's plain-text error shape: "<code> <reason>\n\n<sentence>\n\n".
  function sentenceOf(status, text) {
    const parts = (text || "").split("\n\n");
    const sentence = parts.length >= 2 ? parts[1].trim() : "";
    return sentence || "The server answered " + status + ".";
  }

  async function api(method, path, body, signal) {
    const headers = { "X-Auth-Token": state.token || "" };
    const init = { method, headers, credentials: "omit", cache: "no-store", signal };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (e) {
      throw new ApiError(0, "The server cannot be reached.");
    }
    if (response.status === 204) return null;
    const text = await response.text();
    if (!response.ok) throw new ApiError(response.status, sentenceOf(response.status, text));
    try {
      return JSON.parse(text);
    } catch (e) {
      throw new ApiError(response.status, "The server's answer is not JSON.");
    }
  }

  // ----- formatting -----

  function bytes(n) {
    if (n === null || n === undefined || !isFinite(n)) return "—";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) {
      n /= 1024;
      i += 1;
    }
    return (i === 0 ? String(Math.round(n)) : n.toFixed(n < 10 ? 1 : 0)) + " " + units[i];
  }

  function duration(seconds) {
    if (!isFinite(seconds) || seconds < 0) return "—";
    seconds = Math.round(seconds);
    if (seconds < 60) return seconds + " s";
    const m = Math.floor(seconds / 60);
    if (m < 60) return m + " min " + (seconds % 60) + " s";
    const h = Math.floor(m / 60);
    return h + " h " + (m % 60) + " min";
  }

  function short(id) {
    return typeof id === "string" && id.length > 12 ? id.slice(0, 8) + "…" : String(id);
  }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  // Changes touch the DOM only when a value differs: fifty open pages redraw nothing when
  // nothing moved.
  function setText(node, text) {
    const value = String(text);
    if (node.textContent !== value) node.textContent = value;
  }

  function show(node, visible) {
    if (node.hidden === visible) node.hidden = !visible;
  }

  function say(node, text) {
    setText(node, text || "");
    show(node, Boolean(text));
  }

  // ----- sign-in -----

  function readFragment() {
    const hash = window.location.hash;
    if (!hash || hash.length < 2) return null;
    const params = new URLSearchParams(hash.slice(1));
    const token = params.get("token");
    // The token leaves the address bar (and the history entry) at once.
    history.replaceState(null, "", window.location.pathname + window.location.search);
    return token;
  }

  async function signIn(token, fromForm) {
    state.session += 1;
    state.token = token;
    try {
      await api("GET", JOBS + "?limit=0");
    } catch (e) {
      state.token = null;
      sessionStorage.removeItem("token");
      showSignIn(e.message);
      return;
    }
    sessionStorage.setItem("token", token);
    if (fromForm) $("token").value = "";
    showApp();
  }

  function showSignIn(message) {
    stopPolling();
    state.token = null;
    show($("app"), false);
    show($("sign-out"), false);
    show($("sign-in"), true);
    say($("sign-in-error"), message);
    $("token").focus();
  }

  function signOut() {
    state.session += 1;
    sessionStorage.removeItem("token");
    state.rows.forEach((row) => row.tr.remove());
    state.rows.clear();
    state.details.clear();
    state.samples.clear();
    state.detailAt.clear();
    closeDetail();
    clearImages();
    showSignIn("");
  }

  function showApp() {
    show($("sign-in"), false);
    say($("sign-in-error"), "");
    show($("app"), true);
    show($("sign-out"), true);
    state.imagesAt = 0;
    state.imagesRoute = true;
    startPolling();
  }

  // A 401 while signed in: the token expired or was revoked.
  function lost(e) {
    if (e instanceof ApiError && e.status === 401) {
      sessionStorage.removeItem("token");
      signOut();
      say($("sign-in-error"), e.message);
      return true;
    }
    return false;
  }

  // ----- polling: at most one round of requests a second, none while the tab is hidden -----

  function startPolling() {
    if (state.timer === null && !state.running) schedule(0);
  }

  function stopPolling() {
    if (state.timer !== null) clearTimeout(state.timer);
    state.timer = null;
    if (state.waiting) state.waiting.abort();
    state.waiting = null;
  }

  function schedule(delay) {
    stopPolling();
    state.timer = setTimeout(tick, Math.max(0, delay));
  }

  async function tick() {
    state.timer = null;
    if (state.running) {
      // A cancel or a new filter while a round is under way: one more round after it.
      state.again = true;
      return;
    }
    if (!state.token || document.hidden) return;
    const since = Date.now() - state.lastTick;
    if (since < POLL_MS) {
      schedule(POLL_MS - since);
      return;
    }
    state.running = true;
    state.lastTick = Date.now();
    const session = state.session;
    let pages = 1;
    try {
      const listed = await listJobs();
      if (session !== state.session) throw new Stale();
      pages = listed.pages;
      render(listed.jobs, listed.truncated);
      await refreshDetails(listed.jobs);
      if (Date.now() - state.imagesAt >= IMAGES_EVERY_MS) await refreshImages();
      say($("app-error"), "");
      // A fixed text, not a clock: a clock would redraw every open page every second.
      setText($("updated"), "Live: updated as jobs change.");
    } catch (e) {
      if (session !== state.session) {
        // Signed out or in again meanwhile: this round's answers belong to no one now.
        state.running = false;
        state.again = false;
        if (state.token) schedule(0);
        return;
      }
      if (lost(e)) {
        state.running = false;
        return;
      }
      say($("app-error"), e.message);
    }
    state.running = false;
    if (!state.token) return;
    if (state.again) {
      state.again = false;
      schedule(0);
      return;
    }
    if (pages > 1) {
      // A list of several pages waits that many seconds: one page a second on average (the
      // tag covers the first page only).
      schedule(POLL_MS * pages - (Date.now() - state.lastTick));
    } else {
      state.unchanged = 0;
      waitForChange(session);
    }
  }

  // Between rounds the page asks GET /changes whether its job list still has the tag taken
  // before the last round (timeout=0: answered at once, a few bytes): right after a round,
  // then 1 s, 2 s … after each unchanged answer, up to every 5 s; only a new tag brings a
  // round, so a page on jobs that do not move reads no list. No request waits on the server:
  // a browser keeps at most 6 connections to a host for all its tabs, and a waiting request
  // in every open tab would stall the others.
  async function waitForChange(session) {
    state.timer = null;
    if (!state.token || document.hidden || session !== state.session) return;
    const waiting = new AbortController();
    state.waiting = waiting;
    const query = state.tag ? "?after=" + state.tag + "&timeout=0" : "";
    let changed = true;
    try {
      const answer = await api("GET", CHANGES + query, undefined, waiting.signal);
      if (waiting.signal.aborted || session !== state.session) return;
      const tag = answer && typeof answer.tag === "string" ? answer.tag : null;
      changed = !state.tag || tag !== state.tag;
      state.tag = tag;
    } catch (e) {
      if (waiting.signal.aborted || session !== state.session) return;
      if (lost(e)) return;
      // Any other failure (a restart, say) is shown by the next round.
      state.tag = null;
    }
    state.waiting = null;
    if (changed) {
      schedule(POLL_MS - (Date.now() - state.lastTick));
    } else {
      state.unchanged = Math.min(state.unchanged + 1, QUIET_MAX_MS / POLL_MS);
      state.timer = setTimeout(() => waitForChange(session), POLL_MS * state.unchanged);
    }
  }

  async function listJobs() {
    let jobs = [];
    let marker = null;
    let pages = 0;
    let truncated = false;
    for (;;) {
      const query = new URLSearchParams();
      if (state.filter) query.set("status", state.filter);
      if (marker) query.set("marker", marker);
      const qs = query.toString();
      const page = await api("GET", JOBS + (qs ? "?" + qs : ""));
      if (!Array.isArray(page)) throw new ApiError(200, "The job list is not a JSON array.");
      jobs = jobs.concat(page);
      pages += 1;
      if (page.length < PAGE_LIMIT) break;
      if (pages >= MAX_PAGES) {
        truncated = true;
        break;
      }
      marker = page[page.length - 1].job_id;
    }
    return { jobs, pages, truncated };
  }

  // ----- the job table -----

  function newRow(job) {
    const tr = el("tr");
    tr.dataset.jobId = job.job_id;
    const cell = (label, className) => {
      const td = el("td", className);
      td.dataset.label = label;
      tr.appendChild(td);
      return td;
    };
    const name = cell("Image", "name");
    const id = cell("Job", "id");
    const idCode = el("code");
    id.appendChild(idCode);
    const route = cell("Route", "route");
    const status = cell("Status");
    const statusText = el("span", "status");
    const jobError = el("span", "job-error");
    jobError.hidden = true;
    status.append(statusText, jobError);
    const progressCell = cell("Progress", "num");
    const bar = el("progress");
    bar.max = 100;
    const pct = el("span", "pct");
    progressCell.append(bar, pct);
    const rate = cell("Rate", "num");
    const eta = cell("ETA", "num");
    const actions = cell("", "actions");
    const details = el("button", "secondary details", "Details");
    details.type = "button";
    details.addEventListener("click", () => openDetail(job.job_id));
    const cancel = el("button", "cancel", "Cancel");
    cancel.type = "button";
    cancel.addEventListener("click", () => cancelJob(job.job_id, cancel));
    actions.append(details, cancel);
    return { tr, name, idCode, route, statusText, jobError, bar, pct, rate, eta, details, cancel };
  }

  // "ot1 → ot2" over the two tenants (shortened; the full ids are in the title and the detail).
  function fillRoute(cell, job) {
    const key = [job.source_region_id, job.destination_region_id, job.source_tenant_id, job.destination_tenant_id].join(" ");
    if (cell.dataset.key === key) return;
    cell.dataset.key = key;
    cell.replaceChildren();
    cell.appendChild(el("span", null, job.source_region_id + " → " + job.destination_region_id));
    const tenants = el("span", "where mono", short(job.source_tenant_id) + " → " + short(job.destination_tenant_id));
    tenants.title = "tenant " + job.source_tenant_id + " → tenant " + job.destination_tenant_id;
    cell.appendChild(tenants);
  }

  function render(jobs, truncated) {
    const seen = new Set();
    const body = $("job-rows");
    // Newest first: the list comes oldest first.
    const ordered = jobs.slice().reverse();
    let previous = null;
    const tenants = new Set();
    for (const job of ordered) {
      if (!job || typeof job.job_id !== "string") continue;
      seen.add(job.job_id);
      tenants.add(job.destination_tenant_id);
      tenants.add(job.source_tenant_id);
      let row = state.rows.get(job.job_id);
      if (!row) {
        row = newRow(job);
        state.rows.set(job.job_id, row);
      }
      fill(row, job);
      // Keep the DOM order without moving rows that are already in place (focus stays).
      const next = previous ? previous.nextSibling : body.firstChild;
      if (next !== row.tr) body.insertBefore(row.tr, next);
      previous = row.tr;
    }
    for (const [id, row] of state.rows) {
      if (!seen.has(id)) {
        row.tr.remove();
        state.rows.delete(id);
      }
    }
    show($("no-jobs"), seen.size === 0);
    say(
      $("more-jobs"),
      truncated ? "Only the first " + PAGE_LIMIT * MAX_PAGES + " jobs are shown; filter by status to see others." : ""
    );
    fillTenants(tenants);
    if (state.openJob && !state.rows.has(state.openJob) && !state.filter) closeDetail();
  }

  function fill(row, job) {
    const fresh = !row.job;
    row.job = job;
    setText(row.name, job.source_image_name);
    fillRoute(row.route, job);
    setText(row.statusText, job.status);
    const statusClass = "status status-" + String(job.status).replace(/[^a-z_]/g, "");
    if (row.statusText.className !== statusClass) row.statusText.className = statusClass;
    const progress = Number(job.copy_progress) || 0;
    // A new bar has no value (an indeterminate, animated bar) and reads as 0: set it once.
    if (!row.bar.hasAttribute("value") || row.bar.value !== progress) row.bar.value = progress;
    setText(row.bar, progress + " %");
    setText(row.pct, progress + " %");
    show(row.cancel, CANCELLABLE.includes(job.status));
    if (fresh) {
      row.idCode.textContent = job.job_id;
      row.bar.setAttribute("aria-label", "Progress of job " + job.job_id);
      row.cancel.setAttribute("aria-label", "Cancel job " + job.job_id);
      row.details.setAttribute("aria-label", "Details of job " + job.job_id);
    }
    sample(job, progress);
    const detail = state.details.get(job.job_id);
    const message = job.status === "error" && detail ? detail.error : null;
    say(row.jobError, message);
    rateAndEta(row, job, detail);
  }

  // Progress seen over time, for an ETA when the server has no detail route.
  function sample(job, progress) {
    if (job.status !== "replicating") {
      state.samples.delete(job.job_id);
      return;
    }
    const list = state.samples.get(job.job_id) || [];
    list.push({ t: Date.now(), progress });
    while (list.length > 20) list.shift();
    state.samples.set(job.job_id, list);
  }

  function rateAndEta(row, job, detail) {
    let rate = "—";
    let eta = "—";
    if (job.status === "replicating") {
      if (detail && detail.status === "replicating" && detail.rate_bytes_per_s > 0) {
        rate = bytes(detail.rate_bytes_per_s) + "/s";
        const left = Math.max(0, (detail.bytes_total || 0) - (detail.bytes_done || 0));
        const since = (Date.now() - (state.detailAt.get(job.job_id) || Date.now())) / 1000;
        eta = duration(Math.max(0, left / detail.rate_bytes_per_s - since));
      } else {
        const list = state.samples.get(job.job_id) || [];
        if (list.length >= 2) {
          const first = list[0];
          const last = list[list.length - 1];
          const perSecond = (last.progress - first.progress) / ((last.t - first.t) / 1000);
          if (perSecond > 0) eta = duration((100 - last.progress) / perSecond);
        }
      }
    } else if (job.status === "replicated") {
      eta = "done";
    }
    setText(row.rate, rate);
    setText(row.eta, eta);
  }

  // The detail of running jobs (for rate and ETA), of failed ones once (their message), and
  // of the open one.
  async function refreshDetails(jobs) {
    const wanted = [];
    const now = Date.now();
    for (const job of jobs) {
      const cached = state.details.get(job.job_id);
      const due = now - (state.detailAt.get(job.job_id) || 0) >= DETAIL_EVERY_MS;
      // A job that has just changed status is asked for at once (a copy that just started,
      // ended or failed), a running one every few seconds, a failed one once.
      const changed = cached && cached.status !== job.status;
      // No rate yet for a copy that moves (one that has just started): ask again next round.
      const noRate = !cached || (!(cached.rate_bytes_per_s > 0) && cached.copy_progress !== job.copy_progress);
      if ((job.status === "replicating" && (due || changed || noRate)) ||
          (ACTIVE.includes(job.status) && (due || changed)) ||
          (job.status === "error" && (!cached || changed))) {
        wanted.push(job.job_id);
      }
    }
    if (state.openJob && !wanted.includes(state.openJob)) wanted.unshift(state.openJob);
    for (const id of wanted.slice(0, MAX_DETAILS_PER_TICK)) {
      const cached = state.details.get(id);
      if (cached && TERMINAL.includes(cached.status) && id !== state.openJob) continue;
      await loadDetail(id);
    }
  }

  // GET /jobs/{id}/detail; a job that is gone (404) is forgotten.
  async function loadDetail(id) {
    let detail;
    try {
      detail = await api("GET", JOBS + "/" + encodeURIComponent(id) + "/detail");
    } catch (e) {
      if (e instanceof ApiError && e.status === 404) {
        state.details.delete(id);
        if (state.openJob === id) say($("detail-error"), e.message);
        return;
      }
      throw e;
    }
    state.details.set(id, detail);
    state.detailAt.set(id, Date.now());
    const row = state.rows.get(id);
    if (row && row.job) {
      const message = row.job.status === "error" ? detail.error : null;
      say(row.jobError, message);
      rateAndEta(row, row.job, detail);
    }
    if (state.openJob === id) fillDetail(detail);
  }

  // ----- a job's detail -----

  const DETAIL_KEYS = [
    ["status", "Status"],
    ["error", "Error"],
    ["source_image_name", "Image name"],
    ["source_image_id", "Source image"],
    ["source_tenant_id", "Source tenant"],
    ["source_region_id", "Source region"],
    ["destination_tenant_id", "Destination tenant"],
    ["destination_region_id", "Destination region"],
    ["destination_image_id", "Destination image"],
    ["copy_progress", "Progress (%)"],
    ["bytes_done", "Bytes copied"],
    ["bytes_total", "Bytes in all"],
    ["rate_bytes_per_s", "Rate (bytes/s)"],
    ["created_at", "Created"],
    ["started_at", "Started"],
    ["updated_at", "Updated"],
    ["finished_at", "Finished"],
    ["retries", "Retries"],
    ["resumes", "Resumes"],
  ];

  async function openDetail(id) {
    state.openJob = id;
    $("detail-id").textContent = id;
    say($("detail-error"), "");
    $("detail-list").replaceChildren();
    show($("detail"), true);
    const known = state.details.get(id);
    if (known) fillDetail(known);
    $("detail").focus();
    try {
      await loadDetail(id);
    } catch (e) {
      if (!lost(e)) say($("detail-error"), e.message);
    }
  }

  function closeDetail() {
    const id = state.openJob;
    state.openJob = null;
    show($("detail"), false);
    const row = id && state.rows.get(id);
    if (row && document.activeElement && $("detail").contains(document.activeElement)) {
      row.details.focus();
    }
  }

  function fillDetail(detail) {
    const list = $("detail-list");
    list.replaceChildren();
    for (const [key, label] of DETAIL_KEYS) {
      if (!(key in detail)) continue;
      if (key === "error" && detail.error === null) continue;
      const value = detail[key];
      list.appendChild(el("dt", null, label));
      const dd = el("dd", key === "error" ? "error" : "mono", value === null ? "—" : value);
      if (key === "error") dd.id = "detail-message";
      list.appendChild(dd);
    }
  }

  // ----- cancel -----

  async function cancelJob(id, button) {
    button.disabled = true;
    try {
      await api("DELETE", JOBS + "/" + encodeURIComponent(id));
      say($("app-error"), "");
    } catch (e) {
      if (lost(e)) return;
      say($("app-error"), e.message);
    } finally {
      button.disabled = false;
    }
    state.lastTick = 0;
    schedule(0);
  }

  // ----- images and the copy form (where the appliance keeps the tenant's images) -----

  function clearImages() {
    $("image-rows").replaceChildren();
    $("copy-image").replaceChildren();
    show($("images"), false);
  }

  async function refreshImages() {
    state.imagesAt = Date.now();
    if (!state.imagesRoute) return;
    let images = [];
    let path = IMAGES;
    try {
      for (let pages = 0; path && pages < MAX_PAGES; pages += 1) {
        const page = await api("GET", path);
        if (!page || !Array.isArray(page.images)) throw new ApiError(200, "The image list is not Glance's.");
        images = images.concat(page.images);
        path = typeof page.next === "string" && page.next.startsWith("/v2/images") ? page.next : null;
      }
    } catch (e) {
      // A tenant of a Glance region (409): its images are in its Glance, not here.
      if (e instanceof ApiError && e.status === 409) {
        state.imagesRoute = false;
        clearImages();
        return;
      }
      throw e;
    }
    renderImages(images);
  }

  function renderImages(images) {
    const body = $("image-rows");
    const select = $("copy-image");
    const chosen = select.value;
    body.replaceChildren();
    select.replaceChildren();
    for (const image of images) {
      if (!image || typeof image.id !== "string") continue;
      const tr = el("tr");
      tr.dataset.imageId = image.id;
      const cell = (label, className, text) => {
        const td = el("td", className, text);
        td.dataset.label = label;
        tr.appendChild(td);
        return td;
      };
      const orNone = (value) => (value === null || value === undefined ? "—" : value);
      cell("Name", "name", orNone(image.name));
      cell("Image", "id").appendChild(el("code", null, image.id));
      cell("Status", null, orNone(image.status));
      cell("Format", null, orNone(image.disk_format));
      cell("Size", "num", bytes(image.size));
      const actions = el("td", "actions");
      const copy = el("button", "secondary", "Copy…");
      copy.type = "button";
      copy.setAttribute("aria-label", "Copy image " + image.id);
      copy.addEventListener("click", () => {
        select.value = image.id;
        $("copy-tenant").focus();
      });
      actions.appendChild(copy);
      tr.appendChild(actions);
      body.appendChild(tr);
      const option = el("option", null, (image.name || "—") + " (" + image.id + ")");
      option.value = image.id;
      select.appendChild(option);
    }
    if (chosen) select.value = chosen;
    show($("images"), true);
  }

  function fillTenants(tenants) {
    const list = $("tenants");
    const have = new Set(Array.from(list.options, (o) => o.value));
    for (const tenant of tenants) {
      if (typeof tenant === "string" && !have.has(tenant)) {
        const option = el("option");
        option.value = tenant;
        list.appendChild(option);
      }
    }
  }

  async function copyImage(event) {
    event.preventDefault();
    const result = $("copy-result");
    const image = $("copy-image").value;
    const tenant = $("copy-tenant").value.trim();
    result.className = "";
    result.textContent = "Asking for the copy…";
    try {
      const reply = await api("POST", JOBS, { image_id: image, tenant_id_dst: tenant });
      result.textContent = "Copy started: job " + reply.job_id + ".";
      state.lastTick = 0;
      schedule(0);
    } catch (e) {
      if (lost(e)) return;
      result.className = "error";
      result.textContent = e.message;
    }
  }

  // ----- start -----

  function start() {
    $("sign-in-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const token = $("token").value.trim();
      if (token) signIn(token, true);
    });
    $("sign-out").addEventListener("click", signOut);
    $("detail-close").addEventListener("click", closeDetail);
    $("detail").addEventListener("keydown", (event) => {
      if (event.key === "Escape") closeDetail();
    });
    $("copy-form").addEventListener("submit", copyImage);
    const filter = $("filter");
    state.filter = sessionStorage.getItem("filter") || "";
    filter.value = state.filter;
    filter.addEventListener("change", () => {
      state.filter = filter.value;
      sessionStorage.setItem("filter", state.filter);
      state.lastTick = 0;
      schedule(0);
    });
    // /ui#token=… typed while the page is open: no reload, only this event.
    window.addEventListener("hashchange", () => {
      const token = readFragment();
      if (token) {
        if (state.token) signOut();
        signIn(token, false);
      }
    });
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden && state.token) startPolling();
    });
    const fromFragment = readFragment();
    const token = fromFragment || sessionStorage.getItem("token");
    if (token) {
      signIn(token, false);
    } else {
      showSignIn("");
    }
  }

  start();
})();
