"""Discovering a supabase/functions tree, gathering one function's files, packing, and the real `deno bundle`."""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from mbworker.worker.deployments.archive import BundleTooLarge, unpack_bundle
from mbworker.worker.deployments.gather import (
    BUNDLE_OUTPUT_NAME,
    GatherError,
    discover_functions,
    find_deno,
    gather_function,
    gather_tree,
    pack_bundle,
    strip_jsonc,
)
from mbworker.worker.deployments.manifest import ManifestError
from tests.conftest import require_binary


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A Supabase-style project with shared code, config.toml settings and a few edge cases."""
    sb = tmp_path / "supabase"
    write(
        sb / "config.toml",
        "[functions.hello]\nverify_jwt = false\n"
        "[functions.off]\nenabled = false\n"
        '[functions.custom]\nentrypoint = "./functions/custom/main.ts"\n'
        'static_files = ["./functions/custom/assets/*.html"]\n',
    )
    fns = sb / "functions"
    write(fns / "_shared" / "cors.ts", 'export const corsHeaders = { "Access-Control-Allow-Origin": "*" };\n')
    write(fns / "_shared" / "util.ts", 'export * from "./deep/inner.ts";\nexport { x } from "./x.js";\n')
    write(fns / "_shared" / "deep" / "inner.ts", "export const inner = 1;\n")
    write(fns / "_shared" / "x.js", "export const x = 2;\n")
    write(fns / "_shared" / "unused.ts", "export const unused = 3;\n")
    write(
        fns / "hello" / "index.ts",
        'import "jsr:@supabase/functions-js/edge-runtime.d.ts";\n'
        'import { corsHeaders } from "../_shared/cors.ts";\n'
        "import {\n  inner,\n  x,\n} from '../_shared/util.ts';\n"
        'import type { T } from "./types.ts";\n'
        "Deno.serve(async (req) => {\n"
        '  const { lazy } = await import("./lazy.tsx");\n'
        "  return new Response(String(inner + x + lazy), { headers: corsHeaders });\n"
        "});\n",
    )
    write(fns / "hello" / "types.ts", "export type T = number;\n")
    write(
        fns / "hello" / "lazy.tsx",
        'import data from "./data.json" with { type: "json" };\nexport const lazy = data.n;\n',
    )
    write(fns / "hello" / "data.json", '{"n": 3}\n')
    write(fns / "hello" / "notes.md", "not imported\n")
    write(fns / "off" / "index.ts", "Deno.serve(() => new Response('off'));\n")
    write(fns / "custom" / "main.ts", "Deno.serve(() => new Response('custom'));\n")
    write(fns / "custom" / "assets" / "page.html", "<h1>hi</h1>\n")
    write(fns / "custom" / "assets" / "skip.css", "body{}\n")
    write(fns / "2invalid" / "index.ts", "Deno.serve(() => new Response(''));\n")
    write(fns / "wasmfn" / "fn.wat", "(module)\n")
    write(fns / "wasmfn" / "function.toml", '[limits]\nfuel = 1000000\n[env]\nGREETING = "hi"\n')
    write(fns / "empty" / "README.md", "no entrypoint here\n")
    return tmp_path


def test_discover_skips_shared_invalid_disabled_and_entryless(project: Path) -> None:
    found = {f.slug: f for f in discover_functions(project)}
    assert {s for s, f in found.items() if f.deployable} == {"custom", "hello", "wasmfn"}
    assert found["_shared"].skip_reason == "shared code, not a function"
    assert "not a valid function name" in (found["2invalid"].skip_reason or "")
    assert found["off"].skip_reason == "disabled (enabled = false)"
    assert "no entrypoint" in (found["empty"].skip_reason or "")
    # The same tree is found from the project, from supabase/ and from supabase/functions itself.
    for start in (project / "supabase", project / "supabase" / "functions"):
        assert [f.slug for f in discover_functions(start)] == sorted(found)


def test_gather_tree_follows_imports_and_reads_config(project: Path) -> None:
    specs = {s.slug: s for s in gather_tree(project)}
    assert set(specs) == {"custom", "hello", "wasmfn"}

    hello = specs["hello"]
    assert hello.root == project / "supabase" / "functions"
    assert set(hello.files) == {
        "hello/index.ts",
        "hello/types.ts",  # type-only import
        "hello/lazy.tsx",  # dynamic import()
        "hello/data.json",  # import with { type: "json" } from the lazy module
        "_shared/cors.ts",
        "_shared/util.ts",
        "_shared/deep/inner.ts",  # export * from
        "_shared/x.js",  # export { } from
    }
    assert hello.manifest.entrypoint == "hello/index.ts"
    assert hello.manifest.verify_jwt is False  # from config.toml
    assert hello.manifest.runtime == "deno"

    custom = specs["custom"]
    assert custom.manifest.entrypoint == "custom/main.ts"  # config.toml entrypoint override
    assert custom.manifest.verify_jwt is True  # the default
    assert "custom/assets/page.html" in custom.files
    assert "custom/assets/skip.css" not in custom.files
    assert custom.manifest.static_patterns == ["custom/assets/*.html"]

    wasm = specs["wasmfn"]
    assert wasm.manifest.runtime == "wasm"
    assert wasm.manifest.entrypoint == "wasmfn/fn.wat"
    assert wasm.manifest.limits.fuel == 1_000_000
    assert wasm.manifest.env == {"GREETING": "hi"}


def test_gather_overrides_and_env_file(project: Path) -> None:
    fn = project / "supabase" / "functions" / "custom"
    env_file = write(project / "prod.env", "API_KEY='abc'\n")
    spec = gather_function(fn, verify_jwt_override=False, env_file=env_file)
    assert spec.manifest.verify_jwt is False
    assert spec.manifest.env == {"API_KEY": "abc"}
    # function.toml beats config.toml; globs in function.toml are relative to the folder.
    write(fn / "function.toml", 'verify_jwt = false\nentrypoint = "alt.ts"\nstatic_files = ["assets"]\n')
    write(fn / "alt.ts", "Deno.serve(() => new Response('alt'));\n")
    spec = gather_function(fn)
    assert spec.manifest.entrypoint == "custom/alt.ts"
    assert {"custom/assets/page.html", "custom/assets/skip.css"} <= set(spec.files)


def test_gather_errors_are_clear(project: Path) -> None:
    fns = project / "supabase" / "functions"
    with pytest.raises(GatherError, match="off is disabled"):
        gather_function(fns / "off")
    with pytest.raises(GatherError, match=r"no entrypoint: expected one of index\.ts"):
        gather_function(fns / "empty")
    with pytest.raises(ManifestError, match="invalid function name '_shared'"):
        gather_function(fns / "_shared")
    write(fns / "hello" / "function.toml", 'entrypoint = "missing.ts"\n')
    with pytest.raises(GatherError, match=r"missing\.ts \(from function\.toml\) does not exist"):
        gather_function(fns / "hello")
    bad_env = write(project / "bad.env", "SUPABASE_URL=x\n")
    with pytest.raises(ManifestError, match="SUPABASE_URL: names starting with SUPABASE_ are reserved"):
        gather_function(fns / "custom", env_file=bad_env)


def test_import_map_relative_targets_and_unresolved_warning(tmp_path: Path) -> None:
    fns = tmp_path / "functions"
    write(fns / "_shared" / "db.ts", "export const db = 1;\n")
    write(
        fns / "mapped" / "deno.jsonc",
        '{\n  // comment\n  "imports": {"@shared/": "../_shared/", "lib": "./lib/mod.ts",},\n}\n',
    )
    write(fns / "mapped" / "lib" / "mod.ts", "export const lib = 1;\n")
    write(
        fns / "mapped" / "index.ts",
        'import { db } from "@shared/db.ts";\nimport { lib } from "lib";\nimport "./gone.ts";\n'
        "Deno.serve(() => new Response(String(db + lib)));\n",
    )
    spec = gather_function(fns / "mapped")
    assert set(spec.files) == {"mapped/index.ts", "mapped/deno.jsonc", "mapped/lib/mod.ts", "_shared/db.ts"}
    assert spec.manifest.import_map == "mapped/deno.jsonc"
    assert any("gone.ts" in w for w in spec.warnings)


def test_imports_outside_the_project_are_refused(tmp_path: Path) -> None:
    write(tmp_path / "secret.ts", "export const s = 1;\n")
    fns = tmp_path / "proj" / "supabase" / "functions"
    write(fns / "leaky" / "index.ts", 'import "../../../../secret.ts";\n')
    with pytest.raises(GatherError, match=r"files outside the project folder .*secret\.ts"):
        gather_function(fns / "leaky")


def test_gather_an_entry_file_directly(project: Path) -> None:
    spec = gather_function(project / "supabase" / "functions" / "wasmfn" / "fn.wat", slug="wasmfn")
    assert spec.manifest.runtime == "wasm"
    assert spec.manifest.entrypoint == "wasmfn/fn.wat"
    assert set(spec.files) == {"wasmfn/fn.wat"}


def test_strip_jsonc_keeps_strings() -> None:
    text = '{"url": "http://x//y", /* c */ "a": [1, 2,], // end\n}'
    assert json.loads(strip_jsonc(text)) == {"url": "http://x//y", "a": [1, 2]}


def test_pack_is_reproducible_and_round_trips(project: Path, tmp_path: Path) -> None:
    spec = gather_function(project / "supabase" / "functions" / "hello")
    first, second = pack_bundle(spec), pack_bundle(spec)
    assert first.data == second.data
    assert first.sha256 == second.sha256
    with tarfile.open(fileobj=io.BytesIO(first.data), mode="r:gz") as tar:
        names = tar.getnames()
    assert names[0] == "mbworker.json"
    manifest = unpack_bundle(first.data, tmp_path / "out", sha256=first.sha256)
    assert manifest == spec.manifest
    assert (tmp_path / "out" / "_shared" / "cors.ts").read_text() == (
        project / "supabase" / "functions" / "_shared" / "cors.ts"
    ).read_text()


def test_pack_refuses_oversize(project: Path) -> None:
    fn = project / "supabase" / "functions" / "custom"
    (fn / "assets" / "big.html").write_bytes(os.urandom(200_000))  # random bytes don't compress
    spec = gather_function(fn)
    with pytest.raises(BundleTooLarge, match=r"over the size limit: 0\.2 MB compressed, at most 0\.1 MB"):
        pack_bundle(spec, max_bytes=100_000)


@pytest.mark.slow
def test_npm_graph_is_bundled_with_deno(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Real `deno bundle` (fetches esbuild and the package from the npm registry on first use): how jsr: and
    https: modules ship, and npm packages with `bundle_npm` (they ship as packages otherwise: test_npm_packages)."""
    deno = require_binary("deno", find_deno())
    monkeypatch.setenv("MBWORKER_DENO_DIR", str(tmp_path.parent / "mbworker-deno-cache"))
    fns = tmp_path / "supabase" / "functions"
    write(fns / "_shared" / "greet.ts", 'import { camelCase } from "npm:lodash-es@4.17.21";\n'
          "export const greet = (s: string) => camelCase(s);\n")  # fmt: skip
    write(fns / "npmfn" / "deno.json", '{"imports": {"shared/": "../_shared/"}}\n')
    write(
        fns / "npmfn" / "index.ts",
        'import "jsr:@supabase/functions-js/edge-runtime.d.ts";\n'
        'import { greet } from "shared/greet.ts";\n'
        "Deno.serve(() => new Response(greet('hello edge world')));\n",
    )
    spec = gather_function(fns / "npmfn", bundle_npm=True)
    out = f"npmfn/{BUNDLE_OUTPUT_NAME}"
    assert spec.manifest.entrypoint == out
    assert spec.manifest.source_entrypoint == "npmfn/index.ts"
    assert spec.manifest.import_map is None
    assert {"npmfn/index.ts", "npmfn/deno.json", "_shared/greet.ts", out} <= set(spec.files)
    bundled = spec.files[out]
    assert isinstance(bundled, bytes)
    assert b"npm:" not in bundled
    assert b"jsr:" not in bundled

    # The unpacked bundle runs with an empty DENO_DIR and no network: nothing is fetched at run time.
    packed = pack_bundle(spec)
    dest = tmp_path / "unpacked"
    unpack_bundle(packed.data, dest)
    probe = write(tmp_path / "probe.ts", 'Deno.serve = ((h: any) => { Promise.resolve(h(new Request("http://x/"))).then('
                  "async (r: Response) => console.log(await r.text())); }) as any;\n"
                  f'await import("{(dest / out).as_uri()}");\n')  # fmt: skip
    env = {"DENO_DIR": str(tmp_path / "empty-deno-dir"), "PATH": os.environ.get("PATH", ""), "NO_COLOR": "1"}
    proc = subprocess.run(
        [deno, "run", "--no-remote", "--no-config", "--no-lock", "--allow-read", str(probe)],
        capture_output=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().strip() == "helloEdgeWorld"


def test_remote_imports_are_bundled_at_deploy_time_not_on_the_worker(tmp_path: Path) -> None:
    """An https: import makes gather run `deno bundle`; an unreachable host fails the deploy, not a later boot."""
    deno = require_binary("deno", find_deno())
    fns = tmp_path / "supabase" / "functions"
    write(fns / "remote" / "index.ts", 'import { x } from "http://127.0.0.1:9/mod.ts";\nconsole.log(x);\n')
    with pytest.raises(GatherError, match=r"deno bundle failed for remote/index\.ts"):
        gather_function(fns / "remote", deno_bin=deno, bundle_timeout_s=60)
    spec = gather_function(fns / "remote", bundle_deps=False)
    assert spec.manifest.entrypoint == "remote/index.ts"
