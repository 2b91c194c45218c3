"""WAT sources for the Wasm runtime tests (text only: no binary fixtures)."""

from __future__ import annotations

WASI_IMPORTS = """
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_sizes_get" (func $environ_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_get" (func $environ_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_get" (func $args_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll_oneoff (param i32 i32 i32 i32) (result i32)))
"""

# $write(fd, ptr, len) with the iovec at 0..8 and nwritten at 8; the bump allocator grows memory (traps if it can't).
HELPERS = """
  (global $heap (mut i32) (i32.const 1024))
  (func $write (param $fd i32) (param $ptr i32) (param $len i32) (result i32)
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (local.get $len))
    (call $fd_write (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8)))
  (func $alloc (param $n i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $heap))
    ;; WASI wants aligned pointers: keep the heap 8-aligned
    (global.set $heap (i32.and (i32.add (i32.add (local.get $p) (local.get $n)) (i32.const 7)) (i32.const -8)))
    (block $done
      (loop $grow
        (br_if $done (i32.le_u (global.get $heap) (i32.mul (memory.size) (i32.const 65536))))
        (if (i32.eq (memory.grow (i32.const 1)) (i32.const -1)) (then unreachable))
        (br $grow)))
    (local.get $p))
  (func $strlen (param $p i32) (result i32)
    (local $n i32)
    (block $done
      (loop $l
        (br_if $done (i32.eqz (i32.load8_u (i32.add (local.get $p) (local.get $n)))))
        (local.set $n (i32.add (local.get $n) (i32.const 1)))
        (br $l)))
    (local.get $n))
"""


def wat_bytes(data: bytes) -> str:
    """`data` as a WAT string literal."""
    return '"' + "".join(f"\\{b:02x}" for b in data) + '"'


def module(body: str, *, data: str = "", memory_pages: int = 1, extra: str = "") -> str:
    return f"""(module
{WASI_IMPORTS}
  (memory (export "memory") {memory_pages})
{data}
{HELPERS}
{extra}
  (func (export "_start") {body}))
"""


