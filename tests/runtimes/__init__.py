"""Tests for runtimes/ (Deno subprocesses, Wasm sandboxes)."""
