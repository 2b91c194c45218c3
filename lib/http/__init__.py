"""A general HTTP/1.1 server on trio over httptools (the daemon's front door and admin listener are built on it).

`serve_http` owns the listening sockets and every connection; handlers own nothing they are given beyond the
call. See `types` for the handler seam. It imports nothing of the product.

Modules: `server` (serve_http, HttpServer: listeners, connection tasks, timeouts, drain), `protocol` (the
sans-I/O core: request bytes → requests and bodies, response facts → head bytes), `connection` (its trio
shell: reads, writes, timeouts, the request loop, the Responder), `response_head` (status lines, Date cache,
header bytes), `settings` (HttpSettings), `types` (the seam apps implement; a WebSocket upgrade is handed over with the
connection's stream, and realtime drives websockets' Sans-I/O protocol on it).
"""
