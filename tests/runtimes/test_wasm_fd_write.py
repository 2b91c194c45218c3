"""The shadowed WASI `fd_write` (runtimes/wasm/sandbox.py): errnos, bounds checks, gather writes, caps, threads."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from mbworker.runtimes.wasm import sandbox as sandbox_module
from mbworker.runtimes.wasm.sandbox import CallLimits, Sandbox

IMPORT = '(import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))'

# Each probe stores fd_write's errno as one byte at 300+i; the last byte is nwritten of the gather write. Then
# those bytes go to stdout after the gathered "helloworld".
PROBES = f"""(module
  {IMPORT}
  (memory (export "memory") 1)
  (data (i32.const 100) "hello")
  (data (i32.const 110) "world")
  (func $probe (param $i i32) (param $fd i32) (param $iovs i32) (param $n i32) (param $nwritten i32)
    (i32.store8 (i32.add (i32.const 300) (local.get $i))
      (call $fd_write (local.get $fd) (local.get $iovs) (local.get $n) (local.get $nwritten))))
  (func (export "_start")
    ;; iovecs: [0] = (100, 5), [8] = (110, 5); [24] = (65535, 10) reaches past the end of memory
    (i32.store (i32.const 0) (i32.const 100)) (i32.store (i32.const 4) (i32.const 5))
    (i32.store (i32.const 8) (i32.const 110)) (i32.store (i32.const 12) (i32.const 5))
    (i32.store (i32.const 24) (i32.const 65535)) (i32.store (i32.const 28) (i32.const 10))
    (call $probe (i32.const 0) (i32.const 3) (i32.const 0) (i32.const 1) (i32.const 16))      ;; fd 3: EBADF
    (call $probe (i32.const 1) (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 16))      ;; stdin: EBADF
    (call $probe (i32.const 2) (i32.const 1) (i32.const 0) (i32.const 2) (i32.const 16))      ;; gather: ok
    (i32.store8 (i32.const 308) (i32.load (i32.const 16)))                                    ;; nwritten
    (call $probe (i32.const 3) (i32.const 1) (i32.const 65530) (i32.const 1) (i32.const 16))  ;; iovec array OOB
    (call $probe (i32.const 4) (i32.const 1) (i32.const 24) (i32.const 1) (i32.const 16))     ;; data OOB
    (call $probe (i32.const 5) (i32.const 1) (i32.const 0) (i32.const 2000) (i32.const 16))   ;; > 1024 iovecs
    (call $probe (i32.const 6) (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 65534))   ;; nwritten OOB
    (call $probe (i32.const 7) (i32.const 2) (i32.const 0) (i32.const 2) (i32.const 16))      ;; stderr, capped
    (i32.store (i32.const 32) (i32.const 300)) (i32.store (i32.const 36) (i32.const 9))
    (drop (call $fd_write (i32.const 1) (i32.const 32) (i32.const 1) (i32.const 16)))))
"""

START_SECTION_WRITES = f"""(module
  {IMPORT}
  (memory (export "memory") 1)
  (data (i32.const 100) "boot;")
  (func $boot
    (i32.store (i32.const 0) (i32.const 100)) (i32.store (i32.const 4) (i32.const 5))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 16))))
  (start $boot)
  (func (export "_start") (call $boot)))
