"""A stateful fake of the Hetzner Cloud API, served over HTTP on 127.0.0.1 for the REAL hcloud client.

Field names follow Hetzner's OpenAPI spec and the shapes hcloud 2.27 insists on (reference §1.2-1.5): every
list is paginated with `meta.pagination`; `label_selector` supports =, ==, !=, exists, !k, in, notin; errors are
`{"error": {"code", "message", "details"}}`; mutations return actions that stay `running` for `action_polls`
polls; server create returns `next_actions` (start_server, attach_to_network); firewalls attach to servers by
label selector asynchronously (recomputed on every server change) and never to private-only servers; load
balancer delete answers 204 like the spec says.

Test hooks: `requests` records every call; `mutations()` filters non-GET ones; `fail_on_mutation(n)` makes the
nth mutating request from now fail with a 500 `server_error` (a code the client does not retry).
The fake owns its thread and socket: use `with FakeHcloud() as fake:`.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast
from urllib.parse import parse_qs, urlparse

NOW = "2026-11-29T00:00:00+00:00"

LOCATIONS = {
    "fsn1": (1, "Falkenstein", "DE", "eu-central"),
    "nbg1": (2, "Nuremberg", "DE", "eu-central"),
    "hel1": (3, "Helsinki", "FI", "eu-central"),
    "ash": (4, "Ashburn, VA", "US", "us-east"),
    "hil": (5, "Hillsboro, OR", "US", "us-west"),
    "sin": (6, "Singapore", "SG", "ap-southeast"),
}
SERVER_TYPES = ["cx23", "cx33", "cx43", "cx53", "cpx12", "cpx22", "cpx32", "cpx42", "cpx52", "cpx62",
                "cax11", "cax21", "cax31", "cax41", "ccx13", "ccx23", "ccx33", "ccx43", "ccx53", "ccx63",
                "cx22"]  # fmt: skip
DEPRECATED_TYPES = {"cx22"}
SOLD_OUT = {("cx53", "nbg1")}
"""(server type, location) pairs the API lists but reports `available: false` for, as it does for a sold-out
type in one location; creating one there fails with 412 resource_unavailable."""

Reply = tuple[int, Any]
"""A route's answer: the HTTP status and the JSON body."""


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    body: Any

    @property
    def mutating(self) -> bool:
        return self.method != "GET"


def location_json(name: str) -> dict[str, Any]:
    lid, city, country, zone = LOCATIONS[name]
    return {"id": lid, "name": name, "description": f"{city} DC", "country": country, "city": city,
            "latitude": 50.0, "longitude": 12.0, "network_zone": zone}  # fmt: skip


def server_type_json(i: int, name: str) -> dict[str, Any]:
    deprecation = (
        {"announced": NOW, "unavailable_after": "2027-01-01T00:00:00+00:00"} if name in DEPRECATED_TYPES else None
    )
    return {
        "id": i, "name": name, "description": name.upper(), "category": "shared", "cores": 2, "memory": 4.0,
        "disk": 40, "prices": [], "storage_type": "local", "cpu_type": "shared",
        "architecture": "arm" if name.startswith("cax") else "x86", "deprecated": name in DEPRECATED_TYPES,
        "deprecation": deprecation,
        "locations": [{"id": v[0], "name": k, "deprecation": deprecation, "available": (name, k) not in SOLD_OUT,
                       "recommended": True}
                      for k, v in LOCATIONS.items()
                      if not (name.startswith(("cx", "cax")) and v[3] != "eu-central")],
    }  # fmt: skip


def _split_terms(selector: str) -> list[str]:
    terms, depth, cur = [], 0, ""
    for ch in selector:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            terms.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        terms.append(cur.strip())
    return terms


def match_selector(selector: str, labels: dict[str, str]) -> bool:
    """Hetzner label selector semantics (comma = AND; commas inside () belong to the set)."""
    for term in _split_terms(selector):
        m = re.fullmatch(r"([\w./-]+)\s+(in|notin)\s+\((.*)\)", term)
        if m:
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",")}
            ok = (labels.get(key) in values) if op == "in" else (key not in labels or labels[key] not in values)
        elif "!=" in term:
            key, value = (x.strip() for x in term.split("!=", 1))
            ok = labels.get(key) != value
        elif "==" in term or "=" in term:
            key, value = (x.strip() for x in re.split("==?", term, maxsplit=1))
            ok = labels.get(key) == value
        elif term.startswith("!"):
            ok = term[1:].strip() not in labels
        else:
            ok = term in labels
        if not ok:
            return False
    return True


