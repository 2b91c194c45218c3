"""The worker's HTTP/1.1 front door (one listener carries functions, realtime and health).

`serve_http` owns the listening sockets and every connection; handlers own nothing they are given beyond the
call. See `worker.http.types` for the handler seam.

Modules: `server` (serve_http, HttpServer: listeners, connection tasks, timeouts, drain), `connection` (one
connection: httptools callbacks, request bodies, the Responder), `response_head` (status lines, Date cache,
header bytes), `settings` (HttpSettings), `websocket` (finish a handed-over WebSocket handshake with websockets'
trio server side), `types` (the seam apps implement).
"""
