"""Tests of the L1 result cache (worker/cache/)."""
