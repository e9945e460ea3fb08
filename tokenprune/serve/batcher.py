"""Dynamic batching: requests that arrive within a short window run as one ``generate`` batch."""

from __future__ import annotations

import asyncio
import contextlib
from concurrent.futures import ThreadPoolExecutor

from .engine import Engine, Job
from .protocol import RequestError


class Batcher:
    """Collects jobs for up to ``window_s`` seconds (or until ``max_batch``) and hands each batch to the
    engine in one worker thread, so the event loop keeps accepting requests while the model runs.

    At most ``max_queue`` jobs wait; past that, :meth:`submit` refuses with a 429 instead of queueing
    without bound.
    """

    def __init__(self, engine: Engine, max_batch: int, window_s: float, max_queue: int = 512):
        self.engine, self.max_batch, self.window_s = engine, max_batch, window_s
        self._queue: asyncio.Queue[Job] = asyncio.Queue(maxsize=max_queue)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenprune-generate")
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._worker.shutdown(wait=True, cancel_futures=True)

    def submit(self, job: Job) -> None:
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            raise RequestError(
                "the server is busy; retry later", status=429, code="rate_limit_exceeded"
            ) from None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.window_s
            while len(batch) < self.max_batch:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), timeout))
                except asyncio.TimeoutError:
                    break
            try:
                await loop.run_in_executor(self._worker, self.engine.generate, batch)
            except Exception as error:  # noqa: BLE001 (the batch fails; the batcher goes on)
                for job in batch:
                    job.emit("error", f"generation failed: {type(error).__name__}: {error}")
