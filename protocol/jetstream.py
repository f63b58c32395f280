"""Find-or-create for the project's JetStream streams and KV buckets, written once.

Every peer that needs a stream or bucket (executors, clients, the cluster launcher)
calls these: an existing one is used as it is (an operator may have made it with other
settings, such as R3 on a cluster), a missing one is created, and a race with another
peer creating it at the same moment ends with both using the one that won.
"""

from __future__ import annotations

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StreamConfig
from nats.js.kv import KeyValue


async def ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    """Create the stream unless one of that name exists."""
    try:
        await js.stream_info(config.name)  # type: ignore[arg-type]
        return
    except nats.js.errors.NotFoundError:
        pass
    try:
        await js.add_stream(config)
    except nats.js.errors.BadRequestError:
        # Made meanwhile by another peer (or exists with other settings): use it as it is.
        await js.stream_info(config.name)  # type: ignore[arg-type]


async def ensure_bucket(js: JetStreamContext, config: KeyValueConfig) -> KeyValue:
    """The bucket, created unless it exists."""
    try:
        return await js.key_value(config.bucket)
    except nats.js.errors.BucketNotFoundError:
        pass
    try:
        return await js.create_key_value(config)
    except nats.js.errors.BadRequestError:
        return await js.key_value(config.bucket)  # made meanwhile by another peer
