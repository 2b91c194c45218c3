"""MachinesProvider: the Hetzner planner and renderer, with every server booted as a systemd-nspawn machine here.

Facts come from `<state dir>/machines/state.json` (what this provider created: network, firewalls, servers with
their addresses and nspawn PIDs) checked against the processes that are alive, so `plan` is `plan_cluster` on
those facts and a re-apply of an unchanged spec finds nothing to do. Each server is booted from the cached base
image (machines_image) with its own overlay upper directory and a NoCloud seed holding the exact user-data the
Hetzner provider sends (`render.user_data` with the same NodeContext), meta-data and a version 2 network-config:
`eth0` on the public bridge for public-zone nodes (the name the NAT template masquerades on), `ens10` on the
private bridge for all. The bridges live in the cluster's namespace (machines_net).

The provider owns the nspawn processes it starts: PID and kernel start time are recorded per server, so `status`
and `destroy` work from a new process; machines started by this process are reaped by it. nspawn runs with
`--register=no --keep-unit` (no machined on hosts where systemd is not PID 1).
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from . import desired as d
from .errors import DrainError, ProviderError, SpecError, StepFailed
from .facts import (
    Facts,
    FirewallFact,
    FloatingIpFact,
    NetworkFact,
    PlacementGroupFact,
    Rule,
    ServerFact,
    SshKeyFact,
    ssh_fingerprint,
)
from .machines_image import ensure_image
from .machines_net import PRIV_BRIDGE, PUB_BRIDGE, MachinesNet, NetPlan, free_slot, run
from .nodeops import STATE_HEALTH_SCRIPT, ControlDrainOps, NodeOps, NodeRef, poll_until, tcp_refused
from .plan import (
    AddRoute,
    AddSubnet,
    AssignFloatingIp,
    AttachFixedIp,
    AwaitHealthy,
    ChangeServerType,
    CreateFirewall,
    CreateFloatingIp,
    CreateLoadBalancer,
    CreateNetwork,
    CreatePlacementGroup,
    CreateServer,
    CreateSshKey,
    DeleteFirewall,
    DeleteFloatingIp,
    DeleteLoadBalancer,
    DeleteNetwork,
    DeletePlacementGroup,
    DeleteRoute,
    DeleteServer,
    DeleteSshKey,
    DrainServer,
    FixLoadBalancer,
    Plan,
    PowerOn,
    PowerOnServer,
    PublishWheels,
    RefreshNode,
    SetFirewallRules,
    SetFirewallSelector,
    Step,
)
from .planner import plan_cluster, plan_destroy
from .provider import ApplyOptions, ApplyReport, Progress, no_progress
from .render import NodeAddr, NodeContext, scrape_targets, user_data
from .secrets import ClusterSecrets
from .shipment import Shipment
from .spec import ClusterSpec
from .wheels import Wheelhouse

STOP_GRACE = 30.0  # a clean shutdown of a booted Debian takes a few seconds
LINK_TIMEOUT = 20.0  # nspawn creates the machine's veths right after it starts
PRIVATE_IF = "ens10"
IMAGE = "debian-12"  # what machines_image builds
PUBLIC_IF = "eth0"

#: nspawn processes started by this Python process, by PID, so whichever provider instance stops them reaps them.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def _start_time(pid: int) -> str | None:
    """The process's start time (field 22 of /proc/PID/stat), or None when it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] == "Z" else fields[19]


