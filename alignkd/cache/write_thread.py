"""The writer's threads: encoding on a small pool, writing in order on one thread.

Encoding and compressing a 7B-shaped sample is ~15 ms of numpy/blosc CPU, which one thread
cannot do at a GPU teacher's rate, so each sample is encoded on a pool of encoder threads
as soon as it is added. The writes, commits and catalog updates run in submission order on
one writer thread behind a bounded queue, so the teacher's next forward overlaps all of it.
An exception on that thread is kept and re-raised by the next `submit` or by `close`. With
`background=False` everything runs inline in the caller's thread.
"""

from __future__ import annotations

import os
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

QUEUE_DEPTH = 4  # samples in flight to the writer thread (~8 MB each at 7B shapes)
ENCODER_THREADS = min(4, os.cpu_count() or 1)


class WriteThread:
    """Runs `handle(item)` for each submitted item in order, then `finish()` on close."""

    def __init__(self, handle: Callable[[object], None], finish: Callable[[], None], background: bool) -> None:
        self._handle, self._finish = handle, finish
        self.error: BaseException | None = None
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._encoders: ThreadPoolExecutor | None = None
        if background:
            self._encoders = ThreadPoolExecutor(ENCODER_THREADS, thread_name_prefix="alignkd-cache-encode")
            self._queue = queue.Queue(maxsize=QUEUE_DEPTH)
            self._thread = threading.Thread(target=self._drain, name="alignkd-cache-writer", daemon=True)
            self._thread.start()

    def encode(self, fn: Callable, *args) -> Future | None:
        """Start `fn(*args)` on the encoder pool (None inline: the writer thread calls it itself)."""
        return self._encoders.submit(fn, *args) if self._encoders else None

    def raise_pending(self) -> None:
        if self.error is not None:
            raise self.error

    def submit(self, item) -> None:
        if self._queue is not None:
            self._queue.put(item)
            return
        try:
            self._handle(item)
        except BaseException as exc:
            self.error = exc
            raise

    def close(self) -> None:
        """Run `finish` after every item (an inline error in it propagates); keep a thread's error in `error`."""
        if self._thread is None:
            if self.error is None:
                self._finish()
            return
        self._queue.put(None)
        self._thread.join()
        self._encoders.shutdown(cancel_futures=True)

    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            if self.error is not None:      # keep draining so submit() never blocks forever
                if item is None:
                    return
                continue
            try:
                if item is None:
                    self._finish()
                    return
                self._handle(item)
            except BaseException as exc:     # surfaced by the next submit or close
                self.error = exc
                if item is None:             # finish failed: nothing follows, close() is waiting
                    return
