"""Dynamic batching: concurrent requests wait at most ``max_wait_ms`` to share one model call of <= ``max_batch`` rows.

One worker thread runs the model, so the server's event loop keeps accepting requests while a batch computes; under
load each call carries many requests' rows, which is where the throughput comes from.
"""

import asyncio
import time

import numpy as np


class DynamicBatcher:
    def __init__(self, predict, max_batch=256, max_wait_ms=5.0):
        self.predict, self.max_batch, self.max_wait = predict, int(max_batch), max_wait_ms / 1000.0
        self.queue = None
        self._task = None
        self.calls = 0

    async def start(self):
        self.queue = asyncio.Queue()
        self._task = asyncio.create_task(self._run())

    async def stop(self):
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def submit(self, x):
        """Probabilities (N x K numpy) for x (N x C x H x W float32), computed in a shared batch."""
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((x, future))
        return await future

    async def _run(self):
        while True:
            items = [await self.queue.get()]
            rows = len(items[0][0])
            deadline = time.monotonic() + self.max_wait
            while rows < self.max_batch:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self.queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
                items.append(item)
                rows += len(item[0])
            batch = np.concatenate([x for x, _ in items]) if len(items) > 1 else items[0][0]
            try:
                out = await asyncio.to_thread(self.predict, batch)
                self.calls += 1
            except Exception as exc:  # noqa: BLE001  (delivered to every waiting request)
                for _, future in items:
                    if not future.done():
                        future.set_exception(exc)
                continue
            start = 0
            for x, future in items:
                if not future.done():
                    future.set_result(out[start:start + len(x)])
                start += len(x)
