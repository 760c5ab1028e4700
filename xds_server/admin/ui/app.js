// The dashboard's page: plain JavaScript, no framework, no build step.
//
// Every string that comes from the server (the spec, the audit log, a reason typed by
// an operator) is written with textContent or as an attribute value, never as HTML:
// the `h` helper below is the only way this file makes elements.
// The admin token lives in this variable only: never in a URL, a cookie or storage.
"use strict";

const state = {
  token: "",
  overview: null,
  page: null,       // the rollout page's data
  nodes: null,
  auditRegion: "",
  auditKind: "",
  message: null,    // {text, error} after an action
  scope: null,      // what the token may do (GET /api/scope): {name, verbs, services}
};

// ---- small helpers ----

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "style") Object.assign(el.style, v); // CSSOM: allowed by the CSP, unlike a style attribute
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    el.appendChild(typeof c === "string" || typeof c === "number" ? document.createTextNode(String(c)) : c);
  }
  return el;
}

function svg(tag, attrs, ...children) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    el.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
  }
  return el;
}

function fmtTime(t) {
  return t ? new Date(t * 1000).toLocaleTimeString() : "";
}

function fmtNum(v, digits) {
  if (v === null || v === undefined || Number.isNaN(v)) return "";
  const n = Number(v);
  if (Math.abs(n) >= 100) return n.toFixed(0);
  return n.toPrecision(digits || 3);
}

function pct(v) {
  return `${Number(v || 0).toFixed(Number.isInteger(v) ? 0 : 1)}%`;
}

async function api(path, options) {
  const opts = Object.assign({ headers: {} }, options || {});
  if (state.token) opts.headers["Authorization"] = `Bearer ${state.token}`;
  const resp = await fetch(path, opts);
  let body = null;
  try { body = await resp.json(); } catch (e) { body = null; }
  if (!resp.ok) {
    const err = new Error((body && body.error) || `${resp.status} ${resp.statusText}`);
    err.status = resp.status;
    throw err;
  }
  return body;
}

function route() {
  const parts = (location.hash || "#/").slice(2).split("/").map(decodeURIComponent);
  if (parts[0] === "rollout" && parts[1]) return { page: "rollout", service: parts[1], version: parts[2] || "" };
  if (parts[0] === "nodes") return { page: "nodes" };
  return { page: "overview" };
}

function phase(p) {
  return h("span", { class: `phase ${p}`, "data-phase": p }, p || "none");
}

function weightBar(r, service) {
  const seg = (pool, value) => h("span", {
    class: pool, style: { width: `${Number(value || 0)}%` }, title: `${pool} ${pct(value)}`,
  });
  return h("div", { class: "region-weights" },
    h("div", { class: "bar" },
      seg("production", r.production_percent), seg("baseline", r.baseline_percent), seg("canary", r.canary_percent)),
    h("div", { class: "weights" },
      h("span", { "data-service": service, "data-region": r.region, "data-pool": "production" }, `production ${pct(r.production_percent)}`), " · ",
      h("span", { "data-service": service, "data-region": r.region, "data-pool": "baseline" }, `baseline ${pct(r.baseline_percent)}`), " · ",
      h("span", { "data-service": service, "data-region": r.region, "data-pool": "canary" }, `canary ${pct(r.canary_percent)}`)));
}

function stepLabel(rollout, step) {
  if (step < 0) return "warm-up";
  const steps = rollout.steps || [];
  return step < steps.length ? `step ${step} (${steps[step]}%)` : `step ${step}`;
}

// A rollout group (issue 31): its members move, and roll back, as one.
function groupBadge(name) {
  return h("span", { class: "group", "data-group": name, title: "rollout group: its members move and roll back as one" }, `group ${name}`);
}

// ---- overview ----

