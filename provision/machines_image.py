"""The machines provider's base image: a Debian 12 root built by mmdebstrap, cached by a digest of its recipe.

What a `debian-12` cloud image has is installed (systemd, cloud-init, networkd/resolved, iproute2, python3). The
packages the pillar templates install are only downloaded into apt's cache, with apt's lists kept: cloud-init's
`packages:` then installs them from the cache at boot, running their maintainer scripts on the node exactly as on
a cloud server (a pre-installed postgresql or caddy would start on every node, worker included). Machines never
write here: each boots with its own overlay upper directory.

The cache lives under /var/cache/mbworker/machines/<digest>; a build goes to a temporary directory and is renamed
into place when complete, so an interrupted build is never used.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import time
from importlib import resources
from pathlib import Path

from .errors import ProviderError
from .provider import Progress, no_progress

CACHE_ROOT = Path(os.environ.get("MBWORKER_MACHINES_CACHE", "/var/cache/mbworker/machines"))
SUITE = "bookworm"
#: What the debian-12 image ships (and what booting it with NoCloud needs).
BASE_PACKAGES = (
    "systemd", "systemd-sysv", "systemd-resolved", "dbus", "iproute2", "cloud-init", "ca-certificates",
    "python3", "curl", "procps", "locales",
)  # fmt: skip
#: Installed by templates at runtime rather than listed under `packages:` (e.g. a runcmd's apt-get install).
EXTRA_PACKAGES = ("postgresql-client", "victoria-metrics", "caddy", "python3-venv")


def template_packages() -> tuple[str, ...]:
    """Every package named under `packages:` in the pillar templates: the image follows what they install."""
    names: set[str] = set()
    for entry in resources.files("mbworker.provision.templates").iterdir():
        if not entry.name.endswith(".yaml"):
            continue
        m = re.search(r"(?m)^packages:\n((?:[ ]+- .*\n)+)", entry.read_text())
        if m:
            items = (line.split("#", 1)[0].strip()[2:].strip() for line in m.group(1).splitlines())
            names |= {item for item in items if item and "{{" not in item}
    return tuple(sorted(names | set(EXTRA_PACKAGES)))


#: What the pillars install (downloaded with their Recommends, as cloud-init's apt-get installs those too).
PILLAR_PACKAGES = template_packages()
#: Files written into the root after packages: part of the digest.
CONFIG: dict[str, str] = {
    # NoCloud only: no network metadata service to probe and wait for
    "etc/cloud/cloud.cfg.d/90-mbworker-machines.cfg": "datasource_list: [ NoCloud, None ]\n",
}
#: mmdebstrap customize hooks, in order: part of the digest.
HOOKS = (
    # systemd-resolved made /etc/resolv.conf a link to its stub, which does not answer inside the chroot
    'cp --remove-destination /etc/resolv.conf "$1/etc/resolv.conf"',
    # mmdebstrap's APT_CONFIG turns Recommends off: the node's apt has them on
    'env -u APT_CONFIG chroot "$1" apt-get install --download-only -y -q -o APT::Install-Recommends=true '
    + " ".join(PILLAR_PACKAGES),
    # cloud-init sets LANG=en_US.UTF-8 (Debian's default): cloud images have it generated
    'echo "en_US.UTF-8 UTF-8" > "$1/etc/locale.gen" && chroot "$1" locale-gen',
    # minbase leaves networkd off; cloud-init renders networkd files from network-config
    'chroot "$1" systemctl enable systemd-networkd.service systemd-resolved.service',
)
BUILD_TIMEOUT = 900.0


def image_digest() -> str:
    recipe = "\n".join(
        [SUITE, ",".join(BASE_PACKAGES), ",".join(PILLAR_PACKAGES), *HOOKS, repr(sorted(CONFIG.items()))]
    )
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


def image_path() -> Path:
    return CACHE_ROOT / image_digest()


def ensure_image(progress: Progress = no_progress) -> Path:
    """The cached root for the current recipe, building it first when missing (one to two minutes).

    A lock file serialises builders (two applies, or a test run beside an operator's): the second one waits and
    then finds the image built.
    """
    root = image_path()
    if (root / "etc" / "os-release").exists():
        return root
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    with open(CACHE_ROOT / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (root / "etc" / "os-release").exists():
            return root
        _build(root, progress)
    return root


def _build(root: Path, progress: Progress) -> None:
    for tool in ("mmdebstrap", "systemd-nspawn"):
        if shutil.which(tool) is None:
            raise ProviderError(f"{tool} is not installed (apt-get install mmdebstrap systemd-container)")
    tmp = CACHE_ROOT / f".build-{image_digest()}"  # under the lock: a leftover is an interrupted build
    shutil.rmtree(tmp, ignore_errors=True)
    argv = [
        "mmdebstrap", "--variant=minbase", "--skip=cleanup/apt/lists", "--skip=cleanup/apt/cache",
        f"--include={','.join(BASE_PACKAGES)}", *(f"--customize-hook={h}" for h in HOOKS), SUITE, str(tmp),
    ]  # fmt: skip
    started = time.monotonic()
    log = CACHE_ROOT / f"build-{image_digest()}.log"
    try:
        with open(log, "wb") as out:
            subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, check=True,
                           timeout=BUILD_TIMEOUT)  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ProviderError(f"building the base image failed ({type(exc).__name__}); see {log}") from exc
    for rel, text in CONFIG.items():
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    # machined-less hosts: the machine's own /etc/resolv.conf comes from resolved, not from the host
    resolv = tmp / "etc" / "resolv.conf"
    resolv.unlink(missing_ok=True)
    resolv.symlink_to("../run/systemd/resolve/stub-resolv.conf")
    (tmp / "etc" / "machine-id").write_text("")  # every machine gets its own at first boot
    os.replace(tmp, root)
    progress(f"      base image built in {time.monotonic() - started:.0f}s: {root}")
