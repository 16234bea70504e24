// The agentwall console: pages over the control plane's /v1 API, signed in by the session
// cookie. Everything nodes report is shown as text (textContent, never markup), and the
// Content-Security-Policy runs no script but this file.
"use strict";

const state = { session: null, timer: null, candidate: null };

// An element with attributes and children (strings become text nodes).
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

class ApiError extends Error {
  constructor(status, body, retryAfter) {
    super((body && body.error) || `HTTP ${status}`);
    this.status = status;
    this.body = body;
    // Seconds the server asked to wait (429), at least 1.
    this.retryAfter = Math.max(1, Number(retryAfter) || 1);
  }
}

async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (method !== "GET" && state.session) headers["X-Agentwall-CSRF"] = state.session.csrf;
  const r = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    credentials: "same-origin",
    cache: "no-store",
  });
  const text = await r.text();
  let json = null;
  try { json = text ? JSON.parse(text) : null; } catch (_) { json = { error: text }; }
  if (!r.ok) {
    if (r.status === 401 && path !== "/ui/session") signedOut("The session has ended; sign in again.");
    throw new ApiError(r.status, json, r.headers.get("Retry-After"));
  }
  return json;
}

const isAdmin = () => !!state.session && state.session.roles.includes("admin");

// A label; its style comes from a fixed list, never from what a node wrote.
const TAG_STYLES = new Set(["allow", "audit", "deny", "socket-deny", "unknown", "stale", "drift"]);
function tag(text, cls) {
  const style = cls || text;
  return el("span", { class: `tag ${TAG_STYLES.has(style) ? style : ""}` }, text);
}

function table(columns, rows, opts) {
  const head = el("tr", {}, columns.map((c) => el("th", { scope: "col" }, c)));
  const body = rows.map((cells, i) => {
    const tr = el("tr", opts && opts.rowAttrs ? opts.rowAttrs(i) : {}, cells.map((c) => el("td", {}, c)));
    return tr;
  });
  return el("table", opts && opts.id ? { id: opts.id } : {}, el("thead", {}, head), el("tbody", {}, body));
}

function page(title, ...children) {
  const p = document.getElementById("page");
  p.replaceChildren(el("h1", {}, title), ...children.filter((c) => c !== null && c !== undefined));
  p.hidden = false;
  return p;
}

function failure(e) {
  return el("p", { class: "error", role: "alert" }, e instanceof ApiError ? e.message : String(e));
}

// ---- sign-in ----

function signedOut(message) {
  clearInterval(state.timer);
  state.timer = null;
  state.session = null;
  document.getElementById("nav").hidden = true;
  document.getElementById("who").hidden = true;
  document.getElementById("page").hidden = true;
  document.getElementById("sign-in").hidden = false;
  document.getElementById("sign-in-error").textContent = message || "";
  document.getElementById("token").focus();
}

function signedIn(session) {
  state.session = session;
  document.getElementById("sign-in").hidden = true;
  document.getElementById("nav").hidden = false;
  document.getElementById("who").hidden = false;
  document.getElementById("principal").textContent = session.principal;
  document.getElementById("roles").textContent = `(${session.roles.join(", ")})`;
  route();
}

async function signIn(body) {
  try {
    signedIn(await api("POST", "/ui/session", body));
  } catch (e) {
    document.getElementById("sign-in-error").textContent =
      e instanceof ApiError ? e.message : String(e);
  }
}

// ---- pages ----

const STALE_MS = 120 * 1000;

