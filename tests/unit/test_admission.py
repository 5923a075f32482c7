"""Admission control in-process, on a real event loop: the concurrency cap's queue, its
timeout, and cancellation (a client that leaves, or the request deadline, cancels the task of
a request that waits for a slot)."""

from __future__ import annotations

import asyncio

import pytest

from runtime.front.admission import Admission
from runtime.front.limits import Rejected


def _admission(queue_timeout_s: float = 10, max_queue: int = 4) -> Admission:
    return Admission(
        max_concurrency=1,
        max_queue=max_queue,
        queue_timeout_s=queue_timeout_s,
        rate_rps=0,
        rate_burst=1,
    )


@pytest.mark.parametrize("turns", range(5))
def test_a_cancelled_wait_for_a_slot_is_never_swallowed(turns: int) -> None:
    """The slot is freed, and the waiting request is cancelled `turns` loop iterations later.
    Either the request had the slot before the cancellation (then it holds it), or the
    cancellation ends it and the slot goes back. A cancellation swallowed on the way would
    send a request whose client has left on to the engine."""

    async def main() -> None:
        admission = _admission()
        await admission.acquire()  # the only slot
        waiting = asyncio.create_task(admission.acquire())
        await asyncio.sleep(0)
        assert admission.waiting == 1
        admission.release()
        for _ in range(turns):
            await asyncio.sleep(0)
        had_it = waiting.done()
        waiting.cancel()
        try:
            await waiting
            cancelled = False
        except asyncio.CancelledError:
            cancelled = True
        if had_it:
            assert not cancelled and admission.in_flight == 1
            admission.release()
        else:
            assert cancelled, "the cancellation was swallowed: the request would go on"
        assert (admission.in_flight, admission.waiting) == (0, 0)
        async with asyncio.timeout(1):  # the slot is free again
            await admission.acquire()

    asyncio.run(main())


def test_the_queue_times_out_with_429_and_a_full_queue_refuses_at_once() -> None:
    async def main() -> None:
        admission = _admission(queue_timeout_s=0.05, max_queue=1)
        await admission.acquire()
        with pytest.raises(Rejected) as timed_out:
            await admission.acquire()
        assert (timed_out.value.status, timed_out.value.code) == (429, "overloaded")
        assert timed_out.value.retry_after == 1 and admission.waiting == 0
        queued = asyncio.create_task(admission.acquire())
        await asyncio.sleep(0)
        with pytest.raises(Rejected) as full:  # the one queue place is taken
            await admission.acquire()
        assert full.value.status == 429
        admission.release()
        await queued  # the queued request gets the slot
        assert (admission.in_flight, admission.waiting) == (1, 0)

    asyncio.run(main())