"""

# Writes its own argv[1]-independent marker many times: used to check that concurrent calls keep their output.
REPEAT = f"""(module
  {IMPORT}
  (import "wasi_snapshot_preview1" "environ_get" (func $environ_get (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    (local $i i32)
    ;; environ[0] is "M=<one byte>": write that byte 2000 times
    (drop (call $environ_get (i32.const 0) (i32.const 100)))
    (i32.store (i32.const 8) (i32.add (i32.const 100) (i32.const 2)))
    (i32.store (i32.const 12) (i32.const 1))
    (block $done
      (loop $l
        (br_if $done (i32.ge_u (local.get $i) (i32.const 2000)))
        (drop (call $fd_write (i32.const 1) (i32.const 8) (i32.const 1) (i32.const 16)))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $l)))))
"""

EBADF, EFAULT, EFBIG, EINVAL = 8, 21, 22, 28


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    sb = Sandbox(cache_dir=None, fuel_metering=True, epoch_tick_ms=10, max_table_elements=1000)
    try:
        yield sb
    finally:
        sb.close()


def limits(*, stdout: int = 1 << 20, stderr: int = 1 << 16) -> CallLimits:
    return CallLimits(16 << 20, 100, None, stdout, stderr)


def test_errnos_bounds_and_gather(sandbox: Sandbox) -> None:
    prepared = sandbox.prepare(PROBES.encode(), is_wat=True)
    try:
        outcome = sandbox.call(prepared, env=[], argv=["/"], stdin=b"", limits=limits(stderr=4))
    finally:
        prepared.close()
    assert outcome.failure is None, outcome.detail
    assert outcome.stdout[:10] == b"helloworld"
    assert list(outcome.stdout[10:]) == [EBADF, EBADF, 0, EFAULT, EFAULT, EINVAL, EFAULT, 0, 10]
    assert outcome.stderr == b"hell"  # stderr over its cap is cut, and the write still succeeds
    assert not outcome.stdout_overflowed


def test_stdout_over_the_cap_fails_the_write(sandbox: Sandbox) -> None:
    prepared = sandbox.prepare(PROBES.encode(), is_wat=True)
    try:
        outcome = sandbox.call(prepared, env=[], argv=["/"], stdin=b"", limits=limits(stdout=12))
    finally:
        prepared.close()
    assert outcome.stdout == b"helloworld"  # the 9-byte report did not fit: nothing of it is kept
    assert outcome.stdout_overflowed


def test_start_section_output(sandbox: Sandbox) -> None:
    prepared = sandbox.prepare(START_SECTION_WRITES.encode(), is_wat=True)
    try:
        sandbox.check_instantiate(prepared, limits())  # no call running: its output goes nowhere, no crash
        outcome = sandbox.call(prepared, env=[], argv=["/"], stdin=b"", limits=limits())
    finally:
        prepared.close()
    assert outcome.failure is None, outcome.detail
    assert outcome.stdout == b"boot;boot;"  # start section, then _start


def test_concurrent_calls_keep_their_own_output(sandbox: Sandbox) -> None:
    prepared = sandbox.prepare(REPEAT.encode(), is_wat=True)
    results: dict[str, bytes | str] = {}
    cleared: dict[str, bool] = {}

    def run(marker: str) -> None:
        for _ in range(20):
            outcome = sandbox.call(prepared, env=[("M", marker)], argv=["/"], stdin=b"", limits=limits())
            if outcome.failure is not None or outcome.stdout != marker.encode() * 2000:
                results[marker] = outcome.detail or outcome.stdout
                return
        results[marker] = marker.encode() * 2000
        cleared[marker] = sandbox_module._current.sinks is None  # this thread's calls left nothing behind

    threads = [threading.Thread(target=run, args=(m,)) for m in "abcd"]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        prepared.close()
    assert results == {m: m.encode() * 2000 for m in "abcd"}
    assert cleared == dict.fromkeys("abcd", True)
    assert not sandbox_module._CONTROLS


def test_start_function_detection() -> None:
    import wasmtime

    from mbworker.runtimes.wasm.sandbox import has_start_function

    assert has_start_function(bytes(wasmtime.wat2wasm(START_SECTION_WRITES)))
    assert not has_start_function(bytes(wasmtime.wat2wasm(PROBES)))
    assert has_start_function(b"not wasm")  # unsure: treated as having one (instantiated without the GIL)
    assert has_start_function(bytes(wasmtime.wat2wasm(PROBES))[:-3])  # truncated


def test_pool_slots_are_reused_and_zeroed() -> None:
    """More sequential calls than pool slots: each Store gives its slot back, and memory comes back zeroed."""
    marker = f"""(module
      {IMPORT}
      (memory (export "memory") 1)
      (func (export "_start")
        ;; report the byte at 200 (0 in a fresh memory), then dirty it for whoever gets this slot next
        (i32.store8 (i32.const 100) (i32.add (i32.const 48) (i32.load8_u (i32.const 200))))
        (i32.store8 (i32.const 200) (i32.const 7))
        (i32.store (i32.const 0) (i32.const 100)) (i32.store (i32.const 4) (i32.const 1))
        (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 16)))))
    """
    sb = Sandbox(cache_dir=None, fuel_metering=True, epoch_tick_ms=10, max_table_elements=1000, pool_slots=2)
    try:
        prepared = sb.prepare(marker.encode(), is_wat=True)
        try:
            outputs = {sb.call(prepared, env=[], argv=["/"], stdin=b"", limits=limits()).stdout for _ in range(10)}
        finally:
            prepared.close()
    finally:
        sb.close()
    assert outputs == {b"0"}


@pytest.mark.parametrize(
    ("items", "expected"),
    [
        (["A=1", "", "é€", "last"], [b"A=1", b"", "é€".encode(), b"last"]),
        (["cut\x00here", "next"], [b"cut", b"next"]),  # C stops at NUL: so do we, without shifting the rest
        ([], []),
    ],
)
def test_string_array(items: list[str], expected: list[bytes]) -> None:
    import ctypes

    from mbworker.runtimes.wasm.capi import StringArray

    strings = StringArray(items)
    assert strings.address
    pointers = (ctypes.c_char_p * max(1, len(items))).from_address(strings.address)
    assert [pointers[i] for i in range(len(items))] == expected