async function fleetPage() {
  const [nodes, newest] = await Promise.all([
    api("GET", "/v1/nodes"),
    api("GET", "/v1/policy").catch((e) => (e.status === 404 ? null : Promise.reject(e))),
  ]);
  const newestVersion = newest ? newest.version : null;
  const now = Date.now();
  const stale = nodes.filter((n) => now - Date.parse(n.last_seen) > STALE_MS).length;
  const rows = nodes.map((n) => {
    const isStale = now - Date.parse(n.last_seen) > STALE_MS;
    const drift = newestVersion !== null && n.applied_version !== newestVersion;
    return {
      stale: isStale,
      cells: [
        n.node,
        n.owner || "",
        [n.last_seen, isStale ? [" ", tag("stale")] : null],
        [n.applied_version === null || n.applied_version === undefined ? "none" : String(n.applied_version),
          drift ? [" ", tag("behind", "drift")] : null],
        n.applied_revision || "",
        n.spool_records === undefined ? "" : String(n.spool_records),
        n.records_lost === undefined ? "" : (n.records_lost ? tag(`${n.records_lost} lost`, "deny") : "0"),
        n.agent_version || "",
        n.error || "",
      ],
    };
  });
  page(
    "Fleet",
    el("p", { id: "fleet-summary" },
      `${nodes.length} node(s), ${stale} stale; newest bundle: `,
      newestVersion === null ? "none pushed" : `version ${newestVersion} (${newest.revision})`),
    table(
      ["Node", "Owner", "Last seen", "Applied version", "Revision", "Spooled", "Lost", "agentwall", "Error"],
      rows.map((r) => r.cells),
      { id: "fleet", rowAttrs: (i) => ({ class: rows[i].stale ? "stale" : null }) },
    ),
  );
}

const LIVE_ROWS = 2000;

const FLOW_FILTERS = ["node", "identity", "verdict", "dest", "service", "since", "until"];

function flowDetail(f) {
  const r = f.record || {};
  const fields = [
    ["Time", r.time], ["Verdict", r.verdict], ["Reason", r.reason], ["Node", f.node],
    ["Identity", r.identity], ["Owner", r.owner], ["Destination", r.dest], ["Name asked", r.fqdn],
    ["Port", r.port], ["Protocol", r.protocol], ["Direction", r.direction], ["Rule", r.rule],
    ["Revision", r.revision], ["Process", r.comm], ["Executable", r.exe], ["Command line", r.cmdline],
    ["PID", r.pid], ["UID", r.uid], ["Cgroup", r.cgroup], ["Unit", r.unit],
    ["Container", r.container], ["Service", r.service], ["Count", r.count],
  ].filter(([, v]) => v !== undefined && v !== null && v !== "");
  return el("dl", { class: "detail", id: "flow-detail" },
    fields.map(([k, v]) => [el("dt", {}, k), el("dd", {}, String(v))]));
}

