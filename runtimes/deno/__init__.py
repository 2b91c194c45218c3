"""Deno runtime: Supabase-style edge functions in supervised `deno run` subprocesses (see runtime.py)."""

from mbworker.runtimes.deno.process import OnLog
from mbworker.runtimes.deno.runtime import DenoRuntime, DenoSettings, open_deno_runtime

__all__ = ["DenoRuntime", "DenoSettings", "OnLog", "open_deno_runtime"]
