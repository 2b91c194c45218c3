"""The mbworker daemon: config, start order, HTTP front door, admin API, deployments, cache, Redis, CLI."""
