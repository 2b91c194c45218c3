// Drives the real @supabase/realtime-js (Node 20: `ws` as transport) against an mbworker realtime endpoint.
// Env: RT_URL (e.g. ws://127.0.0.1:PORT/realtime/v1), RT_APIKEY, RT_TOKEN, RT_TOKEN2, RT_BAD_TOKEN.
// Prints one JSON object with what each client observed; tests/e2e/test_realtime_js.py asserts on it.
import { client as realtimeClient, run, subscribe, waitFor } from './realtime_client.mjs'

function client(vsn, extra = {}) {
  return realtimeClient({ vsn, heartbeatIntervalMs: 1000, ...extra }) // exercise the heartbeat quickly
}

function recorder(ch, sink) {
  ch.on('broadcast', { event: '*' }, (m) => {
    const p = m.payload
    const isBin = p instanceof ArrayBuffer
    sink.push({ event: m.event, payload: isBin ? { binary: Array.from(new Uint8Array(p)) } : p, meta: m.meta ?? null })
  })
}

async function main(out) {
  // --- v2 client A (self + ack) and v1 client B on one topic, plus v2 client C --------------------------
  const a = client('2.0.0')
  const b = client('1.0.0')
  const c = client('2.0.0')
  const got = { a: [], b: [], c: [] }
  const syncs = { a: 0, b: 0 }
  const leaves = { a: [] }
  const chA = a.channel('room1', { config: { broadcast: { self: true, ack: true }, presence: { key: 'alice' } } })
  const chB = b.channel('room1', { config: { presence: { key: 'bob' } } })
  const chC = c.channel('room1')
  recorder(chA, got.a); recorder(chB, got.b); recorder(chC, got.c)
  chA.on('presence', { event: 'sync' }, () => { syncs.a++ })
  chA.on('presence', { event: 'leave' }, ({ key, leftPresences }) => { leaves.a.push({ key, n: leftPresences.length }) })
  chB.on('presence', { event: 'sync' }, () => { syncs.b++ })
  out.subscribe = {
    a: await subscribe(chA),
    b: await subscribe(chB),
    c: await subscribe(chC),
  }
  out.vsn = { a: a.vsn, b: b.vsn }

  // presence track across v1/v2
  out.trackA = await chA.track({ user: 'alice', n: 1 })
  out.trackB = await chB.track({ user: 'bob' })
  await waitFor('presence on both', () =>
    Object.keys(chA.presenceState()).length === 2 && Object.keys(chB.presenceState()).length === 2)
  out.presenceA = chA.presenceState()
  out.presenceB = chB.presenceState()

  // JSON broadcast from v2 (kind-3 binary frame on the wire) with self + ack
  out.sendA = await chA.send({ type: 'broadcast', event: 'cursor', payload: { x: 1, from: 'a' } })
  await waitFor('cursor everywhere', () =>
    got.a.some((m) => m.event === 'cursor') && got.b.some((m) => m.event === 'cursor') && got.c.some((m) => m.event === 'cursor'))
  // JSON broadcast from v1 (text); B has self:false so must not get its own
  out.sendB = await chB.send({ type: 'broadcast', event: 'from-v1', payload: { y: 2 } })
  await waitFor('from-v1 at a and c', () => got.a.some((m) => m.event === 'from-v1') && got.c.some((m) => m.event === 'from-v1'))
  // binary payload from v2: to v2 sockets only (kind 4), never to v1
  out.sendBin = await chA.send({ type: 'broadcast', event: 'bin', payload: new Uint8Array([0, 1, 2, 255]).buffer })
  await waitFor('bin at a and c', () => got.a.some((m) => m.event === 'bin') && got.c.some((m) => m.event === 'bin'))
  // REST httpSend (JSON) and the deprecated unjoined send() fallback (batch endpoint)
  out.httpSend = await chC.httpSend('rest', { z: 3 }).catch((e) => ({ success: false, error: String(e.message) }))
  await waitFor('rest at a and b', () => got.a.some((m) => m.event === 'rest') && got.b.some((m) => m.event === 'rest'))
  const f = client('2.0.0')
  const chF = f.channel('room1') // never subscribed: send() falls back to the batch REST endpoint
  out.restFallback = await chF.send({ type: 'broadcast', event: 'batch', payload: { k: 1 } })
  await waitFor('batch at b', () => got.b.some((m) => m.event === 'batch'))
  // a final marker from C proves B had every chance to receive 'bin' / its own 'from-v1'
  await chC.send({ type: 'broadcast', event: 'marker', payload: {} })
  await waitFor('marker at b', () => got.b.some((m) => m.event === 'marker'))
  out.got = got

  // untrack: A sees bob leave
  out.untrackB = await chB.untrack()
  await waitFor('bob leave at a', () => leaves.a.some((l) => l.key === 'bob'))
  out.leavesA = leaves.a
  out.syncs = syncs

  // --- access_token: valid refresh keeps the channel, invalid one ends it with a system error ------------
  const d = client('2.0.0')
  await d.setAuth(process.env.RT_TOKEN)
  const chD = d.channel('tok')
  const systemD = []
  chD.on('system', {}, (p) => systemD.push(p))
  out.subscribeD = await subscribe(chD)
  await d.setAuth(process.env.RT_TOKEN2)
  const r1 = await chD.send({ type: 'broadcast', event: 'still', payload: {} })
  out.afterGoodRefresh = { state: chD.state, send: r1 }
  await d.setAuth(process.env.RT_BAD_TOKEN)
  await waitFor('system error after bad token', () => systemD.length > 0 && chD.state === 'closed')
  out.afterBadRefresh = { state: chD.state, system: systemD }

  // --- an expiring join token ends the channel with a system error -------------------------------------
  const g = client('2.0.0')
  await g.setAuth(process.env.RT_SHORT_TOKEN)
  const chG = g.channel('short')
  const systemG = []
  chG.on('system', {}, (p) => systemG.push(p))
  out.subscribeG = await subscribe(chG)
  await waitFor('expiry', () => systemG.length > 0 && chG.state === 'closed', 8000)
  out.expired = { state: chG.state, system: systemG }

  // --- join errors: private channel denied by default ---------------------------------------------------
  const e = client('2.0.0')
  const chE = e.channel('secret', { config: { private: true } })
  out.privateJoin = await subscribe(chE)
  await e.removeChannel(chE)

  // --- leave: other members see the leave --------------------------------------------------------------
  await a.removeChannel(chA)
  out.removedA = a.getChannels().length
}

run(main)
