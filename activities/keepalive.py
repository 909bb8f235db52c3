"""Heartbeats for activities whose schedule asks for them, sent by the worker's event loop.

A worker killed with ``kill -9`` (an OOM kill, a node lost, a deploy without a drain) never
reports its running activities. Without a heartbeat, Temporal notices only when the attempt's
start-to-close timeout runs out: 60 s for a provider call (``PROVIDER_ACTIVITY_TIMEOUT``,
sized for Stripe's slowest answer), so every charge in flight on that worker, and the
customer's invoice with it, stood still for a minute per crash. With ``heartbeat_timeout``
set by the workflow (``PROVIDER_HEARTBEAT_TIMEOUT``), this interceptor beats while the
activity runs, so a dead process is noticed within that timeout and the attempt is retried
(re-driven under its own idempotency key, as after any crash), while a slow but live provider
call still gets the whole start-to-close timeout.

The beats come from the event loop, not the activity's thread, which is blocked in the
provider's HTTP call: they say "this process is alive", which is what the timeout is for.
A process so starved that its loop misses a whole heartbeat timeout is treated as dead: the
attempt is retried while the first may still finish, which the attempt's idempotency key
makes safe (the same request under the same key, and a finished attempt is replayed, never
sent again), exactly as when the start-to-close timeout runs out on a slow call.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from temporalio import activity
from temporalio.worker import (
    ActivityInboundInterceptor,
    ActivityOutboundInterceptor,
    ExecuteActivityInput,
    Interceptor,
)

#: Beats per heartbeat timeout: a beat lost or late still leaves two more inside the timeout.
BEATS_PER_TIMEOUT = 3


class KeepAlive(Interceptor):
    """Worker interceptor: heartbeats every activity scheduled with a heartbeat timeout."""

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _KeepAliveInbound(next)


class _KeepAliveInbound(ActivityInboundInterceptor):
    _outbound: ActivityOutboundInterceptor | None = None

    def init(self, outbound: ActivityOutboundInterceptor) -> None:
        # The outbound heartbeat is the event loop's own (the activity context's heartbeat is
        # replaced, for a thread-pool activity, by one that blocks on the loop: calling that
        # from the loop would deadlock).
        self._outbound = outbound
        super().init(outbound)

    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        timeout = activity.info().heartbeat_timeout
        if timeout is None or self._outbound is None:
            return await super().execute_activity(input)
        beats = asyncio.create_task(
            _beat(self._outbound, timeout.total_seconds() / BEATS_PER_TIMEOUT)
        )
        try:
            return await super().execute_activity(input)
        finally:
            beats.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beats


async def _beat(outbound: ActivityOutboundInterceptor, every_s: float) -> None:
    # The heartbeat timeout runs from the attempt's start, so the first beat is due a third
    # of the way in, not at once: an activity that ends sooner (a charge usually takes a
    # second) sends none, one heartbeat RPC less per provider call.
    while True:
        await asyncio.sleep(every_s)
        outbound.heartbeat()
