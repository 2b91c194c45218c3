"""A worker's cloud-init carries its rolling-upgrade helper: the helper's own source (decoded from the user data),
started by mbworker.service once a daemon that left a request has exited (and before every start, to converge to
the cluster's release), a root-only node token, and the control plane's private URL."""

from __future__ import annotations

import base64
import dataclasses
import gzip
import re
from importlib import resources

import pytest

from mbworker.provision.render import RenderError

from .conftest import make_spec
from .test_render import CTX, block, docs


def test_a_worker_gets_the_upgrade_helper_its_units_and_the_node_token() -> None:
    text = docs(make_spec())["demo-worker-001"]
    packed = re.search(r"path: /usr/local/sbin/mbworker-upgrade\n.*?encoding: gz\+b64\n\s+content: (\S+)", text, re.S)
    assert packed
    source = resources.files("mbworker.provision").joinpath("upgrade_helper.py").read_text()
    assert gzip.decompress(base64.b64decode(packed[1])).decode() == source
    assert block(text, "/etc/mbworker/control-node-token") == "n" * 64 + "\n"
    assert 'path: /etc/mbworker/control-node-token\n    permissions: "0600"' in text
    unit = block(text, "/etc/systemd/system/mbworker.service")
    assert "ExecStopPost=+/bin/sh -c 'test ! -f /var/lib/mbworker/upgrade/request || systemctl start" in unit
    # before every start, as root, never failing the start: converge to the cluster's release
    assert (
        "ExecStartPre=-+/usr/bin/python3 /usr/local/sbin/mbworker-upgrade --converge "
        "--control-url http://10.0.1.3:8002 --token-file /etc/mbworker/control-node-token\n" in unit
    )
    service = block(text, "/etc/systemd/system/mbworker-upgrade.service")
    assert "--control-url http://10.0.1.3:8002 --token-file /etc/mbworker/control-node-token" in service
    assert "User=" not in service  # root: it writes /opt/mbworker, which the daemon cannot
    assert '[install, -d, -o, mbworker, -g, mbworker, -m, "0700", /var/lib/mbworker/upgrade]' in text
    with pytest.raises(RenderError, match="node token"):
        docs(make_spec(), dataclasses.replace(CTX, node_token=""))