async function flowsPage(params) {
  const q = new URLSearchParams();
  for (const k of FLOW_FILTERS) if (params.get(k)) q.set(k, params.get(k));
  if (params.get("after")) q.set("after", params.get("after"));
  q.set("limit", params.get("limit") || "50");
  const form = el("form", { class: "filters", id: "flow-filters" },
    FLOW_FILTERS.map((k) => el("label", {}, k,
      k === "verdict"
        ? el("select", { name: k },
          ["", "deny", "audit", "unknown", "socket-deny", "allow"].map((v) =>
            el("option", { value: v, selected: params.get(k) === v }, v || "any")))
        : el("input", { name: k, value: params.get(k) || "",
          placeholder: k === "since" || k === "until" ? "RFC 3339" : "" }))),
    el("button", { type: "submit" }, "Filter"));
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const next = new URLSearchParams();
    for (const k of FLOW_FILTERS) {
      const v = form.elements[k].value.trim();
      if (v) next.set(k, v);
    }
    location.hash = `#/flows?${next}`;
  });
  let result;
  try {
    result = await api("GET", `/v1/flows?${q}`);
  } catch (e) {
    page("Flows", form, failure(e));
    return;
  }
  const detail = el("div", { id: "flow-detail-box" });
  const flows = result.flows;
  const show = (f) => detail.replaceChildren(el("h2", {}, `Flow ${f.id}`), flowDetail(f));
  const row = (f) => {
    const r = f.record || {};
    return el("tr", {
      class: "clickable", tabindex: "0", "data-id": f.id,
      onclick: () => show(f),
      onkeydown: (ev) => { if (ev.key === "Enter") show(f); },
    }, [
      r.time || "", f.node, r.identity || "", tag(r.verdict || "?"),
      r.fqdn ? `${r.fqdn} (${r.dest || "?"})` : (r.dest || ""),
      r.port === undefined ? "" : String(r.port), r.protocol || "", r.service || "", r.rule || r.reason || "",
    ].map((c) => el("td", {}, c)));
  };
  const t = table(["Time", "Node", "Identity", "Verdict", "Destination", "Port", "Protocol", "Service", "Rule or reason"], [], { id: "flows" });
  const body = t.querySelector("tbody");
  body.append(...flows.map(row));
  // Live: new records as they arrive, after the newest shown, with the same filters.
  let newest = flows.length ? flows[flows.length - 1].id : Number(params.get("after") || 0);
  const liveStatus = el("span", { class: "muted", id: "live-status", role: "status" });
  const live = el("label", {}, el("input", { type: "checkbox", id: "live" }), " Live");
  live.querySelector("input").addEventListener("change", (ev) => {
    clearInterval(state.timer);
    state.timer = null;
    liveStatus.textContent = "";
    if (!ev.target.checked) return;
    let busy = false;
    let pausedUntil = 0;
    const tick = async () => {
      // One request at a time: a slow answer is not asked for twice; and none while the
      // server has asked to wait.
      if (busy || Date.now() < pausedUntil) return;
      busy = true;
      const more = new URLSearchParams(q);
      if (newest) more.set("after", String(newest));
      more.set("limit", "500");
      try {
        const next = await api("GET", `/v1/flows?${more}`);
        body.append(...next.flows.map(row));
        if (next.flows.length) newest = next.flows[next.flows.length - 1].id;
        // The newest LIVE_ROWS only: a flood does not grow the page without end.
        while (body.children.length > LIVE_ROWS) body.firstElementChild.remove();
        liveStatus.textContent = `following: the newest ${body.children.length} flow(s) shown`;
      } catch (e) {
        liveStatus.textContent = e.message;
        if (e instanceof ApiError && e.status === 429) {
          pausedUntil = Date.now() + e.retryAfter * 1000;
          liveStatus.textContent = `${e.message} (paused for ${e.retryAfter} s)`;
        }
      } finally {
        busy = false;
      }
    };
    tick();
    state.timer = setInterval(tick, 2000);
  });
  const pager = el("div", { class: "pager" }, `${flows.length} flow(s) on this page`, live, liveStatus);
  if (result.next !== null && result.next !== undefined) {
    const more = new URLSearchParams(params);
    more.set("after", String(result.next));
    pager.append(el("a", { href: `#/flows?${more}`, id: "next-page" }, "Next page"));
  }
  if (params.get("after")) {
    const first = new URLSearchParams(params);
    first.delete("after");
    pager.append(el("a", { href: `#/flows?${first}` }, "First page"));
  }
  page("Flows", form, t, pager, detail);
}

async function shadowPage() {
  const nodes = await api("GET", "/v1/shadow-ai");
  const sections = [];
  let groups = 0;
  for (const n of nodes) {
    for (const g of n.groups) {
      groups += 1;
      const services = table(["Service", "Count", "First seen", "Last seen", "Destinations"],
        g.services.map((s) => [s.service, String(s.count), s.first_seen, s.last_seen,
          [...s.destinations].join(", ") + (s.destinations_left_out ? ` and ${s.destinations_left_out} more` : "")]));
      const policy = el("pre", { class: "policy" }, g.suggested_policy);
      const copy = el("button", {
        type: "button",
        onclick: async () => {
          try { await navigator.clipboard.writeText(g.suggested_policy); copy.textContent = "Copied"; } catch (_) { copy.textContent = "Select the text to copy it"; }
        },
      }, "Copy the suggested policy");
      // To the policy page, the suggestion as the candidate (its identity to be named first).
      const simulate = el("button", {
        type: "button",
        onclick: () => { state.candidate = g.suggested_policy; location.hash = "#/policy"; },
      }, "Simulate it");
      sections.push(el("section", { class: "shadow-group" },
        el("h2", {}, g.group),
        el("p", { class: "muted" }, `on ${n.node}`, n.owner ? `, owned by ${n.owner}` : ""),
        services, el("h3", {}, "Suggested policy"), policy, copy, " ", simulate));
    }
  }
  page("Shadow AI",
    el("p", { id: "shadow-summary" }, `${groups} process group(s) on ${nodes.length} node(s) used AI services without an identity.`),
    ...sections);
}

