"""npm packages shipped as packages: resolved on the deploying machine (real `deno install`, real npm registry),
run by the worker's real Deno with nothing fetched, errors at the user's own file and line."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from mbworker.runtimes.api import FunctionVersion
from mbworker.runtimes.deno.spawn import NO_NPM_REGISTRY
from mbworker.runtimes.errors import BootError, WorkerError
from mbworker.runtimes.limits import Limits
from mbworker.worker.deployments.archive import Symlink, unpack_bundle
from mbworker.worker.deployments.gather import BUNDLE_OUTPUT_NAME, BundleSpec, gather_function, pack_bundle
from tests.runtimes.test_deno_support import LogSink, call, call_json, deno_runtime

# brotli-wasm's ESM entry loads its Wasm with fetch(new URL("brotli_wasm_bg.wasm", import.meta.url)): a file of
# the package that a single-file bundle leaves behind.
BROTLI = "npm:brotli-wasm@3.0.1"
WASM = "node_modules/.deno/brotli-wasm@3.0.1/node_modules/brotli-wasm/pkg.web/brotli_wasm_bg.wasm"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture(autouse=True)
def deployer_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The deploying machine's Deno cache: packages come from the npm registry once per test run."""
    monkeypatch.setenv("MBWORKER_DENO_DIR", str(tmp_path_factory.getbasetemp() / "mbworker-deno-cache"))


