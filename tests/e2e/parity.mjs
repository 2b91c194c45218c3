// The real @supabase/realtime-js, written as Supabase's docs teach, against what differed from Supabase:
// a postgres_changes channel, the error texts apps match on, an ES256 user token, presence poisoning.
// Env: RT_URL, RT_APIKEY, RT_MALFORMED_TOKEN, RT_NO_EXP_TOKEN, RT_ES256_TOKEN.
// Prints one JSON object; tests/e2e/test_realtime_js.py asserts on it.
import { client, run, subscribe, waitFor } from './realtime_client.mjs'

async function main(out) {
  // --- a channel listening to database changes still joins; broadcast and presence work on it ----------
  const a = client()
  const system = []
  const got = []
  const todos = a.channel('todos', { config: { broadcast: { self: true, ack: true }, presence: { key: 'alice' } } })
  todos
    .on('postgres_changes', { event: '*', schema: 'public', table: 'todos' }, () => {})
    .on('postgres_changes', { event: 'INSERT', schema: 'public', table: 'notes', filter: 'owner=eq.1' }, () => {})
    .on('system', {}, (p) => system.push(p))
    .on('broadcast', { event: 'ping' }, (m) => got.push(m.payload))
    .on('presence', { event: 'sync' }, () => {})
  out.pgSubscribe = await subscribe(todos)
  await waitFor('system message', () => system.length > 0)
  out.pgSystem = system
  out.pgBindingIds = todos.bindings.postgres_changes.map((b) => typeof b.id)
  out.pgSend = await todos.send({ type: 'broadcast', event: 'ping', payload: { n: 1 } })
  await waitFor('own broadcast', () => got.length > 0)
  out.pgGot = got
  out.pgTrack = await todos.track({ online: true })
  await waitFor('own presence', () => Object.keys(todos.presenceState()).length === 1)

  // --- the error texts apps match on ------------------------------------------------------------------
  const secret = a.channel('secret', { config: { private: true } })
  out.privateJoin = await subscribe(secret)
  await a.removeChannel(secret)
  for (const [name, token] of [['malformed', process.env.RT_MALFORMED_TOKEN], ['noExp', process.env.RT_NO_EXP_TOKEN]]) {
    const c = client()
    await c.setAuth(token)
    const ch = c.channel('room-' + name)
    out[name] = await subscribe(ch)
    await c.removeChannel(ch)
  }

  // --- a user token signed with the project's ES256 key (JWKS) opens the user's private channel ---------
  const u = client()
  await u.setAuth(process.env.RT_ES256_TOKEN)
  out.es256Join = await subscribe(u.channel('user:u1:inbox', { config: { private: true } }))

  // --- presence poisoning: an oversized track is refused; whoever joins next is served ------------------
  const p1 = client()
  const lobby1 = p1.channel('lobby', { config: { presence: { key: 'p1' } } })
  lobby1.on('presence', { event: 'sync' }, () => {})
  await subscribe(lobby1)
  out.bigTrack = await lobby1.track({ blob: 'x'.repeat(2_900_000) })
  out.smallTrack = await lobby1.track({ name: 'p1' })
  const p2 = client()
  const lobby2 = p2.channel('lobby', { config: { presence: { key: 'p2' } } })
  lobby2.on('presence', { event: 'sync' }, () => {})
  out.joiner = await subscribe(lobby2)
  await waitFor('the joiner sees p1', () => 'p1' in lobby2.presenceState())
  out.joinerState = Object.keys(lobby2.presenceState()).sort()
  out.joinerConnected = p2.isConnected()
}

run(main)
