// Drives Debian's Chromium (headless) through the control plane's console, as
// tests/tests/console.rs sets it up: a real control plane with a real node's records.
// Every check throws; the Rust test reads the exit status and what this prints.
//
// Environment: CONSOLE_URL (the console's https address), ADMIN_TOKEN, SECURITY_TOKEN,
// REVOKE_ID (the identity the admin revokes), EXPECT (JSON: what the API answered for the
// same data), SHOTS (a directory for screenshots).
import { chromium } from "playwright-core";

const url = process.env.CONSOLE_URL;
const origin = new URL(url).origin;
const expect = JSON.parse(process.env.EXPECT);
const shots = process.env.SHOTS;

// The next line the test writes on stdin (it acts between two steps of the page).
const lines = [];
let wake = null;
process.stdin.setEncoding("utf8");
process.stdin.on("data", (d) => {
  lines.push(...d.split("\n").filter((l) => l));
  if (wake) wake();
});
async function nextLine() {
  while (!lines.length) await new Promise((r) => { wake = r; });
  return lines.shift();
}

function check(ok, what) {
  if (!ok) throw new Error(`check failed: ${what}`);
  console.log(`ok: ${what}`);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  // The machine has no network past loopback: nothing of Chromium's own may try it.
  args: [
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--disable-gpu",
  ],
});

const offHost = [];
const consoleErrors = [];

// `expected`: browser-console errors this session causes on purpose (a refused sign-in is
// logged by Chromium as a failed load); any other is a failure.
async function session(expected) {
  // The test's control plane has a certificate from the test's own CA, which this fresh
  // profile does not hold: the chain is not checked, the connection is still TLS.
  const context = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 1366, height: 860 } });
  context.on("request", (r) => {
    const u = new URL(r.url());
    if (u.origin !== origin && u.protocol !== "data:") offHost.push(r.url());
  });
  const page = await context.newPage();
  page.on("console", (m) => {
    if (m.type() === "error" && !(expected && expected.test(m.text()))) consoleErrors.push(m.text());
  });
  page.on("pageerror", (e) => consoleErrors.push(String(e)));
  return { context, page };
}

async function signIn(page, token) {
  await page.goto(url);
  await page.locator("#sign-in").waitFor({ state: "visible" });
  await page.locator("#token").fill(token);
  await page.keyboard.press("Enter");
  await page.locator("#nav").waitFor({ state: "visible" });
}

async function rows(page, table) {
  await page.locator(`#${table}`).waitFor();
  return page.locator(`#${table} tbody tr`).count();
}

async function csrfOf(context) {
  const r = await context.request.get(`${origin}/ui/session`);
  return (await r.json()).csrf;
}

