"""Realtime: Phoenix / Supabase Realtime channels (broadcast, presence) for unmodified realtime-js clients.

Entry point: `open_realtime(settings, verifier=... (or jwt_secret=...), node_id=...)` → `RealtimeService`.
"""

from mbworker.realtime.errors import RealtimeError
from mbworker.realtime.service import RealtimeService, RealtimeStatistics, open_realtime
from mbworker.realtime.settings import PrivateChannelRule, RealtimeSettings

__all__ = [
    "PrivateChannelRule",
    "RealtimeError",
    "RealtimeService",
    "RealtimeSettings",
    "RealtimeStatistics",
    "open_realtime",
]
