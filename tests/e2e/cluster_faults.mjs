// Stock realtime-js clients on two workers of one cluster, driven by the test through stdin while it stops and
// restarts Redis. Prints one JSON line per event as it happens:
//   {on, subscribed: true} · {on, presence: [keys…]} · {on, broadcast: {id, from}} · {on, status} · {sent: id}
// Commands on stdin, one JSON object a line:
//   {"join": name, "node": "A"|"B"}     a new client (presence key = name) joins channel `room` and tracks
//   {"send": id, "from": name}           `name` broadcasts {id, from} (event `m`, self: false)
// Env: RT_URL_A, RT_URL_B, RT_APIKEY, RT_CLIENTS (initial clients, e.g. "a1:A,a2:A,b1:B").
import { createInterface } from 'node:readline'
import { RealtimeClient } from '@supabase/realtime-js'
import WebSocket from 'ws'

const apikey = process.env.RT_APIKEY
const urls = { A: process.env.RT_URL_A, B: process.env.RT_URL_B }
const out = (o) => process.stdout.write(JSON.stringify(o) + '\n')
const channels = new Map()

function join(name, node) {
  const client = new RealtimeClient(urls[node], { params: { apikey }, transport: WebSocket, heartbeatIntervalMs: 1000 })
  const ch = client.channel('room', { config: { presence: { key: name }, broadcast: { self: false } } })
  ch.on('broadcast', { event: 'm' }, (m) => out({ on: name, broadcast: m.payload }))
  ch.on('presence', { event: 'sync' }, () => out({ on: name, presence: Object.keys(ch.presenceState()).sort() }))
  channels.set(name, ch)
  return new Promise((resolve) => {
    ch.subscribe(async (status) => {
      if (status !== 'SUBSCRIBED') return out({ on: name, status })
      await ch.track({ name })
      out({ on: name, subscribed: true })
      resolve(ch)
    })
  })
}

const initial = (process.env.RT_CLIENTS || '').split(',').filter(Boolean).map((s) => s.split(':'))
await Promise.all(initial.map(([name, node]) => join(name, node)))

createInterface({ input: process.stdin }).on('line', async (line) => {
  const cmd = JSON.parse(line)
  if (cmd.join) await join(cmd.join, cmd.node)
  if (cmd.send) {
    const result = await channels.get(cmd.from).send({ type: 'broadcast', event: 'm', payload: { id: cmd.send, from: cmd.from } })
    out({ sent: cmd.send, result })
  }
})
setTimeout(() => process.exit(0), 90_000) // the test ends it sooner; never outlive it
