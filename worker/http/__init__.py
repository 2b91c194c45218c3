"""The worker's HTTP/1.1 front door (one listener carries functions, realtime and health).

`serve_http` owns the listening sockets and every connection; handlers own nothing they are given beyond the
call. See `worker.http.types` for the handler seam.
"""
