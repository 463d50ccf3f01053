// caudal's dashboard: draws each page from the REST API (/api/v1) with the
// session cookie, and keeps it live by asking again every few seconds.
//
// Promises:
// - Every value from the server is written as text (textContent, SVG text
//   nodes, attribute values), never parsed as markup.
// - Every action is an API call carrying the page's CSRF token; the server
//   decides whether the signed-in role may do it. A viewer sees no action
//   buttons.
// - Times are shown in the viewer's time zone, with the exact UTC time in
//   the element's datetime and title.
"use strict";
(() => {
  const POLL_MS = 2000;
  const meta = (name) => document.querySelector(`meta[name="${name}"]`)?.content || "";
  const CSRF = meta("csrf-token");
  const ROLE = meta("caudal-role");
  const CAN_ACT = ROLE === "operator" || ROLE === "admin";
  const $page = document.getElementById("page");
  const $title = document.getElementById("title");
  const $status = document.getElementById("status");
  const SVG = "http://www.w3.org/2000/svg";

  // ---- elements -------------------------------------------------------

  function build(el, attrs, children) {
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
      else if (k === "class") el.setAttribute("class", v);
      else el.setAttribute(k, v === true ? "" : String(v));
    }
    const add = (c) => {
      if (c === null || c === undefined || c === false) return;
      if (Array.isArray(c)) c.forEach(add);
      else if (c instanceof Node) el.appendChild(c);
      else el.appendChild(document.createTextNode(String(c)));
    };
    add(children);
    return el;
  }
  const h = (tag, attrs, ...children) => build(document.createElement(tag), attrs, children);
  const s = (tag, attrs, ...children) => build(document.createElementNS(SVG, tag), attrs, children);

  // ---- formatting -----------------------------------------------------

  const TIME = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "medium" });
  const CLOCK = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit" });
  function time(iso) {
    if (!iso) return h("span", { class: "muted" }, "–");
    const d = new Date(iso);
    if (isNaN(d)) return String(iso);
    return h("time", { datetime: d.toISOString(), title: d.toISOString() }, TIME.format(d));
  }
  const num = (n) => (n === null || n === undefined ? "–" : Number(n).toLocaleString());
  function bytes(n) {
    if (n === null || n === undefined) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
  }
  function secs(n) {
    if (n === null || n === undefined) return "–";
    if (n < 1) return `${Math.round(n * 1000)} ms`;
    if (n < 120) return `${n.toFixed(1)} s`;
    if (n < 7200) return `${Math.round(n / 60)} min`;
    return `${(n / 3600).toFixed(1)} h`;
  }
  const badge = (text, kind) => h("span", { class: `badge ${kind || text}` }, text);
  const enc = encodeURIComponent;

  // ---- talking to the API ---------------------------------------------

  class ApiError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  async function api(path, opts = {}) {
    const headers = { Accept: opts.accept || "application/json" };
    if (opts.method && opts.method !== "GET") headers["X-CSRF-Token"] = CSRF;
    if (opts.body !== undefined) headers["Content-Type"] = "application/json";
    const r = await fetch(`/api/v1${path}`, {
      method: opts.method || "GET",
      headers,
      credentials: "same-origin",
      signal: AbortSignal.timeout(15000),
      body: opts.body === undefined ? undefined : JSON.stringify(opts.body),
    });
    if (r.status === 401) {
      location.assign(`/sign-in?next=${enc(location.pathname + location.search)}`);
      throw new ApiError(401, "signed out");
    }
    const text = await r.text();
    if (!r.ok) {
      let message = text;
      try { message = JSON.parse(text).error.message; } catch (_) { /* not JSON */ }
      throw new ApiError(r.status, message || `${r.status}`);
    }
    if (opts.accept && opts.accept !== "application/json") return text;
    return text ? JSON.parse(text) : null;
  }

  function say(text, error) {
    $status.textContent = text;
    $status.className = error ? "status error" : "status";
    $status.setAttribute("role", error ? "alert" : "status");
  }

  // An action button: asks first when `confirmText` is given, then calls
  // the API and says what happened.
  function action(label, run, confirmText, cls, key) {
    if (!CAN_ACT) return null;
    return h("button", {
      type: "button",
      class: cls || "",
      "data-action": label,
      "data-key": key || null,
      onclick: async (e) => {
        if (confirmText && !window.confirm(confirmText)) return;
        const button = e.currentTarget;
        button.disabled = true;
        try {
          const done = await run();
          say(typeof done === "string" ? done : `${label}: done.`);
          refresh();
        } catch (err) {
          say(`${label} failed: ${err.message}`, true);
        } finally {
          button.disabled = false;
        }
      },
    }, label);
  }

  // ---- live regions ---------------------------------------------------

  let regions = [];
  // A region of the page redrawn by `draw` every POLL_MS; focus stays on
  // the element of the same data-key.
  function live(draw, every) {
    const el = h("div", { class: "live" }, h("p", { class: "empty" }, "Loading…"));
    const region = { el, draw, every: every || POLL_MS, next: 0 };
    regions.push(region);
    return el;
  }
  async function update(region) {
    let node;
    try {
      node = await region.draw();
    } catch (err) {
      if (err.status === 401) return;
      node = h("p", { class: "error", role: "alert" }, `Could not load this part: ${err.message}. It will be tried again.`);
    }
    // Nothing changed: nothing is redrawn (focus, scroll and screen
    // readers stay undisturbed).
    const fresh = document.createElement("div");
    fresh.append(node);
    if (fresh.innerHTML === region.el.innerHTML) return;
    // What the viewer typed, where the focus was, and how far each table
    // was scrolled, stay.
    const focused = document.activeElement;
    const key = region.el.contains(focused) ? focused.getAttribute("data-key") : null;
    const typed = [...region.el.querySelectorAll("input[data-key]")].map((i) => [i.getAttribute("data-key"), i.value]);
    const scrolled = [...region.el.querySelectorAll(".scroll")].map((e) => e.scrollLeft);
    region.el.replaceChildren(...fresh.childNodes);
    const find = (k) => region.el.querySelector(`[data-key="${CSS.escape(k)}"]`);
    typed.forEach(([k, v]) => { const i = find(k); if (i) i.value = v; });
    region.el.querySelectorAll(".scroll").forEach((e, i) => { if (scrolled[i]) e.scrollLeft = scrolled[i]; });
    if (key) find(key)?.focus();
  }
  function refresh() { regions.forEach((r) => { r.next = 0; }); tick(); }
  let ticking = false;
  let drawn = false;
  async function tick() {
    if (ticking || document.hidden) return;
    ticking = true;
    const now = Date.now();
    await Promise.all(regions.filter((r) => r.next <= now).map(async (r) => {
      r.next = now + r.every;
      await update(r);
    }));
    ticking = false;
    // When every part of the page first shows its data.
    if (!drawn) { drawn = true; performance.mark("caudal:drawn"); }
  }

  // ---- tables and charts ---------------------------------------------

  // A table: `cols` are [header, cell(row)], `empty` says what to do when
  // there are no rows.
  function table(caption, cols, rows, empty) {
    if (!rows || rows.length === 0) return h("p", { class: "empty" }, empty);
    return h("div", { class: "scroll", tabindex: "0", role: "region", "aria-label": caption, "data-key": `table:${caption}` },
      h("table", {},
        h("caption", { class: "sr-only" }, caption),
        h("thead", {}, h("tr", {}, cols.map(([head]) => h("th", { scope: "col" }, head)))),
        h("tbody", {}, rows.map((row) => h("tr", {}, cols.map(([, cell]) => h("td", {}, cell(row))))))));
  }

  // A line chart of `series` ([{name, cls, points: [[ms, value]]}]).
  function chart(label, series, unit) {
    const W = 600, H = 160, L = 60, B = 24, T = 12;
    const all = series.flatMap((x) => x.points).filter((p) => p[1] !== null && p[1] !== undefined);
    if (all.length < 2) {
      return h("figure", { class: "chart" }, h("figcaption", {}, label),
        h("p", { class: "empty" }, "Not enough points yet: a point is sampled every 2 s while caudal runs."));
    }
    const t0 = Math.min(...all.map((p) => p[0])), t1 = Math.max(...all.map((p) => p[0]));
    const vmax = Math.max(1e-9, ...all.map((p) => p[1]));
    const x = (t) => L + ((t - t0) / Math.max(1, t1 - t0)) * (W - L - 4);
    const y = (v) => T + (1 - v / vmax) * (H - T - B);
    const last = series.map((x) => {
      const p = x.points.filter((q) => q[1] !== null && q[1] !== undefined).pop();
      return `${x.name} ${p ? fixed(p[1]) : "–"} ${unit}`;
    }).join(", ");
    const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": `${label}; now: ${last}` },
      s("line", { x1: L, x2: W, y1: y(0), y2: y(0), class: "axis" }),
      s("line", { x1: L, x2: L, y1: T, y2: H - B, class: "axis" }),
      s("text", { x: L - 6, y: T + 10, class: "tick end" }, fixed(vmax)),
      s("text", { x: L - 6, y: H - B, class: "tick end" }, "0"),
      s("text", { x: L, y: H - 4, class: "tick" }, CLOCK.format(new Date(t0))),
      s("text", { x: W - 4, y: H - 4, class: "tick end" }, CLOCK.format(new Date(t1))),
      series.map((ser) => {
        const pts = ser.points.filter((p) => p[1] !== null && p[1] !== undefined);
        return s("polyline", { class: `line ${ser.cls}`, points: pts.map((p) => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" ") });
      }));
    return h("figure", { class: "chart" },
      h("figcaption", {}, label, " ", series.map((ser) => h("span", { class: `key ${ser.cls}` }, ser.name))),
      svg,
      h("p", { class: "now" }, `Now: ${last}`));
  }
  const fixed = (v) => (Math.abs(v) >= 100 ? Math.round(v).toLocaleString() : Number(v.toFixed(2)).toLocaleString());

  // A small line of the last minute, for tables.
  function spark(values, label) {
    const W = 80, H = 20;
    if (values.length < 2) return h("span", { class: "muted" }, "–");
    const max = Math.max(1e-9, ...values);
    const pts = values.map((v, i) => `${(i / (values.length - 1)) * W},${H - 1 - (v / max) * (H - 2)}`).join(" ");
    return s("svg", { class: "spark", viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img", "aria-label": label },
      s("polyline", { points: pts }));
  }

  // ---- pages ----------------------------------------------------------

  function section(heading, ...body) {
    return h("section", {}, h("h2", {}, heading), body);
  }

  function pipelineState(p) {
    if (p.paused) return badge("paused");
    if (p.intake_blocked) return badge("blocked", "failed");
    return badge(p.outcome || "idle", p.outcome || "idle");
  }
  function lagText(p) {
    if (p.replication) {
      const r = p.replication;
      const parts = [];
      if (r.lag_seconds !== null && r.lag_seconds !== undefined) parts.push(secs(r.lag_seconds));
      if (r.lag_bytes !== null && r.lag_bytes !== undefined) parts.push(bytes(r.lag_bytes));
      return parts.join(" · ") || "–";
    }
    if (p.broker) return p.broker.lag !== undefined && p.broker.lag !== null ? `${num(p.broker.lag)} messages waiting` : (p.broker.connected ? "–" : "disconnected");
    return "–";
  }

  async function overview() {
    $title.textContent = "Overview";
    document.title = "Overview · caudal";
    return [
      live(async () => {
        const { alerts } = await api("/alerts");
        const firing = alerts.flatMap((a) => a.instances.filter((i) => i.state === "firing" && !i.silenced).map(() => a.name));
        if (!firing.length) return h("p", { class: "ok-line" }, `No alert firing (${alerts.length} rule${alerts.length === 1 ? "" : "s"}).`);
        return h("p", { class: "banner", role: "alert" }, `${firing.length} alert${firing.length === 1 ? "" : "s"} firing: ${[...new Set(firing)].join(", ")}. `, h("a", { href: "/alerts" }, "See alerts"));
      }),
      section("Pipelines", live(async () => {
        const { pipelines } = await api("/pipelines");
        const recent = await Promise.all(pipelines.map((p) => api(`/pipelines/${enc(p.pipeline)}/history?last=30`).catch(() => ({ points: [] }))));
        const rows = pipelines.map((p, i) => ({ ...p, points: recent[i].points }));
        return table("Pipelines", [
          ["Pipeline", (p) => h("a", { href: `/pipelines/${enc(p.pipeline)}`, "data-key": `p:${p.pipeline}` }, p.pipeline)],
          ["State", pipelineState],
          ["Delivered/s (last minute)", (p) => {
            const v = p.points.map((q) => q.delivered_per_s);
            return [spark(v, `delivered per second, last minute, now ${v.length ? fixed(v[v.length - 1]) : "unknown"}`), " ", v.length ? fixed(v[v.length - 1]) : ""];
          }],
          ["Last run", (p) => time(p.last_run)],
          ["Rows read / delivered", (p) => `${num(p.rows_read)} / ${num(p.rows_delivered)}`],
          ["Lag", lagText],
          ["Buffer", (p) => `${num(p.buffered_batches)} batches · ${bytes(p.buffer_disk_bytes)}`],
          ["Circuit", (p) => (p.circuit ? badge(p.circuit, p.circuit === "closed" ? "succeeded" : "failed") : "–")],
          ["Last error", (p) => (p.error ? h("span", { class: "err" }, p.error) : "–")],
        ], rows, "No pipeline is configured. Add a [pipelines.NAME] section to the config and restart caudal.");
      })),
      section("Workflows", live(async () => {
        const { workflows } = await api("/workflows");
        return table("Workflows", [
          ["Workflow", (w) => h("a", { href: `/workflows/${enc(w.workflow)}`, "data-key": `w:${w.workflow}` }, w.workflow)],
          ["Schedule", (w) => w.schedule],
          ["Tasks", (w) => num(w.tasks)],
          ["Last run", (w) => (w.last_run ? [badge(w.last_run.state), " #", w.last_run.id, " ", time(w.last_run.created_at)] : "never")],
        ], workflows, "No workflow is configured: see docs/workflows.md.");
      }, 3000)),
      section("Live aggregates", live(async () => {
        const { aggregates } = await api("/live");
        return table("Live aggregates", [
          ["Aggregate", (a) => h("a", { href: `/live?name=${enc(a.name)}`, "data-key": `a:${a.name}` }, a.name)],
          ["Pipeline", (a) => a.pipeline],
          ["Window", (a) => a.window],
          ["Watermark", (a) => time(a.watermark)],
          ["Late / skipped", (a) => `${num(a.late)} / ${num(a.skipped)}`],
          ["Updated", (a) => time(a.updated_at)],
        ], aggregates, "No live aggregate is configured: see docs/live.md.");
      }, 3000)),
      section("Nodes", live(nodeTable, 5000)),
    ];
  }

  async function nodeTable() {
    const { nodes } = await api("/nodes");
    return table("Nodes", [
      ["Node", (n) => [n.id, n.sites_node ? " (sites)" : ""]],
      ["Host / pid", (n) => `${n.host} / ${n.pid}`],
      ["State", (n) => badge(n.state, n.state === "active" ? "succeeded" : n.state === "lost" ? "failed" : "queued")],
      ["Heartbeat", (n) => `${secs(n.heartbeat_age_s)} ago`],
      ["Pipelines", (n) => n.pipelines.join(", ") || "–"],
      ["Version", (n) => n.version],
      ["Started", (n) => time(n.started_at)],
      ["", (n) => (n.state === "active" && n.cluster ? action("Drain", () => api(`/nodes/${enc(n.id)}/drain`, { method: "POST" }), `Drain node ${n.id}? It hands its pipelines over and stops.`, "", `drain:${n.id}`) : null)],
    ], nodes, "No node has registered: caudal runs as one process here (nodes appear when [cluster] is configured).");
  }

  async function pipelinePage(name) {
    $title.textContent = `Pipeline ${name}`;
    document.title = `${name} · caudal`;
    const detail = live(async () => {
      const p = await api(`/pipelines/${enc(name)}`);
      const cp = await api(`/pipelines/${enc(name)}/checkpoint`).catch((e) => (e.status === 404 ? null : Promise.reject(e)));
      const facts = [
        ["State", pipelineState(p)],
        ["Schedule", p.schedule],
        ["Next run", time(p.next_run)],
        ["Checkpoint", cp ? [h("code", { class: "wrap" }, JSON.stringify(cp.position)), " ", time(cp.updated_at)] : "none yet"],
        ["Buffer", `${num(p.buffered_batches)} batches · ${bytes(p.buffer_disk_bytes)}${p.intake_blocked ? ` · intake waits: ${p.intake_blocked}` : ""}`],
        ["Circuit", p.circuit ? [badge(p.circuit, p.circuit === "closed" ? "succeeded" : "failed"), " ", time(p.circuit_updated_at)] : "–"],
        ["Lag", lagText(p)],
        ["Owner", p.owner || "this process"],
        ["Last error", p.error ? h("span", { class: "err" }, p.error) : "–"],
      ];
      // Resync and backfill are for change data capture only.
      document.querySelectorAll(".cdc-only").forEach((e) => { e.hidden = !p.replication; });
      return h("dl", { class: "facts" }, facts.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
    });
    const actions = CAN_ACT ? h("div", { class: "actions", role: "group", "aria-label": "Pipeline actions" },
      action("Pause", () => api(`/pipelines/${enc(name)}/pause`, { method: "POST" })),
      action("Resume", () => api(`/pipelines/${enc(name)}/resume`, { method: "POST" })),
      action("Trigger a run", () => api(`/pipelines/${enc(name)}/trigger`, { method: "POST" })),
      cdcOnly(action("Resync", () => api(`/pipelines/${enc(name)}/resync`, { method: "POST" }), `Resync ${name}? Its checkpoint is reset and every row is read again from the start.`, "danger")),
      cdcOnly(backfillForm(name))) : null;
    const charts = live(async () => {
      const { points } = await api(`/pipelines/${enc(name)}/history`);
      const at = points.map((p) => Date.parse(p.at));
      const series = (key) => points.map((p, i) => [at[i], p[key]]);
      return h("div", { class: "charts" },
        chart("Records per second", [
          { name: "in", cls: "s1", points: series("read_per_s") },
          { name: "out", cls: "s2", points: series("delivered_per_s") },
          { name: "rejected", cls: "s3", points: series("rejected_per_s") },
        ], "/s"),
        chart("Lag (seconds)", [{ name: "lag", cls: "s1", points: series("lag_seconds") }], "s"),
        chart("Delivery latency (ms)", [{ name: "latency", cls: "s2", points: series("latency_ms") }], "ms"));
    });
    const runs = live(async () => {
      const { runs } = await api(`/runs?pipeline=${enc(name)}&limit=20`);
      return table("Latest runs", [
        ["Run", (r) => `#${r.id}`],
        ["Trigger", (r) => r.trigger],
        ["Started", (r) => time(r.started_at)],
        ["Ended", (r) => time(r.ended_at)],
        ["Read / delivered", (r) => `${num(r.rows_read)} / ${num(r.rows_delivered)}`],
        ["Outcome", (r) => badge(r.outcome)],
        ["Error", (r) => (r.error ? h("span", { class: "err" }, r.error) : "–")],
      ], runs, "No run yet: the first starts at the next run time, or trigger one.");
    }, 3000);
    const inspect = h("div", { class: "inspect", "aria-live": "polite" });
    const letters = live(async () => {
      const { dead_letters: rows } = await api(`/dead-letters?pipeline=${enc(name)}&state=pending&limit=100`);
      const replayAll = rows.length ? action("Replay all", async () => {
        const r = await api(`/pipelines/${enc(name)}/dead-letters/replay`, { method: "POST", body: {} });
        return `Replayed: ${r.delivered} delivered, ${r.rejected_again} refused again.`;
      }, rows.length < 100 ? `Send all ${rows.length} pending dead letters of ${name} to the sink again?`
        : `Send every pending dead letter of ${name} (100 or more) to the sink again?`, "", "replay-all") : null;
      return h("div", {}, replayAll, table("Pending dead letters", [
        ["Id", (l) => l.id],
        ["Record key", (l) => h("span", { class: "wrap" }, l.record_key || "–")],
        ["Status", (l) => (l.status === null || l.status === undefined ? "–" : l.status)],
        ["Reason", (l) => h("span", { class: "wrap" }, l.reason)],
        ["Attempts", (l) => l.attempts],
        ["Kept", (l) => time(l.created_at)],
        ["", (l) => h("span", { class: "row-actions" },
          h("button", { type: "button", "data-key": `inspect:${l.id}`, onclick: () => showLetter(l.id, inspect) }, "Inspect"),
          action("Replay", async () => {
            const r = await api(`/pipelines/${enc(name)}/dead-letters/replay`, { method: "POST", body: { ids: [l.id] } });
            return `Dead letter ${l.id} replayed: ${r.delivered} delivered, ${r.rejected_again} refused again.`;
          }, null, "", `replay:${l.id}`),
          action("Discard", () => api(`/dead-letters/${l.id}/discard`, { method: "POST" }), `Discard dead letter ${l.id}? It is kept as discarded and never delivered.`, "danger", `discard:${l.id}`))],
      ], rows, "No pending dead letter: every record was delivered or is still on its way."));
    }, 3000);
    return [detail, actions, section("Last hour", charts), section("Runs", runs), section("Dead letters", letters, inspect)];
  }

  function cdcOnly(el) {
    el.classList.add("cdc-only");
    el.hidden = true;
    return el;
  }

  function backfillForm(name) {
    const table_ = h("input", { id: "bf-table", name: "table", required: true, placeholder: "public.orders" });
    const where = h("input", { id: "bf-where", name: "where", placeholder: "id > 1000 (optional)" });
    return h("form", {
      class: "inline",
      onsubmit: async (e) => {
        e.preventDefault();
        if (!window.confirm(`Backfill ${table_.value} into ${name}? Its rows are read again beside the change stream.`)) return;
        try {
          const body = { table: table_.value };
          if (where.value) body.where = where.value;
          const r = await api(`/pipelines/${enc(name)}/backfill`, { method: "POST", body });
          say(`Backfill ${r.id} of ${r.table} started.`);
        } catch (err) { say(`Backfill failed: ${err.message}`, true); }
      },
    }, h("label", { for: "bf-table" }, "Backfill table"), table_, h("label", { for: "bf-where" }, "where"), where, h("button", { type: "submit" }, "Backfill"));
  }

  async function showLetter(id, into) {
    try {
      const l = await api(`/dead-letters/${id}`);
      into.replaceChildren(h("h3", {}, `Dead letter ${l.id}`),
        h("dl", { class: "facts" },
          h("dt", {}, "Reason"), h("dd", {}, l.reason),
          h("dt", {}, "Event id"), h("dd", {}, h("code", { class: "wrap" }, l.event_id)),
          h("dt", {}, "Position"), h("dd", {}, h("code", { class: "wrap" }, JSON.stringify(l.position))),
          h("dt", {}, "Answer"), h("dd", {}, h("pre", { class: "wrap" }, l.response_excerpt || "–"))),
        h("h4", {}, "Record"),
        h("pre", { class: "record", tabindex: "0" }, JSON.stringify(l.record, null, 2)));
      into.querySelector("h3").setAttribute("tabindex", "-1");
      into.querySelector("h3").focus();
    } catch (err) { say(`Could not load dead letter ${id}: ${err.message}`, true); }
  }

  // ---- workflows ------------------------------------------------------

  const FINISHED = ["succeeded", "failed", "cancelled", "skipped", "upstream_failed"];
  // One state for a task's instances (a mapped task has several).
  function taskState(instances) {
    const states = instances.map((t) => t.state);
    for (const s of ["failed", "upstream_failed", "running", "retrying", "queued", "scheduled", "pending", "cancelled"]) {
      if (states.includes(s)) return s;
    }
    return states.every((x) => x === "skipped") ? "skipped" : "succeeded";
  }

  // Each task's column in the drawing: the longest path to it.
  function layers(graph) {
    const layer = {};
    const byName = Object.fromEntries(graph.map((t) => [t.task, t]));
    const depth = (name, seen = new Set()) => {
      if (layer[name] !== undefined) return layer[name];
      if (seen.has(name)) return 0;
      seen.add(name);
      const deps = (byName[name]?.depends_on || []).filter((d) => byName[d]);
      layer[name] = deps.length ? 1 + Math.max(...deps.map((d) => depth(d, seen))) : 0;
      return layer[name];
    };
    graph.forEach((t) => depth(t.task));
    return layer;
  }

  function dag(graph, states) {
    const layer = layers(graph);
    const columns = [];
    graph.forEach((t) => { (columns[layer[t.task]] = columns[layer[t.task]] || []).push(t.task); });
    const BW = 150, BH = 34, GX = 50, GY = 14;
    const pos = {};
    columns.forEach((col, i) => col.forEach((name, j) => { pos[name] = { x: 8 + i * (BW + GX), y: 8 + j * (BH + GY) }; }));
    const W = 16 + columns.length * (BW + GX) - GX;
    const H = 16 + Math.max(1, ...columns.map((c) => c.length)) * (BH + GY) - GY;
    const edges = graph.flatMap((t) => t.depends_on.filter((d) => pos[d]).map((d) => {
      const a = pos[d], b = pos[t.task];
      const x1 = a.x + BW, y1 = a.y + BH / 2, x2 = b.x, y2 = b.y + BH / 2, mx = (x1 + x2) / 2;
      return s("path", { class: "edge", d: `M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2 - 4},${y2}`, "marker-end": "url(#arrow)" });
    }));
    const label = `Task graph: ${graph.map((t) => `${t.task}${t.depends_on.length ? ` after ${t.depends_on.join(" and ")}` : ""}`).join("; ")}`;
    return h("div", { class: "scroll", tabindex: "0", role: "region", "aria-label": "Task graph" }, s("svg", { class: "dag", viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img", "aria-label": label },
      s("defs", {}, s("marker", { id: "arrow", viewBox: "0 0 8 8", refX: 4, refY: 4, markerWidth: 8, markerHeight: 8, orient: "auto" }, s("path", { d: "M0,0 L8,4 L0,8 z", class: "arrow" }))),
      edges,
      graph.map((t) => {
        const p = pos[t.task];
        const st = states[t.task];
        const name = t.task.length > 20 ? `${t.task.slice(0, 19)}…` : t.task;
        return s("g", { class: `node ${st || "none"}` },
          s("title", {}, `${t.task} (${t.type}${t.mapped ? ", mapped" : ""}${t.pool ? `, pool ${t.pool}` : ""})${st ? `: ${st}` : ""}`),
          s("rect", { x: p.x, y: p.y, width: BW, height: BH, rx: 5 }),
          s("text", { x: p.x + 10, y: p.y + 21 }, name));
      })));
  }

  const finishedTasks = new Map();

  async function workflowPage(name) {
    $title.textContent = `Workflow ${name}`;
    document.title = `${name} · caudal`;
    const attempts = h("div", { class: "inspect", "aria-live": "polite" });
    const start = CAN_ACT ? h("div", { class: "actions", role: "group", "aria-label": "Workflow actions" },
      action("Start a run", async () => {
        const r = await api(`/workflows/${enc(name)}/runs`, { method: "POST", body: {} });
        return `Run #${r.id} queued.`;
      })) : null;
    const body = live(async () => {
      const { workflows } = await api("/workflows");
      const w = workflows.find((x) => x.workflow === name);
      if (!w) return h("p", { class: "error" }, `No workflow ${name} in the config. Go back to the overview.`);
      const { runs } = await api(`/workflow-runs?workflow=${enc(name)}&limit=20`);
      // A finished run's tasks do not change until it is retried.
      const tasks = await Promise.all(runs.map(async (r) => {
        const key = `${r.id}:${r.state}:${r.ended_at}`;
        if (FINISHED.includes(r.state) && finishedTasks.has(key)) return finishedTasks.get(key);
        const t = await api(`/workflow-runs/${r.id}/tasks`);
        if (FINISHED.includes(r.state)) finishedTasks.set(key, t);
        return t;
      }));
      const grid = runs.map((r, i) => {
        const byTask = {};
        tasks[i].tasks.forEach((t) => { (byTask[t.task] = byTask[t.task] || []).push(t); });
        return { run: r, byTask };
      }).reverse();
      const latest = grid.length ? grid[grid.length - 1].byTask : {};
      const latestStates = Object.fromEntries(Object.entries(latest).map(([k, v]) => [k, taskState(v)]));
      const layer = layers(w.graph);
      const names = w.graph.map((t) => t.task).sort((a, b) => layer[a] - layer[b] || a.localeCompare(b));
      const gridTable = grid.length === 0
        ? h("p", { class: "empty" }, CAN_ACT ? "No run yet. Start one with the button above, or wait for its schedule." : "No run yet: it starts on its schedule, or an operator starts one.")
        : h("div", { class: "scroll", tabindex: "0", role: "region", "aria-label": "Runs by task" }, h("table", { class: "grid" },
          h("caption", {}, "Runs (oldest left) by task"),
          h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Task"), grid.map(({ run }) => h("th", { scope: "col" },
            h("span", { class: "run-head" }, `#${run.id}`, h("br", {}), badge(run.state)))))),
          h("tbody", {},
            names.map((task) => h("tr", {}, h("th", { scope: "row" }, task), grid.map(({ run, byTask }) => {
              const inst = byTask[task] || [];
              const st = inst.length ? taskState(inst) : "none";
              const detail = inst.length > 1 ? ` (${inst.length} instances)` : "";
              return h("td", {}, h("button", {
                type: "button", class: `cell ${st}`, "data-key": `cell:${run.id}:${task}`,
                "data-state": st, "aria-label": `${task} in run ${run.id}: ${st}${detail}`, title: `${task} · run ${run.id}: ${st}${detail}`,
                onclick: () => showAttempts(run.id, task, attempts),
              }));
            }))),
            h("tr", {}, h("th", { scope: "row" }, "Actions"), grid.map(({ run }) => h("td", {},
              FINISHED.includes(run.state) ? action("Retry", () => api(`/workflow-runs/${run.id}/retry?failed=true`, { method: "POST" }), null, "small", `retry:${run.id}`)
                : action("Cancel", () => api(`/workflow-runs/${run.id}/cancel`, { method: "POST" }), `Cancel run #${run.id}? Its running tasks are stopped.`, "small danger", `cancel:${run.id}`)))))));
      return h("div", {},
        h("p", {}, `Schedule: ${w.schedule} · ${w.tasks} tasks`),
        section("Graph", dag(w.graph, latestStates), h("p", { class: "help" }, "Colours show the latest run.")),
        section("Runs", gridTable, legend()));
    });
    return [start, body, attempts];
  }

  function legend() {
    return h("ul", { class: "legend", "aria-label": "Colours" },
      ["succeeded", "running", "queued", "failed", "upstream_failed", "skipped", "cancelled", "none"].map((st) =>
        h("li", {}, h("span", { class: `cell ${st}`, "aria-hidden": "true" }), st === "none" ? "not in this run" : st.replace("_", " "))));
  }

  async function showAttempts(run, task, into) {
    try {
      const { attempts } = await api(`/workflow-runs/${run}/attempts`);
      const mine = attempts.filter((a) => a.task === task);
      const logs = h("div", {});
      into.replaceChildren(h("h3", { tabindex: "-1" }, `${task} in run #${run}`), table("Attempts", [
        ["Instance", (a) => (a.map_index < 0 ? "–" : a.map_index)],
        ["Attempt", (a) => a.attempt],
        ["State", (a) => badge(a.state)],
        ["Node", (a) => a.node || "–"],
        ["Started", (a) => time(a.started_at)],
        ["Ended", (a) => time(a.ended_at)],
        ["Exit", (a) => (a.exit_code === null || a.exit_code === undefined ? "–" : a.exit_code)],
        ["Error", (a) => (a.error ? h("span", { class: "err" }, a.error) : "–")],
        ["Log", (a) => h("span", { class: "row-actions" }, ["stdout", "stderr"].map((stream) => h("button", {
          type: "button", class: "small",
          onclick: async () => {
            const q = `attempt=${a.attempt}&stream=${stream}${a.map_index >= 0 ? `&index=${a.map_index}` : ""}`;
            try {
              const text = await api(`/workflow-runs/${run}/tasks/${enc(task)}/log?${q}`, { accept: "text/plain" });
              logs.replaceChildren(h("h4", {}, `${stream} of attempt ${a.attempt}`), h("pre", { class: "log", tabindex: "0" }, text || "(empty)"));
            } catch (err) { logs.replaceChildren(h("p", { class: "error" }, `No ${stream}: ${err.message}`)); }
          },
        }, stream)))],
      ], mine, "No attempt yet: the task has not started."), logs);
      into.querySelector("h3").focus();
    } catch (err) { say(`Could not load the attempts: ${err.message}`, true); }
  }

  // ---- datasets, live, alerts, nodes, audit --------------------------

  async function datasetsPage() {
    $title.textContent = "Datasets";
    document.title = "Datasets · caudal";
    return [live(async () => {
      const { datasets } = await api("/datasets");
      return table("Datasets", [
        ["Dataset", (d) => h("a", { href: `/datasets/${enc(d.name)}`, "data-key": `d:${d.name}` }, d.name)],
        ["Format", (d) => d.format],
        ["Partitioned by", (d) => d.partition_by.join(", ") || "–"],
        ["Partitions", (d) => num(d.partitions)],
        ["Rows", (d) => num(d.rows)],
        ["Size", (d) => bytes(d.bytes)],
        ["Dates", (d) => (d.first_date ? `${d.first_date} … ${d.last_date}` : "–")],
        ["Committed", (d) => time(d.committed_at)],
      ], datasets, "No dataset yet: a pipeline whose sink writes files (type = \"files\") makes one. See docs/datasets.md.");
    }, 5000)];
  }

  async function datasetPage(name) {
    $title.textContent = `Dataset ${name}`;
    document.title = `${name} · caudal`;
    const results = h("div", { "aria-live": "polite" });
    const filter = h("input", { id: "q-filter", name: "filter", placeholder: "date_from=2025-05-01&provider_id=7", class: "wide" });
    const columns = h("input", { id: "q-columns", name: "columns", placeholder: "all" });
    const limit = h("input", { id: "q-limit", name: "limit", type: "number", min: 1, max: 50000, value: 100 });
    const run = async (cursor) => {
      const q = new URLSearchParams(filter.value.trim());
      if (columns.value.trim()) q.set("columns", columns.value.trim());
      q.set("limit", limit.value || "100");
      if (cursor) q.set("cursor", cursor);
      try {
        const page = await api(`/datasets/${enc(name)}/rows?${q}`);
        const cols = [...new Set(page.rows.flatMap((r) => Object.keys(r)))];
        results.replaceChildren(
          table(`Rows of ${name}`, cols.map((c) => [c, (r) => (r[c] === null || r[c] === undefined ? "–" : typeof r[c] === "object" ? JSON.stringify(r[c]) : String(r[c]))]), page.rows, "No row matches."),
          page.next_cursor ? h("button", { type: "button", onclick: () => run(page.next_cursor) }, "Next page") : null);
      } catch (err) { results.replaceChildren(h("p", { class: "error", role: "alert" }, err.message)); }
    };
    const form = h("form", { class: "query", onsubmit: (e) => { e.preventDefault(); run(); } },
      h("label", { for: "q-filter" }, "Filter (COLUMN=value, COLUMN_from=, COLUMN_to=, joined by &)"), filter,
      h("label", { for: "q-columns" }, "Columns (comma-separated)"), columns,
      h("label", { for: "q-limit" }, "Rows"), limit,
      h("button", { type: "submit" }, "Query"));
    const partitions = live(async () => {
      const { partitions } = await api(`/datasets/${enc(name)}/partitions`);
      return table("Partitions", [
        ["Partition", (p) => h("code", { class: "wrap" }, p.path)],
        ["Generation", (p) => p.generation],
        ["Rows", (p) => num(p.rows)],
        ["Size", (p) => bytes(p.bytes)],
        ["Committed", (p) => time(p.committed_at)],
      ], partitions, "No partition yet: the dataset's pipeline has not written any.");
    }, 10000);
    return [section("Query", form, results), section("Partitions", partitions)];
  }

  async function livePage() {
    $title.textContent = "Live aggregates";
    document.title = "Live · caudal";
    const chosen = new URLSearchParams(location.search).get("name");
    return [live(async () => {
      const { aggregates } = await api("/live");
      if (!aggregates.length) return h("p", { class: "empty" }, "No live aggregate is configured: add an [aggregates.NAME] section (docs/live.md).");
      const name = chosen && aggregates.some((a) => a.name === chosen) ? chosen : aggregates[0].name;
      const a = aggregates.find((x) => x.name === name);
      const data = await api(`/live/${enc(name)}?limit=2000`);
      const metrics = Object.keys(a.metrics);
      const byStart = {};
      data.windows.forEach((w) => {
        const t = Date.parse(w.start);
        const slot = (byStart[t] = byStart[t] || { rows: 0 });
        slot.rows += w.rows;
        metrics.forEach((m) => { if (typeof w.metrics[m] === "number") slot[m] = (slot[m] || 0) + w.metrics[m]; });
      });
      const starts = Object.keys(byStart).map(Number).sort((x, y) => x - y);
      const series = (m) => starts.map((t) => [t, byStart[t][m] === undefined ? null : byStart[t][m]]);
      const latest = data.windows.slice().sort((x, y) => Date.parse(y.start) - Date.parse(x.start)).slice(0, 50);
      return h("div", {},
        h("nav", { "aria-label": "Aggregates", class: "tabs" }, aggregates.map((x) => h("a", { href: `/live?name=${enc(x.name)}`, "aria-current": x.name === name ? "page" : null, "data-key": `tab:${x.name}` }, x.name))),
        h("p", {}, `${a.name}: windows of ${a.window} every ${a.every} over pipeline ${a.pipeline}, grouped by ${a.group_by.join(", ") || "nothing"}. Watermark: `, time(data.watermark)),
        h("div", { class: "charts" },
          chart("Rows per window (all groups)", [{ name: "rows", cls: "s1", points: series("rows") }], ""),
          metrics.map((m, i) => chart(`${m} (${a.metrics[m]}, all groups)`, [{ name: m, cls: `s${(i % 3) + 1}`, points: series(m) }], ""))),
        table("Newest windows", [
          ["Start", (w) => time(w.start)],
          ["Group", (w) => Object.entries(w.group).map(([k, v]) => `${k}=${v}`).join(", ") || "–"],
          ["Rows", (w) => num(w.rows)],
          ...metrics.map((m) => [m, (w) => (w.metrics[m] === null || w.metrics[m] === undefined ? "–" : typeof w.metrics[m] === "object" ? JSON.stringify(w.metrics[m]) : String(w.metrics[m]))]),
          ["Closed", (w) => (w.closed ? "yes" : "open")],
        ], latest, "No window yet: it appears with the first record counted."));
    })];
  }

  async function alertsPage() {
    $title.textContent = "Alerts";
    document.title = "Alerts · caudal";
    const rules = live(async () => {
      const { alerts } = await api("/alerts");
      return table("Alert rules", [
        ["Alert", (a) => [h("strong", {}, a.name), a.summary ? h("div", { class: "help" }, a.summary) : null]],
        ["Watching", (a) => h("code", { class: "wrap" }, a.watching)],
        ["Severity", (a) => a.severity],
        ["Instances", (a) => (a.instances.length ? h("ul", { class: "plain" }, a.instances.map((i) => h("li", {},
          badge(i.silenced ? "silenced" : i.state, i.state === "firing" && !i.silenced ? "failed" : "queued"), " ",
          Object.entries(i.labels).map(([k, v]) => `${k}=${v}`).join(", "), i.value !== null && i.value !== undefined ? ` = ${fixed(i.value)}` : "", " since ", time(i.since)))) : "quiet")],
        ["Silences", (a) => (a.silences.length ? h("ul", { class: "plain" }, a.silences.map((x) => h("li", {},
          `until `, time(x.until), ` by ${x.created_by}${x.reason ? `: ${x.reason}` : ""} `,
          action("End silence", () => api(`/alerts/silences/${x.id}`, { method: "DELETE" }), null, "small", `unsilence:${x.id}`)))) : "–")],
        ["", (a) => (CAN_ACT ? silenceForm(a.name, alerts.indexOf(a)) : null)],
      ], alerts, "No alert rule is configured: add an [alerts.NAME] section (docs/alerts.md).");
    }, 3000);
    const history = live(async () => {
      const { events } = await api("/alerts/history?limit=100");
      return table("History", [
        ["When", (e) => time(e.at)],
        ["Alert", (e) => e.alert],
        ["Event", (e) => badge(e.event, e.event === "fired" ? "failed" : e.event === "resolved" ? "succeeded" : "queued")],
        ["Labels", (e) => Object.entries(e.labels).map(([k, v]) => `${k}=${v}`).join(", ") || "–"],
        ["Value", (e) => (e.value === null || e.value === undefined ? "–" : fixed(e.value))],
      ], events, "Nothing has fired yet.");
    }, 5000);
    return [section("Rules", rules), section("History", history)];
  }

  function silenceForm(alert, index) {
    const id = `sil-${index}`;
    const duration = h("input", { id: `${id}-d`, value: "1h", size: 5, "data-key": `silence-for:${alert}` });
    const reason = h("input", { id: `${id}-r`, placeholder: "why", size: 10, "data-key": `silence-reason:${alert}` });
    return h("form", {
      class: "inline",
      onsubmit: async (e) => {
        e.preventDefault();
        try {
          await api(`/alerts/${enc(alert)}/silence`, { method: "POST", body: { for: duration.value, reason: reason.value || undefined } });
          say(`${alert} silenced for ${duration.value}.`);
          refresh();
        } catch (err) { say(`Silence failed: ${err.message}`, true); }
      },
    }, h("label", { for: `${id}-d` }, "Silence for"), duration, h("label", { for: `${id}-r`, class: "sr-only" }, "Reason"), reason, h("button", { type: "submit", class: "small", "data-key": `silence:${alert}` }, "Silence"));
  }

  async function nodesPage() {
    $title.textContent = "Nodes";
    document.title = "Nodes · caudal";
    return [live(nodeTable, 3000)];
  }

  async function auditPage() {
    $title.textContent = "Audit log";
    document.title = "Audit · caudal";
    return [live(async () => {
      const { audit } = await api("/audit");
      return table("Audit log (newest first)", [
        ["When", (a) => time(a.at)],
        ["Token", (a) => a.token],
        ["Call", (a) => h("code", { class: "wrap" }, `${a.method} ${a.path}`)],
        ["Status", (a) => a.status],
      ], audit, "No change has been made through the API yet.");
    }, 5000)];
  }

  // ---- routing --------------------------------------------------------

  async function route() {
    const path = location.pathname;
    const m = (re) => path.match(re);
    let parts;
    let match;
    if (path === "/") parts = await overview();
    else if ((match = m(/^\/pipelines\/([^/]+)$/))) parts = await pipelinePage(decodeURIComponent(match[1]));
    else if ((match = m(/^\/workflows\/([^/]+)$/))) parts = await workflowPage(decodeURIComponent(match[1]));
    else if (path === "/datasets") parts = await datasetsPage();
    else if ((match = m(/^\/datasets\/([^/]+)$/))) parts = await datasetPage(decodeURIComponent(match[1]));
    else if (path === "/live") parts = await livePage();
    else if (path === "/alerts") parts = await alertsPage();
    else if (path === "/nodes") parts = await nodesPage();
    else if (path === "/audit") parts = await auditPage();
    else parts = [h("p", { class: "error" }, "No such page. ", h("a", { href: "/" }, "Go to the overview."))];
    $page.replaceChildren(...parts.filter(Boolean));
    document.querySelectorAll("nav a").forEach((a) => {
      if (a.getAttribute("href") === path || (path.startsWith(a.getAttribute("href")) && a.getAttribute("href") !== "/")) a.setAttribute("aria-current", "page");
    });
    tick();
    setInterval(tick, 500);
    document.addEventListener("visibilitychange", tick);
  }

  route();
})();
