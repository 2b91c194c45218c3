"""Tests of the HTTP front door (worker.http)."""
