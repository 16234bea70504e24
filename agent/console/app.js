// The agentwall console: pages over the control plane's /v1 API, signed in by the session
// cookie. Everything nodes report is shown as text (textContent, never markup), and the
// Content-Security-Policy runs no script but this file.
"use strict";

const state = { session: null };

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
  constructor(status, body) {
    super((body && body.error) || `HTTP ${status}`);
    this.status = status;
    this.body = body;
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
    throw new ApiError(r.status, json);
  }
  return json;
}

const isAdmin = () => !!state.session && state.session.roles.includes("admin");

function tag(text, cls) {
  return el("span", { class: `tag ${cls || text}` }, text);
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
  p.replaceChildren(el("h1", {}, title), ...children);
  p.hidden = false;
  return p;
}

function failure(e) {
  return el("p", { class: "error", role: "alert" }, e instanceof ApiError ? e.message : String(e));
}

// ---- sign-in ----

function signedOut(message) {
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
      ["Node", "Owner", "Last seen", "Applied version", "Revision", "agentwall", "Error"],
      rows.map((r) => r.cells),
      { id: "fleet", rowAttrs: (i) => ({ class: rows[i].stale ? "stale" : null }) },
    ),
  );
}

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
  const rows = flows.map((f) => {
    const r = f.record || {};
    return [
      r.time || "", f.node, r.identity || "", tag(r.verdict || "?"),
      r.fqdn ? `${r.fqdn} (${r.dest || "?"})` : (r.dest || ""),
      r.port === undefined ? "" : String(r.port), r.protocol || "", r.service || "", r.rule || r.reason || "",
    ];
  });
  const t = table(["Time", "Node", "Identity", "Verdict", "Destination", "Port", "Protocol", "Service", "Rule or reason"], rows, {
    id: "flows",
    rowAttrs: (i) => ({
      class: "clickable", tabindex: "0", "data-id": flows[i].id,
      onclick: () => detail.replaceChildren(el("h2", {}, `Flow ${flows[i].id}`), flowDetail(flows[i])),
      onkeydown: (ev) => {
        if (ev.key === "Enter") detail.replaceChildren(el("h2", {}, `Flow ${flows[i].id}`), flowDetail(flows[i]));
      },
    }),
  });
  const pager = el("div", { class: "pager" }, `${flows.length} flow(s) on this page`);
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
      sections.push(el("section", { class: "shadow-group" },
        el("h2", {}, g.group),
        el("p", { class: "muted" }, `on ${n.node}`, n.owner ? `, owned by ${n.owner}` : ""),
        services, el("h3", {}, "Suggested policy"), policy, copy));
    }
  }
  page("Shadow AI",
    el("p", { id: "shadow-summary" }, `${groups} process group(s) on ${nodes.length} node(s) used AI services without an identity.`),
    ...sections);
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

const PAGES = {
  fleet: fleetPage,
  flows: flowsPage,
  "shadow-ai": shadowPage,
  revocations: revocationsPage,
};

async function route() {
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
  try {
    const s = await api("GET", "/ui/session");
    if (s && s.signed_in) signedIn(s);
    else signedOut("");
  } catch (e) {
    signedOut(e instanceof ApiError ? e.message : String(e));
  }
}

start();
