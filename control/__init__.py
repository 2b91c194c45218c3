"""The control plane: one authenticated API on the system node that manages the whole cluster.

`mbworker control serve` runs it (`serve.py`); it reaches the cluster's Redis and the workers' admin listeners
over the private network and is reached by operators with its own token (never a worker's admin token).

- `registry`: nodes as they report themselves (heartbeats in Redis, written by worker/cluster/heartbeat.py) and
  every node of the cluster's layout, upstreams for proxies, scrape targets, drains.
- `layout`: the layout file the provisioner writes (every node: name, role, private IP); `probes`: the task that
  re-reads it and probes the nodes that send no heartbeat (state, NAT).
- `functions`: cluster-wide deploy / list / rollback / delete / logs through the workers' admin APIs.
- `audit`: a ring of the mutating calls.
- session revocation: `mbworker.lib.revocation` (the list every worker consults).
- `app`: the HTTP API (`/control/v1/...`), `settings` and `token`: its configuration and credential.

It imports no runtime, and the daemon does not import it (pyproject's import contracts).
"""