class FakeHcloud:
    def __init__(self, *, action_polls: int = 1) -> None:
        self.action_polls = action_polls
        self.lock = threading.RLock()
        self.requests: list[Request] = []
        self._ids = itertools.count(100)
        self._ips = itertools.count(1)
        self.resources: dict[str, dict[int, dict[str, Any]]] = {
            k: {} for k in ("servers", "networks", "firewalls", "ssh_keys", "placement_groups",
                            "load_balancers", "floating_ips")
        }  # fmt: skip
        self.actions: dict[int, dict[str, Any]] = {}
        self._action_polls_left: dict[int, int] = {}
        self._fail_at: int | None = None
        self._fail_code = ("server_error", 500)
        self._mutations_seen = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    # --- lifecycle and test hooks --------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> FakeHcloud:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def mutations(self) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if r.mutating]

    def clear_log(self) -> None:
        with self.lock:
            self.requests.clear()

    def fail_on_mutation(self, n: int, code: str = "server_error", status: int = 500) -> None:
        """Make the nth mutating request from now fail (1 = the next one)."""
        with self.lock:
            self._fail_at = self._mutations_seen + n
            self._fail_code = (code, status)

    def servers(self) -> list[dict[str, Any]]:
        with self.lock:
            return [dict(s) for s in self.resources["servers"].values()]

    def server_by_name(self, name: str) -> dict[str, Any]:
        return next(s for s in self.servers() if s["name"] == name)

    # --- HTTP plumbing ----------------------------------------------------------------------------------------

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body are separate writes: avoid 40 ms delayed-ACK stalls

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _serve(self, method: str) -> None:
                url = urlparse(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                query = parse_qs(url.query)
                status, payload = fake.dispatch(method, url.path, query, body, self.headers.get("Authorization"))
                data = b"" if payload is None else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("RateLimit-Limit", "3600")
                self.send_header("RateLimit-Remaining", "3599")
                self.send_header("RateLimit-Reset", "1795000000")
                self.send_header("X-Correlation-Id", "fake-correlation")
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._serve("GET")

            def do_POST(self) -> None:
                self._serve("POST")

            def do_PUT(self) -> None:
                self._serve("PUT")

            def do_DELETE(self) -> None:
                self._serve("DELETE")

        return Handler

    def dispatch(
        self, method: str, path: str, query: dict[str, list[str]], body: Any, auth: str | None
    ) -> tuple[int, Any]:
        with self.lock:
            req = Request(method, path.removeprefix("/v1"), query, body)
            self.requests.append(req)
            try:
                if auth != "Bearer test-token":
                    raise ApiError(401, "unauthorized", "unable to authenticate")
                if req.mutating:
                    self._mutations_seen += 1
                    if self._fail_at is not None and self._mutations_seen == self._fail_at:
                        self._fail_at = None
                        raise ApiError(self._fail_code[1], self._fail_code[0], "injected failure")
                return self._route(req)
            except ApiError as e:
                return e.status, {"error": {"code": e.code, "message": e.message, "details": e.details}}

    def _route(self, req: Request) -> tuple[int, Any]:
        parts = [p for p in req.path.split("/") if p]
        m, n = req.method, len(parts)
        if parts[0] == "actions" and n == 2 and m == "GET":
            return 200, {"action": self._poll_action(int(parts[1]))}
        if parts[0] in ("server_types", "locations", "images") and m == "GET":
            return self._static(parts[0], req)
        res = parts[0]
        if res not in self.resources:
            raise ApiError(404, "not_found", f"no such path {req.path}")
        if n == 1 and m == "GET":
            return self._list(res, req)
        if n == 1 and m == "POST":
            return cast(Reply, getattr(self, f"_create_{res}")(req.body))
        obj = self._get(res, int(parts[1]))
        if n == 2 and m == "GET":
            return 200, {_singular(res): self._view(res, obj)}
        if n == 2 and m == "PUT":
            if "name" in req.body:
                obj["name"] = req.body["name"]
            if "labels" in req.body:
                obj["labels"] = dict(req.body["labels"])  # PUT replaces the whole map
            self._refresh_firewalls()
            return 200, {_singular(res): self._view(res, obj)}
        if n == 2 and m == "DELETE":
            return cast(Reply, getattr(self, f"_delete_{res}")(obj))
        if n == 3 and parts[2] == "members" and res == "networks":
            members = [{"id": s["id"], "type": "server", "ip": pn["ip"], "alias_ips": pn["alias_ips"],
                        "subnet": None, "status": "attached"}
                       for s in self.resources["servers"].values() for pn in s["private_net"]
                       if pn["network"] == obj["id"]]  # fmt: skip
            return 200, {"members": members, "meta": _meta(1, 50, len(members))}
        if n == 4 and parts[2] == "actions" and m == "POST":
            return cast(Reply, getattr(self, f"_act_{res}_{parts[3]}")(obj, req.body or {}))
        raise ApiError(404, "not_found", f"no such path {req.path}")

    # --- generic pieces -----------------------------------------------------------------------------------------

    def _get(self, res: str, id: int) -> dict[str, Any]:
        obj = self.resources[res].get(id)
        if obj is None:
            raise ApiError(404, "not_found", f"{_singular(res)} with ID '{id}' not found")
        return obj

    def _list(self, res: str, req: Request) -> tuple[int, Any]:
        items = sorted(self.resources[res].values(), key=lambda o: o["id"])
        q = req.query
        if "name" in q:
            items = [o for o in items if o.get("name") == q["name"][0]]
        if "label_selector" in q:
            items = [o for o in items if match_selector(q["label_selector"][0], o.get("labels", {}))]
        if "fingerprint" in q:
            items = [o for o in items if o.get("fingerprint") == q["fingerprint"][0]]
        if "status" in q and res == "servers":
            items = [o for o in items if o["status"] in q["status"]]
        page, per_page = int(q.get("page", ["1"])[0]), min(int(q.get("per_page", ["25"])[0]), 50)
        chunk = items[(page - 1) * per_page : page * per_page]
        return 200, {res: [self._view(res, o) for o in chunk], "meta": _meta(page, per_page, len(items))}

    def _static(self, what: str, req: Request) -> tuple[int, Any]:
        if what == "server_types":
            items = [server_type_json(i, name) for i, name in enumerate(SERVER_TYPES, 1)]
        elif what == "locations":
            items = [location_json(name) for name in LOCATIONS]
        else:
            items = [_image_json()]
        if "name" in req.query:
            items = [i for i in items if i["name"] == req.query["name"][0]]
        return 200, {what: items, "meta": _meta(1, 50, len(items))}

    def _new_action(self, command: str, resources: list[tuple[str, int]]) -> dict[str, Any]:
        aid = next(self._ids)
        action = {"id": aid, "command": command, "status": "running", "progress": 0, "started": NOW,
                  "finished": None, "resources": [{"id": i, "type": t} for t, i in resources],
                  "error": None}  # fmt: skip
        self.actions[aid] = action
        self._action_polls_left[aid] = self.action_polls
        return dict(action)

    def _poll_action(self, aid: int) -> dict[str, Any]:
        if aid not in self.actions:
            raise ApiError(404, "not_found", f"action {aid} not found")
        left = self._action_polls_left[aid]
        if left <= 0:
            self.actions[aid].update(status="success", progress=100, finished=NOW)
        self._action_polls_left[aid] = left - 1
        return dict(self.actions[aid])

    def _unique(self, res: str, name: str) -> None:
        if any(o.get("name") == name for o in self.resources[res].values()):
            raise ApiError(409, "uniqueness_error", "name is already used",
                           {"fields": [{"name": "name", "messages": ["is already used"]}]})  # fmt: skip

    def _view(self, res: str, obj: dict[str, Any]) -> dict[str, Any]:
        copy: dict[str, Any] = json.loads(json.dumps(obj))
        return copy

    # --- ssh keys -------------------------------------------------------------------------------------------------

    def _create_ssh_keys(self, body: dict[str, Any]) -> tuple[int, Any]:
        import base64
        import hashlib

        self._unique("ssh_keys", body["name"])
        try:
            blob = base64.b64decode(body["public_key"].split()[1])
        except Exception as exc:
            raise ApiError(400, "invalid_input", "invalid public key") from exc
        digest = hashlib.md5(blob, usedforsecurity=False).hexdigest()
        fp = ":".join(digest[i : i + 2] for i in range(0, 32, 2))
        if any(k["fingerprint"] == fp for k in self.resources["ssh_keys"].values()):
            raise ApiError(409, "uniqueness_error", "SSH key with the same fingerprint already exists")
        key = {"id": next(self._ids), "name": body["name"], "fingerprint": fp, "public_key": body["public_key"],
               "labels": body.get("labels") or {}, "created": NOW}  # fmt: skip
        self.resources["ssh_keys"][key["id"]] = key
        return 201, {"ssh_key": self._view("ssh_keys", key)}

    def _delete_ssh_keys(self, obj: dict[str, Any]) -> tuple[int, Any]:
        del self.resources["ssh_keys"][obj["id"]]
        return 204, None

    # --- networks ---------------------------------------------------------------------------------------------------

    def _create_networks(self, body: dict[str, Any]) -> tuple[int, Any]:
        self._unique("networks", body["name"])
        ip_range = ipaddress.ip_network(body["ip_range"])
        net = {"id": next(self._ids), "name": body["name"], "ip_range": body["ip_range"], "subnets": [],
               "routes": [], "servers": [], "load_balancers": [], "protection": {"delete": False},
               "labels": body.get("labels") or {}, "created": NOW, "expose_routes_to_vswitch": False}  # fmt: skip
        for sub in body.get("subnets") or []:
            self._add_subnet(net, ip_range, sub)
        self.resources["networks"][net["id"]] = net
        return 201, {"network": self._view("networks", net)}

    def _add_subnet(self, net: dict[str, Any], ip_range: Any, sub: dict[str, Any]) -> None:
        cidr = ipaddress.ip_network(sub["ip_range"])
        if not cidr.subnet_of(ip_range):
            raise ApiError(400, "invalid_input", "subnet not in network ip_range")
        if any(cidr.overlaps(ipaddress.ip_network(s["ip_range"])) for s in net["subnets"]):
            raise ApiError(409, "networks_overlap", "subnets overlap")
        net["subnets"].append({"type": sub["type"], "ip_range": sub["ip_range"], "network_zone": sub["network_zone"],
                               "gateway": str(ip_range.network_address + 1), "vswitch_id": None})  # fmt: skip

    def _act_networks_add_subnet(self, net: dict[str, Any], body: dict[str, Any]) -> tuple[int, Any]:
        self._add_subnet(net, ipaddress.ip_network(net["ip_range"]), body)
        return 201, {"action": self._new_action("add_subnet", [("network", net["id"])])}

    def _act_networks_add_route(self, net: dict[str, Any], body: dict[str, Any]) -> tuple[int, Any]:
        gw = ipaddress.ip_address(body["gateway"])
        if gw not in ipaddress.ip_network(net["ip_range"]):
            raise ApiError(400, "invalid_input", "gateway not in network")
        if any(r["destination"] == body["destination"] for r in net["routes"]):
            raise ApiError(409, "uniqueness_error", "route already exists")
        net["routes"].append({"destination": body["destination"], "gateway": body["gateway"]})
        return 201, {"action": self._new_action("add_route", [("network", net["id"])])}

    def _act_networks_delete_route(self, net: dict[str, Any], body: dict[str, Any]) -> tuple[int, Any]:
        net["routes"] = [
            r for r in net["routes"] if r != {"destination": body["destination"], "gateway": body["gateway"]}
        ]
        return 201, {"action": self._new_action("delete_route", [("network", net["id"])])}

    def _delete_networks(self, obj: dict[str, Any]) -> tuple[int, Any]:
        if any(pn["network"] == obj["id"] for s in self.resources["servers"].values() for pn in s["private_net"]):
            raise ApiError(409, "resource_in_use", "network has attached servers")
        del self.resources["networks"][obj["id"]]
        return 204, None

    # --- firewalls --------------------------------------------------------------------------------------------------

    def _create_firewalls(self, body: dict[str, Any]) -> tuple[int, Any]:
        self._unique("firewalls", body["name"])
        fw = {"id": next(self._ids), "name": body["name"], "labels": body.get("labels") or {}, "created": NOW,
              "rules": [self._rule(r) for r in body.get("rules") or []], "applied_to": []}  # fmt: skip
        self.resources["firewalls"][fw["id"]] = fw
        for a in body.get("apply_to") or []:
            fw["applied_to"].append(self._apply_entry(a))
        self._refresh_firewalls()
        actions = [self._new_action("apply_firewall", [("firewall", fw["id"])])] if fw["applied_to"] else []
        return 201, {"firewall": self._view("firewalls", fw), "actions": actions}

    @staticmethod
    def _rule(r: dict[str, Any]) -> dict[str, Any]:
        if r["direction"] == "in" and not r.get("source_ips"):
            raise ApiError(400, "invalid_input", "inbound rule needs source_ips")
        if r["protocol"] in ("tcp", "udp") and not r.get("port"):
            raise ApiError(400, "invalid_input", "tcp/udp rule needs a port")
        # every key present, as the client requires
        return {"direction": r["direction"], "protocol": r["protocol"], "port": r.get("port"),
                "source_ips": r.get("source_ips") or [], "destination_ips": r.get("destination_ips") or [],
                "description": r.get("description")}  # fmt: skip

    @staticmethod
    def _apply_entry(a: dict[str, Any]) -> dict[str, Any]:
        if a["type"] == "label_selector":
            return {"type": "label_selector", "label_selector": {"selector": a["label_selector"]["selector"]},
                    "applied_to_resources": []}  # fmt: skip
        return {"type": "server", "server": {"id": a["server"]["id"]}}

    def _refresh_firewalls(self) -> None:
        """Label-selector attachments follow server labels; private-only servers never get a Cloud Firewall."""
        servers = self.resources["servers"].values()
        for fw in self.resources["firewalls"].values():
            for entry in fw["applied_to"]:
                if entry["type"] == "label_selector":
                    entry["applied_to_resources"] = [
                        {"type": "server", "server": {"id": s["id"]}}
                        for s in servers
                        if match_selector(entry["label_selector"]["selector"], s["labels"])
                        and (s["public_net"]["ipv4"] or s["public_net"]["ipv6"])
                    ]
        for s in servers:
            s["public_net"]["firewalls"] = [
                {"id": fw["id"], "status": "applied"}
                for fw in self.resources["firewalls"].values()
                if any(r["server"]["id"] == s["id"] for e in fw["applied_to"]
                       for r in e.get("applied_to_resources", []) + ([e] if e["type"] == "server" else []))
            ]  # fmt: skip

    def _act_firewalls_set_rules(self, fw: dict[str, Any], body: dict[str, Any]) -> tuple[int, Any]:
        fw["rules"] = [self._rule(r) for r in body["rules"]]
        return 201, {"actions": [self._new_action("set_firewall_rules", [("firewall", fw["id"])])]}

    def _act_firewalls_apply_to_resources(self, fw: dict[str, Any], body: dict[str, Any]) -> tuple[int, Any]:
        for a in body["apply_to"]:
            entry = self._apply_entry(a)
            if any(e.get("label_selector") == entry.get("label_selector") and e["type"] == entry["type"]
                   for e in fw["applied_to"]):  # fmt: skip
                raise ApiError(409, "firewall_already_applied", "already applied")
            fw["applied_to"].append(entry)
        self._refresh_firewalls()
        return 201, {"actions": [self._new_action("apply_firewall", [("firewall", fw["id"])])]}

    def _act_firewalls_remove_from_resources(self, fw: dict[str, Any], body: dict[str, Any]) -> tuple[int, Any]:
        for a in body["remove_from"]:
            entry = self._apply_entry(a)
            fw["applied_to"] = [
                e for e in fw["applied_to"]
                if not (e["type"] == entry["type"] and e.get("label_selector") == entry.get("label_selector")
                        and e.get("server") == entry.get("server"))
            ]  # fmt: skip
        self._refresh_firewalls()
        return 201, {"actions": [self._new_action("remove_firewall", [("firewall", fw["id"])])]}

    def _delete_firewalls(self, obj: dict[str, Any]) -> tuple[int, Any]:
        if obj["applied_to"]:
            raise ApiError(409, "resource_in_use", "firewall is still applied")
        del self.resources["firewalls"][obj["id"]]
        self._refresh_firewalls()
        return 204, None

    # --- placement groups -------------------------------------------------------------------------------------------

    def _create_placement_groups(self, body: dict[str, Any]) -> tuple[int, Any]:
        self._unique("placement_groups", body["name"])
        pg = {"id": next(self._ids), "name": body["name"], "type": body["type"], "servers": [],
              "labels": body.get("labels") or {}, "created": NOW}  # fmt: skip
        self.resources["placement_groups"][pg["id"]] = pg
        return 201, {"placement_group": self._view("placement_groups", pg), "action": None}

    def _delete_placement_groups(self, obj: dict[str, Any]) -> tuple[int, Any]:
        if obj["servers"]:
            raise ApiError(409, "resource_in_use", "placement group is not empty")
        del self.resources["placement_groups"][obj["id"]]
        return 204, None

    # --- servers ------------------------------------------------------------------------------------------------------

    def _create_servers(self, body: dict[str, Any]) -> tuple[int, Any]:
        self._unique("servers", body["name"])
        st = body["server_type"]
        if st not in SERVER_TYPES:
            raise ApiError(400, "invalid_input", f"server type {st} not found")
        loc = body.get("location") or "fsn1"
        if loc not in LOCATIONS:
            raise ApiError(400, "invalid_input", f"location {loc} not found")
        if (st, loc) in SOLD_OUT:
            raise ApiError(412, "resource_unavailable", f"server type {st} is currently unavailable in {loc}")
        pub = body.get("public_net") or {"enable_ipv4": True, "enable_ipv6": True}
        networks = body.get("networks") or []
        if (
            not pub.get("enable_ipv4", True)
            and not pub.get("enable_ipv6", True)
            and not networks
            and body.get("start_after_create", True)
        ):
            raise ApiError(
                400, "invalid_input", "a server without public IPs needs a network (or start_after_create false)"
            )
        for key in body.get("ssh_keys") or []:
            if not any(k["id"] == key or k["name"] == key for k in self.resources["ssh_keys"].values()):
                raise ApiError(400, "invalid_input", f"ssh key {key} not found")
        sid = next(self._ids)
        n = next(self._ips)
        server: dict[str, Any] = {
            "id": sid, "name": body["name"], "status": "initializing", "created": NOW,
            "labels": body.get("labels") or {},
            "server_type": server_type_json(SERVER_TYPES.index(st) + 1, st),
            "location": location_json(loc), "image": _image_json(str(body.get("image") or "debian-12")),
            "iso": None, "rescue_enabled": False,
            "locked": False, "backup_window": None, "outgoing_traffic": 0, "ingoing_traffic": 0,
            "included_traffic": 21990232555520, "protection": {"delete": False, "rebuild": False},
            "volumes": [], "load_balancers": [], "primary_disk_size": 40, "placement_group": None,
            "public_net": {
                "ipv4": {"id": sid + 100000, "ip": f"198.51.100.{n % 250 + 1}", "blocked": False,
                         "dns_ptr": "static.example"} if pub.get("enable_ipv4", True) else None,
                "ipv6": {"id": sid + 200000, "ip": f"2001:db8:{n:x}::/64", "blocked": False, "dns_ptr": []}
                if pub.get("enable_ipv6", True) else None,
                "floating_ips": [], "firewalls": [],
            },
            "private_net": [],
        }  # fmt: skip
        if len(body.get("user_data") or "") > 32 * 1024:
            raise ApiError(400, "invalid_input", "user_data is limited to 32 KiB")
        self._user_data[sid] = body.get("user_data")
        pg_id = body.get("placement_group")
        if pg_id is not None:
            pg = self._get("placement_groups", pg_id)
            if len(pg["servers"]) >= 10:
                raise ApiError(412, "placement_error", "spread group is full")
            pg["servers"].append(sid)
            server["placement_group"] = {k: pg[k] for k in ("id", "name", "type", "servers", "labels", "created")}
        self.resources["servers"][sid] = server
        action = self._new_action("create_server", [("server", sid)])
        next_actions = [self._new_action("start_server", [("server", sid)])]
        for net_id in networks:
            self._attach(server, self._get("networks", net_id), None)
            next_actions.append(self._new_action("attach_to_network", [("server", sid), ("network", net_id)]))
        server["status"] = "running" if body.get("start_after_create", True) else "off"
        self._refresh_firewalls()
        return 201, {"server": self._view("servers", server), "action": action, "next_actions": next_actions,
                     "root_password": None}  # fmt: skip

    @property
    def _user_data(self) -> dict[int, Any]:
        if not hasattr(self, "_ud"):
            self._ud: dict[int, Any] = {}
        return self._ud

    def user_data(self, name: str) -> str | None:
        return self._user_data.get(self.server_by_name(name)["id"])

    def _attach(self, server: dict[str, Any], net: dict[str, Any], ip: str | None) -> None:
        if any(pn["network"] == net["id"] for pn in server["private_net"]):
            raise ApiError(409, "server_already_attached", "already attached")
        if not net["subnets"]:
            raise ApiError(409, "no_subnet_available", "network has no subnet")
        subnet = ipaddress.ip_network(net["subnets"][0]["ip_range"])
        used = {pn["ip"] for s in self.resources["servers"].values() for pn in s["private_net"]}
        used |= {a for s in self.resources["servers"].values() for pn in s["private_net"] for a in pn["alias_ips"]}
        if ip is not None:
            if ipaddress.ip_address(ip) not in subnet or ip in used:
                raise ApiError(409, "ip_not_available", f"{ip} is not available")
        else:
            # as Hetzner: the lowest free address of the subnet (its .1 is the gateway)
            ip = next((str(h) for h in itertools.islice(subnet.hosts(), 1, None) if str(h) not in used), None)
            if ip is None:
                raise ApiError(409, "ip_not_available", "no free address left in the subnet")
        server["private_net"].append({"network": net["id"], "ip": ip, "alias_ips": [],
                                      "mac_address": "86:00:00:00:00:01"})  # fmt: skip
        net["servers"].append(server["id"])

    def _act_servers_attach_to_network(self, s: dict[str, Any], body: dict[str, Any]) -> tuple[int, Any]:
        net = self._get("networks", body["network"])
        self._attach(s, net, body.get("ip"))
        if body.get("alias_ips"):
            s["private_net"][-1]["alias_ips"] = list(body["alias_ips"])
        return 201, {"action": self._new_action("attach_to_network", [("server", s["id"]), ("network", net["id"])])}

    def _act_servers_change_alias_ips(self, s: dict[str, Any], body: dict[str, Any]) -> tuple[int, Any]:
        pn = next((p for p in s["private_net"] if p["network"] == body["network"]), None)
        if pn is None:
            raise ApiError(409, "server_not_attached_to_network", "not attached")
        pn["alias_ips"] = list(body["alias_ips"])
        return 201, {"action": self._new_action("change_alias_ips", [("server", s["id"])])}

    def _act_servers_shutdown(self, s: dict[str, Any], body: dict[str, Any]) -> tuple[int, Any]:
        s["status"] = "off"
        return 201, {"action": self._new_action("shutdown_server", [("server", s["id"])])}

    def _act_servers_poweroff(self, s: dict[str, Any], body: dict[str, Any]) -> tuple[int, Any]:
        s["status"] = "off"
        return 201, {"action": self._new_action("stop_server", [("server", s["id"])])}

    def _act_servers_poweron(self, s: dict[str, Any], body: dict[str, Any]) -> tuple[int, Any]:
        s["status"] = "running"
        return 201, {"action": self._new_action("start_server", [("server", s["id"])])}

    def _act_servers_change_type(self, s: dict[str, Any], body: dict[str, Any]) -> tuple[int, Any]:
        if s["status"] != "off":
            raise ApiError(409, "server_not_stopped", "server must be stopped to change its type")
        st = body["server_type"]
        if st not in SERVER_TYPES:
            raise ApiError(400, "invalid_input", f"server type {st} not found")
        s["server_type"] = server_type_json(SERVER_TYPES.index(st) + 1, st)
        return 201, {"action": self._new_action("change_server_type", [("server", s["id"])])}

    def _delete_servers(self, obj: dict[str, Any]) -> tuple[int, Any]:
        del self.resources["servers"][obj["id"]]
        for net in self.resources["networks"].values():
            if obj["id"] in net["servers"]:
                net["servers"].remove(obj["id"])
        for pg in self.resources["placement_groups"].values():
            if obj["id"] in pg["servers"]:
                pg["servers"].remove(obj["id"])
        for fip in self.resources["floating_ips"].values():
            if fip["server"] == obj["id"]:
                fip["server"] = None
        self._refresh_firewalls()
        return 200, {"action": self._new_action("delete_server", [("server", obj["id"])])}

    # --- load balancers -----------------------------------------------------------------------------------------------

    def _create_load_balancers(self, body: dict[str, Any]) -> tuple[int, Any]:
        self._unique("load_balancers", body["name"])
        lbt = body["load_balancer_type"]
        lb = {
            "id": next(self._ids), "name": body["name"], "labels": body.get("labels") or {}, "created": NOW,
            "public_net": {"enabled": True, "ipv4": {"ip": "203.0.113.10", "dns_ptr": None},
                           "ipv6": {"ip": "2001:db8:ffff::1", "dns_ptr": None}},
            "private_net": [], "location": location_json(body.get("location") or "fsn1"),
            "load_balancer_type": _lb_type_json(lbt), "protection": {"delete": False},
            "algorithm": body.get("algorithm") or {"type": "round_robin"}, "services": [], "targets": [],
            "outgoing_traffic": 0, "ingoing_traffic": 0, "included_traffic": 0,
        }  # fmt: skip
        if body.get("network") is not None:
            lb["private_net"].append({"network": body["network"], "ip": "10.0.1.254"})
        for svc in body.get("services") or []:
            lb["services"].append(self._service(svc))
        for t in body.get("targets") or []:
            lb["targets"].append(self._target(lb, t))
        self.resources["load_balancers"][lb["id"]] = lb
        return 201, {"load_balancer": self._view("load_balancers", lb),
                     "action": self._new_action("create_load_balancer", [("load_balancer", lb["id"])])}  # fmt: skip

    @staticmethod
    def _service(svc: dict[str, Any]) -> dict[str, Any]:
        hc = svc.get("health_check") or {"protocol": "tcp", "port": svc["destination_port"], "interval": 15,
                                         "timeout": 10, "retries": 3}  # fmt: skip
        hc.setdefault("http", None)
        return {"protocol": svc["protocol"], "listen_port": svc["listen_port"],
                "destination_port": svc["destination_port"], "proxyprotocol": svc.get("proxyprotocol", False),
                "health_check": hc, "http": svc.get("http")}  # fmt: skip

    @staticmethod
    def _target(lb: dict[str, Any], t: dict[str, Any]) -> dict[str, Any]:
        if t.get("use_private_ip") and not lb["private_net"]:
            raise ApiError(422, "targets_without_use_private_ip", "load balancer is not attached to a network")
        out = {"type": t["type"], "use_private_ip": t.get("use_private_ip", False)}
        if t["type"] == "label_selector":
            out["label_selector"] = {"selector": t["label_selector"]["selector"]}
            out["targets"] = []
        else:
            out["server"] = t["server"]
        return out

    def _act_load_balancers_add_target(self, lb: dict[str, Any], body: dict[str, Any]) -> tuple[int, Any]:
        lb["targets"].append(self._target(lb, body))
        return 201, {"action": self._new_action("add_target", [("load_balancer", lb["id"])])}

    def _act_load_balancers_add_service(self, lb: dict[str, Any], body: dict[str, Any]) -> tuple[int, Any]:
        lb["services"].append(self._service(body))
        return 201, {"action": self._new_action("add_service", [("load_balancer", lb["id"])])}

    def _act_load_balancers_attach_to_network(self, lb: dict[str, Any], body: dict[str, Any]) -> tuple[int, Any]:
        lb["private_net"].append({"network": body["network"], "ip": body.get("ip") or "10.0.1.254"})
        return 201, {"action": self._new_action("attach_to_network", [("load_balancer", lb["id"])])}

    def _act_load_balancers_change_type(self, lb: dict[str, Any], body: dict[str, Any]) -> tuple[int, Any]:
        lb["load_balancer_type"] = _lb_type_json(body["load_balancer_type"])
        return 201, {"action": self._new_action("change_load_balancer_type", [("load_balancer", lb["id"])])}

    def _delete_load_balancers(self, obj: dict[str, Any]) -> tuple[int, Any]:
        del self.resources["load_balancers"][obj["id"]]
        return 204, None

    # --- floating IPs -------------------------------------------------------------------------------------------------

    def _create_floating_ips(self, body: dict[str, Any]) -> tuple[int, Any]:
        if not body.get("server") and not body.get("home_location"):
            raise ApiError(400, "invalid_input", "either server or home_location must be given")
        if body.get("name"):
            self._unique("floating_ips", body["name"])
        fip = {"id": next(self._ids), "name": body.get("name"), "description": body.get("description"),
               "type": body["type"], "ip": "203.0.113.77", "server": body.get("server"),
               "home_location": location_json(body.get("home_location") or "fsn1"), "dns_ptr": [],
               "blocked": False, "protection": {"delete": False}, "labels": body.get("labels") or {},
               "created": NOW}  # fmt: skip
        self.resources["floating_ips"][fip["id"]] = fip
        action = self._new_action("assign_floating_ip", [("floating_ip", fip["id"])]) if fip["server"] else None
        return 201, {"floating_ip": self._view("floating_ips", fip), "action": action}

    def _act_floating_ips_assign(self, fip: dict[str, Any], body: dict[str, Any]) -> tuple[int, Any]:
        self._get("servers", body["server"])
        fip["server"] = body["server"]
        return 201, {"action": self._new_action("assign_floating_ip", [("floating_ip", fip["id"])])}

    def _delete_floating_ips(self, obj: dict[str, Any]) -> tuple[int, Any]:
        del self.resources["floating_ips"][obj["id"]]
        return 204, None


def _singular(res: str) -> str:
    return res[:-1]


def _meta(page: int, per_page: int, total: int) -> dict[str, Any]:
    last = max(1, -(-total // per_page))
    return {"pagination": {"page": page, "per_page": per_page, "previous_page": page - 1 if page > 1 else None,
                           "next_page": page + 1 if page < last else None, "last_page": last,
                           "total_entries": total}}  # fmt: skip


def _image_json(name: str = "debian-12") -> dict[str, Any]:
    return {"id": 114690387, "type": "system", "status": "available", "name": name,
            "description": name, "image_size": None, "disk_size": 5, "created": NOW,
            "created_from": None, "bound_to": None, "os_flavor": name.split("-")[0], "os_version": name.split("-")[-1],
            "rapid_deploy": True, "protection": {"delete": False}, "deprecated": None, "deleted": None,
            "labels": {}, "architecture": "x86"}  # fmt: skip


def _lb_type_json(name: str) -> dict[str, Any]:
    return {"id": {"lb11": 1, "lb21": 2, "lb31": 3}.get(name, 1), "name": name, "description": name.upper(),
            "max_connections": 10000, "max_services": 5, "max_targets": 25, "max_assigned_certificates": 10,
            "deprecated": None, "prices": []}  # fmt: skip
