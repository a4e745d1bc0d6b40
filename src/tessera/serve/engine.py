"""One model instance, ``workers`` requests at a time, a bounded queue; background jobs for indexing.

:class:`AskWorker` runs submitted work on ``workers`` threads: one when the model answers one
request at a time, ``--max-batch`` when its generations decode together
(:class:`tessera.lm.batching.ContinuousBatcher`) or go to an OpenAI-compatible server.  At most
``queue_size`` requests wait behind the running ones;
:meth:`AskWorker.submit` raises :class:`QueueFull` (the API answers ``429`` with
``Retry-After``) beyond that.  Every task has a deadline covering its queue wait and
its run: work still queued at its deadline is dropped, running work checks
:meth:`AskWorker.check` from its callbacks (each generated token) and stops.  The
SelfCite citation phase polls :meth:`AskWorker.stop_hook` (its ``should_stop``) before
each model pass, so a request that times out while its citations are scored frees the
worker within one pass.

:class:`JobManager` runs corpus indexing on its own thread, reporting stage and
progress for ``GET /v1/jobs/{id}``.
"""

from __future__ import annotations

import collections
import math
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from tessera.errors import TesseraError


_M_ARENA_MAX = -8  # glibc mallopt parameter


def _libc():
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


def limit_malloc_arenas(n: int = 2) -> bool:
    """Cap glibc's malloc arenas (one per thread by default, up to 8 per core): with several worker threads each
    holding its own arena, freed request buffers stay mapped and resident memory creeps up under steady load."""
    libc = _libc()
    return bool(libc is not None and libc.mallopt(_M_ARENA_MAX, int(n)))


def disable_mkl_buffer_pools() -> bool:
    """Turn off MKL's fast memory manager (``MKL_DISABLE_FAST_MM=1``) unless the environment already sets it.

    MKL keeps the work buffers of its matrix products in pools per calling thread and never returns them: with
    several worker threads running the citation model (PyTorch's CPU matmuls go to MKL), the server's live memory
    grew by about 15 MiB at a time for as long as new (thread, size) pairs kept coming, +190 MiB of live ``mmap``
    blocks over a 10-minute soak (``benchmarks/serve_memprobe.py``), and none with the pools off.  MKL reads the
    variable when PyTorch loads it: this must run before ``import torch``; returns whether it took effect."""
    import os
    import sys

    os.environ.setdefault("MKL_DISABLE_FAST_MM", "1")
    return "torch" not in sys.modules


class MemoryTrimmer:
    """``malloc_trim(0)`` at most every ``every_s`` seconds: returns the heap's free pages to the system."""

    def __init__(self, every_s: float = 5.0):
        self.every_s, self._last, self._libc = every_s, 0.0, _libc()
        self._lock = threading.Lock()

    def __call__(self) -> None:
        if self._libc is None:
            return
        now = time.monotonic()
        with self._lock:
            if now - self._last < self.every_s:
                return
            self._last = now
        self._libc.malloc_trim(0)


class ApiError(Exception):
    """An error the API turns into ``{"error": {status, code, message, field}}``."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.field, self.headers = status, code, " ".join(message.split()), field, headers

    def body(self) -> dict:
        return {"error": {"status": self.status, "code": self.code, "message": self.message, "field": self.field}}


class QueueFull(ApiError):
    def __init__(self, retry_after: int, capacity: int):
        super().__init__(429, "queue_full", f"the server is busy ({capacity} requests running or queued); retry after "
                         f"{retry_after} s", headers={"Retry-After": str(retry_after)})
        self.retry_after = retry_after


class RequestTimeout(TesseraError):
    """The request ran past the server's request timeout."""


class Cancelled(Exception):
    """The client went away; the work is abandoned."""


@dataclass(eq=False)  # hashed by identity: the running tasks are a set
class Task:
    fn: Callable[["Task"], object]
    deadline: float
    enqueued: float = field(default_factory=time.monotonic)
    started: float | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    future: Future = field(default_factory=Future)

    @property
    def queue_s(self) -> float:
        return (self.started or time.monotonic()) - self.enqueued


