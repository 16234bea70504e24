// Drives Debian's Firefox ESR (headless, over WebDriver BiDi with puppeteer-core) through
// the control plane's console as security, as tests/tests/console.rs sets it up: each page
// shows the numbers the API returns, keyboard navigation works, nothing is asked of another
// host and the browser's console stays clean. Every check throws; the Rust test reads the
// exit status and what this prints.
//
// Environment: CONSOLE_URL, SECURITY_TOKEN, EXPECT (JSON, as console.mjs takes it), SHOTS,
// FIREFOX (the browser's executable).
import puppeteer from "puppeteer-core";

const url = process.env.CONSOLE_URL;
const origin = new URL(url).origin;
const expect = JSON.parse(process.env.EXPECT);
const shots = process.env.SHOTS;

function check(ok, what) {
  if (!ok) throw new Error(`check failed: ${what}`);
  console.log(`ok: ${what}`);
}

const browser = await puppeteer.launch({
  browser: "firefox",
  executablePath: process.env.FIREFOX || "/usr/bin/firefox-esr",
  headless: true,
  // The window's own size, not an emulated one: Firefox ESR's WebDriver BiDi lacks some of
  // the emulation commands puppeteer's setViewport sends.
  defaultViewport: null,
  args: ["--width=1366", "--height=860"],
  // The test's control plane has a certificate from the test's own CA, which this fresh
  // profile does not hold: the chain is not checked, the connection is still TLS.
  acceptInsecureCerts: true,
  // The machine has no network past loopback: nothing of Firefox's own may try it.
  extraPrefsFirefox: {
    "network.captive-portal-service.enabled": false,
    "network.connectivity-service.enabled": false,
    "browser.safebrowsing.malware.enabled": false,
    "browser.safebrowsing.phishing.enabled": false,
    "browser.safebrowsing.downloads.enabled": false,
    "app.update.disabledForTesting": true,
    "datareporting.policy.dataSubmissionEnabled": false,
    "toolkit.telemetry.enabled": false,
  },
});

const offHost = [];
const consoleErrors = [];

async function rows(page, table) {
  await page.waitForSelector(`#${table}`);
  return page.$$eval(`#${table} tbody tr`, (r) => r.length);
}

async function text(page, selector) {
  await page.waitForSelector(selector);
  return page.$eval(selector, (e) => e.textContent);
}

async function open(page, name, table) {
  await page.click(`nav a[data-page="${name}"]`);
  await page.waitForSelector(`#${table}`);
}

try {
  const page = await browser.newPage();
  page.on("request", (r) => {
    const u = new URL(r.url());
    if (u.origin !== origin && u.protocol !== "data:") offHost.push(r.url());
  });
  page.on("console", (m) => {
    if (m.type() === "error") consoleErrors.push(m.text());
  });
  page.on("pageerror", (e) => consoleErrors.push(String(e)));

  await page.goto(url);
  await page.waitForSelector("#sign-in", { visible: true });
  await page.type("#token", process.env.SECURITY_TOKEN);
  await page.keyboard.press("Enter");
  await page.waitForSelector("#nav", { visible: true });
  check((await text(page, "#roles")) === "(security)", "Firefox: signed in as security");

  check((await rows(page, "fleet")) === expect.nodes, `Firefox: the fleet page lists ${expect.nodes} nodes`);
  check((await text(page, "#fleet")).includes(expect.node), "Firefox: the fleet page names the node");
  await page.screenshot({ path: `${shots}/firefox-fleet.png`, fullPage: true });

  await open(page, "flows", "flows");
  check((await rows(page, "flows")) === expect.flows, `Firefox: the flows page shows the API's ${expect.flows} flows`);
  await page.screenshot({ path: `${shots}/firefox-flows.png`, fullPage: true });

  await open(page, "identities", "identities");
  check((await rows(page, "identities")) === expect.identities.length,
    `Firefox: the identities page lists ${expect.identities.length}`);
  await page.click(`#identities tbody tr`);
  await page.waitForSelector("#decisions-chart canvas");
  check(true, "Firefox: an identity's decisions are drawn as a chart");
  await page.screenshot({ path: `${shots}/firefox-identity.png`, fullPage: true });

  await open(page, "shadow-ai", "shadow-summary");
  check((await page.$$eval(".shadow-group", (g) => g.length)) === expect.shadow_groups,
    `Firefox: the shadow-AI page shows ${expect.shadow_groups} group(s)`);

  await open(page, "alerts", "alerts");
  check((await rows(page, "alerts")) === expect.alerts, `Firefox: the alerts page lists ${expect.alerts}`);

  // Keyboard: a navigation link takes focus and Enter opens its page.
  await page.focus('nav a[data-page="policy"]');
  await page.keyboard.press("Enter");
  check((await rows(page, "versions")) === expect.versions, `Firefox: reached by keyboard, the policy page lists ${expect.versions} versions`);
  check((await rows(page, "proposals")) === expect.proposals, `Firefox: and ${expect.proposals} proposal(s)`);
  await page.screenshot({ path: `${shots}/firefox-policy.png`, fullPage: true });

  await open(page, "revocations", "revocations");
  check((await rows(page, "revocations")) === expect.revocations, `Firefox: the revocations page lists ${expect.revocations}`);
  check((await page.$("#revoke-form")) === null, "Firefox: security is shown no revoke form");

  check(offHost.length === 0, `Firefox: no request to another host (${offHost.join(", ")})`);
  check(consoleErrors.length === 0, `Firefox: no errors in the browser's console (${consoleErrors.join(" | ")})`);
} finally {
  await browser.close();
}