function renderOverview(main) {
  const ov = state.overview;
  if (!ov) return;
  main.appendChild(h("h1", {}, "Rollouts"));
  for (const svc of ov.services) {
    const ro = svc.rollout;
    const card = h("section", { class: "card service", "data-service": svc.name },
      h("h2", {}, h("a", { href: `#/rollout/${encodeURIComponent(svc.name)}` }, svc.name), " ",
        ro && ro.phase ? phase(ro.phase) : h("span", { class: "muted" }, ro ? "waiting" : "no rollout"),
        svc.group ? groupBadge(svc.group) : null,
        ro ? h("span", { class: "muted" }, ` canary ${ro.canary_version} · steps ${(ro.steps || []).join(" → ")}%`) : null));
    if (ro && ro.waiting) card.appendChild(h("p", { class: "waiting" }, `${ro.phase ? "next canary " : ""}waiting: ${ro.waiting}`));
    if (ro && ro.phase) {
      if (ro.reason) card.appendChild(h("p", { class: "rollout-reason" }, ro.reason));
      const rows = ro.regions.map((r) => h("tr", { "data-region": r.region },
        h("td", {}, r.region), h("td", {}, phase(r.phase)), h("td", {}, stepLabel(ro, r.step), r.manual ? " (set by hand)" : ""),
        h("td", {}, weightBar(r, svc.name)), h("td", { class: "region-reason" }, r.reason)));
      card.appendChild(h("table", {}, h("tr", {}, h("th", {}, "region"), h("th", {}, "phase"), h("th", {}, "step"),
        h("th", {}, "weights"), h("th", {}, "reason")), rows));
    }
    const last = svc.last_decision;
    if (last) {
      card.appendChild(h("p", { class: "last-decision" }, h("strong", {}, "Last decision "),
        `${fmtTime(last.time)} ${last.region || "all regions"}: ${last.phase_from} → ${last.phase_to} (${last.actor}): `,
        h("span", {}, last.reason)));
    }
    main.appendChild(card);
  }
  main.appendChild(h("h2", {}, "Nodes by sync state"));
  main.appendChild(h("table", { id: "sync" },
    h("tr", {}, h("th", {}, "region"), ["SYNCED", "STALE", "NACKED", "NOT SENT"].map((s) => h("th", {}, s))),
    ov.regions.map((r) => h("tr", { "data-region": r.region }, h("td", {}, r.region),
      ["SYNCED", "STALE", "NACKED", "NOT SENT"].map((s) => h("td", { class: `num sync-${s.replace(" ", "_")}` }, r.nodes[s] || 0))))));
  const st = ov.server.store;
  main.appendChild(h("h2", {}, "This replica"));
  main.appendChild(h("p", { id: "replica" }, `${ov.server.role}: ${ov.server.role_detail}. State store: `,
    !st.known ? "kept by the leader" : st.writable ? "writable" : `FAILING: ${st.error}`,
    `. Actions ${ov.server.actions_detail}.`));
}

// ---- the rollout page ----

function regionSeries(audit, region) {
  const weight = [], canaryErr = [], compErr = [], canaryP99 = [], compP99 = [], markers = [];
  let comparator = "comparator";
  for (const e of audit) {
    if (e.region !== region && e.region !== null) continue;
    if (e.region === region && e.weights_after) weight.push([e.time, e.weights_after.canary || 0]);
    const m = e.measurements;
    if (e.region === region && m && m.canary) {
      if (m.canary.error_rate !== null) canaryErr.push([e.time, m.canary.error_rate]);
      if (m.canary.p99_ms !== null) canaryP99.push([e.time, m.canary.p99_ms]);
      if (m.baseline) {
        comparator = m.comparator || comparator;
        if (m.baseline.error_rate !== null) compErr.push([e.time, m.baseline.error_rate]);
        if (m.baseline.p99_ms !== null) compP99.push([e.time, m.baseline.p99_ms]);
      }
    }
    if (e.kind !== "check") markers.push({ t: e.time, label: `${fmtTime(e.time)} ${e.phase_to}: ${e.reason}`, cls: e.phase_to });
  }
  return { weight, canaryErr, compErr, canaryP99, compP99, markers, comparator };
}

