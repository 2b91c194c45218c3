"""npm packages shipped as packages vs inlined with `deno bundle`: bundle sizes and cold starts, against bare Deno.

    .venv/bin/python bench/npm_packages.py [--cold 5] [--package brotli|supabase|ms]

For one function importing an npm package (brotli-wasm: loads its own .wasm; @supabase/supabase-js: the usual
dependency; ms: one small module), gathered both ways on this machine (packages from the npm registry, cached):
- bundle size: the archive the CLI uploads (compressed) and what it unpacks to, files and links.
- cold start: the first request of a never-run version through `DenoRuntime.invoke` (spawn, bootstrap, import,
  first response; a fresh per-version DENO_DIR seeded from the runtime's template), median of `--cold`; and a bare
  `deno run` of the same module serving on a port, with the same node_modules and a fresh DENO_DIR, from spawn to
  its first HTTP response (the reference the ≤ 1.3× target of bench/functions.py is measured against).

The bundled form of brotli-wasm does not boot (its .wasm is not in the bundle): reported as such.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import trio  # noqa: E402
from _load import free_port  # noqa: E402
from deno_direct import deno_bin, first_response  # noqa: E402

from mbworker.runtimes.api import FunctionVersion, Invocation, empty_body  # noqa: E402
from mbworker.runtimes.deno import DenoSettings, open_deno_runtime  # noqa: E402
from mbworker.runtimes.errors import FunctionRuntimeError  # noqa: E402
from mbworker.runtimes.limits import Limits  # noqa: E402
from mbworker.worker.deployments.archive import Symlink, unpack_bundle  # noqa: E402
from mbworker.worker.deployments.gather import gather_function, pack_bundle  # noqa: E402

PACKAGES = {
    "brotli": (
        'import ready from "npm:brotli-wasm@3.0.1";\nconst brotli = await ready;\n',
        "String(brotli.compress(new TextEncoder().encode('ok')).length)",
    ),
    "supabase": (
        'import { createClient } from "npm:@supabase/supabase-js@2.49.4";\n'
        'const client = createClient("http://127.0.0.1:9", "anon");\n',
        "typeof client.from",
    ),
    "ms": ('import ms from "npm:ms@2.1.3";\n', "String(ms('2s'))"),
}


def source(package: str, direct: bool) -> str:
    head, value = PACKAGES[package]
    if direct:
        return head + (
            'Deno.serve({ hostname: "127.0.0.1", port: Number(Deno.args[0]), onListen() {} }, '
            f"() => new Response({value}));\n"
        )
    return head + f"Deno.serve(() => new Response({value}));\n"


def gather(work: Path, package: str, bundled: bool) -> tuple[Path, FunctionVersion, dict[str, float]]:
    folder = work / "src" / ("bundled" if bundled else "packaged") / "fn"
    folder.mkdir(parents=True)
    (folder / "index.ts").write_text(source(package, direct=False))
    spec = gather_function(folder, bundle_npm=bundled)
    packed = pack_bundle(spec)
    dest = work / "unpacked" / ("bundled" if bundled else "packaged")
    dest.parent.mkdir(parents=True, exist_ok=True)
    manifest = unpack_bundle(packed.data, dest)
    raw = sum(
        len(v) if isinstance(v, bytes) else v.stat().st_size for v in spec.files.values() if isinstance(v, bytes | Path)
    )
    sizes = {
        "compressed": packed.size,
        "unpacked": raw,
        "files": len(spec.files),
        "links": sum(isinstance(v, Symlink) for v in spec.files.values()),
    }
    fn = FunctionVersion(
        "bench", 1, "deno", dest, manifest.entrypoint, manifest.import_map,
        limits=Limits(max_processes=1), deno_config=manifest.deno_config,
    )  # fmt: skip
    return dest, fn, sizes


async def cold_through_runtime(work: Path, fn: FunctionVersion, rounds: int) -> list[float] | str:
    settings = DenoSettings(deno_bin=deno_bin(), scratch_dir=work / "scratch")
    out: list[float] = []
    async with open_deno_runtime(settings, on_log=lambda *a: None) as rt:
        for i in range(rounds):
            version = dataclasses.replace(fn, version=100 + i)
            t0 = time.perf_counter()
            try:
                async with rt.invoke(version, Invocation("GET", "/bench", [], empty_body(), "c")) as r:
                    body = b"".join([c async for c in r.body])
            except FunctionRuntimeError as exc:
                return f"does not boot: {str(exc)[:90]}"
            out.append(time.perf_counter() - t0)
            if r.status != 200:
                return f"answers {r.status}: {body[:80]!r}"
            await rt.retire(version)
    return out


def cold_bare(work: Path, packaged: Path, package: str, rounds: int) -> list[float]:
    """A bare `deno run` of the module with the same node_modules (the packaged bundle's), fresh DENO_DIR each."""
    folder = packaged / "fn"
    direct = folder / "direct.ts"
    direct.write_text(source(package, direct=True))
    out = []
    for i in range(rounds):
        port = free_port()
        env = {"DENO_DIR": str(work / f"bare-{i}"), "NO_COLOR": "1", "DENO_NO_UPDATE_CHECK": "1"}
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [deno_bin(), "run", "--cached-only", f"--config={folder / 'deno.json'}", "-A", str(direct), str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
        )
        try:
            first_response(port, t0 + 30)
            out.append(time.perf_counter() - t0)
        finally:
            proc.kill()
            proc.wait()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cold", type=int, default=5)
    ap.add_argument("--package", choices=sorted(PACKAGES), default="brotli")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="mbw-bench-npm-") as tmp:
        work = Path(tmp)
        rows = {}
        for bundled in (True, False):
            _, fn, sizes = gather(work, args.package, bundled)
            cold = trio.run(cold_through_runtime, work / ("b" if bundled else "p"), fn, args.cold)
            rows["deno bundle (before)" if bundled else "packages (after)"] = (sizes, cold)
        packaged_dir = work / "unpacked" / "packaged"
        bare_dir = work / "bare-copy"
        shutil.copytree(packaged_dir, bare_dir, symlinks=True)
        for p in bare_dir.rglob("*"):
            if not p.is_symlink():
                p.chmod(0o755 if p.is_dir() else 0o644)
        bare = cold_bare(work, bare_dir, args.package, args.cold)
    print(f"npm:{args.package} — bundle sizes and cold starts (median of {args.cold})")
    bare_ms = statistics.median(bare) * 1e3
    print(f"  bare `deno run` (same node_modules, fresh DENO_DIR): {bare_ms:.1f} ms")
    for name, (sizes, cold) in rows.items():
        size = (
            f"{sizes['compressed'] / 1e3:.0f} kB compressed, {sizes['unpacked'] / 1e3:.0f} kB unpacked, "
            f"{sizes['files']:.0f} files ({sizes['links']:.0f} links)"
        )
        if isinstance(cold, str):
            print(f"  {name:22} {size}; cold start: {cold}")
        else:
            ms = statistics.median(cold) * 1e3
            print(f"  {name:22} {size}; cold start {ms:.1f} ms = {ms / bare_ms:.2f}× bare")


if __name__ == "__main__":
    main()