async function alertsPage() {
  const r = await api("GET", "/v1/alerts");
  const t = r.thresholds;
  // Newest first: what happened last is what is looked for.
  const rows = [...r.alerts].reverse().map((a) => {
    const evidence = el("pre", { class: "evidence" }, JSON.stringify(a.evidence || {}, null, 1));
    const who = a.identity || a.subject || "";
    const filter = a.identity ? el("a", { href: `#/flows?${new URLSearchParams({ identity: a.identity })}` }, "flows") : "";
    return [a.time || "", tag(a.alert || "", a.severity === "warning" ? "deny" : "audit"), who, a.node || "",
      a.summary || "", evidence, filter];
  });
  page("Alerts",
    el("p", { id: "alerts-summary" }, `${r.alerts.length} alert(s)` + (t.enabled ? "" : " (alerts are off)")),
    el("p", { class: "muted" },
      `Raised by: a destination new after ${t.learning_hours} h of learning; ${t.denials} denials in ${t.denial_window_secs} s; ` +
      `${t.dns_refusals} refused DNS queries in ${t.dns_window_secs} s, or a label of ${t.dns_label_length}+ characters at ${t.dns_entropy_bits}+ bits each; ` +
      `a new shadow-AI group. Sent to ${t.webhooks.length} webhook(s).`),
    table(["Time", "Alert", "Identity or node", "Node", "Summary", "Evidence", ""], rows, { id: "alerts" }));
}

async function revocationsPage() {
  let list;
  try {
    list = await api("GET", "/v1/revocations");
  } catch (e) {
    page("Revocations", failure(e));
    return;
  }
  const children = [
    table(["Identity", "Generation", "At", "By", "Reason"],
      list.map((r) => [r.identity, String(r.generation), r.at, r.by, r.reason || ""]), { id: "revocations" }),
  ];
  if (isAdmin()) {
    const status = el("p", { id: "revoke-status", role: "status" });
    const confirmBox = el("div", { id: "revoke-confirm" });
    const form = el("form", { class: "stack", id: "revoke-form" },
      el("h2", {}, "Revoke an identity on every node"),
      el("label", {}, "SPIFFE ID", el("input", { name: "identity", required: true, placeholder: "spiffe://example.org/agent" })),
      el("label", {}, "Reason", el("input", { name: "reason", maxlength: "1024" })),
      el("button", { type: "submit", class: "danger" }, "Revoke…"));
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const identity = form.elements.identity.value.trim();
      const reason = form.elements.reason.value.trim();
      const yes = el("button", { type: "button", class: "danger", id: "revoke-yes" }, "Revoke it");
      const no = el("button", { type: "button", onclick: () => confirmBox.replaceChildren() }, "Cancel");
      yes.addEventListener("click", async () => {
        confirmBox.replaceChildren();
        try {
          const r = await api("POST", "/v1/revocations", reason ? { identity, reason } : { identity });
          status.textContent = `Revoked ${r.identity} (generation ${r.generation}); nodes learn it at once.`;
          await revocationsPage();
          document.getElementById("revoke-status").textContent = status.textContent;
        } catch (e) {
          status.replaceChildren(failure(e));
        }
      });
      confirmBox.replaceChildren(el("div", { class: "confirm", role: "alertdialog" },
        el("p", {}, `Revoke ${identity} on every node? Its agents lose every connection and cannot start again.`),
        yes, " ", no));
      yes.focus();
    });
    children.push(form, confirmBox, status);
  }
  page("Revocations", ...children);
}

// A unified diff, its added and removed lines marked.
function diffView(text) {
  return el("pre", { class: "diff" }, text.split("\n").map((line) => {
    const cls = line.startsWith("+++") || line.startsWith("---") ? "file"
      : line.startsWith("+") ? "add" : line.startsWith("-") ? "del" : line.startsWith("@@") ? "hunk" : null;
    return [el("span", { class: cls }, line), "\n"];
  }));
}

function changeRows(changes) {
  return changes.map((c) => [c.identity, c.fqdn ? `${c.fqdn} (${c.dest})` : c.dest, String(c.port), c.protocol, String(c.count), c.why]);
}

