"""One job on one slice: start every host, watch them, decide success or failure.

A `JobRun` runs in its own thread so that a failing worker stops the others within one poll interval,
independent of how often Snakemake asks for job status. `SlicePool` keeps one job per slice and queues
the rest.
"""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass
from typing import Callable, Protocol

from snakemake_executor_plugin_tpu.slices import SliceSpec

TAIL_LINES = 40


class JobFailure(Exception):
    """A job failed for a reason the user can act on; the message says which worker and why."""


class Preempted(Exception):
    """The job's TPU VM was preempted or is gone; the backend may recreate it and rerun the job."""


class Backend(Protocol):
    """How a job's hosts are started and watched (local processes or TPU VM hosts)."""

    hosts: int

    def prepare(self) -> None: ...
    def start(self) -> None: ...
    def poll(self) -> list[tuple[str, int | None]]: ...  # per worker: (running|exit|lost, code)
    def kill(self, workers: list[int]) -> None: ...
    def tail(self, worker: int, lines: int) -> str: ...
    def log_location(self, worker: int) -> str: ...
    def finish(self, success: bool) -> None: ...


@dataclass
class Outcome:
    ok: bool
    message: str = ""
    cancelled: bool = False


class JobRun:
    def __init__(self, label: str, spec: SliceSpec | None, backend: Backend,
                 on_done: Callable[["JobRun"], None] | None = None, log: Callable[[str], None] = print):
        self.label = label  # e.g. "job 3 (rl_train)"
        self.spec = spec
        self.backend = backend
        self.on_done = on_done
        self.log = log
        self.outcome: Outcome | None = None
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = threading.Event()

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"tpu-{self.label}", daemon=True)
        self._thread.start()

    @property
    def done(self) -> bool:
        return self.outcome is not None

    def cancel(self, wait_s: float = 60) -> None:
        """Stop every worker of this job and wait for the watcher to finish."""
        self._cancel.set()
        if self._thread is None:  # still queued: never started
            self._finish(Outcome(False, f"{self.label}: cancelled before it started", cancelled=True))
            return
        if self._started.is_set():
            self._kill(list(range(self.backend.hosts)))
        self._thread.join(wait_s)

    # ------------------------------------------------------------ the watcher
    def _kill(self, workers: list[int]) -> None:
        try:
            self.backend.kill(workers)
        except Exception as e:  # keep going: the other workers must still be stopped
            self.log(f"{self.label}: stopping workers {workers} failed: {e}")

    def _finish(self, outcome: Outcome) -> None:
        if self.outcome is not None:
            return
        try:
            self.backend.finish(outcome.ok)
        except JobFailure as e:
            outcome = Outcome(False, str(e))
        except Exception as e:
            outcome = Outcome(False, f"{self.label}: after the run: {type(e).__name__}: {e}")
        self.outcome = outcome
        if self.on_done:
            self.on_done(self)

    def _run(self) -> None:
        try:
            self._finish(self._watch_surviving_preemptions())
        except JobFailure as e:
            self._finish(Outcome(False, str(e)))
        except Exception as e:  # a bug or an unexpected host error must fail the job, not hang it
            self._kill(list(range(self.backend.hosts)))
            self._finish(Outcome(False, f"{self.label}: executor error: {type(e).__name__}: {e}"))

    def _tails(self, workers: list[int]) -> str:
        parts = []
        for w in workers:
            try:
                text = self.backend.tail(w, TAIL_LINES)
            except Exception as e:
                text = f"(could not read the log: {e})"
            parts.append(f"--- worker {w} log ({self.backend.log_location(w)}), last {TAIL_LINES} lines ---\n"
                         f"{text.rstrip()}")
        return "\n".join(parts)

    def _watch_surviving_preemptions(self) -> Outcome:
        """Run the job; when its VM is preempted, let the backend recreate it and run it again."""
        attempt = 0
        while True:
            try:
                return self._watch()
            except Preempted as e:
                attempt += 1
                limit = getattr(self.backend, "max_recreate", 0)
                if attempt > limit or self._cancel.is_set():
                    raise JobFailure(f"{self.label}: {e}" + (f" ({limit} recreation(s) already)" if limit else
                                     "; add `provision:` to the slice to have the executor recreate it")) from None
                self.log(f"{self.label}: {e}; recreating it and running the job again ({attempt}/{limit})")
                self.backend.after_preemption()

    def _watch(self) -> Outcome:
        if self._cancel.is_set():
            return Outcome(False, f"{self.label}: cancelled", cancelled=True)
        self.backend.prepare()
        if self._cancel.is_set():
            return Outcome(False, f"{self.label}: cancelled", cancelled=True)
        self._started.set()
        self.backend.start()
        t0 = time.monotonic()
        host0_done_at: float | None = None
        poll_s = self.spec.poll_s if self.spec else 0.2
        timeout_s = self.spec.timeout_s if self.spec else 0
        grace_s = self.spec.follower_grace_s if self.spec else 0
        n = self.backend.hosts
        while True:
            if self._cancel.is_set():
                self._kill(list(range(n)))
                return Outcome(False, f"{self.label}: cancelled; stopped all {n} worker(s)", cancelled=True)
            states = self.backend.poll()
            failed = [w for w, (s, c) in enumerate(states) if s == "lost" or (s == "exit" and c != 0)]
            running = [w for w, (s, _) in enumerate(states) if s == "running"]
            if failed:
                if running:
                    self._kill(running)
                why = "; ".join(
                    f"worker {w} " + (f"exited with code {states[w][1]}" if states[w][0] == "exit"
                                      else "is gone without an exit code (killed or host lost)")
                    for w in failed)
                stopped = f"; stopped worker(s) {', '.join(map(str, running))}" if running else ""
                return Outcome(False, f"{self.label}: {why}{stopped}\n{self._tails(failed)}")
            if not running:
                return Outcome(True)
            now = time.monotonic()
            if timeout_s and now - t0 > timeout_s:
                self._kill(running)
                return Outcome(False, f"{self.label}: timed out after {timeout_s:g} s (slice timeout_s); "
                                      f"worker(s) {', '.join(map(str, running))} still running were stopped\n"
                                      f"{self._tails(running)}")
            if states[0] == ("exit", 0) and host0_done_at is None:
                host0_done_at = now
            if host0_done_at is not None and grace_s and now - host0_done_at > grace_s:
                self._kill(running)
                return Outcome(False, f"{self.label}: host 0 finished but worker(s) "
                                      f"{', '.join(map(str, running))} were still running {grace_s:g} s later "
                                      "(follower_grace_s) and were stopped; did the rule run a trainer command "
                                      f"that every host joins?\n{self._tails(running)}")
            self._cancel.wait(poll_s)