def printing(output: bytes, *, exit_code: int | None = None) -> str:
    """Writes `output` to stdout, then returns (or calls proc_exit)."""
    tail = f"(call $proc_exit (i32.const {exit_code}))" if exit_code is not None else ""
    return module(
        f"(drop (call $write (i32.const 1) (i32.const 512) (i32.const {len(output)}))) {tail}",
        data=f"  (data (i32.const 512) {wat_bytes(output)})",
        memory_pages=max(1, (512 + len(output)) // 65536 + 1),
    )


# Dumps `env:<var>` and `arg:<arg>` lines, then `body:` and stdin, as text/plain; `log:` lines go to stderr.
DUMP = module(
    """
    (local $count i32) (local $ptrs i32) (local $buf i32) (local $n i32)
    (drop (call $write (i32.const 1) (i32.const 256) (i32.const 38)))
    (drop (call $write (i32.const 2) (i32.const 340) (i32.const 19)))
    (drop (call $environ_sizes_get (i32.const 16) (i32.const 20)))
    (local.set $count (i32.load (i32.const 16)))
    (local.set $ptrs (call $alloc (i32.mul (local.get $count) (i32.const 4))))
    (local.set $buf (call $alloc (i32.load (i32.const 20))))
    (drop (call $environ_get (local.get $ptrs) (local.get $buf)))
    (call $dump (local.get $ptrs) (local.get $count) (i32.const 300))
    (drop (call $args_sizes_get (i32.const 16) (i32.const 20)))
    (local.set $count (i32.load (i32.const 16)))
    (local.set $ptrs (call $alloc (i32.mul (local.get $count) (i32.const 4))))
    (local.set $buf (call $alloc (i32.load (i32.const 20))))
    (drop (call $args_get (local.get $ptrs) (local.get $buf)))
    (call $dump (local.get $ptrs) (local.get $count) (i32.const 310))
    (drop (call $write (i32.const 1) (i32.const 320) (i32.const 5)))
    (block $eof
      (loop $read
        (local.set $buf (call $alloc (i32.const 65536)))
        (i32.store (i32.const 0) (local.get $buf))
        (i32.store (i32.const 4) (i32.const 65536))
        (drop (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
        (local.set $n (i32.load (i32.const 8)))
        (br_if $eof (i32.eqz (local.get $n)))
        (drop (call $write (i32.const 1) (local.get $buf) (local.get $n)))
        (br $read)))
    """,
    data="""
  (data (i32.const 256) "Status: 201\\nContent-Type: text/plain\\n\\n")
  (data (i32.const 300) "env:")
  (data (i32.const 310) "arg:")
  (data (i32.const 320) "body:")
  (data (i32.const 330) "\\n")
  (data (i32.const 340) "log: one\\nlog: two\\n\\n")
""",
    extra="""
  (func $dump (param $ptrs i32) (param $count i32) (param $label i32)
    (local $i i32) (local $s i32)
    (block $done
      (loop $l
        (br_if $done (i32.ge_u (local.get $i) (local.get $count)))
        (local.set $s (i32.load (i32.add (local.get $ptrs) (i32.mul (local.get $i) (i32.const 4)))))
        (drop (call $write (i32.const 1) (local.get $label) (i32.const 4)))
        (drop (call $write (i32.const 1) (local.get $s) (call $strlen (local.get $s))))
        (drop (call $write (i32.const 1) (i32.const 330) (i32.const 1)))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $l))))
""",
)

TRAP = module("unreachable")

INFINITE_LOOP = module("(loop $l (br $l))")

# Grows one page at a time until memory.grow fails, then traps (what C's abort-on-OOM does).
GROW_UNTIL_TRAP = module(
    """
    (block $failed
      (loop $l
        (br_if $failed (i32.eq (memory.grow (i32.const 1)) (i32.const -1)))
        (br $l)))
    unreachable
    """
)

# Tries to grow by 64 MiB; reports the outcome of memory.grow as a normal response.
GROW_AND_REPORT = module(
    """
    (if (i32.eq (memory.grow (i32.const 1024)) (i32.const -1))
      (then (drop (call $write (i32.const 1) (i32.const 256) (i32.const 37))))
      (else (drop (call $write (i32.const 1) (i32.const 300) (i32.const 33)))))
    """,
    data="""
  (data (i32.const 256) "Content-Type: text/plain\\n\\ngrow failed")
  (data (i32.const 300) "Content-Type: text/plain\\n\\ngrew ok")
""",
)

# Writes 4 KiB chunks forever, ignoring write errors.
WRITE_FOREVER = module(
    """
    (drop (call $write (i32.const 1) (i32.const 256) (i32.const 26)))
    (loop $l
      (drop (call $write (i32.const 1) (i32.const 4096) (i32.const 4096)))
      (br $l))
    """,
    data='  (data (i32.const 256) "Content-Type: text/plain\\n\\n")',
)

# A global counter and a memory cell, both incremented per run: a fresh instance prints "1 1" every time.
COUNTER = module(
    """
    (global.set $count (i32.add (global.get $count) (i32.const 1)))
    (i32.store8 (i32.const 600) (i32.add (i32.load8_u (i32.const 600)) (i32.const 1)))
    (i32.store8 (i32.const 282) (i32.add (i32.const 48) (global.get $count)))
    (i32.store8 (i32.const 284) (i32.add (i32.const 48) (i32.load8_u (i32.const 600))))
    (drop (call $write (i32.const 1) (i32.const 256) (i32.const 29)))
    """,
    data='  (data (i32.const 256) "Content-Type: text/plain\\n\\n? ?")\n  (global $count (mut i32) (i32.const 0))',
)

# Calls poll_oneoff (what sleep() does) and prints the errno it got as a decimal.
SLEEP = module(
    """
    (local $r i32)
    (local.set $r (call $poll_oneoff (i32.const 700) (i32.const 800) (i32.const 1) (i32.const 900)))
    (i32.store8 (i32.const 282) (i32.add (i32.const 48) (i32.div_u (local.get $r) (i32.const 10))))
    (i32.store8 (i32.const 283) (i32.add (i32.const 48) (i32.rem_u (local.get $r) (i32.const 10))))
    (drop (call $write (i32.const 1) (i32.const 256) (i32.const 28)))
    """,
    data='  (data (i32.const 256) "Content-Type: text/plain\\n\\n??")',
)

FOREIGN_IMPORT = """(module
  (import "env" "magic" (func $magic (result i32)))
  (memory (export "memory") 1)
  (func (export "_start") (drop (call $magic))))
"""

NO_START = '(module (memory (export "memory") 1) (func (export "main")))'
