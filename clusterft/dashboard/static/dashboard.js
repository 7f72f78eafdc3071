// The clusterft dashboard: hash-routed views over the jobs API (/v1/jobs, /v1/dashboard/*).
// Every value from the server goes in as text (el() never parses HTML), and every request carries
// the key typed in the header; polling timers belong to the view and stop when it changes.
"use strict";

const POLL_MS = 1000;
const KEY_STORE = "clusterft.apiKey";
const keyInput = document.getElementById("api-key");
const view = document.getElementById("view");
const errorBox = document.getElementById("error");
let timers = [];
let charts = [];

keyInput.value = sessionStorage.getItem(KEY_STORE) || "";
// The next poll of the view sends the new key; the view is not rebuilt here, since this fires when
// the field loses focus, that is, in the middle of the click that moved it away.
keyInput.addEventListener("change", () => sessionStorage.setItem(KEY_STORE, keyInput.value.trim()));

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (value !== null && value !== undefined) node.setAttribute(name, value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function table(headers, rows, attrs = {}) {
  return el("table", attrs, el("tr", {}, headers.map((h) => el("th", {}, h))),
    rows.map((cells) => el("tr", {}, cells.map((c) => el("td", {}, c)))));
}

function showError(message) {
  errorBox.textContent = message;
  errorBox.hidden = !message;
}

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  const key = keyInput.value.trim();
  if (key) headers.Authorization = `Bearer ${key}`;
  if (options.json !== undefined) {
    headers["Content-Type"] = "application/json";
    options = { ...options, method: options.method || "POST", body: JSON.stringify(options.json) };
  }
  const response = await fetch(path, { ...options, headers });
  const text = await response.text();
  if (!response.ok) {
    let message = text;
    try { message = JSON.parse(text).error.message; } catch (_) { /* not OpenAI's error body */ }
    const error = new Error(`${response.status}: ${message}`);
    error.status = response.status;
    throw error;
  }
  showError("");
  const type = response.headers.get("content-type") || "";
  return type.includes("application/json") ? JSON.parse(text) : text;
}

function every(ms, fn) {
  const tick = async () => {
    try { await fn(); } catch (err) { showError(String(err.message || err)); }
  };
  tick();
  timers.push(setInterval(tick, ms));
}

const fmt = (x, digits = 4) => (x === null || x === undefined ? "–" : typeof x === "number" ? +x.toPrecision(digits) : x);
const when = (t) => (t ? new Date(t * 1000).toISOString().replace("T", " ").slice(0, 19) : "–");
const state = (s) => el("span", { class: `state state-${s}` }, s);
const bytes = (n) => (n >= 1 << 20 ? `${(n / (1 << 20)).toFixed(1)} MiB` : `${(n / 1024).toFixed(1)} KiB`);

// ---------------------------------------------------------------- jobs

function jobsView() {
  // Rows are updated in place, keyed by job id: a link under the pointer is never replaced, so a
  // click lands even while the list is refreshing.
  const headers = ["job", "name", "state", "progress", "loss", "attempt", "restarts", "updated"];
  const list = el("table", { id: "jobs-table" }, el("tr", {}, headers.map((h) => el("th", {}, h))));
  const empty = el("p", { class: "note" }, "No jobs yet: submit one.");
  const rows = new Map();
  let order = "";
  const body = el("div", { id: "jobs" }, empty);
  view.append(el("h2", {}, "Jobs"), body);
  every(POLL_MS, async () => {
    const jobs = (await api("/v1/jobs")).data;
    if (!jobs.length) return;
    if (!list.isConnected) body.replaceChildren(list);
    for (const j of jobs) {
      if (!rows.has(j.id)) {
        const link = el("a", { href: `#/jobs/${j.id}`, class: "job-link" }, j.id);
        rows.set(j.id, el("tr", { "data-job": j.id }, el("td", {}, link), headers.slice(1).map(() => el("td"))));
      }
      const cells = [j.name, state(j.status), `${j.progress.step} / ${j.progress.planned_steps ?? "?"}`,
        fmt(j.progress.loss), j.attempt, j.restarts, when(j.updated_at)];
      const tds = rows.get(j.id).children;
      cells.forEach((cell, i) => tds[i + 1].replaceChildren(cell instanceof Node ? cell : String(cell)));
    }
    const ids = jobs.map((j) => j.id).join(" ");
    if (ids !== order) {
      order = ids;
      list.replaceChildren(list.firstChild, ...jobs.map((j) => rows.get(j.id)));
    }
  });
}