class AskWorker:
    """``workers`` threads over a bounded FIFO queue (see the module docstring)."""

    def __init__(self, queue_size: int, timeout_s: float, name: str = "tessera-ask", workers: int = 1):
        self.queue_size, self.timeout_s, self.name = queue_size, timeout_s, name
        self.workers = max(1, int(workers))
        self._waiting: collections.deque[Task] = collections.deque()
        self._running: set[Task] = set()
        self._cond = threading.Condition()
        self._durations: collections.deque[float] = collections.deque(maxlen=16)
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._trim = MemoryTrimmer()
        self.completed = 0
        self.rejected = 0

    @property
    def capacity(self) -> int:
        return self.queue_size + self.workers

    def counts(self) -> tuple[int, int]:
        with self._cond:
            return len(self._running), len(self._waiting)

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: mean recent run time times the work ahead of it, over the workers."""
        with self._cond:
            ahead = len(self._waiting) + len(self._running)
            mean = sum(self._durations) / len(self._durations) if self._durations else 5.0
        return max(1, min(int(self.timeout_s), math.ceil(mean * max(1, ahead) / max(1, self.capacity))))

    def submit(self, fn: Callable[[Task], object]) -> Task:
        task = Task(fn, deadline=time.monotonic() + self.timeout_s)
        with self._cond:
            if self._closed:
                raise ApiError(503, "shutting_down", "the server is shutting down; retry in a moment")
            busy = len(self._running) + len(self._waiting)
            if busy >= self.capacity:
                self.rejected += 1
                full = True
            else:
                full = False
                self._waiting.append(task)
                self._start()
                self._cond.notify()
        if full:
            raise QueueFull(self.retry_after(), self.capacity)
        return task

    def check(self, task: Task) -> None:
        """Raise when ``task`` should stop: its client went away or its deadline passed."""
        if task.cancelled.is_set():
            raise Cancelled()
        if time.monotonic() > task.deadline:
            raise RequestTimeout(f"the request took longer than the server's timeout of {self.timeout_s:g} s; "
                                 "ask for fewer tokens (max_new_tokens) or retry when the server is less busy")

    def stop_hook(self, task: Task) -> Callable[[], bool]:
        """A ``should_stop`` hook for cooperative cancellation (``tessera.ask.ask``, SelfCite):
        it raises what :meth:`check` raises (:class:`RequestTimeout`, :class:`Cancelled`)."""

        def should_stop() -> bool:
            self.check(task)
            return False

        return should_stop

    def _start(self) -> None:
        self._threads = [t for t in self._threads if t.is_alive()]
        while len(self._threads) < self.workers:
            t = threading.Thread(target=self._loop, name=f"{self.name}-{len(self._threads)}", daemon=True)
            self._threads.append(t)
            t.start()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if self._closed and not self._waiting:
                    return
                task = self._waiting.popleft()
                self._running.add(task)
            task.started = time.monotonic()
            try:
                if not task.future.set_running_or_notify_cancel():
                    continue
                self.check(task)
                result = task.fn(task)
            except BaseException as e:  # noqa: BLE001 - handed to the waiting request
                task.future.set_exception(e)
            else:
                task.future.set_result(result)
            finally:
                with self._cond:
                    self._running.discard(task)
                    self._durations.append(time.monotonic() - task.started)
                    self.completed += 1
                self._trim()

    def close(self, wait: float = 5.0) -> None:
        with self._cond:
            self._closed = True
            for task in self._waiting:
                task.cancelled.set()
            for task in self._running:
                task.cancelled.set()
            self._cond.notify_all()
        end = time.monotonic() + wait
        for t in self._threads:
            t.join(max(0.0, end - time.monotonic()))


@dataclass
class Job:
    id: str
    kind: str
    corpus_id: str | None = None
    status: str = "queued"
    progress: float = 0.0
    stage: str = "queued"
    error: str | None = None
    created_at: float = field(default_factory=time.time)
    finished_at: float | None = None

    def to_dict(self) -> dict:
        return {"id": self.id, "kind": self.kind, "status": self.status, "progress": round(self.progress, 4),
                "stage": self.stage, "corpus_id": self.corpus_id, "error": self.error, "created_at": self.created_at,
                "finished_at": self.finished_at}

    def update(self, stage: str, progress: float) -> None:
        self.stage, self.progress = stage, max(self.progress, min(1.0, progress))


class JobManager:
    """Background jobs (corpus indexing) on one thread, at most ``max_pending`` waiting; the last ``keep`` kept."""

    def __init__(self, max_pending: int = 16, keep: int = 200):
        self.max_pending, self.keep = max_pending, keep
        self.jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self._queue: collections.deque[tuple[Job, Callable[[Job], None]]] = collections.deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def submit(self, kind: str, fn: Callable[[Job], None], corpus_id: str | None = None) -> Job:
        job = Job(uuid.uuid4().hex[:12], kind, corpus_id)
        with self._cond:
            if len(self._queue) >= self.max_pending:
                raise ApiError(429, "jobs_full", f"{len(self._queue)} indexing jobs are waiting; retry when they finish",
                               headers={"Retry-After": "10"})
            self.jobs[job.id] = job
            while len(self.jobs) > self.keep:
                oldest = next(iter(self.jobs))
                if self.jobs[oldest].status in ("queued", "running"):
                    break
                self.jobs.pop(oldest)
            self._queue.append((job, fn))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="tessera-jobs", daemon=True)
                self._thread.start()
            self._cond.notify()
        return job

    def get(self, job_id: str) -> Job | None:
        with self._cond:
            return self.jobs.get(job_id)

    def idle(self) -> bool:
        with self._cond:
            return not self._queue and all(j.status in ("done", "failed") for j in self.jobs.values())

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                job, fn = self._queue.popleft()
            job.status, job.stage = "running", "starting"
            try:
                fn(job)
            except Exception as e:  # noqa: BLE001 - reported through the job
                job.status, job.error = "failed", str(e) if isinstance(e, TesseraError) else f"{type(e).__name__}: {e}"
                job.stage = "failed"
            else:
                job.status, job.progress, job.stage = "done", 1.0, "done"
            job.finished_at = time.time()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
