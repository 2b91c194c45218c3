"""The operator's tools: the `mbworker` command (main.py), the admin API client, doctor and docs generation. They
run on the operator's machine or beside a daemon, never inside its hot path."""
