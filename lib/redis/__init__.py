"""A trio-native Redis client: pooled, auto-pipelined, pub/sub with resubscribe, Sentinel, Lua scripts.

RESP is parsed by `hiredis.Reader` and encoded by `hiredis.pack_command`. Start with `open_redis(url)` for
commands and `open_pubsub(url)` (or `serve_pubsub`) for subscriptions; URL forms are in `config`.
"""

from ._queue import EventQueue
from .api import Redis
from .bus import BusMember, PubSubBus, open_pubsub_bus
from .client import RedisClient, RedisState, RedisStatistics, open_redis, serve_redis
from .commands import Command, RedisCommands
from .config import RedisSettings, RedisUrlError, parse_redis_url
from .errors import (
    RedisAuthError,
    RedisConnectionError,
    RedisError,
    RedisProtocolError,
    RedisResponseError,
    RedisTimeout,
)
from .pipeline import Pipeline, Slot
from .pubsub import (
    PubSub,
    PubSubDisconnected,
    PubSubEvent,
    PubSubMessage,
    PubSubResubscribed,
    PubSubState,
    PubSubStatistics,
    open_pubsub,
    serve_pubsub,
)
from .scripts import Script

__all__ = [
    "BusMember",
    "Command",
    "EventQueue",
    "Pipeline",
    "PubSub",
    "PubSubBus",
    "PubSubDisconnected",
    "PubSubEvent",
    "PubSubMessage",
    "PubSubResubscribed",
    "PubSubState",
    "PubSubStatistics",
    "Redis",
    "RedisAuthError",
    "RedisClient",
    "RedisCommands",
    "RedisConnectionError",
    "RedisError",
    "RedisProtocolError",
    "RedisResponseError",
    "RedisSettings",
    "RedisState",
    "RedisStatistics",
    "RedisTimeout",
    "RedisUrlError",
    "Script",
    "Slot",
    "open_pubsub",
    "open_pubsub_bus",
    "open_redis",
    "parse_redis_url",
    "serve_pubsub",
    "serve_redis",
]
