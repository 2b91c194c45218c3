"""function.toml / config.toml / env-file parsing and the secrets rules: pure, no I/O beyond tmp files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ConfigDict, create_model

from mbworker.runtimes.limits import Limits
from mbworker.worker.deployments.manifest import (
    CacheSettings,
    Manifest,
    ManifestError,
    infer_runtime,
    load_config_toml,
    load_function_toml,
    parse_duration,
    parse_env_file,
    parse_env_text,
    validate_secrets,
    validate_slug,
)
from mbworker.worker.deployments.store import staged_deployment


def test_env_text_quotes_comments_export_and_multiline() -> None:
    env = parse_env_text(
        "# a comment\n"
        "\n"
        "PLAIN=value\n"
        'export QUOTED="two words" # trailing comment\n'
        "SINGLE='no $EXPANSION here'\n"
        'MULTI="line one\nline two"\n'
        "HASH=x#not-a-comment\n"
        "EMPTY=\n"
        "PLAIN=later wins\n"
    )
    assert env == {
        "PLAIN": "later wins",
        "QUOTED": "two words",
        "SINGLE": "no $EXPANSION here",
        "MULTI": "line one\nline two",
        "HASH": "x#not-a-comment",
        "EMPTY": "",
    }


def test_env_text_does_not_expand_host_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MBW_TEST_HOST_SECRET", "leaked")
    assert parse_env_text('A="${MBW_TEST_HOST_SECRET}"\n') == {"A": "${MBW_TEST_HOST_SECRET}"}


def test_env_text_reports_bad_lines_with_line_numbers() -> None:
    with pytest.raises(ManifestError) as info:
        parse_env_text("GOOD=1\nthis is not an assignment\nNOVALUE\n", source=".env")
    problems = info.value.problems
    assert any("line 2" in p and "not KEY=value" in p for p in problems)
    assert any("line 3" in p and "NOVALUE has no value" in p for p in problems)
    assert all(p.startswith(".env: ") for p in problems)


def test_env_file_validates_secrets(tmp_path: Path) -> None:
    path = tmp_path / "prod.env"
    path.write_text("SUPABASE_URL=http://x\nOK=1\n")
    with pytest.raises(ManifestError, match="SUPABASE_URL: names starting with SUPABASE_ are reserved"):
        parse_env_file(path)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({f"K{i}": "v" for i in range(101)}, "101 secrets, at most 100"),
        ({"N" * 257: "v"}, "name is 257 characters, at most 256"),
        ({"supabase_key": "v"}, "reserved for the platform"),
        ({"BIG": "x" * (48 * 1024 + 1)}, "value is 49153 bytes, at most 49152"),
        ({"1BAD": "v"}, "may contain only letters, digits and _"),
        ({"NUL": "a\x00b"}, "NUL byte"),
    ],
)
def test_secrets_rules(env: dict[str, str], expected: str) -> None:
    with pytest.raises(ManifestError, match=expected):
        validate_secrets(env)


def test_secrets_at_the_limits_are_fine() -> None:
    env = {f"K{i}": "v" for i in range(99)} | {"N" * 256: "x" * (48 * 1024)}
    assert validate_secrets(env) is env


def test_function_toml_full(tmp_path: Path) -> None:
    path = tmp_path / "function.toml"
    path.write_text(
        'verify_jwt = false\nentrypoint = "main.ts"\nstatic_files = ["assets/**"]\n'
        "[limits]\nmemory_mb = 512\ncpu_time_ms = 5000\n"
        '[env]\nSTRIPE_KEY = "sk_test"\n'
        '[cache]\nttl = "5m"\nvary = ["Accept-Language", "accept-language", "X-Tenant"]\n'
        "include_authorization = false\n"
    )
    cfg = load_function_toml(path)
    assert cfg.verify_jwt is False
    assert cfg.entrypoint == "main.ts"
    assert cfg.limits.memory_mb == 512
    assert cfg.limits.cpu_time_ms == 5000
    assert cfg.limits.wall_clock_s == 400  # untouched defaults stay
    assert cfg.env == {"STRIPE_KEY": "sk_test"}
    assert cfg.cache == CacheSettings(ttl=300.0, vary=["accept-language", "x-tenant"], include_authorization=False)


def test_function_toml_errors_are_user_facing(tmp_path: Path) -> None:
    path = tmp_path / "function.toml"
    path.write_text(
        'runtime = "python"\nverfy_jwt = false\n[limits]\nmemory_mb = 1\n'
        '[env]\nSUPABASE_X = "1"\n[cache]\nttl = "soon"\n'
    )
    with pytest.raises(ManifestError) as info:
        load_function_toml(path)
    text = "\n".join(info.value.problems)
    assert "runtime: Input should be 'deno' or 'wasm'" in text
    assert "verfy_jwt: Extra inputs are not permitted" in text  # a typo is caught, not ignored
    assert "limits.memory_mb: Input should be greater than or equal to 16" in text
    assert "SUPABASE_X: names starting with SUPABASE_ are reserved" in text
    assert "cache.ttl: invalid duration 'soon'" in text
    assert all(p.startswith(str(path)) for p in info.value.problems)


def test_function_toml_bad_toml(tmp_path: Path) -> None:
    path = tmp_path / "function.toml"
    path.write_text("verify_jwt = \n")
    with pytest.raises(ManifestError, match="invalid TOML"):
        load_function_toml(path)
    path.write_text("x = " + "[" * 50_000 + "]" * 50_000 + "\n")  # past Python's recursion limit
    with pytest.raises(ManifestError, match="nested too deeply"):
        load_function_toml(path)


def test_config_toml_functions_tables(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        "[api]\nport = 54321\n[functions.hello]\nverify_jwt = false\nfuture_key = 1\n"
        '[functions.off]\nenabled = false\n[functions.custom]\nentrypoint = "./functions/custom/main.ts"\n'
    )
    cfg = load_config_toml(path)
    assert set(cfg) == {"hello", "off", "custom"}
    assert cfg["hello"].verify_jwt is False  # unknown Supabase keys are ignored there
    assert cfg["off"].enabled is False
    assert cfg["custom"].entrypoint == "./functions/custom/main.ts"
    path.write_text('[functions.hello]\nverify_jwt = "nope"\n')
    with pytest.raises(ManifestError, match=r"functions\.hello: verify_jwt: Input should be a valid boolean"):
        load_config_toml(path)


@pytest.mark.parametrize(("text", "seconds"), [("30s", 30), ("500ms", 0.5), ("2m", 120), ("1h", 3600), (15, 15)])
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_slugs_and_runtime_inference() -> None:
    assert validate_slug("hello-world_2") == "hello-world_2"
    for bad in ("_shared", "2fast", "has space", "a/b", ""):
        with pytest.raises(ManifestError, match="invalid function name"):
            validate_slug(bad)
    assert infer_runtime("fn.wasm") == "wasm"
    assert infer_runtime("fn.WAT") == "wasm"
    assert infer_runtime("index.ts") == "deno"


def test_manifest_rejects_escaping_paths() -> None:
    for bad in ("../x.ts", "/abs.ts", "a/../b.ts", "a\\b.ts", "./a.ts", "C:/x.ts"):
        with pytest.raises(ValueError, match="path inside the bundle"):
            Manifest(slug="s", runtime="deno", entrypoint=bad)


def test_manifests_and_deployment_records_stay_readable_by_the_release_before_a_new_limit() -> None:
    """During a rolling upgrade a worker one release older reads the bundles and the cluster's deployment records
    this release writes. It knows every limit but the newest (here: `max_message_bytes`) and refuses unknown keys:
    what a function left at the built-in default is not written, what it set is."""
    older_fields: dict[str, Any] = {
        name: (info.annotation, info) for name, info in Limits.model_fields.items() if name != "max_message_bytes"
    }
    OlderLimits = create_model("OlderLimits", __config__=ConfigDict(extra="forbid"), **older_fields)
    plain = Manifest(slug="hello", runtime="deno", entrypoint="index.ts")
    tuned = plain.model_copy(update={"limits": plain.limits.model_copy(update={"memory_mb": 64})})
    for manifest, written in ((plain, {}), (tuned, {"memory_mb": 64})):
        for record in (manifest, staged_deployment("hello", 1, manifest, "0" * 64, 10)):
            limits = json.loads(record.model_dump_json())["limits"]
            assert limits == written
            OlderLimits.model_validate(limits)  # what the older worker does with it
            assert (
                type(record).model_validate_json(record.model_dump_json()) == record
            )  # and this release reads it back
    loud = plain.model_copy(update={"limits": plain.limits.model_copy(update={"max_message_bytes": 1024})})
    with pytest.raises(
        ValueError, match="max_message_bytes"
    ):  # a function that uses the new limit needs the new release
        OlderLimits.model_validate(json.loads(loud.model_dump_json())["limits"])
