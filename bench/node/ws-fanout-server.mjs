// Reference for bench/realtime_fanout.py: a plain Node `ws` server that relays every message it receives
// to every other connected client (the same fan-out mbworker realtime does for a channel). No compression.
import { WebSocketServer } from 'ws'

const port = Number(process.argv[2])
const wss = new WebSocketServer({ port, host: '127.0.0.1', perMessageDeflate: false })
wss.on('connection', (ws) => {
  ws.on('message', (data, isBinary) => {
    for (const c of wss.clients) if (c !== ws && c.readyState === 1) c.send(data, { binary: isBinary })
  })
})
wss.on('listening', () => process.stdout.write('LISTENING\n'))
