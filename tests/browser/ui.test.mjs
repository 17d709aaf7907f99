// The web UI in a real browser: `p2pchat demo` (a relay and alice, bob and
// carol), each node's page open in one browser context as tabs, driven by
// playwright-core in Debian's Chromium. Run by .ci/browser, which sets
// P2PCHAT_BIN and SCREENSHOT_DIR.
//
// Every step waits for what a person would see, with a deadline, and saves a
// screenshot; a failed step saves one of each page before exiting non-zero.
import { spawn } from 'node:child_process';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const BIN = process.env.P2PCHAT_BIN;
const SHOTS = process.env.SCREENSHOT_DIR || 'screenshots';
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const WAIT = 20_000;
const NAMES = ['alice', 'bob', 'carol'];
// Group names are peer-provided text too.
const GROUP = 'Trio <b>&amp;</b>';

if (!BIN) {
  console.error('P2PCHAT_BIN must name the p2pchat binary');
  process.exit(2);
}
mkdirSync(SHOTS, { recursive: true });

// ---- The demo ------------------------------------------------------------

function startDemo() {
  const demo = spawn(BIN, ['demo'], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  demo.stderr.on('data', (d) => { stderr += d; });
  return new Promise((resolve, reject) => {
    const nodes = {};
    let pending = null;
    let buffer = '';
    const timer = setTimeout(() => reject(new Error(`the demo did not come up in 60 s:\n${stderr}`)), 60_000);
    const timerFail = () => demo.kill('SIGKILL');
    demo.on('exit', (code) => reject(new Error(`the demo exited (${code}):\n${stderr}`)));
    demo.on('error', (e) => reject(e));
    setTimeout(() => { if (NAMES.some((n) => !nodes[n])) timerFail(); }, 60_000);
    demo.stdout.on('data', (data) => {
      buffer += data;
      let end;
      while ((end = buffer.indexOf('\n')) >= 0) {
        const line = buffer.slice(0, end);
        buffer = buffer.slice(end + 1);
        const node = line.match(/^(alice|bob|carol)\s+([0-9a-f]{40}) on /);
        if (node) pending = { name: node[1], peer: node[2] };
        const api = line.match(/^\s+API (http:\/\/\S+)\s+web UI (\S+)/);
        if (api && pending) {
          nodes[pending.name] = { peer: pending.peer, api: api[1], link: api[2] };
          pending = null;
        }
        if (line.startsWith('running;') && NAMES.every((n) => nodes[n])) {
          clearTimeout(timer);
          resolve({ demo, nodes });
        }
      }
    });
  });
}

// ---- Steps ---------------------------------------------------------------

let stepNumber = 0;
let pages = {};

async function step(title, body) {
  stepNumber += 1;
  const started = Date.now();
  process.stdout.write(`step ${stepNumber}: ${title} … `);
  try {
    await body();
  } catch (e) {
    console.log('FAILED');
    for (const [name, page] of Object.entries(pages)) {
      await page.screenshot({ path: join(SHOTS, `failed-step-${stepNumber}-${name}.png`) }).catch(() => {});
    }
    throw e;
  }
  console.log(`ok (${Date.now() - started} ms)`);
}

async function shot(page, name) {
  await page.screenshot({ path: join(SHOTS, `${String(stepNumber).padStart(2, '0')}-${name}.png`) });
}

const conversationItem = (page, text) => page.locator('.conversation-item', { hasText: text });
const bubble = (page, text) => page.locator('#messages .bubble', { hasText: text });

async function send(page, text) {
  await page.locator('#input').fill(text);
  await page.locator('#input').press('Enter');
  await bubble(page, text).first().waitFor({ timeout: WAIT });
}

async function expectText(locator, pattern, what) {
  await locator.first().waitFor({ timeout: WAIT });
  const deadline = Date.now() + WAIT;
  let text = '';
  while (Date.now() < deadline) {
    text = (await locator.first().textContent()) || '';
    if (pattern.test(text)) return;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`${what}: ${JSON.stringify(text)} does not match ${pattern}`);
}

// ---- The flow ------------------------------------------------------------

async function main() {
  const { demo, nodes } = await startDemo();
  const short = (name) => nodes[name].peer.slice(0, 8);
  let browser = null;
  const alerts = [];
  try {
    // Chromium refuses its sandbox to root, and CI containers give it a
    // small /dev/shm.
    const args = ['--disable-dev-shm-usage'];
    if (process.getuid && process.getuid() === 0) args.push('--no-sandbox');
    browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args });
    const context = await browser.newContext({ viewport: { width: 1200, height: 780 } });
    for (const name of NAMES) {
      const page = await context.newPage();
      page.on('dialog', async (dialog) => {
        // The page asks before leaving a group; an alert would be injected
        // script running, which must never happen.
        if (dialog.type() === 'confirm') await dialog.accept();
        else {
          alerts.push(dialog.message());
          await dialog.dismiss();
        }
      });
      pages[name] = page;
    }
    const { alice, bob, carol } = pages;

    await step('each node\'s page opens from its login link, in one browser', async () => {
      for (const name of NAMES) {
        await pages[name].goto(nodes[name].link);
        await expectText(pages[name].locator('#my-id'), new RegExp(`^${nodes[name].peer}$`), `${name}'s own ID`);
        await expectText(pages[name].locator('#ws-status'), /^connected$/, `${name}'s WebSocket`);
        await expectText(pages[name].locator('#relay-status'), /relay connected/, `${name}'s relay`);
      }
      await shot(alice, 'alice-start');
    });

    await step('alice opens a conversation with bob and sends a message', async () => {
      await alice.locator('#new-conversation').click();
      await alice.locator('#conversation-peer').fill(nodes.bob.peer);
      await alice.locator('#conversation-peer').press('Enter');
      await expectText(alice.locator('#chat-title'), new RegExp(short('bob')), 'the open conversation');
      await send(alice, 'Hello Bob, this is Alice');
      await shot(alice, 'alice-sent');
    });

    await step('bob\'s page shows it live, unread', async () => {
      const item = conversationItem(bob, 'Hello Bob, this is Alice');
      await item.waitFor({ timeout: WAIT });
      await expectText(item.locator('.badge'), /^1$/, 'bob\'s unread count');
      await expectText(item.locator('.name'), new RegExp(short('alice')), 'the conversation\'s name');
      await shot(bob, 'bob-live');
    });

    await step('bob opens it, and alice\'s page shows "read"', async () => {
      await conversationItem(bob, 'Hello Bob, this is Alice').click();
      await bubble(bob, 'Hello Bob, this is Alice').waitFor({ timeout: WAIT });
      const mine = alice.locator('#messages .message.out', { hasText: 'Hello Bob, this is Alice' });
      await mine.and(alice.locator('[data-status="read"]')).waitFor({ timeout: WAIT });
      await mine.locator('.mark[aria-label="read"]').waitFor({ timeout: WAIT });
      // Read, so bob's unread badge goes.
      await conversationItem(bob, 'Hello Bob, this is Alice').locator('.badge')
        .waitFor({ state: 'detached', timeout: WAIT });
      await shot(alice, 'alice-read');
    });

    await step('bob answers, and peer text is shown as text, never run', async () => {
      const hostile = '<img src=x onerror=alert(1)>';
      await send(bob, hostile);
      const shown = bubble(alice, 'onerror');
      await shown.waitFor({ timeout: WAIT });
      const text = await shown.first().textContent();
      if (text !== hostile) throw new Error(`the text was changed: ${JSON.stringify(text)}`);
      if (await alice.locator('#messages img').count()) throw new Error('peer text became an element');
      await expectText(conversationItem(alice, 'onerror').locator('.last'), /<img src=x onerror=alert\(1\)>/, 'the list preview');
      await shot(alice, 'alice-escaped');
    });

    await step('a group with fewer than three people is refused with a clear message', async () => {
      await alice.locator('#new-group').click();
      await alice.locator('#group-name').fill('Too small');
      await alice.locator('#group-members').fill(nodes.bob.peer);
      await alice.locator('#group-form button[type="submit"]').click();
      await expectText(alice.locator('#group-error'), /at least 2 other members/, 'the group size message');
      await shot(alice, 'group-too-small');
      await alice.locator('#group-form .cancel').click();
    });

    await step('alice makes a group of three and all three exchange messages', async () => {
      await alice.locator('#new-group').click();
      await alice.locator('#group-name').fill(GROUP);
      await alice.locator('#group-members').fill(`${nodes.bob.peer}\n${nodes.carol.peer}`);
      await alice.locator('#group-form button[type="submit"]').click();
      await expectText(alice.locator('#chat-title'), /^Trio <b>&amp;<\/b>$/, 'the new group, its name as text');
      if (await alice.locator('.conversation-item b, #chat-title b').count()) throw new Error('a group name became markup');
      await expectText(alice.locator('#chat-subtitle'), /3 members/, 'the group\'s size');
      // Bob wrote to alice and carol joined alice's demo group: neither is asked.
      for (const page of [bob, carol]) {
        if (await page.locator('#invitation-list .invitation').count()) throw new Error('a friend was asked to accept');
      }
      await send(alice, 'Welcome to Trio');
      for (const [name, page] of [['bob', bob], ['carol', carol]]) {
        const item = conversationItem(page, 'Trio');
        await expectText(item.locator('.last'), /Welcome to Trio/, `${name}'s list`);
        await item.click();
        await bubble(page, 'Welcome to Trio').waitFor({ timeout: WAIT });
        await expectText(page.locator('#messages .message.in', { hasText: 'Welcome to Trio' }).locator('.sender'),
          new RegExp(short('alice')), `the sender's short ID at ${name}`);
      }
      await send(carol, 'Carol here');
      await send(bob, 'Bob here');
      for (const [name, page] of [['alice', alice], ['bob', bob]]) {
        await bubble(page, 'Carol here').waitFor({ timeout: WAIT });
      }
      await bubble(carol, 'Bob here').waitFor({ timeout: WAIT });
      await bubble(alice, 'Bob here').waitFor({ timeout: WAIT });
      const welcome = alice.locator('#messages .message.out', { hasText: 'Welcome to Trio' });
      await welcome.and(alice.locator('[data-status="read"]')).waitFor({ timeout: WAIT });
      await alice.locator('#members-toggle').click();
      await expectText(alice.locator('#member-list li', { hasText: short('alice') }), /admin/, 'the admin mark');
      await shot(alice, 'group');
      await shot(carol, 'group-carol');
    });

    await step('carol leaves, and the others see it', async () => {
      await carol.locator('#members-toggle').click();
      await carol.locator('#leave').click();
      await carol.locator('#composer-note').waitFor({ timeout: WAIT });
      for (const [name, page] of [['alice', alice], ['bob', bob]]) {
        if (await page.locator('#members').isHidden()) await page.locator('#members-toggle').click();
        const carolRow = page.locator('#member-list li', { hasText: short('carol') });
        await expectText(carolRow, /left/, `carol's row at ${name}`);
        await expectText(page.locator('#chat-subtitle'), /2 members/, `the group's size at ${name}`);
      }
      await send(alice, 'Just the two of us now');
      await bubble(bob, 'Just the two of us now').waitFor({ timeout: WAIT });
      await shot(alice, 'carol-left');
      await shot(carol, 'carol-after-leaving');
    });

    // Bob makes a group with alice and carol. Alice wrote to him, so she is
    // in at once; carol never wrote to bob, so her page asks her first.
    const bobMakesGroup = async (name) => {
      await bob.locator('#new-group').click();
      await bob.locator('#group-name').fill(name);
      await bob.locator('#group-members').fill(`${nodes.alice.peer}\n${nodes.carol.peer}`);
      await bob.locator('#group-form button[type="submit"]').click();
      await expectText(bob.locator('#chat-title'), new RegExp(`^${name}$`), `bob's new group ${name}`);
      const invitation = carol.locator('#invitation-list .invitation', { hasText: name });
      await invitation.waitFor({ timeout: WAIT });
      await expectText(invitation.locator('.from'), new RegExp(`from ${short('bob')}.*2 other members`), 'who invites');
      if (await conversationItem(carol, name).count()) throw new Error(`carol is in ${name} before answering`);
      if (await alice.locator('#invitation-list .invitation').count()) throw new Error('alice was asked, though she wrote to bob');
      await conversationItem(alice, name).waitFor({ timeout: WAIT });
      return invitation;
    };

    await step('a stranger\'s group waits for carol, who declines it; bob sees her gone', async () => {
      const invitation = await bobMakesGroup('Second');
      await shot(carol, 'invitation');
      await invitation.locator('button.decline').click();
      await carol.locator('#invitations').waitFor({ state: 'hidden', timeout: WAIT });
      if (await conversationItem(carol, 'Second').count()) throw new Error('a declined group was kept');
      if (await bob.locator('#members').isHidden()) await bob.locator('#members-toggle').click();
      await expectText(bob.locator('#member-list li', { hasText: short('carol') }), /left/, 'carol\'s row in Second');
      await expectText(bob.locator('#chat-subtitle'), /2 members/, 'the declined group\'s size');
      await shot(bob, 'carol-declined');
    });

    await step('carol accepts the next one and reads what was sent', async () => {
      const invitation = await bobMakesGroup('Third');
      await send(bob, 'Welcome to Third');
      await invitation.locator('button.accept').click();
      await expectText(carol.locator('#chat-title'), /^Third$/, 'the accepted group, opened');
      await carol.locator('#invitations').waitFor({ state: 'hidden', timeout: WAIT });
      await bubble(carol, 'Welcome to Third').waitFor({ timeout: WAIT });
      await send(carol, 'Thanks for having me');
      await bubble(bob, 'Thanks for having me').waitFor({ timeout: WAIT });
      await expectText(conversationItem(alice, 'Third').locator('.last'), /Thanks for having me/, 'alice\'s list');
      await shot(carol, 'carol-accepted');
      // Back to Trio for the steps that follow.
      await conversationItem(bob, 'Trio').click();
      await expectText(bob.locator('#chat-title'), /^Trio /, 'Trio, open again at bob');
    });

    await step('a dropped WebSocket shows a banner, reconnects and catches up', async () => {
      // The page waits 4 s before reconnecting; a message arrives meanwhile.
      await bob.evaluate(() => { state.backoff = 4000; state.socket.close(); });
      await bob.locator('#banner').waitFor({ state: 'visible', timeout: WAIT });
      await expectText(bob.locator('#ws-status'), /^disconnected$/, 'the status line');
      await send(alice, 'While bob was away');
      await shot(bob, 'bob-disconnected');
      await bob.locator('#banner').waitFor({ state: 'hidden', timeout: WAIT });
      await expectText(bob.locator('#ws-status'), /^connected$/, 'the reconnected socket');
      await bubble(bob, 'While bob was away').waitFor({ timeout: WAIT });
      await send(alice, 'After the reconnect');
      await bubble(bob, 'After the reconnect').waitFor({ timeout: WAIT });
    });

    await step('a narrow window shows one pane, with a way back', async () => {
      await bob.setViewportSize({ width: 390, height: 760 });
      // The members panel covers the narrow window; Escape closes it.
      await shot(bob, 'narrow-members');
      await bob.keyboard.press('Escape');
      await bob.locator('#members').waitFor({ state: 'hidden', timeout: WAIT });
      await bob.locator('#back').waitFor({ state: 'visible', timeout: WAIT });
      if (await bob.locator('.sidebar').isVisible()) throw new Error('the list shows beside an open chat');
      await shot(bob, 'narrow-conversation');
      await bob.locator('#back').click();
      await conversationItem(bob, 'Trio').waitFor({ state: 'visible', timeout: WAIT });
      if (await bob.locator('#conversation').isVisible()) throw new Error('the chat shows beside the list');
      await shot(bob, 'narrow-list');
    });

    if (alerts.length) throw new Error(`script ran in a page: alert(${alerts.join(', ')})`);
    console.log(`all ${stepNumber} steps passed; screenshots in ${SHOTS}`);
  } finally {
    if (browser) await browser.close();
    demo.kill('SIGINT');
  }
}

main().catch((e) => {
  console.error(e && e.stack ? e.stack : e);
  process.exit(1);
});