try {
  // Without a session, the pages ask for one and the API refuses.
  {
    const { context, page } = await session(/status of 401/);
    await page.goto(url);
    await page.locator("#sign-in").waitFor({ state: "visible" });
    await page.screenshot({ path: `${shots}/sign-in.png` });
    const r = await context.request.get(`${origin}/v1/nodes`);
    check(r.status() === 401, `a request without a session is refused (${r.status()})`);
    await page.locator("#token").fill("not-a-token-of-this-control-plane");
    await page.keyboard.press("Enter");
    await page.locator("#sign-in-error").filter({ hasText: "holds no role" }).waitFor();
    check(true, "a wrong token is refused at sign-in");
    await context.close();
  }

  // Security reads everything and acts on nothing. (The refused candidate below is
  // answered 422, which Chromium logs as a failed load.)
  {
    const { context, page } = await session(/status of 422/);
    await signIn(page, process.env.SECURITY_TOKEN);
    check((await page.locator("#roles").textContent()) === "(security)", "signed in as security");
    const cookies = await context.cookies();
    const c = cookies.find((c) => c.name === "__Host-agentwall-session");
    check(c && c.httpOnly && c.secure && c.sameSite === "Strict", "the session cookie is HttpOnly, Secure, SameSite=Strict");

    // Fleet: the nodes the API lists.
    check((await rows(page, "fleet")) === expect.nodes, `the fleet page lists ${expect.nodes} nodes`);
    const fleet = await page.locator("#fleet").textContent();
    check(fleet.includes(expect.node) && fleet.includes(expect.node_owner), "the fleet page names the node and its owner");
    check((await page.locator("#fleet-summary").textContent()).includes(`version ${expect.version}`), "the fleet page names the newest bundle");
    await page.screenshot({ path: `${shots}/fleet.png`, fullPage: true });

    // Flows: the first page, a filter, one flow's detail.
    await page.locator('nav a[data-page="flows"]').click();
    check((await rows(page, "flows")) === expect.flows, `the flows page shows the API's ${expect.flows} flows`);
    await page.locator('#flow-filters select[name="verdict"]').selectOption("deny");
    await page.locator('#flow-filters button[type="submit"]').click();
    await page.waitForFunction(() => location.hash.includes("verdict=deny"));
    await page.locator("#flows tbody tr").first().waitFor();
    check((await rows(page, "flows")) === expect.denials, `filtered to denials, the API's ${expect.denials}`);
    await page.locator("#flows tbody tr").first().focus();
    await page.keyboard.press("Enter");
    const detail = await page.locator("#flow-detail").textContent();
    check(detail.includes(expect.denied_dest) && detail.includes(expect.identity) && detail.includes("no rule allows it"),
      `a denial's detail names its identity, destination and reason (${detail})`);
    await page.screenshot({ path: `${shots}/flows.png`, fullPage: true });

    // Identities: each one's numbers, its chart, its rules and which are unused.
    await page.locator('nav a[data-page="identities"]').click();
    check((await rows(page, "identities")) === expect.identities.length, `the identities page lists ${expect.identities.length}`);
    const want = expect.identities.find((i) => i.identity === expect.identity);
    const cells = await page.locator("#identities tbody tr", { hasText: expect.identity }).locator("td").allTextContents();
    check(cells[2] === String(want.allow) && cells[3] === String(want.audit) && cells[4] === String(want.deny),
      `the identity's counts are the API's (${cells.join(" | ")})`);
    await page.locator("#identities tbody tr", { hasText: expect.identity }).click();
    await page.locator("#identity-name").waitFor();
    await page.locator("#decisions-chart canvas").waitFor();
    check(true, "the identity's decisions are drawn as a chart");
    check((await rows(page, "top-destinations")) === want.top_destinations.length, "its top destinations are the API's");
    check((await rows(page, "rules")) === want.rules.length, "its rules are listed");
    check((await page.locator("#rules").textContent()).includes("unused") === want.rules.some((r) => r.hits === 0),
      "unused rules are marked");
    await page.screenshot({ path: `${shots}/identities.png`, fullPage: true });
    check((await page.locator("#identities-pager").textContent()).startsWith(`${expect.identities.length} identit`),
      "the pager counts the identities on this page");
    // The page after that identity, by name: it is not listed there, and its detail, asked
    // for alone, still is.
    const later = new URLSearchParams({ after: expect.identity, id: expect.identity });
    await page.evaluate((h) => { location.hash = h; }, `#/identities?${later}`);
    await page.locator("#identities-pager a", { hasText: "First page" }).waitFor();
    const listed = await page.locator("#identities tbody tr td:first-child").allTextContents();
    check(listed.every((i) => i > expect.identity), `a later page lists only identities after it (${listed.join(", ")})`);
    check((await page.locator("#identity-name").textContent()) === expect.identity, "an identity on no page shown is asked for alone");

    // Policy: versions, a diff, a refused candidate's errors, a candidate's simulation.
    await page.locator('nav a[data-page="policy"]').click();
    check((await rows(page, "versions")) === expect.versions, `the policy page lists ${expect.versions} versions`);
    check((await rows(page, "proposals")) === expect.proposals, `and ${expect.proposals} proposal(s)`);
    check((await page.locator("#proposals").textContent()).includes("awaiting approvals"), "a proposal awaiting approvals is said so");
    await page.locator('#diff-form button[type="submit"]').click();
    await page.locator("pre.diff").first().waitFor();
    check((await page.locator("pre.diff").first().textContent()).includes(expect.diff_line), "the diff shows the added rule");
    await page.locator('#candidate-form textarea[name="text"]').fill("kind: AgentPolicy\nname: broken\negress:\n  - to: [192.0.2.0/33]\n");
    await page.locator('#candidate-form button[type="submit"]').click();
    await page.locator("#candidate-errors li").first().waitFor();
    check((await page.locator("#candidate-errors").textContent()).includes("agents.yaml:"), "a refused candidate shows its errors at file:line:column");
    await page.screenshot({ path: `${shots}/policy-errors.png`, fullPage: true });
    await page.locator('#candidate-form textarea[name="text"]').fill(expect.candidate);
    await page.locator('#candidate-form button[type="submit"]').click();
    await page.locator("#simulation-summary").waitFor();
    check((await rows(page, "newly-denied")) === expect.newly_denied && (await rows(page, "newly-allowed")) === expect.newly_allowed,
      `the simulation is the API's: ${expect.newly_denied} newly denied, ${expect.newly_allowed} newly allowed`);
    await page.screenshot({ path: `${shots}/policy.png`, fullPage: true });

    // Shadow AI.
    await page.locator('nav a[data-page="shadow-ai"]').click();
    await page.locator("#shadow-summary").waitFor();
    check((await page.locator(".shadow-group").count()) === expect.shadow_groups, `the shadow AI page shows ${expect.shadow_groups} groups`);
    check((await page.locator(".shadow-group pre").first().textContent()).includes("kind: AgentPolicy"), "with a suggested policy");
    await page.screenshot({ path: `${shots}/shadow-ai.png`, fullPage: true });
    const suggested = await page.locator(".shadow-group pre").first().textContent();
    await page.locator(".shadow-group button", { hasText: "Simulate it" }).first().click();
    await page.locator("#candidate-form").waitFor();
    check((await page.locator('#candidate-form textarea[name="text"]').inputValue()) === suggested,
      "a suggested policy goes to the policy page as the candidate");

    // Alerts, with their evidence.
    await page.locator('nav a[data-page="alerts"]').click();
    await page.locator("#alerts-summary").waitFor();
    check((await rows(page, "alerts")) === expect.alerts, `the alerts page shows ${expect.alerts} alert(s)`);
    check((await page.locator("#alerts tbody").textContent()).includes("new_shadow_ai"), "the shadow-AI alert, by kind");
    check((await page.locator("#alerts pre.evidence").first().textContent()).includes("notebook.service"), "with its evidence");
    await page.screenshot({ path: `${shots}/alerts.png`, fullPage: true });

    // Live: a flow recorded after the page opened shows up without a reload.
    await page.locator('nav a[data-page="flows"]').click();
    await page.locator("#flows").waitFor();
    await page.locator("#live").check();
    await page.locator("#live-status").filter({ hasText: "following" }).waitFor();
    console.log("waiting: live");
    await nextLine();
    await page.locator("#flows tbody tr", { hasText: expect.live_dest }).waitFor();
    check(true, "a new flow reached the live flows page");
    await page.locator("#live").uncheck();

    // Revocations: listed, but no way to revoke.
    await page.locator('nav a[data-page="revocations"]').click();
    await page.locator("#revocations").waitFor();
    check((await page.locator("#revoke-form").count()) === 0, "security is offered no revoke form");
    const csrf = await csrfOf(context);
    const r = await context.request.post(`${origin}/v1/revocations`, {
      headers: { "X-Agentwall-CSRF": csrf, "Content-Type": "application/json" },
      data: { identity: process.env.REVOKE_ID },
    });
    check(r.status() === 403, `security's revoke is refused (${r.status()})`);

    // Sign-out ends the session on the server: the cookie, sent again, opens nothing.
    const kept = (await context.cookies()).find((c) => c.name === "__Host-agentwall-session");
    await page.locator("#sign-out").click();
    await page.locator("#sign-in").waitFor({ state: "visible" });
    await context.addCookies([kept]);
    const after = await context.request.get(`${origin}/v1/nodes`);
    check(after.status() === 401, `the signed-out session's cookie is refused (${after.status()})`);
    await context.close();
  }

  // An admin, signed in by a one-time link (as `agentwall cp console-link` prints one),
  // revokes an identity, with a reason, after confirming.
  {
    const { context, page } = await session();
    await page.goto(process.env.ADMIN_LINK);
    await page.locator("#nav").waitFor({ state: "visible" });
    check((await page.locator("#roles").textContent()) === "(admin)", "signed in as admin by the link");
    check(!page.url().includes("link="), `the link's code left the address bar (${page.url()})`);
    await page.locator('nav a[data-page="revocations"]').click();
    await page.locator("#revoke-form").waitFor();
    await page.locator('#revoke-form input[name="identity"]').fill(process.env.REVOKE_ID);
    await page.locator('#revoke-form input[name="reason"]').fill("leaked key, ticket SEC-1");
    await page.locator('#revoke-form button[type="submit"]').click();
    await page.locator("#revoke-confirm .confirm").waitFor();
    check((await page.locator("#revocations tbody tr").count()) === expect.revocations, "nothing is revoked before confirming");
    await page.screenshot({ path: `${shots}/revoke-confirm.png`, fullPage: true });
    await page.locator("#revoke-yes").click();
    await page.locator("#revocations tbody tr", { hasText: process.env.REVOKE_ID }).waitFor();
    const row = await page.locator("#revocations tbody tr", { hasText: process.env.REVOKE_ID }).textContent();
    check(row.includes("leaked key, ticket SEC-1"), "the revocation is listed with its reason");
    await page.screenshot({ path: `${shots}/revocations.png`, fullPage: true });
    await context.close();
  }

  check(offHost.length === 0, `no request left for another host (${offHost.join(", ")})`);
  check(consoleErrors.length === 0, `no errors in the browser's console (${consoleErrors.join(" | ")})`);
} finally {
  await browser.close();
  process.stdin.destroy();
}
