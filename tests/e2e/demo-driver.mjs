// Drives the realtime demo (examples/functions/realtime-demo) in two headless Debian chromium pages with
// playwright-core (no downloaded browsers): presence both ways, cursors both ways, chat both ways, then a leave.
// Usage: node demo-driver.mjs <page-url> <chromium> <room>. Prints one JSON object: what the pages' DOM showed.
import { chromium } from 'playwright-core'

const [pageUrl, executablePath, room] = process.argv.slice(2)
const out = { errors: [] }
const STEP_MS = 8000

// Last resort: Playwright's exit handler still kills the browser it launched.
setTimeout(() => {
  out.errors.push('driver timeout')
  console.log(JSON.stringify(out))
  process.exit(2)
}, 40000).unref()

const browser = await chromium.launch({
  executablePath,
  headless: true,
  timeout: 20000,
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
    '--disable-component-update', '--disable-sync', '--no-first-run'],
})

async function open (name) {
  const context = await browser.newContext({ viewport: { width: 1000, height: 700 } })
  const page = await context.newPage()
  page.setDefaultTimeout(STEP_MS)
  page.on('pageerror', (e) => out.errors.push(`${name}: ${e.message}`))
  page.on('console', (m) => {
    // A failed load is reported with its URL by the 'response' handler below.
    if (m.type() === 'error' && !m.text().startsWith('Failed to load resource')) out.errors.push(`${name} console: ${m.text()}`)
  })
  page.on('response', (r) => { if (r.status() >= 400) out.errors.push(`${name}: HTTP ${r.status()} ${r.url()}`) })
  page.on('requestfailed', (r) => out.errors.push(`${name}: request failed ${r.url()}`))
  const url = new URL(pageUrl)
  url.searchParams.set('name', name)
  url.searchParams.set('room', room)
  const response = await page.goto(url.toString())
  out.http ??= {}
  out.http[name] = response.status()
  return { name, context, page }
}

/** Waits until `fn(arg)` is truthy in the page; a timeout names the step and shows the page's status line. */
async function waitDom (who, step, fn, arg) {
  try {
    return await (await who.page.waitForFunction(fn, arg, { timeout: STEP_MS })).jsonValue()
  } catch (e) {
    const status = await who.page.locator('#status').textContent().catch(() => '?')
    throw new Error(`${who.name}: ${step} (status: ${status}): ${e.message.split('\n')[0]}`)
  }
}

const people = (who) => who.page.locator('#people li').evaluateAll((els) => els.map((e) => e.dataset.name))
const chat = (who) => who.page.locator('#chat li').evaluateAll((els) =>
  els.map((e) => ({ from: e.dataset.from, text: e.textContent, self: 'self' in e.dataset })))

/** `from` moves its pointer to a fraction of its board; `to` waits until it shows that cursor there. */
async function moveCursor (from, to, fx, fy) {
  const box = await from.page.locator('#board').boundingBox()
  await from.page.mouse.move(box.x + box.width * fx, box.y + box.height * fy, { steps: 5 })
  return await waitDom(to, `cursor of ${from.name}`, ([name, fx, fy]) => {
    const el = document.querySelector(`.cursor[data-name="${name}"]`)
    if (!el || Math.abs(el.dataset.x - fx) > 0.01 || Math.abs(el.dataset.y - fy) > 0.01) return null
    return { name: el.dataset.name, x: Number(el.dataset.x), y: Number(el.dataset.y), left: el.style.left }
  }, [from.name, fx, fy])
}

async function say (from, to, text) {
  await from.page.fill('#chat-input', text)
  await from.page.press('#chat-input', 'Enter')
  await waitDom(to, `chat from ${from.name}`, (t) =>
    [...document.querySelectorAll('#chat li')].some((li) => li.textContent.endsWith(t)), text)
}

try {
  const ada = await open('Ada')
  const bob = await open('Bob')
  out.config = await ada.page.evaluate(() => JSON.parse(document.getElementById('demo-config').textContent))
  for (const who of [ada, bob]) {
    out.status ??= {}
    out.status[who.name] = await waitDom(who, 'join', () => {
      const s = document.getElementById('status').dataset.state
      return s === 'connecting' ? null : s
    })
    await waitDom(who, 'presence of both', () => document.querySelectorAll('#people li').length >= 2)
  }
  out.people = { Ada: await people(ada), Bob: await people(bob) }
  out.you = await ada.page.locator('#people li', { hasText: '(you)' }).getAttribute('data-name')

  out.cursors = {
    seenByBob: await moveCursor(ada, bob, 0.25, 0.6),
    seenByAda: await moveCursor(bob, ada, 0.75, 0.3),
  }
  await say(ada, bob, 'hello from Ada')
  await say(bob, ada, 'hi Ada, Bob here')
  out.chat = { Ada: await chat(ada), Bob: await chat(bob) }

  // Bob leaves: Ada's presence list and board forget him.
  await bob.context.close()
  await waitDom(ada, 'leave of Bob', () =>
    document.querySelectorAll('#people li').length === 1 && !document.querySelector('.cursor[data-name="Bob"]'))
  out.afterLeave = { people: await people(ada), cursors: await ada.page.locator('.cursor').count() }
} catch (e) {
  out.errors.push(String(e?.stack ?? e))
} finally {
  await browser.close()
}
console.log(JSON.stringify(out))
