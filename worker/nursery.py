"""`open_owned_nursery` for the worker's packages (it lives in runtimes/nursery.py: runtimes does not import the
worker, and both use it)."""

from mbworker.runtimes.nursery import open_owned_nursery

__all__ = ["open_owned_nursery"]
