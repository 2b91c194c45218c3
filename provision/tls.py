"""The cluster's own certificate authority, kept in the operator's state directory, and the proxy certificates it
issues (with the `openssl` command line: no crypto library in the operator's environment).

`LocalCa` owns `ca.pem` (public: hand it to clients that must trust the proxies) and `ca.key` (mode 0600, never
leaves the state dir). The proxy's certificate chain + key go into the proxy's user-data (which already carries
secrets). With `proxy.tls = "acme"` the same certificate only bootstraps HAProxy until certbot has a public one.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import ProvisionError

CA_CERT = "ca.pem"
CA_KEY = "ca.key"


def _openssl(*args: str, cwd: Path) -> None:
    try:
        subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)
    except FileNotFoundError:
        raise ProvisionError("openssl is needed to issue the cluster's certificates and was not found") from None
    except subprocess.CalledProcessError as exc:
        tail = exc.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["?"]
        raise ProvisionError(f"openssl {args[0]} failed: {tail[0]}") from None
    except subprocess.TimeoutExpired:
        raise ProvisionError(f"openssl {args[0]} timed out") from None


@dataclass(frozen=True)
class LocalCa:
    state_dir: Path

    @property
    def cert_path(self) -> Path:
        return self.state_dir / CA_CERT

    @property
    def key_path(self) -> Path:
        return self.state_dir / CA_KEY

    def cert_pem(self) -> str:
        return self.cert_path.read_text()

    def issue(self, names: list[str], ips: list[str] = [], days: int = 825) -> str:  # noqa: B006 (never mutated)
        """A server certificate for `names` (DNS) and `ips`, signed by this CA: leaf + CA chain + key, PEM."""
        if not names and not ips:
            raise ProvisionError("a certificate needs at least one name or address")
        sans = [f"DNS:{n}" for n in names] + [f"IP:{ipaddress.ip_address(i)}" for i in ips]
        with tempfile.TemporaryDirectory(prefix="mbtls-") as tmp:
            d = Path(tmp)
            (d / "ext.cnf").write_text(
                "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                f"extendedKeyUsage=serverAuth\nsubjectAltName={','.join(sans)}\n"
            )
            cn = (names or ips)[0]
            _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "leaf.key", cwd=d)
            _openssl("req", "-new", "-key", "leaf.key", "-subj", f"/CN={cn}", "-out", "leaf.csr", cwd=d)
            _openssl(
                "x509", "-req", "-in", "leaf.csr", "-CA", str(self.cert_path), "-CAkey", str(self.key_path),
                "-CAcreateserial", "-CAserial", "serial", "-days", str(days), "-sha256", "-extfile", "ext.cnf",
                "-out", "leaf.pem", cwd=d,
            )  # fmt: skip
            return (d / "leaf.pem").read_text() + self.cert_pem() + (d / "leaf.key").read_text()


def load_or_create_ca(state_dir: Path, cluster: str) -> LocalCa:
    """The cluster CA in `state_dir`, created on first use (key 0600)."""
    ca = LocalCa(state_dir)
    if ca.cert_path.exists() and ca.key_path.exists():
        mode = ca.key_path.stat().st_mode & 0o777
        if mode & 0o077:
            raise ProvisionError(f"{ca.key_path} is readable by others (mode {mode:o}); chmod 600 it")
        return ca
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mbca-", dir=state_dir) as tmp:
        d = Path(tmp)
        _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.key", cwd=d)
        os.chmod(d / "ca.key", 0o600)
        _openssl(
            "req", "-x509", "-new", "-key", "ca.key", "-sha256", "-days", "3650", "-subj",
            f"/CN={cluster} cluster CA", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", "-out", "ca.pem", cwd=d,
        )  # fmt: skip
        os.replace(d / "ca.key", ca.key_path)
        os.replace(d / "ca.pem", ca.cert_path)
    return ca