async function policyPage() {
  const [versions, proposals] = await Promise.all([
    api("GET", "/v1/policy/versions"),
    api("GET", "/v1/policy/proposals"),
  ]);
  const diffBox = el("div", { id: "diff-box" });
  const pick = (name, chosen) => el("select", { name },
    versions.map((v) => el("option", { value: String(v.version), selected: v.version === chosen }, `version ${v.version}`)));
  const diffForm = el("form", { class: "filters", id: "diff-form" },
    el("label", {}, "from", pick("from", versions.length > 1 ? versions[1].version : null)),
    el("label", {}, "to", pick("to", versions.length ? versions[0].version : null)),
    el("button", { type: "submit" }, "Show the changes"));
  diffForm.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try {
      const d = await api("GET", `/v1/policy/diff?from=${encodeURIComponent(diffForm.elements.from.value)}&to=${encodeURIComponent(diffForm.elements.to.value)}`);
      diffBox.replaceChildren(d.files.length
        ? el("div", {}, d.files.map((f) => [el("h3", {}, `${f.name} (${f.change})`), diffView(f.diff)]))
        : el("p", {}, `Versions ${d.from} and ${d.to} hold the same files.`));
    } catch (e) {
      diffBox.replaceChildren(failure(e));
    }
  });

  // A candidate: files chosen from disk, or one typed in; validated and replayed against
  // every node's recorded flows. Nothing is pushed.
  const result = el("div", { id: "simulation" });
  const candidate = el("form", { class: "stack", id: "candidate-form" },
    el("label", {}, "Policy files (*.yaml)", el("input", { type: "file", name: "files", multiple: true, accept: ".yaml,.yml" })),
    el("label", {}, "or the text of agents.yaml", el("textarea", { name: "text", rows: "10", spellcheck: "false" })),
    el("label", {}, "Flows since (RFC 3339, optional)", el("input", { name: "since", placeholder: "2026-12-01T00:00:00Z" })),
    el("button", { type: "submit" }, "Validate and simulate"));
  candidate.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const files = [];
    for (const f of candidate.elements.files.files) files.push({ name: f.name, text: await f.text() });
    if (!files.length && candidate.elements.text.value.trim()) files.push({ name: "agents.yaml", text: candidate.elements.text.value });
    if (!files.length) {
      result.replaceChildren(el("p", { class: "error" }, "Choose policy files or type a policy."));
      return;
    }
    const body = { files };
    if (candidate.elements.since.value.trim()) body.since = candidate.elements.since.value.trim();
    result.replaceChildren(el("p", { class: "muted" }, "Replaying the fleet's flows…"));
    try {
      const r = await api("POST", "/v1/policy/simulate", body);
      result.replaceChildren(
        el("p", { id: "simulation-summary" },
          `Revision ${r.revision}: ${r.replayed} recorded flow(s) replayed; ${r.newly_denied.length} newly denied, ${r.newly_allowed.length} newly allowed.`,
          r.truncated ? ` Only the first ${r.records} records were read: narrow it with a time.` : ""),
        el("h3", {}, "Newly denied"),
        table(["Identity", "Destination", "Port", "Protocol", "Count", "Why"], changeRows(r.newly_denied), { id: "newly-denied" }),
        el("h3", {}, "Newly allowed"),
        table(["Identity", "Destination", "Port", "Protocol", "Count", "Rule"], changeRows(r.newly_allowed), { id: "newly-allowed" }));
    } catch (e) {
      const problems = e.body && e.body.errors ? e.body.errors : [];
      result.replaceChildren(failure(e),
        el("ul", { id: "candidate-errors" }, problems.map((p) => el("li", {}, `${p.file}:${p.line}:${p.column}: ${p.message}`))));
    }
  });

  if (state.candidate) {
    candidate.elements.text.value = state.candidate;
    state.candidate = null;
  }
  page("Policy",
    table(["Version", "Revision", "Pushed", "By"],
      versions.map((v) => [String(v.version), v.revision, v.pushed_at, v.pushed_by]), { id: "versions" }),
    el("h2", {}, "Proposals"),
    el("p", { class: "muted" }, "Pushes awaiting the approvals the control plane requires; signers approve with their own key: agentwall cp policy approve N --sign-key KEY --sha256 HASH --trusted-signer PUB."),
    table(["Proposal", "Revision", "Pushed", "By", "Signed by", "State"],
      proposals.map((p) => [String(p.id), p.revision, p.pushed_at, p.pushed_by,
        p.signing.signatures && p.signing.signatures.length ? p.signing.signatures.map((s) => s.signer || s.key).join(", ") : "no one",
        p.version ? `published as version ${p.version}` : "awaiting approvals"]), { id: "proposals" }),
    el("h2", {}, "Compare two versions"), diffForm, diffBox,
    el("h2", {}, "Try a candidate against the fleet's flows"), candidate, result);
}

