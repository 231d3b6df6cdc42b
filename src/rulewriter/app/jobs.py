"""Long work off the request thread: a :class:`Job` reports progress in [0, 1], then a result or an error.

Example::

    >>> runner = JobRunner(workers=1)
    >>> job = runner.submit("demo", None, lambda job: 42)
    >>> runner.pool.shutdown(wait=True); (job.state, job.result)
    ('done', 42)
"""
from __future__ import annotations

import secrets
import threading
import time
import traceback
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import RulewriterError

__all__ = ["Job", "JobRunner", "MAX_JOBS_KEPT"]

#: Finished jobs kept for polling; the oldest finished ones are dropped beyond this.
MAX_JOBS_KEPT = 256


@dataclass
class Job:
    """Work running off the request thread: progress in [0, 1], then a result or an error."""

    id: str
    kind: str
    session: str | None
    state: str = "queued"  # queued | running | done | error
    progress: float = 0.0
    message: str = ""
    result: Any = None
    error: str | None = None
    created: float = field(default_factory=time.time)
    finished: float | None = None

    def report(self, progress: float, message: str | None = None) -> None:
        self.progress = float(min(1.0, max(self.progress, progress)))
        if message is not None:
            self.message = message

    def to_dict(self) -> dict:
        return {"id": self.id, "kind": self.kind, "state": self.state, "progress": round(self.progress, 4),
                "message": self.message, "result": self.result, "error": self.error}


class JobRunner:
    """A small thread pool for jobs, keeping the most recent ones for polling."""

    def __init__(self, workers: int = 2) -> None:
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rulewriter-job")
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.lock = threading.Lock()

    def submit(self, kind: str, session: str | None, fn: Callable[[Job], Any]) -> Job:
        job = Job(secrets.token_hex(8), kind, session)
        with self.lock:
            self.jobs[job.id] = job
            while len(self.jobs) > MAX_JOBS_KEPT:
                oldest = next(iter(self.jobs))
                if self.jobs[oldest].state in ("queued", "running"):
                    break
                self.jobs.pop(oldest)

        def run() -> None:
            job.state = "running"
            try:
                job.result = fn(job)
                job.progress, job.state = 1.0, "done"
            except RulewriterError as e:
                job.error, job.state = str(e), "error"
            except Exception as e:  # noqa: BLE001 - a job must end in a state the page can show
                traceback.print_exc()
                job.error, job.state = f"internal error: {type(e).__name__}: {e}", "error"
            finally:
                job.finished = time.time()

        self.pool.submit(run)
        return job

    def get(self, job_id: str) -> Job | None:
        with self.lock:
            return self.jobs.get(job_id)

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
