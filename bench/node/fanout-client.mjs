// Load generator for bench/realtime_fanout.py: N subscribers + 1 publisher over `ws`.
// argv: url mode(phoenix|raw) N M payloadBytes. Prints READY once all joined, waits for GO on stdin,
// publishes M messages, prints one JSON line when every subscriber got all of them.
import WebSocket from 'ws'

const [url, mode, nStr, mStr, sizeStr] = process.argv.slice(2)
const N = Number(nStr), M = Number(mStr), SIZE = Number(sizeStr)
const TOPIC = 'realtime:bench'
let delivered = 0
const target = N * M

function open() {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, { perMessageDeflate: false })
    ws.on('error', reject)
    ws.on('open', () => {
      if (mode !== 'phoenix') return resolve(ws)
      ws.once('message', () => resolve(ws)) // the join reply
      ws.send(JSON.stringify(['1', '1', TOPIC, 'phx_join', { config: {} }]))
    })
  })
}

async function main() {
  const subs = []
  for (let i = 0; i < N; i += 100) {
    const batch = await Promise.all(Array.from({ length: Math.min(100, N - i) }, open))
    subs.push(...batch)
  }
  for (const ws of subs) ws.on('message', () => { delivered++ })
  const pub = await open()
  process.stdout.write('READY\n')
  await new Promise((r) => process.stdin.once('data', r))
  const body = 'x'.repeat(SIZE)
  const frame = mode === 'phoenix'
    ? JSON.stringify(['1', null, TOPIC, 'broadcast', { type: 'broadcast', event: 'm', payload: { d: body } }])
    : JSON.stringify([null, null, TOPIC, 'broadcast', { type: 'broadcast', event: 'm', payload: { d: body } }])
  const t0 = process.hrtime.bigint()
  let sent = 0
  while (sent < M) {
    // keep at most 20 messages in flight per subscriber so neither server's buffers grow without bound
    if (sent * N - delivered < 20 * N) { pub.send(frame); sent++ } else await new Promise((r) => setImmediate(r))
  }
  while (delivered < target) await new Promise((r) => setImmediate(r))
  const secs = Number(process.hrtime.bigint() - t0) / 1e9
  process.stdout.write(JSON.stringify({ deliveries: delivered, seconds: secs, frame_bytes: frame.length }) + '\n')
  for (const ws of subs) ws.terminate()
  pub.terminate()
  process.exit(0)
}
const timer = setTimeout(() => { process.stderr.write(`timeout: ${delivered}/${target}\n`); process.exit(2) }, 120000)
timer.unref()
main().catch((e) => { process.stderr.write(String(e && e.stack || e) + '\n'); process.exit(1) })