function decisionsChart(buckets, bucketSecs) {
  const box = el("div", { id: "decisions-chart", class: "chart", role: "img",
    "aria-label": "Decisions over time: allowed, audit and denied flows per bucket" });
  if (!buckets.length || typeof uPlot === "undefined") {
    box.append(el("p", { class: "muted" }, "No decisions recorded in this span."));
    return box;
  }
  const xs = buckets.map((b) => Date.parse(b.start) / 1000);
  const data = [xs, buckets.map((b) => b.allow), buckets.map((b) => b.audit), buckets.map((b) => b.deny)];
  // Drawn once the box is in the page (uPlot measures nothing itself; the width is ours).
  requestAnimationFrame(() => {
    const width = Math.max(320, box.clientWidth || 800);
    new uPlot({
      width, height: 220,
      // The span the buckets cover, even when it is one bucket.
      scales: { x: { time: true, range: () => [xs[0], xs[xs.length - 1] + bucketSecs] } },
      series: [
        {},
        { label: "allowed", stroke: "#1d6b32", width: 2 },
        { label: "audit", stroke: "#8a5a00", width: 2 },
        { label: "denied", stroke: "#b3261e", width: 2 },
      ],
      axes: [{}, { label: `flows per ${bucketSecs >= 3600 ? `${bucketSecs / 3600} h` : `${bucketSecs / 60} min`}` }],
    }, data, box);
  });
  return box;
}

async function identitiesPage(params) {
  const q = new URLSearchParams();
  if (params.get("since")) q.set("since", params.get("since"));
  if (params.get("after")) q.set("after", params.get("after"));
  const r = await api("GET", `/v1/identities${q.toString() ? `?${q}` : ""}`);
  const chosen = params.get("id");
  // One identity's detail: from this page, or asked for alone (a link to it, another page).
  let one = chosen && r.identities.find((i) => i.identity === chosen);
  let oneBuckets = r.bucket_secs;
  if (chosen && !one) {
    const alone = new URLSearchParams();
    if (params.get("since")) alone.set("since", params.get("since"));
    alone.set("identity", chosen);
    const a = await api("GET", `/v1/identities?${alone}`);
    one = a.identities[0];
    oneBuckets = a.bucket_secs;
  }
  const form = el("form", { class: "filters", id: "identity-filters" },
    el("label", {}, "since", el("input", { name: "since", value: params.get("since") || "", placeholder: "RFC 3339" })),
    el("button", { type: "submit" }, "Show"));
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const next = new URLSearchParams();
    if (form.elements.since.value.trim()) next.set("since", form.elements.since.value.trim());
    if (chosen) next.set("id", chosen);
    location.hash = `#/identities?${next}`;
  });
  const pager = el("div", { class: "pager", id: "identities-pager" },
    `${r.identities.length} identit${r.identities.length === 1 ? "y" : "ies"} on this page`,
    r.identities_left_out ? `; ${r.identities_left_out} record(s) of identities on later pages` : "");
  if (r.next_after) {
    const more = new URLSearchParams(params);
    more.set("after", r.next_after);
    more.delete("id");
    pager.append(el("a", { href: `#/identities?${more}`, id: "identities-next" }, "Next page"));
  }
  if (params.get("after")) {
    const first = new URLSearchParams(params);
    first.delete("after");
    first.delete("id");
    pager.append(el("a", { href: `#/identities?${first}` }, "First page"));
  }
  const open = (id) => {
    const next = new URLSearchParams(params);
    next.set("id", id);
    location.hash = `#/identities?${next}`;
  };
  const list = table(["Identity", "Owner", "Allowed", "Audit", "Denied", "Nodes", "Sessions", "Last seen", "Unused rules"],
    r.identities.map((i) => [i.identity, i.owner || "", String(i.allow), String(i.audit), String(i.deny),
      String(i.nodes.length), String(i.sessions.reduce((n, s) => n + s.sessions, 0)), i.last_seen || "",
      String(i.rules.filter((x) => x.hits === 0).length)]),
    {
      id: "identities",
      rowAttrs: (n) => ({
        class: "clickable", tabindex: "0",
        onclick: () => open(r.identities[n].identity),
        onkeydown: (ev) => { if (ev.key === "Enter") open(r.identities[n].identity); },
      }),
    });
  const detail = [];
  if (one) {
    detail.push(
      el("h2", { id: "identity-name" }, one.identity),
      el("p", {}, one.owner ? `Owner ${one.owner}. ` : "No owner. ",
        `Seen on ${one.nodes.length} node(s)`, one.nodes.length ? `: ${one.nodes.join(", ")}` : "", "."),
      el("p", { id: "identity-sessions" }, one.sessions.length
        ? `Live sessions (as each node last said): ${one.sessions.map((s) => `${s.sessions} on ${s.node}`).join(", ")}.`
        : "No live session on any node (as each node last said)."),
      decisionsChart(one.buckets, oneBuckets),
      el("h3", {}, "Top destinations"),
      table(["Destination", "Port", "Protocol", "Allowed", "Audit", "Denied"],
        one.top_destinations.map((d) => [d.dest, String(d.port), d.protocol, String(d.allow), String(d.audit), String(d.deny)]),
        { id: "top-destinations" }),
      el("h3", {}, r.version ? `Rules in version ${r.version}` : "Rules"),
      table(["Rule", "Place", "From", "Allowed flows"],
        one.rules.map((x) => [String(x.rule_id), x.place, x.from, x.hits ? String(x.hits) : tag("unused", "drift")]),
        { id: "rules" }));
  }
  page("Identities", form, list, pager,
    r.truncated ? el("p", { class: "muted" }, `Only the first ${r.records} records were read: narrow it with a time.`) : null,
    ...detail);
}