def deploy_here(spec: BundleSpec, dest: Path) -> FunctionVersion:
    """What a worker does with the uploaded archive: unpack it (every check) and run what its manifest says."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    manifest = unpack_bundle(pack_bundle(spec).data, dest)
    return FunctionVersion(
        slug=manifest.slug,
        version=1,
        runtime="deno",
        bundle_dir=dest,
        entrypoint=manifest.entrypoint,
        import_map=manifest.import_map,
        deno_config=manifest.deno_config,
        limits=Limits(request_idle_timeout_s=20),
    )


@pytest.mark.slow
async def test_a_package_loads_its_own_wasm_and_nothing_is_fetched(tmp_path: Path) -> None:
    fns = tmp_path / "supabase" / "functions"
    write(fns / "_shared" / "brotli.ts", f'import ready from "{BROTLI}";\nexport const brotli = await ready;\n')
    write(fns / "br" / "deno.json", '{\n  // JSONC\n  "imports": { "shared/": "../_shared/" },\n}\n')
    write(
        fns / "br" / "index.ts",
        'import "jsr:@supabase/functions-js/edge-runtime.d.ts";\n'
        'import { brotli } from "shared/brotli.ts";\n'
        "Deno.serve((req) => {\n"
        '  const text = new URL(req.url).searchParams.get("t") ?? "";\n'
        "  const packed = brotli.compress(new TextEncoder().encode(text));\n"
        "  const back = new TextDecoder().decode(brotli.decompress(packed));\n"
        f'  return Response.json({{ back, at: import.meta.resolve("{BROTLI}") }});\n'
        "});\n",
    )
    spec = gather_function(fns / "br")
    assert spec.manifest.entrypoint == "br/index.ts"  # the user's module, not a generated one
    assert spec.manifest.deno_config == "br/deno.json"
    assert spec.manifest.import_map is None  # the generated deno.json holds the imports
    assert spec.manifest.source_entrypoint is None
    assert not any(name.endswith(BUNDLE_OUTPUT_NAME) for name in spec.files)
    assert {"br/index.ts", "_shared/brotli.ts", "br/deno.lock", f"br/{WASM}"} <= set(spec.files)
    assert spec.files["br/node_modules/brotli-wasm"] == Symlink(".deno/brotli-wasm@3.0.1/node_modules/brotli-wasm")
    config = spec.files["br/deno.json"]
    assert isinstance(config, bytes)
    assert json.loads(config)["imports"]["shared/"] == "../_shared/"
    assert json.loads(config)["lock"] == {"path": "./deno.lock", "frozen": True}

    bundle = tmp_path / "worker" / "br-v1"
    fn = deploy_here(spec, bundle)
    # The worker's Deno: --cached-only, an npm registry that does not resolve, an empty cache of its own.
    async with deno_runtime(tmp_path / "worker") as rt:
        got = await call_json(rt, fn, "GET", "/br?t=hello%20wasm")
        package = bundle / "br" / "node_modules" / ".deno" / "brotli-wasm@3.0.1" / "node_modules" / "brotli-wasm"
        assert got == {"back": "hello wasm", "at": f"file://{package}/index.web.js"}

        # The control: the same bundle without the package cannot boot, since the worker's Deno can fetch nothing.
        broken = tmp_path / "worker" / "br-v2"
        shutil.copytree(bundle, broken, symlinks=True)
        shutil.rmtree(broken / "br" / "node_modules" / ".deno" / "brotli-wasm@3.0.1")
        with pytest.raises(BootError) as info:
            await rt.warm(dataclasses.replace(fn, bundle_dir=broken, version=2))
        assert "brotli-wasm" in (info.value.output or "")
    assert NO_NPM_REGISTRY.startswith("http://npm-registry.invalid")
    # and nothing landed in the worker's own Deno caches
    assert not list((tmp_path / "worker" / "scratch").rglob("brotli_wasm_bg.wasm"))


@pytest.mark.slow
async def test_errors_name_the_users_file_and_line(tmp_path: Path) -> None:
    fns = tmp_path / "functions"
    write(
        fns / "boom" / "index.ts",
        'import ms from "npm:ms@2.1.3";\n\ntype T = { a: number };\nconst t: T = { a: ms("1s") };\n'
        'if (t.a > 0) {\n  throw new Error("boom while loading");\n}\nDeno.serve(() => new Response("x"));\n',
    )
    write(fns / "oops" / "package.json", '{"dependencies": {"ms": "2.1.3"}}\n')  # a bare import, as Node has it
    write(
        fns / "oops" / "index.ts",
        'import ms from "ms";\n\ninterface Shape {\n  n: number;\n}\n'
        "Deno.serve((req: Request): Response => {\n"
        '  const s: Shape = { n: ms("2s") };\n'
        '  if (new URL(req.url).searchParams.has("fail")) throw new TypeError(`oops ${s.n}`);\n'
        '  return new Response("fine");\n'
        "});\n",
    )
    boom = deploy_here(gather_function(fns / "boom"), tmp_path / "worker" / "boom")
    oops = deploy_here(gather_function(fns / "oops"), tmp_path / "worker" / "oops")
    logs = LogSink()
    async with deno_runtime(tmp_path / "worker", logs) as rt:
        with pytest.raises(BootError) as info:
            await rt.warm(boom)
        assert "boom while loading" in (info.value.output or "")
        assert "boom/index.ts:6:9" in (info.value.output or "")  # what a deploy prints, at the source's line

        assert (await call(rt, oops, "GET", "/oops"))[2] == b"fine"
        with pytest.raises(WorkerError):
            await call(rt, oops, "GET", "/oops?fail=1")
    lines = [line for slug, _, _, line in logs.lines if slug == "oops"]
    assert any("oops/index.ts:8:56" in line for line in lines), lines
    assert not any(BUNDLE_OUTPUT_NAME in line for _, _, _, line in logs.lines)


def test_deno_config_is_written_only_when_set() -> None:
    """Records and manifests from before the field load unchanged, and one that doesn't use it carries no key a
    worker from before it would refuse (they forbid unknown keys) during a rolling upgrade."""
    from mbworker.worker.deployments.manifest import Manifest
    from mbworker.worker.deployments.model import Deployment

    old = {"slug": "a", "runtime": "deno", "entrypoint": "a/mbworker.bundle.js", "source_entrypoint": "a/index.ts"}
    assert Manifest.model_validate(old).deno_config is None
    assert "deno_config" not in Manifest.model_validate(old).model_dump_json()
    record = {**old, "version": 1, "status": "ACTIVE", "sha256": "0" * 64, "size_bytes": 1, "created_at": 1}
    dep = Deployment.model_validate({**record, "updated_at": 1})
    assert dep.deno_config is None
    assert "deno_config" not in dep.model_dump_json()
    packaged = Manifest.model_validate({**old, "entrypoint": "a/index.ts", "deno_config": "a/deno.json"})
    assert json.loads(packaged.model_dump_json())["deno_config"] == "a/deno.json"


@pytest.mark.slow
async def test_the_bundled_form_still_runs(tmp_path: Path) -> None:
    """Versions deployed as one `deno bundle` file (npm before it shipped as packages; jsr:/https: still) keep
    serving: the worker runs them as before (no config, the generated import map)."""
    src = write(
        tmp_path / "fns" / "old" / "index.ts",
        'import ms from "npm:ms@2.1.3";\nDeno.serve(() => new Response(String(ms("1m"))));\n',
    )
    spec = gather_function(src.parent, bundle_npm=True)
    assert spec.manifest.entrypoint == f"old/{BUNDLE_OUTPUT_NAME}"
    assert spec.manifest.deno_config is None
    fn = deploy_here(spec, tmp_path / "worker" / "old")
    thrower = write(
        tmp_path / "fns" / "thrower" / "index.ts",
        'import ms from "npm:ms@2.1.3";\n\nif (ms("1s")) {\n  throw new Error("bundled boom");\n}\n',
    )
    bad = deploy_here(gather_function(thrower.parent, bundle_npm=True), tmp_path / "worker" / "thrower")
    async with deno_runtime(tmp_path / "worker") as rt:
        assert (await call(rt, fn, "GET", "/old"))[2] == b"60000"
        with pytest.raises(BootError) as info:
            await rt.warm(bad)
        # the bundle's inline source map: the user's module and line, not mbworker.bundle.js
        assert "thrower/index.ts:4:9" in (info.value.output or "")
