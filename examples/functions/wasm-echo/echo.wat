;; wasm-echo: a WAGI module (CGI over WASI preview 1) that answers with the request as JSON:
;;   {"method":"POST","path":"/x","query":"a=1","headers":{"host":"..."},"body":"..."}
;; WAGI hands the request over as a WASI command: CGI variables + HTTP_* headers in the environment, the body on
;; stdin. The response goes to stdout: CGI headers, a blank line, the body. No SDK needed; this file is the source
;; (mbworker compiles .wat at deploy). The body is copied as a JSON string, so it is expected to be UTF-8 text.
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_sizes_get" (func $environ_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_get" (func $environ_get (param i32 i32) (result i32)))

  (memory (export "memory") 1)

  ;; 0..40 scratch (sizes, iovecs); constants at 64..; the heap starts at 1024.
  (data (i32.const 64) "Content-Type: application/json\n\n")
  (data (i32.const 128) "REQUEST_METHOD")
  (data (i32.const 144) "PATH_INFO")
  (data (i32.const 160) "QUERY_STRING")
  (data (i32.const 176) "HTTP_")
  (data (i32.const 192) "{\"method\":")
  (data (i32.const 208) ",\"path\":")
  (data (i32.const 224) ",\"query\":")
  (data (i32.const 240) ",\"headers\":{")
  (data (i32.const 256) "},\"body\":")
  (data (i32.const 272) "0123456789abcdef")

  (global $heap (mut i32) (i32.const 1024))
  (global $out (mut i32) (i32.const 0))
  (global $out_len (mut i32) (i32.const 0))
  (global $env_count (mut i32) (i32.const 0))
  (global $env_ptrs (mut i32) (i32.const 0))

  ;; Make memory at least `end` bytes long; trap if the host refuses to grow it (memory limit).
  (func $ensure (param $end i32)
    (block $done
      (loop $grow
        (br_if $done (i32.le_u (local.get $end) (i32.mul (memory.size) (i32.const 65536))))
        (if (i32.eq (memory.grow (i32.const 1)) (i32.const -1)) (then unreachable))
        (br $grow))))

  ;; Bump allocator, 8-aligned (WASI wants aligned pointer arrays).
  (func $alloc (param $n i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap
      (i32.and (i32.add (i32.add (local.get $p) (local.get $n)) (i32.const 7)) (i32.const -8)))
    (call $ensure (global.get $heap))
    (local.get $p))

  (func $strlen (param $p i32) (result i32)
    (local $n i32)
    (block $done
      (loop $l
        (br_if $done (i32.eqz (i32.load8_u (i32.add (local.get $p) (local.get $n)))))
        (local.set $n (i32.add (local.get $n) (i32.const 1)))
        (br $l)))
    (local.get $n))

  ;; The output is built at the end of the heap, then written with one fd_write.
  (func $emit_byte (param $c i32)
    (call $ensure (i32.add (i32.add (global.get $out) (global.get $out_len)) (i32.const 1)))
    (i32.store8 (i32.add (global.get $out) (global.get $out_len)) (local.get $c))
    (global.set $out_len (i32.add (global.get $out_len) (i32.const 1))))

  (func $emit (param $p i32) (param $n i32)
    (local $i i32)
    (block $done
      (loop $l
        (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
        (call $emit_byte (i32.load8_u (i32.add (local.get $p) (local.get $i))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $l))))

  ;; A JSON string: escapes " and \ and control characters (\u00XX).
  (func $emit_str (param $p i32) (param $n i32)
    (local $i i32) (local $c i32)
    (call $emit_byte (i32.const 34))
    (block $done
      (loop $l
        (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
        (local.set $c (i32.load8_u (i32.add (local.get $p) (local.get $i))))
        (if (i32.or (i32.eq (local.get $c) (i32.const 34)) (i32.eq (local.get $c) (i32.const 92)))
          (then
            (call $emit_byte (i32.const 92))
            (call $emit_byte (local.get $c)))
          (else
            (if (i32.lt_u (local.get $c) (i32.const 32))
              (then
                (call $emit_byte (i32.const 92))
                (call $emit_byte (i32.const 117))
                (call $emit_byte (i32.const 48))
                (call $emit_byte (i32.const 48))
                (call $emit_byte (i32.load8_u (i32.add (i32.const 272) (i32.shr_u (local.get $c) (i32.const 4)))))
                (call $emit_byte (i32.load8_u (i32.add (i32.const 272) (i32.and (local.get $c) (i32.const 15))))))
              (else (call $emit_byte (local.get $c))))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $l)))
    (call $emit_byte (i32.const 34)))

  ;; 1 if the NUL-terminated string at $s starts with the $n bytes at $prefix.
  (func $starts_with (param $s i32) (param $prefix i32) (param $n i32) (result i32)
    (local $i i32)
    (block $no
      (loop $l
        (if (i32.ge_u (local.get $i) (local.get $n)) (then (return (i32.const 1))))
        (br_if $no
          (i32.ne (i32.load8_u (i32.add (local.get $s) (local.get $i)))
                  (i32.load8_u (i32.add (local.get $prefix) (local.get $i)))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $l)))
    (i32.const 0))

  (func $env_at (param $i i32) (result i32)
    (i32.load (i32.add (global.get $env_ptrs) (i32.shl (local.get $i) (i32.const 2)))))

  ;; The value of environment variable $name ($n bytes), or 0 if it is not set.
  (func $getenv (param $name i32) (param $n i32) (result i32)
    (local $i i32) (local $s i32)
    (block $done
      (loop $l
        (br_if $done (i32.ge_u (local.get $i) (global.get $env_count)))
        (local.set $s (call $env_at (local.get $i)))
        (if (call $starts_with (local.get $s) (local.get $name) (local.get $n))
          (then
            (if (i32.eq (i32.load8_u (i32.add (local.get $s) (local.get $n))) (i32.const 61))
              (then (return (i32.add (i32.add (local.get $s) (local.get $n)) (i32.const 1)))))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $l)))
    (i32.const 0))

  (func $emit_env (param $name i32) (param $n i32)
    (local $v i32)
    (local.set $v (call $getenv (local.get $name) (local.get $n)))
    (if (i32.eqz (local.get $v))
      (then (call $emit_str (i32.const 0) (i32.const 0)))
      (else (call $emit_str (local.get $v) (call $strlen (local.get $v))))))

  ;; "HTTP_X_REQUEST_ID=abc" → "x-request-id":"abc"
  (func $emit_header (param $s i32)
    (local $i i32) (local $c i32)
    (call $emit_byte (i32.const 34))
    (local.set $i (i32.const 5))
    (block $done
      (loop $l
        (local.set $c (i32.load8_u (i32.add (local.get $s) (local.get $i))))
        (br_if $done (i32.eq (local.get $c) (i32.const 61)))
        (if (i32.eq (local.get $c) (i32.const 95)) (then (local.set $c (i32.const 45))))
        (if (i32.and (i32.ge_u (local.get $c) (i32.const 65)) (i32.le_u (local.get $c) (i32.const 90)))
          (then (local.set $c (i32.add (local.get $c) (i32.const 32)))))
        (call $emit_byte (local.get $c))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $l)))
    (call $emit_byte (i32.const 34))
    (call $emit_byte (i32.const 58))
    (local.set $s (i32.add (i32.add (local.get $s) (local.get $i)) (i32.const 1)))
    (call $emit_str (local.get $s) (call $strlen (local.get $s))))

  ;; fd_write until everything is out (or stdout fails).
  (func $write_all (param $p i32) (param $n i32)
    (block $done
      (loop $l
        (br_if $done (i32.eqz (local.get $n)))
        (i32.store (i32.const 24) (local.get $p))
        (i32.store (i32.const 28) (local.get $n))
        (br_if $done (call $fd_write (i32.const 1) (i32.const 24) (i32.const 1) (i32.const 32)))
        (local.set $p (i32.add (local.get $p) (i32.load (i32.const 32))))
        (local.set $n (i32.sub (local.get $n) (i32.load (i32.const 32))))
        (br $l))))

  (func (export "_start")
    (local $body i32) (local $n i32) (local $i i32) (local $s i32) (local $first i32)
    ;; The environment: CGI variables and HTTP_* headers.
    (drop (call $environ_sizes_get (i32.const 0) (i32.const 4)))
    (global.set $env_count (i32.load (i32.const 0)))
    (global.set $env_ptrs (call $alloc (i32.shl (global.get $env_count) (i32.const 2))))
    (drop (call $environ_get (global.get $env_ptrs) (call $alloc (i32.load (i32.const 4)))))

    ;; The body: stdin to the end, contiguous from $body.
    (local.set $body (global.get $heap))
    (block $eof
      (loop $read
        (call $ensure (i32.add (global.get $heap) (i32.const 65536)))
        (i32.store (i32.const 8) (global.get $heap))
        (i32.store (i32.const 12) (i32.const 65536))
        (br_if $eof (call $fd_read (i32.const 0) (i32.const 8) (i32.const 1) (i32.const 16)))
        (local.set $n (i32.load (i32.const 16)))
        (br_if $eof (i32.eqz (local.get $n)))
        (global.set $heap (i32.add (global.get $heap) (local.get $n)))
        (br $read)))
    (global.set $out (global.get $heap))

    (call $emit (i32.const 192) (i32.const 10))
    (call $emit_env (i32.const 128) (i32.const 14))
    (call $emit (i32.const 208) (i32.const 8))
    (call $emit_env (i32.const 144) (i32.const 9))
    (call $emit (i32.const 224) (i32.const 9))
    (call $emit_env (i32.const 160) (i32.const 12))
    (call $emit (i32.const 240) (i32.const 12))
    (local.set $first (i32.const 1))
    (block $done
      (loop $l
        (br_if $done (i32.ge_u (local.get $i) (global.get $env_count)))
        (local.set $s (call $env_at (local.get $i)))
        (if (call $starts_with (local.get $s) (i32.const 176) (i32.const 5))
          (then
            (if (i32.eqz (local.get $first)) (then (call $emit_byte (i32.const 44))))
            (local.set $first (i32.const 0))
            (call $emit_header (local.get $s))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $l)))
    (call $emit (i32.const 256) (i32.const 9))
    (call $emit_str (local.get $body) (i32.sub (global.get $out) (local.get $body)))
    (call $emit_byte (i32.const 125))
    (call $emit_byte (i32.const 10))

    (call $write_all (i32.const 64) (i32.const 32))
    (call $write_all (global.get $out) (global.get $out_len))))
