"""`[net] allow` in function.toml travels manifest → Deployment → FunctionVersion.net_allow."""

from __future__ import annotations

from pathlib import Path

import pytest

from mbworker.worker.deployments.manifest import Manifest, ManifestError, load_function_toml
from mbworker.worker.deployments.store import Deployment, DeploymentStatus, function_version


def test_net_allow_list_is_parsed_and_normalised(tmp_path: Path) -> None:
    toml = tmp_path / "function.toml"
    toml.write_text('[net]\nallow = ["API.example.com:443", "api.example.com:443", "[2001:db8::1]:8443", "x.io"]\n')
    assert load_function_toml(toml).net.allow == ["api.example.com:443", "[2001:db8::1]:8443", "x.io"]
    toml.write_text("")
    assert load_function_toml(toml).net.allow is None  # default: the public internet


@pytest.mark.parametrize(
    "entry", ["https://api.example.com", "api.example.com/path", "*.example.com", "a b", "host:0", "host:99999", ""]
)
def test_net_allow_entries_must_be_host_or_host_port(tmp_path: Path, entry: str) -> None:
    toml = tmp_path / "function.toml"
    toml.write_text(f'[net]\nallow = ["{entry}"]\n')
    with pytest.raises(ManifestError, match=r"net\.allow"):
        load_function_toml(toml)


def test_unknown_net_keys_are_errors(tmp_path: Path) -> None:
    toml = tmp_path / "function.toml"
    toml.write_text("[net]\ndeny = ['10.0.0.1']\n")
    with pytest.raises(ManifestError, match=r"net\.deny"):
        load_function_toml(toml)


def test_deployment_passes_the_list_to_the_runtime(tmp_path: Path) -> None:
    manifest = Manifest(slug="f", runtime="deno", entrypoint="index.ts", net={"allow": ["api.example.com:443"]})
    common = {"slug": "f", "version": 1, "status": DeploymentStatus.STAGED, "sha256": "0" * 64, "size_bytes": 1,
              "runtime": "deno", "entrypoint": "index.ts", "created_at": 0, "updated_at": 0}  # fmt: skip
    dep = Deployment.model_validate({**common, "net": manifest.net.model_dump()})
    roundtrip = Deployment.model_validate_json(dep.model_dump_json())
    assert function_version(roundtrip, tmp_path, {}).net_allow == ("api.example.com:443",)
    assert function_version(Deployment.model_validate(common), tmp_path, {}).net_allow is None
