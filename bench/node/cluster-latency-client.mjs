// Load generator for bench/cluster_latency.py (one process per worker, so that neither client event loop queues
// the other's frames): N raw Phoenix (vsn 2.0.0) subscribers on one worker, all joined to one topic, and, with
// RATE > 0, one publisher on the same worker sending RATE broadcasts/s for SECONDS. Each payload carries its
// send time on CLOCK_MONOTONIC (process.hrtime: one clock for every process on the machine). Prints READY once
// all joined, waits for GO on stdin, and prints one JSON line when every subscriber got all M messages (or
// after SECONDS + 10 s): counts, and latency histograms (0.1 ms bins) of every delivery and of each message's
// first arrival on this worker. The first WARMUP messages are not counted.
// argv: url N M RATE WARMUP PAYLOAD_BYTES    (M = messages the publisher sends, RATE = 0: subscribers only)
import WebSocket from 'ws'

const [url, nStr, mStr, rateStr, warmupStr, sizeStr] = process.argv.slice(2)
const N = Number(nStr), M = Number(mStr), RATE = Number(rateStr), WARMUP = Number(warmupStr), SIZE = Number(sizeStr)
const TOPIC = 'realtime:bench'
const BIN = 0.1 // ms
const BINS = 20_000 // up to 2 s; later goes to the last bin
const hist = new Uint32Array(BINS)
const firstHist = new Uint32Array(BINS)
const first = new Float64Array(M).fill(Infinity)
let received = 0
let ref = 1
const I_KEY = Buffer.from('"i":'), T_KEY = Buffer.from('"t":')
const now = () => Number(process.hrtime.bigint()) / 1e6

// The number after `key` in a frame, read straight from the bytes: JSON.parse of every frame would make the
// client the bottleneck at tens of thousands of frames/s.
function numberAfter(buf, key) {
  let at = buf.indexOf(key)
  if (at < 0) return NaN
  at += key.length
  let end = at
  while (end < buf.length && buf[end] !== 44 && buf[end] !== 125) end++ // ',' or '}'
  return Number(buf.toString('latin1', at, end))
}

const bin = (ms) => Math.min(BINS - 1, Math.max(0, Math.floor(ms / BIN)))

function onFrame(data) {
  const t = now()
  const i = numberAfter(data, I_KEY)
  if (Number.isNaN(i)) return // a heartbeat reply
  received++
  if (i < WARMUP) return
  const l = t - numberAfter(data, T_KEY)
  hist[bin(l)]++
  if (l < first[i]) first[i] = l
}

function open(subscriber) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, { perMessageDeflate: false })
    ws.on('error', reject)
    ws.on('open', () => {
      ws.once('message', () => {
        if (subscriber) ws.on('message', onFrame)
        resolve(ws)
      })
      ws.send(JSON.stringify(['1', String(ref++), TOPIC, 'phx_join', { config: { broadcast: { self: false } } }]))
    })
  })
}

async function main() {
  const subs = []
  for (let i = 0; i < N; i += 100) subs.push(...(await Promise.all(Array.from({ length: Math.min(100, N - i) }, () => open(true)))))
  const pub = RATE > 0 ? await open(false) : null
  const all = pub ? [...subs, pub] : subs
  // The server closes sockets silent for 60 s: heartbeat like a real client would.
  const hb = setInterval(() => { for (const ws of all) ws.send(JSON.stringify([null, String(ref++), 'phoenix', 'heartbeat', {}])) }, 20_000)
  process.stdout.write('READY\n')
  await new Promise((r) => process.stdin.once('data', r))
  const t0 = now()
  if (pub) {
    const pad = 'x'.repeat(SIZE)
    for (let i = 0; i < M; i++) {
      const wait = t0 + (i * 1000) / RATE - now()
      if (wait > 0) await new Promise((r) => setTimeout(r, wait))
      const payload = { i, t: now(), d: pad }
      pub.send(JSON.stringify(['1', String(ref++), TOPIC, 'broadcast', { type: 'broadcast', event: 'm', payload }]))
    }
  }
  const sendSeconds = (now() - t0) / 1000
  const deadline = t0 + (M / (RATE || 50)) * 1000 + 10_000
  while (received < N * M && now() < deadline) await new Promise((r) => setTimeout(r, 20))
  clearInterval(hb)
  for (let i = WARMUP; i < M; i++) if (Number.isFinite(first[i])) firstHist[bin(first[i])]++
  const sparse = (h) => Object.fromEntries([...h.entries()].filter(([, n]) => n)) // bin index → count
  for (const ws of all) ws.terminate()
  const line = JSON.stringify({ send_seconds: sendSeconds, expected: N * M, received, bin_ms: BIN, bins: BINS,
    hist: sparse(hist), first: sparse(firstHist) })
  process.stdout.write(line + '\n', () => process.exit(0))
}
const timer = setTimeout(() => { process.stderr.write('timeout\n'); process.exit(2) }, 120_000)
timer.unref()
main().catch((e) => { process.stderr.write(String((e && e.stack) || e) + '\n'); process.exit(1) })