const PAGES = {
  fleet: fleetPage,
  flows: flowsPage,
  "shadow-ai": shadowPage,
  alerts: alertsPage,
  identities: identitiesPage,
  policy: policyPage,
  revocations: revocationsPage,
};

async function route() {
  clearInterval(state.timer);
  state.timer = null;
  if (!state.session) return;
  const hash = location.hash.replace(/^#\/?/, "");
  const [name, query] = hash.split("?");
  const which = PAGES[name] ? name : "fleet";
  for (const a of document.querySelectorAll("nav a")) {
    if (a.dataset.page === which) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  try {
    await PAGES[which](new URLSearchParams(query || ""));
  } catch (e) {
    if (state.session) page(which, failure(e));
  }
}

async function start() {
  document.getElementById("sign-in-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const token = document.getElementById("token");
    const value = token.value;
    token.value = "";
    signIn({ token: value });
  });
  document.getElementById("sign-in-cert").addEventListener("click", () => signIn({}));
  document.getElementById("sign-out").addEventListener("click", async () => {
    try { await api("DELETE", "/ui/session"); } catch (_) { /* ended either way */ }
    signedOut("Signed out.");
  });
  window.addEventListener("hashchange", route);
  // A one-time sign-in link: its code leaves the address bar (and the history) at once.
  const link = location.hash.match(/^#link=([0-9a-f]{64})$/);
  if (link) {
    history.replaceState(null, "", location.pathname);
    // A link replaces a session this browser has only when its user says so: a page
    // elsewhere must not sign someone in as another.
    const now = await api("GET", "/ui/session").catch(() => null);
    if (!(now && now.signed_in) || window.confirm(`Sign in with the link instead of as ${now.principal}?`)) {
      signedOut("");
      await signIn({ link: link[1] });
      return;
    }
  }
  try {
    const s = await api("GET", "/ui/session");
    if (s && s.signed_in) signedIn(s);
    else signedOut("");
  } catch (e) {
    signedOut(e instanceof ApiError ? e.message : String(e));
  }
}

start();