class SlicePool:
    """One job at a time per slice; jobs without a slice start at once."""

    def __init__(self):
        self._lock = threading.Lock()
        self._busy: dict[str, JobRun] = {}
        self._queues: dict[str, collections.deque[JobRun]] = collections.defaultdict(collections.deque)

    def submit(self, run: JobRun) -> str | None:
        """Start `run` or queue it; returns the label of the job it waits for, if queued."""
        run.on_done = self._on_done
        if run.spec is None:
            run.start()
            return None
        with self._lock:
            current = self._busy.get(run.spec.slice_id)
            if current is not None:
                self._queues[run.spec.slice_id].append(run)
                return current.label
            self._busy[run.spec.slice_id] = run
        run.start()
        return None

    def _on_done(self, run: JobRun) -> None:
        if run.spec is None:
            return
        nxt = None
        with self._lock:
            if self._busy.get(run.spec.slice_id) is run:
                del self._busy[run.spec.slice_id]
                queue = self._queues[run.spec.slice_id]
                while queue:
                    cand = queue.popleft()
                    if not cand.done:
                        nxt = cand
                        self._busy[run.spec.slice_id] = cand
                        break
        if nxt is not None:
            nxt.start()

    def dequeue(self, run: JobRun) -> bool:
        """Drop a queued (not started) run; True if it was queued."""
        with self._lock:
            if run.spec is not None and run in self._queues[run.spec.slice_id]:
                self._queues[run.spec.slice_id].remove(run)
                return True
        return False
