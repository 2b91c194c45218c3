// What the realtime-js drivers (conformance.mjs, parity.mjs) share: clients they disconnect at the end, a
// bounded wait, a subscribe that resolves with the final status, and the run that prints their one JSON object.
// Env: RT_URL (e.g. ws://127.0.0.1:PORT/realtime/v1), RT_APIKEY.
import { RealtimeClient } from '@supabase/realtime-js'
import WebSocket from 'ws'

const clients = []

// A stock RealtimeClient (Node 20: `ws` as transport) on RT_URL with RT_APIKEY; `options` add to or override those.
export function client(options = {}) {
  const c = new RealtimeClient(process.env.RT_URL, {
    params: { apikey: process.env.RT_APIKEY },
    transport: WebSocket,
    ...options,
  })
  clients.push(c)
  return c
}

// Poll `pred` every 10 ms; throws naming `what` after `ms`.
export async function waitFor(what, pred, ms = 5000) {
  const start = Date.now()
  while (!pred()) {
    if (Date.now() - start > ms) throw new Error(`timeout waiting for ${what}`)
    await new Promise((r) => setTimeout(r, 10))
  }
}

// Subscribe `ch`; resolves with {status, error} once it is SUBSCRIBED, CHANNEL_ERROR or TIMED_OUT.
export function subscribe(ch) {
  return new Promise((resolve) => {
    ch.subscribe((status, err) => {
      if (status !== 'SUBSCRIBED' && status !== 'CHANNEL_ERROR' && status !== 'TIMED_OUT') return
      resolve({ status, error: err ? String(err.message || err) : null })
    })
  })
}

// Run `main(out)` within 40 s, then disconnect every client and print `out` (errors in `out.errors`) as one line.
export function run(main) {
  const out = { errors: [] }
  const timer = setTimeout(() => { out.errors.push('global timeout'); finish(1) }, 40000)
  function finish(code) {
    clearTimeout(timer)
    for (const c of clients) { try { c.disconnect() } catch {} }
    process.stdout.write(JSON.stringify(out) + '\n')
    setTimeout(() => process.exit(code), 50)
  }
  main(out).then(() => finish(0), (err) => { out.errors.push(String(err && err.stack || err)); finish(1) })
}