class MachinesProvider:
    name = "machines"

    def __init__(
        self,
        spec: ClusterSpec,
        secrets: ClusterSecrets,
        state_dir: Path,
        *,
        node_ops: NodeOps | None = None,
        wheelhouse: Wheelhouse | None = None,
    ) -> None:
        self.spec = spec
        self._secrets = secrets
        self.dir = state_dir / "machines"
        #: The proxies' certificates come from the cluster CA (tls = "local-ca": clients trust <state dir>/ca.pem).
        self._shipment = Shipment(spec, state_dir, wheelhouse_override=wheelhouse)
        self._node_ops = node_ops or ControlDrainOps(
            MachinesNodeOps(self, secrets.admin_token.get_secret_value()), state_dir
        )

    # --- state ----------------------------------------------------------------------------------------------------

    def _state_path(self) -> Path:
        return self.dir / "state.json"

    def load(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self._state_path().read_text())
        except FileNotFoundError:
            data = {}
        except (OSError, ValueError) as exc:
            raise ProviderError(f"cannot read {self._state_path()}: {exc}") from exc
        for key in ("servers", "firewalls", "placement_groups", "ssh_keys", "floating_ips"):
            data.setdefault(key, {})
        data.setdefault("next_id", 1)
        return data

    def _save(self, state: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self._state_path().with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
        os.replace(tmp, self._state_path())

    @staticmethod
    def _new_id(state: dict[str, Any]) -> int:
        n: int = state["next_id"]
        state["next_id"] = n + 1
        return n

    def net(self, state: dict[str, Any] | None = None) -> MachinesNet | None:
        state = state if state is not None else self.load()
        network = state.get("network")
        if network is None:
            return None
        return MachinesNet(NetPlan(self.spec.name, network["slot"], ipaddress.IPv4Network(network["ip_range"])))

    # --- facts ----------------------------------------------------------------------------------------------------

    def read_facts(self) -> Facts:
        state = self.load()
        net = state.get("network")
        net_fact = (
            NetworkFact(
                id=net["id"],
                name=net["name"],
                ip_range=net["ip_range"],
                subnets=tuple(net["subnets"]),
                routes=tuple((r[0], r[1]) for r in net["routes"]),
                labels=net["labels"],
            )
            if net is not None
            else None
        )
        return Facts(
            network=net_fact,
            servers=tuple(self._server_fact(s) for s in state["servers"].values()),
            firewalls=tuple(
                FirewallFact(f["id"], name, tuple(_rule(r) for r in f["rules"]), (f["selector"],), f["labels"])
                for name, f in state["firewalls"].items()
            ),
            ssh_keys=tuple(
                SshKeyFact(k["id"], name, k["fingerprint"], k["labels"]) for name, k in state["ssh_keys"].items()
            ),
            placement_groups=tuple(
                PlacementGroupFact(p["id"], name, p["labels"]) for name, p in state["placement_groups"].items()
            ),
            floating_ips=tuple(
                FloatingIpFact(f["id"], name, f["ip"], f["server_id"], f["labels"])
                for name, f in state["floating_ips"].items()
            ),
        )

    def _server_fact(self, s: dict[str, Any]) -> ServerFact:
        return ServerFact(
            id=s["id"],
            name=s["name"],
            server_type=s["type"],
            status="running" if self._alive(s) else "off",
            labels=s["labels"],
            ipv4=s["public_ip"],
            private_ip=s["private_ip"],
            alias_ips=tuple(s["alias_ips"]),
            network_ids=(1,),
            placement_group_id=s.get("placement_group_id"),
        )

    @staticmethod
    def _alive(s: dict[str, Any]) -> bool:
        pid = s.get("pid")
        return pid is not None and _start_time(pid) == s.get("start")

    # --- plans ---------------------------------------------------------------------------------------------------

    def _validate(self) -> None:
        problems = []
        if self.spec.image != IMAGE:
            problems.append(f"image: the machines provider boots {IMAGE} only, the spec asks for {self.spec.image!r}")
        if self.spec.load_balancer is not None:
            problems.append("load_balancer: the machines provider does not emulate one (remove [load_balancer])")
        if problems:
            raise SpecError("invalid cluster spec for the machines provider:\n  " + "\n  ".join(problems))

    def plan(self, *, drain: bool = True) -> Plan:
        self._validate()
        p = plan_cluster(self.spec, self.read_facts(), drain=drain, secrets_digest=self._secrets.digest())
        return Plan(p.cluster, self.name, p.steps)

    def destroy_plan(self) -> Plan:
        p = plan_destroy(self.spec, self.read_facts())
        steps = p.steps
        state = self.load()
        if state.get("network") is None and state.get("slot") is not None:
            # a namespace left by a run interrupted before the network was recorded: still ours to remove
            steps = (*steps, Step("delete", "network", d.network_name(self.spec), "leftovers", DeleteNetwork(0)))
        return Plan(p.cluster, self.name, steps)

    # --- apply -----------------------------------------------------------------------------------------------------

    def apply(self, plan: Plan, options: ApplyOptions, progress: Progress = no_progress) -> ApplyReport:
        report = ApplyReport()
        kept: set[str] = set()
        changes = plan.changes
        if changes and all(s.action == "delete" for s in changes):
            # a destroy: every machine starts its shutdown now, so they go down side by side, not one by one
            servers = self.load()["servers"]
            for step in changes:
                if isinstance(step.op, DeleteServer) and (s := servers.get(step.op.name)) and self._alive(s):
                    _signal(s["pid"], signal.SIGTERM)
        for i, step in enumerate(changes, 1):
            label = f"{step.action} {step.kind} {step.name}"
            progress(f"[{i}/{len(changes)}] {label}{f' ({step.detail})' if step.detail else ''}")
            started = time.monotonic()
            try:
                self._execute(step, options, report, kept, progress)
            except (ProviderError, OSError) as exc:
                raise StepFailed(label, str(exc)) from exc
            progress(f"      done in {time.monotonic() - started:.1f}s")
            report.done.append(label)
        system = self.load()["servers"].get(d.server_name(self.spec.name, "system", 0))
        self._shipment.record_control(system["public_ip"] if system else None)
        return report

    def _execute(
        self, step: Step, options: ApplyOptions, report: ApplyReport, kept: set[str], progress: Progress
    ) -> None:
        op = step.op
        state = self.load()
        match op:
            case CreateSshKey():
                state["ssh_keys"][op.name] = {
                    "id": self._new_id(state), "fingerprint": ssh_fingerprint(op.public_key),
                    "public_key": op.public_key, "labels": op.labels,
                }  # fmt: skip
            case DeleteSshKey():
                state["ssh_keys"] = {k: v for k, v in state["ssh_keys"].items() if v["id"] != op.id}
            case CreateNetwork():
                slot = state.get("slot")
                if slot is None:
                    slot = state["slot"] = free_slot()
                    self._save(state)  # before anything exists on the host: destroy finds it after a crash
                net = MachinesNet(NetPlan(self.spec.name, slot, ipaddress.IPv4Network(op.ip_range)))
                net.up()
                state["network"] = {
                    "id": self._new_id(state), "name": op.name, "ip_range": op.ip_range, "subnets": [op.subnet],
                    "routes": [], "labels": op.labels, "slot": slot,
                }  # fmt: skip
                self._save(state)
                self._sync_firewall(state)
            case AddSubnet():
                state["network"]["subnets"].append(op.subnet)
            case AddRoute():
                self._require_net(state).set_nat_route(op.gateway)
                state["network"]["routes"] = [[op.destination, op.gateway]]
            case DeleteRoute():
                self._require_net(state).set_nat_route(None)
                state["network"]["routes"] = []
            case DeleteNetwork():
                for s in list(state["servers"].values()):
                    self._stop(s)  # a network with machines on it is not deleted by Hetzner either; be thorough
                    state["servers"].pop(s["name"])
                slot = state.get("slot")
                if slot is not None:
                    ip_range = state["network"]["ip_range"] if state.get("network") else str(self.spec.network)
                    MachinesNet(NetPlan(self.spec.name, slot, ipaddress.IPv4Network(ip_range))).down()
                state.pop("network", None)
                state.pop("slot", None)
            case CreateFirewall():
                state["firewalls"][op.name] = {
                    "id": self._new_id(state), "rules": [_rule_json(r) for r in op.rules], "selector": op.selector,
                    "labels": op.labels,
                }  # fmt: skip
                self._sync_firewall(state)
            case SetFirewallRules():
                fw = _by_id(state["firewalls"], op.id)
                fw["rules"] = [_rule_json(r) for r in op.rules]
                self._sync_firewall(state)
            case SetFirewallSelector():
                fw = _by_id(state["firewalls"], op.id)
                if op.selector:
                    fw["selector"] = op.selector
                self._sync_firewall(state)
            case DeleteFirewall():
                state["firewalls"] = {k: v for k, v in state["firewalls"].items() if v["id"] != op.id}
                self._sync_firewall(state)
            case CreatePlacementGroup():
                state["placement_groups"][op.name] = {"id": self._new_id(state), "labels": op.labels}
            case DeletePlacementGroup():
                state["placement_groups"] = {k: v for k, v in state["placement_groups"].items() if v["id"] != op.id}
            case CreateServer():
                self._create_server(op, state, progress)
            case AttachFixedIp():
                s = state["servers"][op.server_name]
                if op.alias:
                    # like Hetzner: the network routes the alias to the server; the OS config is the template's
                    if op.ip not in s["alias_ips"]:
                        s["alias_ips"].append(op.ip)
                elif s["private_ip"] != op.ip:
                    raise ProviderError(f"{op.server_name} booted with {s['private_ip']}, not {op.ip}")
            case ChangeServerType():
                s = _by_id(state["servers"], op.server_id)
                progress("      shutdown")
                self._stop(s)
                s["type"] = op.server_type
                progress("      power on")
                self._boot(s, state)
            case PowerOn():
                self._boot(_by_id(state["servers"], op.server_id), state)
            case PowerOnServer():
                self._boot(state["servers"][op.server_name], state)  # booted at create already: no-op then
            case PublishWheels():
                wheels = self._shipment.wheels()
                progress(f"      {len(wheels.wheels)} wheels, mbworker {wheels.version}")
                self._node_ops.publish_wheels(
                    self._ref(state["servers"][op.system_name]), wheels.directory, timeout=600.0
                )
            case DrainServer():
                self._drain(op.name, state, options, report, kept, progress)
            case AwaitHealthy():
                node = self._ref(state["servers"][op.server_name])
                self._node_ops.wait_healthy(node, timeout=options.health_timeout)
            case RefreshNode():
                self._refresh(op, state, kept)
            case DeleteServer():
                if op.name in kept:
                    progress(f"      left in place: {op.name} was not drained (use --force to delete anyway)")
                    return
                s = state["servers"][op.name]
                self._stop(s)
                shutil.rmtree(self.dir / op.name, ignore_errors=True)
                del state["servers"][op.name]
                self._sync_firewall(state)
            case CreateFloatingIp():
                state["floating_ips"][op.name] = {
                    "id": self._new_id(state), "ip": self._free_public(state, floating=True), "server_id": None,
                    "labels": op.labels,
                }  # fmt: skip
            case AssignFloatingIp():
                if op.name not in state["floating_ips"]:
                    raise ProviderError(f"floating IP {op.name} does not exist")
                self._assign_fip(state, state["floating_ips"][op.name], op.server_name)
            case DeleteFloatingIp():
                fip = _by_id(state["floating_ips"], op.id)
                if (fip_net := self.net(state)) is not None:
                    run(fip_net.plan.in_ns("ip", "route", "del", f"{fip['ip']}/32"), check=False)
                state["floating_ips"] = {k: v for k, v in state["floating_ips"].items() if v["id"] != op.id}
            case CreateLoadBalancer() | FixLoadBalancer() | DeleteLoadBalancer():
                raise ProviderError("the machines provider does not emulate a load balancer")
            case _:
                raise ProviderError(f"no executor for {type(op).__name__}")
        self._save(state)

    def _require_net(self, state: dict[str, Any]) -> MachinesNet:
        net = self.net(state)
        if net is None:
            raise ProviderError("the cluster network does not exist")
        return net

    # --- servers ------------------------------------------------------------------------------------------------

    def _free_private(self, state: dict[str, Any]) -> str:
        """Hetzner's allocator: the lowest free address of the subnet (from .2; .1 is the subnet's gateway)."""
        taken = {s["private_ip"] for s in state["servers"].values()}
        taken |= {ip for s in state["servers"].values() for ip in s["alias_ips"]}
        # fixed addresses of servers the spec wants are attached later in Hetzner; the allocator would then
        # refuse them, so they are not handed out here either
        taken |= {s.fixed_ip for s in d.desired_servers(self.spec) if s.fixed_ip is not None}
        subnet = self.spec.subnet_cidr
        for host in list(subnet.hosts())[1:]:
            if str(host) not in taken:
                return str(host)
        raise ProviderError(f"subnet {subnet} is full")

    def _free_public(self, state: dict[str, Any], *, floating: bool = False) -> str:
        net = self._require_net(state)
        taken = {s["public_ip"] for s in state["servers"].values()} | {f["ip"] for f in state["floating_ips"].values()}
        hosts = list(net.plan.public_net.hosts())[1:]  # .1 is the namespace: the public gateway
        for host in reversed(hosts) if floating else hosts:
            if str(host) not in taken:
                return str(host)
        raise ProviderError(f"{net.plan.public_net} is full")

    def _node_context(self, state: dict[str, Any], want: d.DesiredServer, public_ip: str | None) -> NodeContext:
        """What Hetzner's executor passes to user_data: the wanted servers that exist, with their addresses."""
        wanted = {s.name for s in d.desired_servers(self.spec)}
        live = [s for s in state["servers"].values() if s["name"] in wanted and s["private_ip"]]
        addrs = [NodeAddr(s["name"], s["role"], _addr(s)) for s in live]
        fip = state["floating_ips"].get(d.floating_ip_name(self.spec))
        return self._shipment.node_context(
            want,
            workers=tuple(a for a in addrs if a.role == "worker"),
            nodes=tuple(addrs),
            public_ip=public_ip,
            floating_ip=fip["ip"] if fip else "",
        )

    def _create_server(self, op: CreateServer, state: dict[str, Any], progress: Progress) -> None:
        want = op.server
        net = self._require_net(state)
        public_ip = self._free_public(state) if want.public else None
        ud = user_data(self.spec, want, self._secrets, self._node_context(state, want, public_ip))
        # every server's private address is chosen by the planner (Hetzner: attach_to_network with ip=)
        private = want.fixed_ip
        server: dict[str, Any] = {
            "id": self._new_id(state), "name": want.name, "role": want.role, "index": want.index,
            "type": want.server_type, "labels": op.labels, "private_ip": private,
            "public_ip": public_ip, "alias_ips": [],
            "placement_group_id": state["placement_groups"].get(want.placement_group or "", {}).get("id"),
            "pid": None, "start": None,
        }  # fmt: skip
        mdir = self.dir / want.name
        shutil.rmtree(mdir, ignore_errors=True)
        seed = mdir / "upper" / "var" / "lib" / "cloud" / "seed" / "nocloud"
        seed.mkdir(parents=True, mode=0o700)
        _write_private(seed / "user-data", ud)
        keys = [k["public_key"] for k in state["ssh_keys"].values()]
        meta = {"instance-id": f"{want.name}-{server['id']}", "local-hostname": want.name, "public-keys": keys}
        _write_private(seed / "meta-data", json.dumps(meta, indent=2) + "\n")
        _write_private(seed / "network-config", json.dumps(self._network_config(server, net), indent=2) + "\n")
        state["servers"][want.name] = server
        self._save(state)  # recorded before it boots: a crash half-way leaves something destroy can find
        image = ensure_image(progress)
        self._boot(server, state, image)
        self._sync_firewall(state)

    def _network_config(self, server: dict[str, Any], net: MachinesNet) -> dict[str, Any]:
        """Version 2, as Hetzner's DHCP would configure it: public /24 + default route, private in the network."""
        prefix = self.spec.network.prefixlen
        eths: dict[str, Any] = {
            PRIVATE_IF: {"match": {"name": PRIVATE_IF}, "addresses": [f"{server['private_ip']}/{prefix}"]}
        }
        if server["public_ip"]:
            eths[PUBLIC_IF] = {
                "match": {"name": PUBLIC_IF},
                "addresses": [f"{server['public_ip']}/{net.plan.public_net.prefixlen}"],
                "routes": [{"to": "0.0.0.0/0", "via": net.plan.public_gateway}],
                "nameservers": {"addresses": [str(r) for r in self.spec.resolvers]},
            }
        return {"version": 2, "ethernets": eths}

    def _links(self, server: dict[str, Any]) -> list[tuple[str, str, str]]:
        """(name on the namespace side, name in the machine, bridge) of each of the machine's interfaces."""
        n = server["id"]
        links = [(f"mb{n}p", PRIVATE_IF, PRIV_BRIDGE)]
        if server["public_ip"]:
            links.append((f"mb{n}e", PUBLIC_IF, PUB_BRIDGE))
        return links

    def _boot(self, server: dict[str, Any], state: dict[str, Any], image: Path | None = None) -> None:
        if self._alive(server):
            return
        image = image or ensure_image()
        net = self._require_net(state)
        mdir = self.dir / server["name"]
        upper = mdir / "upper"
        upper.mkdir(parents=True, exist_ok=True)
        argv = [
            *net.plan.in_ns("systemd-nspawn"), "--quiet", "--boot", "--register=no", "--keep-unit",
            f"--machine={server['name']}", f"--directory={image}", f"--overlay={image}:{upper}:/",
            "--private-network", *(f"--network-veth-extra={h}:{c}" for h, c, _ in self._links(server)),
            "--resolv-conf=off", "--timezone=off", "--link-journal=no", "--console=read-only",
        ]  # fmt: skip
        with open(mdir / "console.log", "ab") as out:
            try:
                proc = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                )
            except OSError as exc:
                raise ProviderError(f"cannot start systemd-nspawn: {exc.strerror}") from exc
        _CHILDREN[proc.pid] = proc
        server["pid"], server["start"] = proc.pid, _start_time(proc.pid)
        server["booted_at"] = time.time()
        self._save(state)
        try:
            for host_side, _, bridge in self._links(server):
                self._attach(net, proc, host_side, bridge)
            self._wait_leader(server, proc)
        except ProviderError:
            self._stop(server)
            raise

    def _wait_leader(self, server: dict[str, Any], proc: subprocess.Popen[bytes]) -> None:
        """Until the machine's systemd runs: from then on exec() and nsenter reach the machine itself."""
        deadline = time.monotonic() + LINK_TIMEOUT
        while self.leader(server) is None:
            if proc.poll() is not None:
                raise ProviderError(f"systemd-nspawn exited with status {proc.returncode} while booting")
            if time.monotonic() > deadline:
                raise ProviderError(f"{server['name']}: no systemd within {LINK_TIMEOUT:.0f}s of the start")
            time.sleep(0.1)

    def _attach(self, net: MachinesNet, proc: subprocess.Popen[bytes], link: str, bridge: str) -> None:
        deadline = time.monotonic() + LINK_TIMEOUT
        while run(net.plan.in_ns("ip", "link", "show", link), check=False) == "":
            if proc.poll() is not None:
                raise ProviderError(f"systemd-nspawn exited with status {proc.returncode} before creating {link}")
            if time.monotonic() > deadline:
                raise ProviderError(f"systemd-nspawn did not create {link} within {LINK_TIMEOUT:.0f}s")
            time.sleep(0.1)
        run(net.plan.in_ns("ip", "link", "set", link, "master", bridge, "up"))

    def _stop(self, server: dict[str, Any]) -> None:
        """SIGTERM to nspawn shuts the machine down cleanly; after STOP_GRACE its init and nspawn are killed."""
        pid = server.get("pid")
        if pid is not None and self._alive(server):
            leader = self.leader(server)
            _signal(pid, signal.SIGTERM)
            if not _wait_gone(pid, STOP_GRACE):
                if leader is not None:
                    _signal(leader, signal.SIGKILL)  # the machine's PID 1: its whole PID namespace goes with it
                _signal(pid, signal.SIGKILL)
                _wait_gone(pid, STOP_GRACE)
        if pid is not None and (child := _CHILDREN.pop(pid, None)) is not None:
            child.wait(timeout=STOP_GRACE)
        server["pid"] = server["start"] = None

    def stop_machine(self, name: str) -> None:
        """Shut machine `name` down cleanly (as a power-off from the console would); `start_machine` boots it again."""
        state = self.load()
        self._stop(state["servers"][name])
        self._save(state)

    def start_machine(self, name: str) -> None:
        """Boot a stopped machine again with its disk (overlay) as it was: cloud-init does not run twice."""
        state = self.load()
        self._boot(state["servers"][name], state)
        self._save(state)

    def leader(self, server: dict[str, Any] | str) -> int | None:
        """The machine's PID 1 as seen from the host (nspawn's child running systemd), or None."""
        if isinstance(server, str):
            server = self.load()["servers"].get(server, {})
        if not isinstance(server, dict) or not self._alive(server):
            return None
        pid = server["pid"]
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            return None
        for child in children:
            # right after start, nspawn's child is a helper that forks the machine's init and exits
            try:
                if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                    return int(child)
            except OSError:
                continue
        return None

    def exec(
        self, name: str, argv: list[str], *, input: str | None = None, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside machine `name` (all its namespaces), as root; the result is returned, not checked."""
        done = self.nsenter(name, argv, input=None if input is None else input.encode(), timeout=timeout)
        return subprocess.CompletedProcess(
            done.args, done.returncode, done.stdout.decode(errors="replace"), done.stderr.decode(errors="replace")
        )

    def nsenter(
        self, name: str, argv: list[str], *, input: bytes | None = None, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[bytes]:
        """`argv` run in every namespace of machine `name`'s init, as root; the result is returned, not checked.

        The init found may be gone by the time nsenter looks (seen on a loaded host, with the machine still
        running): then nsenter fails before running anything ("stat of /proc/N/ns/… failed"), so it is safe to
        look for the init again and retry, until `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            leader = self.leader(name)
            if leader is None:
                server = self.load()["servers"].get(name)
                if server is None or not self._alive(server) or time.monotonic() > deadline:
                    raise ProviderError(f"machine {name} is not running{self._console_tail(name)}")
                time.sleep(0.2)  # systemd-nspawn runs but its init is not (yet, again) there: look again
                continue
            try:
                done = subprocess.run(
                    ["nsenter", "-t", str(leader), "-a", *argv], input=input, capture_output=True,
                    timeout=max(1.0, deadline - time.monotonic()),
                )  # fmt: skip
            except subprocess.TimeoutExpired as exc:
                raise ProviderError(f"{' '.join(argv)} in {name} did not finish within {timeout:.0f}s") from exc
            vanished = (
                done.returncode != 0 and done.stderr.startswith(b"nsenter: ") and not Path(f"/proc/{leader}").exists()
            )
            if not vanished or time.monotonic() > deadline:
                return done
            time.sleep(0.2)  # the machine's init is being replaced: look again

    def _console_tail(self, name: str, lines: int = 15) -> str:
        """The end of the machine's console, for an error that says it is not running (empty when there is none)."""
        try:
            tail = (self.dir / name / "console.log").read_bytes()[-4000:].decode(errors="replace").splitlines()
        except OSError:
            return ""
        return ("; its console ends:\n  " + "\n  ".join(tail[-lines:])) if tail else ""

    def wait_booted(self, name: str, timeout: float) -> str:
        """Block until machine `name` has finished booting (cloud-final included); its state, e.g. `degraded`.

        `systemctl is-system-running --wait` waits for the boot's end, but only once the machine's systemd is up:
        asked earlier, it answers at once (offline, unknown), so it is asked again until the deadline.
        """
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ProviderError(f"machine {name} did not finish booting within {timeout:.0f}s")
            state = self.exec(name, ["systemctl", "is-system-running", "--wait"], timeout=left).stdout.strip()
            if state in ("running", "degraded", "maintenance", "stopping"):
                return state
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))

    # --- firewalls, floating IPs ------------------------------------------------------------------------------

    def _sync_firewall(self, state: dict[str, Any]) -> None:
        net = self.net(state)
        if net is None:
            return
        public: dict[str, tuple[Rule, ...]] = {}
        for s in state["servers"].values():
            if not s["public_ip"]:
                continue
            rules: list[Rule] = []
            for fw in state["firewalls"].values():
                if _selects(fw["selector"], s["labels"]):
                    rules += [_rule(r) for r in fw["rules"]]
            if any(_selects(fw["selector"], s["labels"]) for fw in state["firewalls"].values()):
                public[s["public_ip"]] = tuple(rules)
                for f in state["floating_ips"].values():
                    if f["server_id"] == s["id"]:
                        public[f["ip"]] = tuple(rules)
        net.set_firewall(public)

    def _assign_fip(self, state: dict[str, Any], fip: dict[str, Any], server_name: str) -> None:
        """Route the floating address to the server's public address, as Hetzner's network does."""
        target = state["servers"].get(server_name)
        if target is None:
            raise ProviderError(f"cannot assign floating IP {fip['ip']}: no server {server_name}")
        net = self._require_net(state)
        run(net.plan.in_ns("ip", "route", "replace", f"{fip['ip']}/32", "via", target["public_ip"], "dev", PUB_BRIDGE))
        fip["server_id"] = target["id"]
        self._sync_firewall(state)

    # --- drains and refreshes ---------------------------------------------------------------------------------

    def _ref(self, s: dict[str, Any]) -> NodeRef:
        return NodeRef(s["name"], s["role"], _addr(s), s["public_ip"])

    def _drain(
        self,
        name: str,
        state: dict[str, Any],
        options: ApplyOptions,
        report: ApplyReport,
        kept: set[str],
        progress: Progress,
    ) -> None:
        try:
            self._node_ops.drain(self._ref(state["servers"][name]), timeout=options.drain_timeout)
        except DrainError as exc:
            if options.force:
                progress(f"      drain failed ({exc}); deleting anyway (--force)")
                report.forced.append((name, str(exc)))
            else:
                progress(f"      drain failed ({exc}); leaving {name} in place")
                report.left_in_place.append((name, str(exc)))
                kept.add(name)

    def _refresh(self, op: RefreshNode, state: dict[str, Any], kept: set[str]) -> None:
        node = state["servers"][op.server_name]
        wanted = {s.name for s in d.desired_servers(self.spec)} | kept
        live = [s for s in state["servers"].values() if s["name"] in wanted]
        nodes = tuple(NodeAddr(s["name"], s["role"], _addr(s)) for s in live)
        content = scrape_targets(self.spec, nodes) + "\n"
        labels = node["labels"] | {"targets-rev": d.targets_revision([n.name for n in nodes])}
        self._node_ops.refresh(self._ref(node), op.kind, content)
        node["labels"] = labels

    # --- status -----------------------------------------------------------------------------------------------

    def leftovers(self) -> list[str]:
        """What of this cluster is still on the host: machines alive, namespace, links, routes, nft tables."""
        state = self.load()
        out = [f"machine {s['name']}" for s in state["servers"].values() if self._alive(s)]
        net = self.net(state)
        if net is not None:
            out += net.leftovers()
        return out

    def close(self) -> None:
        closer = getattr(self._node_ops, "close", None)
        if callable(closer):
            closer()


class MachinesNodeOps:
    """Drain and refresh through the machines themselves: no SSH, no route from the host into the private range.

    drain: the RemoteNodeOps request, run by this Python inside the cluster's namespace (`ip netns exec`).
    refresh: the same script RemoteNodeOps runs over SSH, run inside the node with nsenter.
    """

    def __init__(self, provider: MachinesProvider, admin_token: str) -> None:
        self._provider = provider
        self._token = admin_token

    def drain(self, node: NodeRef, *, timeout: float) -> None:
        net = self._provider.net()
        if net is None or node.private_ip is None:
            raise DrainError(f"{node.name}: no network to reach it on")
        code = (
            "import os,sys\nfrom mbworker.provision.nodeops import NodeRef, RemoteNodeOps\n"
            "from mbworker.provision.errors import DrainError\n"
            "ops = RemoteNodeOps(os.environ['MBW_TOKEN'], int(sys.argv[2]))\n"
            "try:\n    ops.drain(NodeRef(sys.argv[1], 'worker', sys.argv[3], None), timeout=float(sys.argv[4]))\n"
            "except DrainError as e:\n    print(e, file=sys.stderr); sys.exit(3)\n"
        )
        argv = net.plan.in_ns(
            _python(), "-c", code, node.name, str(self._provider.spec.daemon.admin_port), node.private_ip, str(timeout)
        )
        env = dict(os.environ, MBW_TOKEN=self._token)
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 30, env=env)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise DrainError(f"{node.name}: drain failed: {type(exc).__name__}") from exc
        if done.returncode != 0:
            raise DrainError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}")

    def wait_healthy(self, node: NodeRef, *, timeout: float, via: NodeRef | None = None) -> None:
        """The RemoteNodeOps checks, run inside the machine itself (`via` is not needed: nsenter reaches it)."""
        poll_until(lambda: self._why_unhealthy(node), what=node.name, timeout=timeout)

    def _why_unhealthy(self, node: NodeRef) -> str | None:
        if node.role == "worker":
            script = (
                f"curl -fsS -o /dev/null --max-time 5 http://{node.private_ip}:{self._provider.spec.daemon.port}/ready"
            )
        elif node.role == "state":
            script = STATE_HEALTH_SCRIPT
        elif node.role == "proxy" and node.public_ip is not None:
            return tcp_refused(node.public_ip, 443)
        else:
            script = "true"
        try:
            done = self._provider.exec(node.name, ["sh", "-c", script], timeout=60)
        except ProviderError as exc:  # not running (yet)
            return str(exc)
        return None if done.returncode == 0 else (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]

    def refresh(self, node: NodeRef, kind: str, content: str) -> None:
        from .nodeops import _REFRESH_SCRIPTS

        done = self._provider.exec(node.name, ["sh", "-c", _REFRESH_SCRIPTS[kind]], input=content)  # type: ignore[index]
        if done.returncode != 0:
            raise ProviderError(f"refresh {kind} on {node.name} failed: exit {done.returncode}: {done.stderr[-300:]}")

    def publish_wheels(self, node: NodeRef, directory: Path, *, timeout: float) -> None:
        """The wheels into the system machine's /var/lib/mbwheels (the same swap RemoteNodeOps does over SSH)."""
        from .nodeops import PUBLISH_SCRIPT

        files = sorted(p.name for p in directory.glob("*.whl"))
        tar = subprocess.run(["tar", "-c", "-C", str(directory), *files], capture_output=True, check=True)
        done = self._provider.nsenter(node.name, ["sh", "-c", PUBLISH_SCRIPT], input=tar.stdout, timeout=timeout)
        if done.returncode != 0:
            raise ProviderError(
                f"publishing wheels to {node.name} failed: {done.stderr.decode(errors='replace')[-300:]}"
            )


def _python() -> str:
    import sys

    return sys.executable


def _addr(s: dict[str, Any]) -> str:
    """The address other nodes use: the fixed alias (state) or the primary private IP (as in hetzner._addr)."""
    aliases: list[str] = s["alias_ips"]
    return aliases[0] if aliases else s["private_ip"]


def _rule(r: list[Any]) -> Rule:
    return Rule(r[0], r[1], r[2], tuple(r[3]), r[4])


def _rule_json(r: Rule) -> list[Any]:
    return [r.direction, r.protocol, r.port, list(r.source_ips), r.description]


def _by_id(items: dict[str, dict[str, Any]], id_: int) -> dict[str, Any]:
    for item in items.values():
        if item["id"] == id_:
            return item
    raise ProviderError(f"no object with id {id_} in the machines state")


def _selects(selector: str, labels: dict[str, str]) -> bool:
    """Hetzner label selectors as the planner writes them: `k=v` and `k in (a,b)`, comma-joined."""
    i = 0
    terms: list[str] = []
    depth = 0
    for j, ch in enumerate(selector):
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            terms.append(selector[i:j])
            i = j + 1
    terms.append(selector[i:])
    for term in (t.strip() for t in terms):
        if " in " in term:
            key, values = term.split(" in ", 1)
            allowed = {v.strip() for v in values.strip().strip("()").split(",")}
            if labels.get(key.strip()) not in allowed:
                return False
        elif "=" in term:
            key, value = term.split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
    return True


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError as exc:
        raise ProviderError(f"cannot signal process {pid}: {exc.strerror}") from exc


def _wait_gone(pid: int, timeout: float) -> bool:
    child = _CHILDREN.get(pid)
    if child is not None:
        try:
            child.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    deadline = time.monotonic() + timeout
    while _start_time(pid) is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True
