"""Settings of the control plane: flags > `MBWORKER_CONTROL_*` env > defaults (what a systemd unit sets)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from mbworker.control.layout import PATRONI_PORT


class ControlSettings(BaseSettings):
    """Env names are `MBWORKER_CONTROL_<FIELD>`."""

    model_config = SettingsConfigDict(env_prefix="MBWORKER_CONTROL_", extra="forbid", validate_default=True)

    host: str = Field("127.0.0.1", description="Listener address (the system node's: reached from control_allow)")
    port: int = Field(8002, ge=0, le=65535, description="Listener port (0: any free port)")
    redis_url: str = Field(description="The cluster's Redis (state pillar)")
    token_file: Path = Field(
        Path(".mbcontrol/control_token"), description="The control token (created with mode 0600 if missing)"
    )
    node_token_file: Path | None = Field(
        None, description="Read-only token for proxies and metrics: upstreams and scrape targets (created 0600)"
    )
    admin_token: SecretStr = Field(description="The workers' admin token: how the control plane reaches them")
    wheels_dir: Path = Field(
        Path(".mbcontrol/wheels"), description="The mbworker wheels held per version (what upgrades install)"
    )
    node_name: str | None = Field(
        None, description="This node's name: the control plane then lists itself (role system) among the nodes"
    )
    layout_file: Path | None = Field(
        None,
        description="The cluster's layout (the file_sd JSON the provisioner writes, /etc/mbsystem/targets.json on the"
        " system node): every node in it is listed, and those that send no heartbeat (state, NAT) are probed",
    )
    down_after_s: float = Field(15.0, gt=0, description="A node silent this long is shown as down")
    probe_interval_s: float = Field(5.0, gt=0, description="How often nodes without a heartbeat are probed")
    patroni_port: int = Field(
        PATRONI_PORT, ge=1, le=65535, description="Patroni's REST API on state nodes (health probe)"
    )
    session_lifetime_s: float = Field(
        3600.0, gt=0, description="Longest access-token lifetime: a revoked session stays denied this long"
    )
    audit_size: int = Field(1000, ge=1, description="Mutating calls kept in the audit ring")
    max_bundle_mb: int = Field(20, ge=1, description="Largest accepted function bundle (compressed)")
    deploy_timeout_s: float = Field(120.0, gt=0, description="How long a deploy may take on the workers")
