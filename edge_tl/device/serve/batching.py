"""Running inference off the event loop, one request at a time or in dynamic batches.

:class:`Dispatcher` hands each request's feed to a worker thread. :class:`DynamicBatcher` (``--max-batch`` > 1)
puts requests on an asyncio queue instead; a collector task takes the first, waits up to ``max_delay`` for
more until ``max_batch`` images are gathered, concatenates them into one runner call on a worker thread and
splits the outputs back. Requests are never split: one larger than what is left waits for the next batch.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from edge_tl.device.serve.metrics import Metrics

Feed = dict[str, np.ndarray]
RunFn = Callable[[Feed], Feed]


class Dispatcher:
    """One runner call per request, on ``workers`` threads."""

    def __init__(self, run: RunFn, executor: ThreadPoolExecutor, metrics: Metrics):
        self.run = run
        self.executor = executor
        self.metrics = metrics

    def _call(self, feed: Feed, queued_at: float) -> Feed:
        self.metrics.queue_depth.dec()
        self.metrics.queue_wait.observe(time.perf_counter() - queued_at)
        return self.run(feed)

    async def submit(self, feed: Feed) -> Feed:
        self.metrics.queue_depth.inc()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self._call, feed, time.perf_counter())

    async def stop(self) -> None:
        """Nothing queued outside the executor; the executor is shut down by its owner."""


@dataclass
class _Pending:
    feed: Feed
    n: int
    future: asyncio.Future
    queued_at: float


class DynamicBatcher(Dispatcher):
    def __init__(self, run: RunFn, executor: ThreadPoolExecutor, metrics: Metrics, *, max_batch: int,
                 max_delay_s: float, workers: int = 1):
        super().__init__(run, executor, metrics)
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.workers = workers
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()  # binds to the loop on first use
        self._task: asyncio.Task | None = None
        self._running: set[asyncio.Task] = set()

    async def submit(self, feed: Feed) -> Feed:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._collect(), name="edge-tl-batcher")
        n = next(iter(feed.values())).shape[0]
        pending = _Pending(feed, n, asyncio.get_running_loop().create_future(), time.perf_counter())
        self.metrics.queue_depth.inc()
        self._queue.put_nowait(pending)
        return await pending.future

    async def _collect(self) -> None:
        queue = self._queue
        slots = asyncio.Semaphore(self.workers)
        carry: _Pending | None = None
        loop = asyncio.get_running_loop()
        while True:
            await slots.acquire()
            first = carry or await queue.get()
            carry = None
            batch, total = [first], first.n
            deadline = loop.time() + self.max_delay_s
            while total < self.max_batch:
                try:
                    nxt = queue.get_nowait()
                except asyncio.QueueEmpty:
                    timeout = deadline - loop.time()
                    if timeout <= 0:
                        break
                    try:
                        nxt = await asyncio.wait_for(queue.get(), timeout)
                    except asyncio.TimeoutError:
                        break
                if total + nxt.n > self.max_batch:
                    carry = nxt
                    break
                batch.append(nxt)
                total += nxt.n
            task = loop.create_task(self._run_batch(batch, slots))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run_batch(self, batch: list[_Pending], slots: asyncio.Semaphore) -> None:
        now = time.perf_counter()
        for p in batch:
            self.metrics.queue_depth.dec()
            self.metrics.queue_wait.observe(now - p.queued_at)
        try:
            if len(batch) == 1:
                feed = batch[0].feed
            else:
                feed = {name: np.concatenate([p.feed[name] for p in batch]) for name in batch[0].feed}
            loop = asyncio.get_running_loop()
            out = await loop.run_in_executor(self.executor, self.run, feed)
            start = 0
            for p in batch:
                if not p.future.done():
                    p.future.set_result({k: v[start:start + p.n] for k, v in out.items()})
                start += p.n
        except Exception as exc:  # the runner failed: every request of the batch gets the error
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
        finally:
            slots.release()

    async def stop(self) -> None:
        """Finish running batches, then stop the collector (call when no request holds this model)."""
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
