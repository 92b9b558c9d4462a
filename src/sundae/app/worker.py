"""One model, one thread: the web app's job queue.

A pipeline must not run two batches at once (its modules are shared, and on a GPU two batches would
compete for memory), so every request becomes a :class:`Job` that a single worker thread runs in
arrival order; each job has its own seeds and its own event channel, so results never mix.

A job is cancelled by setting its flag (the server does so when the client disconnects). Sampling
stops after its current step: the sampler's step callback, :meth:`Job.wanted`, returns False.
Encoding and decoding, which can be long for a large canvas, stop within one module's forward:
the worker checks the flag before every forward pass of the modules the job names in ``watched``
(the server gives every module of the job's tokenizer), through forward pre-hooks that exist only
while the job runs and act only on the worker's thread. A queued job that was cancelled never starts.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

logger = logging.getLogger(__name__)

Event = dict[str, Any]
# Errors that mean "this request cannot be done" (ValueError and ConfigError), shown as they are.
REQUEST_ERRORS = (ValueError,)


class JobCancelled(Exception):
    """Raised inside a running job once its client has gone; unwinds the job."""


def new_job_id(kind: str) -> str:
    """Server-made, so it is safe in file names: ``20250101-120000-generate-1a2b3c4d``."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{kind}-{secrets.token_hex(4)}"


@dataclass
class Job:
    """One request's work: ``run(job)`` returns the final event's fields; ``emit`` sends events to its client."""

    kind: str
    run: Callable[["Job"], dict[str, Any]]
    emit: Callable[[Event | None], None]  # None closes the client's stream
    watched: tuple[nn.Module, ...] = ()  # checked for cancellation before each of their forward passes
    id: str = ""
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted_at: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        self.id = self.id or new_job_id(self.kind)

    def cancel(self) -> None:
        self.cancelled.set()

    def raise_if_cancelled(self) -> None:
        if self.cancelled.is_set():
            raise JobCancelled(self.id)

    def wanted(self, *_: object) -> bool:
        """Whether the job is still wanted; as a sampler step callback, it stops sampling once cancelled."""
        return not self.cancelled.is_set()


class ModelWorker:
    """Runs jobs one at a time on one thread, checking each job's cancel flag before every forward pass
    of the job's ``watched`` modules (each module itself; give ``module.modules()`` to watch its
    submodules too). One worker serves every model of the app: only one of them computes at a time."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sundae-model")
        self._lock = threading.Lock()
        self._unfinished = 0
        self._running: Job | None = None

    @property
    def unfinished(self) -> int:
        """Jobs queued or running."""
        with self._lock:
            return self._unfinished

    def submit(self, job: Job) -> int:
        """Queue ``job``; returns how many jobs are ahead of it."""
        with self._lock:
            ahead = self._unfinished
            self._unfinished += 1
        future: Future = self._executor.submit(self._run, job)
        future.add_done_callback(self._finished)
        return ahead

    def shutdown(self) -> None:
        """Drop queued jobs and cancel the running one."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        running = self._running
        if running is not None:
            running.cancel()

    def _finished(self, _: Future) -> None:
        with self._lock:
            self._unfinished -= 1

    def _run(self, job: Job) -> None:
        self._running = job
        try:
            job.emit(self._outcome(job))
        finally:
            self._running = None
            job.emit(None)

    def _outcome(self, job: Job) -> Event:
        if job.cancelled.is_set():
            return {"event": "cancelled"}
        started = time.perf_counter()
        job.emit({"event": "started", "queued_seconds": round(started - job.submitted_at, 3)})
        worker_thread = threading.get_ident()

        def check(*_: object) -> None:  # another thread using the same modules is not this job
            if threading.get_ident() == worker_thread:
                job.raise_if_cancelled()

        handles = [module.register_forward_pre_hook(check) for module in job.watched]
        try:
            result = job.run(job)
        except JobCancelled:
            logger.info("job %s cancelled after %.2fs", job.id, time.perf_counter() - started)
            return {"event": "cancelled"}
        except REQUEST_ERRORS as error:
            return {"event": "error", "message": str(error)}
        except Exception as error:  # the stream must still end cleanly; the traceback goes to the log
            logger.exception("job %s failed", job.id)
            message = f"internal error ({type(error).__name__}: {error}); see the server log"
            return {"event": "error", "message": message}
        finally:
            for handle in handles:
                handle.remove()
        return {"event": "done", "job": job.id, "seconds": round(time.perf_counter() - started, 3), **result}