function lossChart(target) {
  const opts = {
    title: "training loss and learning rate", width: 760, height: 300,
    scales: { x: { time: false }, lr: { auto: true } },
    series: [{ label: "step" }, { label: "loss", stroke: "#2563eb", width: 2 },
      { label: "lr", stroke: "#d97706", scale: "lr" }],
    axes: [{ label: "step" }, { label: "loss" }, { side: 1, scale: "lr", label: "lr", grid: { show: false } }],
  };
  const data = [[], [], []];
  const chart = new uPlot(opts, data, target);
  charts.push(chart);
  return {
    points: () => data[0].length,
    add(records) {
      for (const r of records) { data[0].push(r.step); data[1].push(r.loss); data[2].push(r.lr); }
      if (records.length) chart.setData(data);
      target.dataset.points = String(data[0].length);
    },
  };
}

function jobView(id) {
  const head = el("div", { id: "job-head" });
  const chartBox = el("div", { id: "loss-chart", "data-points": "0" });
  const timeline = el("div", { id: "timeline" });
  const ckpts = el("div", { id: "checkpoints" });
  const evalBox = el("div", { id: "evaluation" });
  const follow = el("input", { type: "checkbox", id: "log-follow", checked: "" });
  const log = el("pre", { class: "log", id: "log" });
  view.append(el("h2", {}, `Job ${id}`), head, el("h3", {}, "Loss and learning rate"), chartBox,
    el("h3", {}, "State timeline"), timeline, el("h3", {}, "Checkpoints"), ckpts,
    el("h3", {}, "Evaluation and gates"), evalBox,
    el("h3", {}, "Log ", el("label", {}, follow, " follow")), log);
  const chart = lossChart(chartBox);
  let last = 0;
  every(POLL_MS, async () => {
    const job = await api(`/v1/jobs/${id}`);
    head.replaceChildren(table(["state", "reason", "progress", "attempt", "restarts", "resumed from"], [[
      state(job.status), job.reason ?? "", `${job.progress.step} / ${job.progress.planned_steps ?? "?"}`,
      job.attempt, job.restarts, job.resumed_from ?? "–"]], { id: "job-summary" }));
    timeline.replaceChildren(table(["at", "from", "to", "attempt", "reason"],
      job.events.map((e) => [when(e.at), e.from_state ?? "", state(e.to_state), e.attempt, e.reason ?? ""]),
      { id: "timeline-table" }));
    const fresh = (await api(`/v1/dashboard/jobs/${id}/metrics?after=${last}`)).data;
    if (fresh.length) last = fresh[fresh.length - 1].step;
    chart.add(fresh);
    if (follow.checked) {
      const text = await api(`/v1/dashboard/jobs/${id}/logs?tail=16384`);
      log.textContent = text.replace(/\x1b\[[0-9;]*m/g, ""); // Ray's colour codes
      log.scrollTop = log.scrollHeight;
    }
  });
  every(3 * POLL_MS, async () => {
    const list = (await api(`/v1/dashboard/jobs/${id}/checkpoints`)).data;
    ckpts.replaceChildren(list.length ? table(["step", "name", "size", "valid", "created"],
      list.map((c) => [c.step, c.name, bytes(c.size_bytes),
        el("span", { class: c.valid ? "pass" : "fail" }, c.valid ? "valid" : `invalid: ${c.problem}`),
        when(c.created)]), { id: "checkpoints-table" }) : el("p", { class: "note" }, "No checkpoint yet."));
    const ev = await api(`/v1/dashboard/jobs/${id}/evaluation`);
    const metrics = Object.entries(ev.metrics);
    evalBox.replaceChildren(
      metrics.length ? table(["metric", "value"], metrics.map(([k, v]) => [k, fmt(v)])) :
        el("p", { class: "note" }, "Not evaluated yet."),
      ev.gates.length ? table(["gate", "value", "result"], ev.gates.map((g) => [g.gate, fmt(g.value),
        g.passes === null ? "–" : el("span", { class: g.passes ? "pass" : "fail" }, g.passes ? "pass" : "fail")]),
      { id: "gates-table" }) : el("p", { class: "note" }, "No promotion gates in this spec."));
  });
}

// ---------------------------------------------------------------- registry

function registryView() {
  const body = el("div", { id: "registry" });
  view.append(el("h2", {}, "Registry"), body);
  const act = async (path, payload) => {
    try {
      await api(path, { json: payload });
      await draw();
    } catch (err) { showError(String(err.message)); }
  };
  async function draw() {
    const reg = await api("/v1/dashboard/registry");
    // A poll does not redraw under a weight being typed (it would drop the typing).
    if (document.activeElement?.classList.contains("canary-weight-input")) return;
    const sections = reg.models.map((m) => el("section", { class: "model", "data-model": m.name },
      el("h3", {}, m.name),
      table(["alias", "version", "traffic", ""], reg.aliases.map((a) => [a,
        el("span", { class: "alias-version", "data-alias": a }, m.aliases[a] ?? "–"),
        el("span", { class: "traffic-weight", "data-alias": a }, trafficOf(m, a)),
        [reg.actions.includes("rollback") && m.aliases[a] ? el("button",
          { class: "rollback", "data-alias": a, onclick: () => act(`/v1/dashboard/registry/${m.name}/rollback`, { alias: a }) },
          `roll back ${a}`) : "",
        a === "canary" && m.aliases.canary && reg.actions.includes("canary") ? canaryControl(m) : ""]])),
      table(["version", "kind", "created", "job", "eval", "promote"], m.versions.map((v) => [
        v.version, v.kind, v.created_at, v.job_id ?? "–",
        Object.entries(v.eval).map(([k, x]) => `${k}=${fmt(x)}`).join(" "),
        reg.aliases.map((a) => el("button", {
          class: "promote", "data-version": v.version, "data-alias": a,
          onclick: () => act(`/v1/dashboard/registry/${m.name}/promote`, { version: v.version, alias: a }),
        }, `→ ${a}`))])),
      el("h4", {}, "Alias history"),
      table(["at", "alias", "action", "version", "previous", "weight", "reason"],
        m.history.slice().reverse().map((h) => [h.at, h.alias, h.action, h.version, h.previous ?? "–",
          h.weight === null || h.weight === undefined ? "–" : `${h.previous_weight ?? 0}% → ${h.weight}%`,
          h.reason ?? "–"]),
        { class: "history" }),
      m.serving.length ? table(["replica", "app", "host", "version", "alias", "live"],
        m.serving.map((r) => [r.replica, r.app, r.host, r.version, r.alias, r.live ? "yes" : "stale"])) : ""));
    body.replaceChildren(...(sections.length ? sections : [el("p", { class: "note" }, "No model registered yet.")]));
  }
  // The share of requests an alias's version serves: the canary its weight, production the rest.
  function trafficOf(m, alias) {
    if (!m.aliases[alias]) return "–";
    const canary = m.aliases.canary ? m.canary_weight : 0;
    return `${alias === "canary" ? canary : 100 - canary}%`;
  }
  function canaryControl(m) {
    const input = el("input", { type: "number", min: 0, max: 100, step: 1, class: "canary-weight-input",
      value: m.canary_weight, "aria-label": "canary weight (%)" });
    return el("span", {}, input, el("button", { class: "set-canary-weight",
      onclick: () => act(`/v1/dashboard/registry/${m.name}/canary`, { weight: input.valueAsNumber }) },
    "set canary weight"));
  }
  every(5 * POLL_MS, draw);
}

// ---------------------------------------------------------------- serving

function servingView() {
  const body = el("div", { id: "serving" });
  view.append(el("h2", {}, "Serving"), body);
  every(2 * POLL_MS, async () => {
    const s = await api("/v1/dashboard/serving");
    if (!s.reachable) {
      body.replaceChildren(el("p", { class: "note", id: "serving-unreachable" },
        `Serve app not reachable (${s.url ?? "no URL"}): ${s.error}`));
      return;
    }
    body.replaceChildren(table(["figure", "value"], [
      ["serve app", s.url], ["engine replicas", s.engine_replicas], ["KV cache usage", fmt(s.kv_usage)],
      ["prefix cache hit rate", fmt(s.prefix_cache_hit_rate)], ["requests running", fmt(s.requests_running)],
      ["requests waiting", fmt(s.requests_waiting)], ["mean TTFT (s)", fmt(s.ttft_mean_s)],
      ["mean ITL (s)", fmt(s.itl_mean_s)], ["requests/s", fmt(s.requests_per_s, 3)],
      ["requests finished", s.requests_total]], { id: "serving-table" }),
    table(["replica", "version served", "KV usage", "running", "waiting"],
      s.replicas.map((r) => [r.replica, r.version === null ? "–" : `v${r.version}`, fmt(r.kv_usage), fmt(r.running), fmt(r.waiting)]),
      { id: "replicas-table" }));
  });
}

// ---------------------------------------------------------------- submit

function submitView() {
  const gutter = el("div", { class: "gutter", id: "gutter" });
  const text = el("textarea", { id: "spec-yaml", spellcheck: "false" });
  text.value = sessionStorage.getItem("clusterft.draft") ||
    "model_name_or_path: models/tiny-llama\ndataset: demo_tasks\noutput_dir: saves/my-job\nmax_steps: 20\n";
  const name = el("input", { id: "job-name", placeholder: "job name (optional)" });
  const problems = el("ul", { class: "problems", id: "problems" });
  const status = el("p", { id: "submit-status" });
  let bad = new Set();
  const drawGutter = () => {
    const count = text.value.split("\n").length;
    gutter.replaceChildren(...Array.from({ length: count }, (_, i) =>
      el("div", { class: bad.has(i + 1) ? "bad" : null, "data-line": i + 1 }, i + 1)));
  };
  const validate = async () => {
    const result = await api("/v1/dashboard/validate", { json: { spec_yaml: text.value } });
    bad = new Set(result.problems.filter((p) => p.line).map((p) => p.line));
    problems.replaceChildren(...result.problems.map((p) => el("li", { "data-line": p.line ?? "" },
      `${p.line ? `line ${p.line}` : "spec"}: ${p.key}: ${p.message}`)));
    status.textContent = result.ok ? "valid" : `${result.problems.length} problem(s)`;
    drawGutter();
    return result.ok;
  };
  const submit = async () => {
    try {
      if (!(await validate())) return;
      const job = await api("/v1/jobs", { json: { spec_yaml: text.value, name: name.value || null } });
      location.hash = `#/jobs/${job.id}`;
    } catch (err) { showError(String(err.message)); }
  };
  let pending = null;
  text.addEventListener("input", () => {
    sessionStorage.setItem("clusterft.draft", text.value);
    drawGutter();
    clearTimeout(pending);
    pending = setTimeout(() => validate().catch((err) => showError(String(err.message))), 400);
  });
  text.addEventListener("scroll", () => { gutter.scrollTop = text.scrollTop; });
  view.append(el("h2", {}, "Submit a job"), el("div", { class: "editor" }, gutter, text),
    el("p", {}, name, " ", el("button", { id: "validate", onclick: () => validate().catch((e) => showError(e.message)) }, "Validate"),
      el("button", { id: "submit", onclick: submit }, "Submit")), status, problems,
    el("p", { class: "note" }, "Relative paths resolve against the jobs API server's directory."));
  drawGutter();
}

// ---------------------------------------------------------------- routing

function route() {
  timers.forEach(clearInterval);
  charts.forEach((c) => c.destroy());
  timers = [];
  charts = [];
  view.replaceChildren();
  showError("");
  const [page, id] = location.hash.replace(/^#\/?/, "").split("/");
  document.querySelectorAll("header nav a").forEach((a) =>
    a.classList.toggle("active", a.id === `nav-${page || "jobs"}`));
  if (page === "jobs" && id) jobView(decodeURIComponent(id));
  else if (page === "registry") registryView();
  else if (page === "serving") servingView();
  else if (page === "submit") submitView();
  else jobsView();
}

window.addEventListener("hashchange", route);
route();
