;; wasm-hello: the smallest WAGI module (CGI over WASI preview 1). It writes CGI headers, a blank line and a
;; JSON body to stdout; mbworker turns that into the HTTP response. This text file is the source: mbworker
;; compiles .wat at deploy and caches the compiled module.
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 64) "Content-Type: application/json\n\n{\"message\":\"Hello from Wasm!\"}")
  (func (export "_start")
    ;; one iovec at 0: {buf = 64, len = 62}; the written count goes to 16
    (i32.store (i32.const 0) (i32.const 64))
    (i32.store (i32.const 4) (i32.const 62))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 16)))))