function chart(title, series, limits, markers, t0, t1) {
  const W = 390, H = 150, L = 44, R = 8, T = 18, B = 20;
  const values = series.flatMap((s) => s.points.map((p) => p[1])).concat(limits.map((l) => l.value));
  const ymax = Math.max(1e-9, ...values) * 1.1;
  const span = Math.max(1, t1 - t0);
  const x = (t) => L + ((t - t0) / span) * (W - L - R);
  const y = (v) => T + (1 - v / ymax) * (H - T - B);
  const g = svg("svg", { class: "chart", width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img" },
    svg("title", {}, title),
    svg("text", { x: L, y: 12 }, title),
    svg("line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }),
    svg("line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B }),
    svg("text", { x: 2, y: T + 8 }, fmtNum(ymax, 2)),
    svg("text", { x: 2, y: H - B }, "0"),
    svg("text", { x: L, y: H - 4 }, fmtTime(t0)),
    svg("text", { x: W - R - 50, y: H - 4 }, fmtTime(t1)));
  for (const l of limits) {
    g.appendChild(svg("line", { class: "limit", x1: L, x2: W - R, y1: y(l.value), y2: y(l.value) },
      svg("title", {}, `${l.label} ${l.value}`)));
  }
  for (const m of markers) {
    g.appendChild(svg("line", { class: `marker ${m.cls}`, x1: x(m.t), x2: x(m.t), y1: T, y2: H - B },
      svg("title", {}, m.label)));
  }
  for (const s of series) {
    if (!s.points.length) continue;
    let d = "";
    s.points.forEach((p, i) => {
      if (s.step && i > 0) d += ` H${x(p[0]).toFixed(1)}`;
      d += `${i ? " L" : "M"}${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`;
    });
    g.appendChild(svg("path", { class: s.cls, d }, svg("title", {}, s.name)));
  }
  return g;
}

function latestVerdicts(audit, region) {
  for (let i = audit.length - 1; i >= 0; i--) {
    const e = audit[i];
    if (e.region === region && e.verdict && (e.verdict.metrics || []).length) return e;
  }
  return null;
}

function checksTable(page) {
  const rows = [];
  for (const r of page.rollout.regions) {
    const e = latestVerdicts(page.audit, r.region);
    if (!e) continue;
    const v = e.verdict;
    for (const m of v.metrics) {
      rows.push(h("tr", { "data-region": r.region, "data-metric": m.name },
        h("td", {}, r.region), h("td", {}, m.name), h("td", { class: `class-${m.classification}` }, m.classification),
        h("td", { class: "num" }, fmtNum(m.effect)), h("td", { class: "num" }, fmtNum(m.p_value)),
        h("td", { class: "num" }, fmtNum(m.alpha)), h("td", { class: "num" }, v.score === null ? "" : fmtNum(v.score)),
        h("td", {}, m.detail)));
    }
    for (const c of v.checks || []) {
      rows.push(h("tr", { "data-region": r.region, "data-metric": c.metric },
        h("td", {}, r.region), h("td", {}, `${c.metric} (guardrail)`), h("td", {}, c.ok ? "pass" : "breach"),
        h("td", { class: "num" }, fmtNum(c.value)), h("td", {}, ""), h("td", {}, ""), h("td", {}, ""),
        h("td", {}, `limit ${c.limit}`)));
    }
  }
  return h("table", { id: "checks" },
    h("tr", {}, ["region", "metric", "class", "effect", "p-value", "held to", "score", "detail"].map((c) => h("th", {}, c))),
    rows.length ? rows : h("tr", {}, h("td", { colspan: 8, class: "muted" }, "no checks yet")));
}

function auditTable(page) {
  const regions = [...new Set(page.audit.map((e) => e.region || "all"))];
  const kinds = [...new Set(page.audit.map((e) => e.kind))];
  const select = (id, value, options, onchange) => h("select", { id, onchange },
    h("option", { value: "" }, "every"), options.map((o) => h("option", { value: o, selected: o === value }, o)));
  const filters = h("div", { class: "filters" },
    "region ", select("audit-region", state.auditRegion, regions, (ev) => { state.auditRegion = ev.target.value; render(); }),
    "kind ", select("audit-kind", state.auditKind, kinds, (ev) => { state.auditKind = ev.target.value; render(); }));
  const shown = page.audit.filter((e) =>
    (!state.auditRegion || (e.region || "all") === state.auditRegion) && (!state.auditKind || e.kind === state.auditKind));
  const rows = shown.slice(-500).reverse().map((e) => h("tr", { "data-id": e.id, "data-kind": e.kind, "data-region": e.region || "all" },
    h("td", {}, fmtTime(e.time)), h("td", {}, e.region || "all"), h("td", {}, e.kind),
    h("td", {}, e.step === null ? "" : String(e.step)), h("td", {}, `${e.phase_from || ""} → ${e.phase_to || ""}`),
    h("td", { class: "actor" }, e.actor), h("td", { class: "audit-group" }, e.group || ""),
    h("td", {}, h("pre", { class: "reason" }, e.reason))));
  return h("div", {}, filters, h("table", { id: "audit" },
    h("tr", {}, ["time", "region", "kind", "step", "phase", "actor", "group", "reason"].map((c) => h("th", {}, c))), rows));
}

// Least privilege (issue 30): may the token do `verb` on every one of `services`?
// The server checks every action anyway; the page only hides what would be refused.
function allowed(verb, services) {
  const sc = state.scope;
  if (!sc || !sc.name || !(sc.verbs || []).includes(verb)) return false;
  if (sc.services === null || sc.services === undefined) return true;
  const covers = (svc) => sc.services.some((p) => (p.endsWith("*") ? svc.startsWith(p.slice(0, -1)) : svc === p));
  return services.every(covers);
}

function actionsPanel(page) {
  const ov = state.overview;
  if (!ov || !ov.server.actions) {
    return h("p", { class: "muted", id: "actions-off" }, `Read-only: actions ${ov ? ov.server.actions_detail : ""}.`);
  }
  if (!state.token) {
    return h("p", { class: "muted", id: "actions-off" }, "Enter the admin token above to pause, resume, abort or promote.");
  }
  const reason = h("input", { type: "text", id: "action-reason", placeholder: "reason (required; goes in the audit log)" });
  // `path`: the service's actions, or its rollout group's (every member at once).
  const act = async (path, label) => {
    if (!reason.value.trim()) { state.message = { text: "a reason is required", error: true }; render(); return; }
    try {
      await api(path, {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ reason: reason.value }),
      });
      state.message = { text: `${label}: done`, error: false };
    } catch (e) {
      state.message = { text: `${label}: ${e.message}`, error: true };
    }
    await refresh();
  };
  const names = ["pause", "resume", "abort", "promote"];
  const service = encodeURIComponent(page.rollout.service);
  const group = page.group;
  const members = group ? group.services : [page.rollout.service];
  // A member's pause, resume, abort or promote acts on its whole group: it needs every member.
  const mine = names.filter((n) => allowed(n, members));
  const groupNames = group ? names.filter((n) => allowed(n, members)) : [];
  const msg = state.message;
  if (!mine.length && !groupNames.length) {
    const sc = state.scope;
    return h("p", { class: "muted", id: "actions-off" },
      sc && sc.name ? `The token ${sc.name} may not act on ${page.rollout.service} (its scope: ${sc.scope}).` : "The token's scope is not known (see the error above).");
  }
  return h("div", { class: "actions" }, reason,
    mine.map((n) => h("button", { type: "button", id: `action-${n}`, onclick: () => act(`/api/rollouts/${service}/${n}`, n) }, n)),
    groupNames.length ? h("div", { class: "group-actions", "data-group": group.name },
      `group ${group.name} (${group.services.join(", ")}): `,
      groupNames.map((n) => h("button", {
        type: "button", id: `group-action-${n}`, onclick: () => act(`/api/groups/${encodeURIComponent(group.name)}/${n}`, `group ${group.name} ${n}`),
      }, `${n} group`))) : null,
    msg ? h("div", { class: `message ${msg.error ? "error" : ""}`, id: "action-message" }, msg.text) : null);
}

// One region's signal health (issue 27): can its evidence be trusted? Nodes applied /
// unknown / lagging on the current routes, Prometheus's Envoy targets up, the evidence's
// age, the canary's routed share against its configured one (the SRM test's p-value).
function signalsPanel(reg) {
  const s = reg.signals || {};
  const nodes = s.nodes_known ? `${s.nodes_applied} applied / ${s.nodes_unknown} unknown / ${s.nodes_lagging} lagging` : "not known here";
  const row = (name, value, bad) => h("tr", { "data-signal": name, class: bad ? "signal-bad" : "" },
    h("th", {}, name), h("td", {}, value));
  const rows = [row("nodes", nodes, s.nodes_known && (s.nodes_unknown > 0 || s.nodes_lagging > 0))];
  // Stragglers (issue 28): nodes that missed the step while the ACK quorum holds.
  const stragglers = s.stragglers || [];
  if (stragglers.length) rows.push(row("stragglers", stragglers.join("; "), true));
  if (!s.read) {
    rows.push(row("evidence", "not read yet", false));
  } else {
    rows.push(row("targets up", `${s.targets_up} of ${s.targets}`, s.targets_up < s.targets || s.targets === 0));
    rows.push(row("evidence age", s.evidence_age_s >= 0 ? `${fmtNum(s.evidence_age_s)} s (scrape ${fmtNum(s.scrape_interval_s)} s)` : "no sample",
      s.evidence_age_s < 0 || s.evidence_age_s > 2 * s.scrape_interval_s));
    rows.push(row("canary routed", s.canary_routed_percent >= 0 ? `${pct(s.canary_routed_percent)} of ${pct(s.canary_configured_percent)} configured` : "no requests yet", false));
    rows.push(row("SRM p-value", s.srm_p_value >= 0 ? fmtNum(s.srm_p_value) : (s.srm_note || "not tested"), !s.trusted && !s.problem));
    rows.push(row("verdict", s.trusted ? "trusted" : (s.problem || s.srm_note), !s.trusted));
  }
  return h("div", { class: `signals ${s.read && !s.trusted ? "untrusted" : ""}`, "data-region": reg.region },
    h("h3", {}, "signals"), h("table", {}, rows));
}

// The rollout group's members: each one's phase, or why its canary waits to start.
function groupPanel(group) {
  return h("section", { class: "card group-members", id: "group", "data-group": group.name },
    h("strong", {}, `Rollout group ${group.name}`), group.consistent ? " (consistent routing)" : "", ": ",
    group.members.map((m, i) => h("span", { class: "member", "data-service": m.service }, i ? ", " : "",
      h("a", { href: `#/rollout/${encodeURIComponent(m.service)}` }, m.service), " ",
      m.phase ? phase(m.phase) : h("span", { class: "muted" }, m.waiting ? `waiting: ${m.waiting}` : "no rollout"))));
}

function renderRollout(main, r) {
  const page = state.page;
  if (!page) {
    // A canary that waits to start (a group member without a canary, an `after:`) has no rollout yet.
    const svc = ((state.overview && state.overview.services) || []).find((s) => s.name === r.service);
    const ro = svc && svc.rollout;
    if (ro && ro.waiting) {
      main.appendChild(h("h1", {}, `${r.service} ${ro.canary_version} `, h("span", { class: "muted" }, "waiting"), svc.group ? groupBadge(svc.group) : null));
      main.appendChild(h("p", { class: "waiting", id: "waiting" }, `waiting: ${ro.waiting}`));
    } else {
      main.appendChild(h("p", { class: "muted" }, `no rollout of ${r.service}`));
    }
    return;
  }
  const ro = page.rollout;
  main.appendChild(h("h1", {}, `${ro.service} ${ro.canary_version} `, phase(ro.phase), ro.group ? groupBadge(ro.group) : null));
  if (page.group) main.appendChild(groupPanel(page.group));
  if (ro.waiting) main.appendChild(h("p", { class: "waiting" }, `next canary waiting: ${ro.waiting}`));
  if (page.cause) {
    const c = page.cause;
    main.appendChild(h("section", { class: "card cause", id: "rollback-cause", "data-region": c.region || "", "data-metric": c.metric || "" },
      h("strong", {}, "Rolled back"), ` at ${fmtTime(c.time)}: region `, h("b", { class: "cause-region" }, c.region || "all"),
      ", metric ", h("b", { class: "cause-metric" }, c.metric || "none (not a metric)"), ` (by ${c.actor}). `, h("span", {}, c.reason)));
  }
  main.appendChild(h("p", { class: "rollout-reason" }, ro.reason));
  main.appendChild(actionsPanel(page));
  const t0 = page.started_at;
  const t1 = Math.max(page.updated_at, ...page.audit.map((e) => e.time), t0 + 1);
  const g = page.guardrails;
  for (const reg of ro.regions) {
    const s = regionSeries(page.audit, reg.region);
    main.appendChild(h("section", { class: "card region", "data-region": reg.region },
      h("h2", {}, `${reg.region} `, phase(reg.phase), ` ${stepLabel(ro, reg.step)}`), weightBar(reg, ro.service),
      h("div", { class: "legend" }, h("span", { class: "canary" }, "— canary"), h("span", { class: "comparator" }, `— ${s.comparator}`),
        h("span", { class: "limit" }, "- - guardrail"), h("span", {}, "| decision (hover for its reason)")),
      h("div", { class: "charts" },
        chart("canary weight %", [{ name: "canary", cls: "canary", points: s.weight, step: true }], [], s.markers, t0, t1),
        chart("error rate", [{ name: "canary", cls: "canary", points: s.canaryErr }, { name: s.comparator, cls: "comparator", points: s.compErr }],
          [{ label: "max_error_rate", value: g.max_error_rate }], s.markers, t0, t1),
        chart("p99 ms", [{ name: "canary", cls: "canary", points: s.canaryP99 }, { name: s.comparator, cls: "comparator", points: s.compP99 }],
          [{ label: "max_p99_ms", value: g.max_p99_ms }], s.markers, t0, t1)),
      signalsPanel(reg),
      h("p", { class: "region-reason" }, reg.reason)));
  }
  main.appendChild(h("h2", {}, "Checks (latest per region)"));
  main.appendChild(checksTable(page));
  main.appendChild(h("h2", {}, "Audit log"));
  main.appendChild(auditTable(page));
  main.appendChild(h("h2", {}, "Rollouts of this service"));
  main.appendChild(h("ul", { id: "history" }, page.history.map((p) => h("li", {},
    h("a", { href: `#/rollout/${encodeURIComponent(ro.service)}/${encodeURIComponent(p.canary_version)}` }, p.canary_version),
    " ", phase(p.phase), ` started ${new Date(p.started_at * 1000).toLocaleString()}: `, p.reason))));
}

// ---- nodes ----

function renderNodes(main) {
  const nodes = (state.nodes && state.nodes.nodes) || [];
  main.appendChild(h("h1", {}, "Nodes"));
  const types = ["listener", "route", "cluster", "endpoint"];
  main.appendChild(h("table", { id: "nodes" },
    h("tr", {}, ["node", "client", "region", "sync", "connected since", ...types, "NACK", "straggler"].map((c) => h("th", {}, c))),
    nodes.map((n) => {
      const byType = Object.fromEntries(n.types.map((t) => [t.type, t]));
      const nacks = n.types.filter((t) => t.nack_error).map((t) => `${t.type}: ${t.nack_error}`);
      return h("tr", { "data-node": n.id },
        h("td", {}, n.id), h("td", { class: "client-type" }, n.client_type), h("td", {}, n.region),
        h("td", { class: `sync-${n.sync_state.replace(" ", "_")}` }, n.sync_state),
        h("td", {}, new Date(n.connected_since * 1000).toLocaleString()),
        types.map((t) => {
          const ts = byType[t];
          return h("td", { class: "num" }, ts ? `sent ${ts.sent_version || "-"} / acked ${ts.acked_version || "-"}` : "");
        }),
        h("td", { class: "nack" }, nacks.join("; ")),
        h("td", { class: "straggler" }, n.straggler || ""));
    })));
}

// ---- loading, live updates ----

async function refresh() {
  const r = route();
  try {
    if (state.token && !state.scope) state.scope = await api("/api/scope");
    state.overview = await api("/api/overview");
    const svc = state.overview.services.find((s) => s.name === r.service);
    const waiting = svc && svc.rollout && !svc.rollout.phase; // not started: nothing to fetch
    if (r.page === "rollout" && waiting && !r.version) {
      state.page = null;
    } else if (r.page === "rollout") {
      const q = r.version ? `?version=${encodeURIComponent(r.version)}` : "";
      try { state.page = await api(`/api/rollouts/${encodeURIComponent(r.service)}${q}`); } catch (e) {
        if (e.status === 404) state.page = null; else throw e;
      }
    }
    if (r.page === "nodes") state.nodes = await api("/api/nodes");
    state.error = null;
  } catch (e) {
    state.error = e.message;
  }
  render();
}

function render() {
  const r = route();
  const main = document.getElementById("main");
  const focused = document.activeElement && document.activeElement.id;
  const typed = document.getElementById("action-reason");
  const reasonText = typed ? typed.value : "";
  main.textContent = "";
  if (state.error) main.appendChild(h("p", { class: "message error", id: "error" }, state.error));
  if (r.page === "rollout") renderRollout(main, r);
  else if (r.page === "nodes") renderNodes(main);
  else renderOverview(main);
  const again = document.getElementById("action-reason");
  if (again) { again.value = reasonText; if (focused === "action-reason") again.focus(); }
  const ov = state.overview;
  document.getElementById("server-role").textContent = ov ? `replica: ${ov.server.role}` : "";
  document.getElementById("nav-overview").className = r.page === "overview" ? "current" : "";
  document.getElementById("nav-nodes").className = r.page === "nodes" ? "current" : "";
}

let pending = null;
function refreshSoon() {
  if (pending) return;
  pending = setTimeout(() => { pending = null; refresh(); }, 150);
}

function setLive(on, text) {
  const el = document.getElementById("live");
  el.className = `live ${on ? "on" : "off"}`;
  el.textContent = text;
}

// Server-sent events read through fetch, so the token can go in a header.
async function listen() {
  for (;;) {
    try {
      const headers = state.token ? { Authorization: `Bearer ${state.token}` } : {};
      const resp = await fetch("/api/events", { headers });
      if (!resp.ok || !resp.body) throw new Error(`${resp.status}`);
      setLive(true, "live");
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += decoder.decode(value, { stream: true });
        let i;
        while ((i = buf.indexOf("\n\n")) >= 0) {
          const chunk = buf.slice(0, i);
          buf = buf.slice(i + 2);
          const name = (chunk.match(/^event: (.*)$/m) || [])[1];
          if (name === "decision" || name === "state") {
            setLive(true, `live · ${name} at ${new Date().toLocaleTimeString()}`);
            refreshSoon();
          }
        }
      }
    } catch (e) {
      // the server went away or refused: show it, and try again
    }
    setLive(false, "reconnecting");
    await new Promise((resolve) => setTimeout(resolve, 2000));
  }
}

document.getElementById("token-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const input = document.getElementById("token");
  state.token = input.value.trim();
  state.scope = null; // asked again for the new token
  input.value = "";
  input.placeholder = state.token ? "token set (kept in this tab only)" : "admin token (kept in this tab only)";
  refresh();
});
window.addEventListener("hashchange", () => { state.message = null; state.page = null; refresh(); });
refresh();
listen();
setInterval(refresh, 5000); // node sync states change without decisions
