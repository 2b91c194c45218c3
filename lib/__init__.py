"""General trio libraries that know nothing of the product: a Redis client (`redis/`, over hiredis), an HTTP/1.1
server (`http/`, over httptools), a WebSocket transport over websockets' Sans-I/O protocol (`websocket`) and
`open_owned_nursery`. They import nothing of mbworker outside lib/ (an import
contract in pyproject.toml holds them to it); the daemon, realtime and runtimes build on them."""
