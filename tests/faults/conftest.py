from tests.daemon.conftest import http, worker

__all__ = ["http", "worker"]
