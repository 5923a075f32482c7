"""Admission control: a concurrency cap with a small bounded queue, and a token-bucket rate
limit per client identity. Both answer 429 with Retry-After instead of letting load pile up
in the engine, whose own queue is unbounded."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from runtime.config import FrontSection
from runtime.front.limits import Rejected


@dataclass
class TokenBucket:
    """`rate` tokens per second, at most `burst` saved up. Pure given the clock values."""

    rate: float
    burst: float
    tokens: float = field(init=False)
    stamp: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.tokens = self.burst

    def take(self, now: float) -> float | None:
        """Take one token; None if granted, else the seconds until one is available."""
        if self.stamp is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return None
        return (1 - self.tokens) / self.rate


class Admission:
    @classmethod
    def from_config(cls, front: FrontSection) -> Admission:
        return cls(
            max_concurrency=front.max_concurrency,
            max_queue=front.max_queue,
            queue_timeout_s=front.queue_timeout_s,
            rate_rps=front.rate_limit_rps,
            rate_burst=front.rate_limit_burst,
        )

    def __init__(
        self,
        *,
        max_concurrency: int,
        max_queue: int,
        queue_timeout_s: float,
        rate_rps: float,
        rate_burst: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._slots = asyncio.Semaphore(max_concurrency)
        self._max_queue = max_queue
        self._queue_timeout = queue_timeout_s
        self._rate, self._burst = rate_rps, rate_burst
        self._buckets: dict[str, TokenBucket] = {}
        self._clock = clock
        self.waiting = 0
        self.in_flight = 0

    def check_rate(self, identity: str | None) -> None:
        if self._rate <= 0:
            return
        # Identities come from the configured allowlist, so this dict stays small.
        bucket = self._buckets.setdefault(identity or "", TokenBucket(self._rate, self._burst))
        wait = bucket.take(self._clock())
        if wait is not None:
            raise Rejected(
                429, "Rate limit exceeded for this client", "rate_limited", retry_after=wait
            )

    async def acquire(self) -> None:
        if self._slots.locked():
            if self.waiting >= self._max_queue:
                raise Rejected(429, "The server is busy", "overloaded", retry_after=1)
            self.waiting += 1
            # Not asyncio.wait_for: on Python 3.11 it swallows a cancellation (a client that
            # left, the request deadline) that arrives as the slot is granted, and the request
            # would go on to the engine. Awaited directly, the semaphore gives the slot back.
            try:
                async with asyncio.timeout(self._queue_timeout):
                    await self._slots.acquire()
            except TimeoutError:
                raise Rejected(429, "The server is busy", "overloaded", retry_after=1) from None
            finally:
                self.waiting -= 1
        else:
            await self._slots.acquire()
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1
        self._slots.release()


def retry_after_header(seconds: float) -> bytes:
    return str(max(1, math.ceil(seconds))).encode()
