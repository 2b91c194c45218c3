// Two stock realtime-js clients on two different workers of one cluster. Prints one JSON line per event as it
// happens (the test reacts to them: it kills a worker mid-run). Env: RT_URL_A, RT_URL_B, RT_APIKEY.
import { RealtimeClient } from '@supabase/realtime-js'
import WebSocket from 'ws'

const apikey = process.env.RT_APIKEY
const out = (o) => process.stdout.write(JSON.stringify(o) + '\n')

function join(name, url) {
  const client = new RealtimeClient(url, { params: { apikey }, transport: WebSocket, heartbeatIntervalMs: 1000 })
  const ch = client.channel('room', { config: { presence: { key: name }, broadcast: { self: false } } })
  ch.on('broadcast', { event: 'hello' }, (m) => out({ on: name, broadcast: m.payload }))
  ch.on('presence', { event: 'sync' }, () => out({ on: name, presence: Object.keys(ch.presenceState()).sort() }))
  return new Promise((resolve) => {
    ch.subscribe(async (status) => {
      if (status !== 'SUBSCRIBED') return
      await ch.track({ name })
      out({ on: name, subscribed: true })
      resolve(ch)
    })
  })
}

const [alice, bob] = await Promise.all([join('alice', process.env.RT_URL_A), join('bob', process.env.RT_URL_B)])
// The test writes a line on stdin when both presence lists are complete: then each side broadcasts once.
process.stdin.once('data', async () => {
  await alice.send({ type: 'broadcast', event: 'hello', payload: { from: 'alice' } })
  await bob.send({ type: 'broadcast', event: 'hello', payload: { from: 'bob' } })
  out({ sent: true })
})
setTimeout(() => process.exit(0), 90_000) // the test ends it sooner; never outlive it
