"""Process plumbing of the scenarios: the load-generator workers and a broker CPU sampler."""

from __future__ import annotations

import multiprocessing
import queue
import threading
import time
from typing import TYPE_CHECKING, Self

from loadgen import IdleJob, PublishJob, Report, SubscribeJob, monotonic_ns, worker_main

if TYPE_CHECKING:
    from collections.abc import Sequence
    from multiprocessing.context import SpawnProcess
    from types import TracebackType

    from brokers import RunningBroker

__all__ = ["CpuSampler", "Workers"]


class Workers:
    """The load-generator processes of one scenario; all are gone when the block exits."""

    def __init__(self) -> None:
        """Prepare the report queue and the ``go`` and ``stop`` events; no process yet."""
        self._ctx = multiprocessing.get_context("spawn")
        self.reports: multiprocessing.Queue[Report] = self._ctx.Queue()
        self.go = self._ctx.Event()
        self.stop = self._ctx.Event()
        self._procs: dict[str, SpawnProcess] = {}
        self._inbox: dict[tuple[str, str], Report] = {}
        self.errors: dict[str, str] = {}

    def __enter__(self) -> Self:
        """Nothing to start: workers start with `spawn`."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Tell every worker to leave, give them 3 s, then terminate and kill what is left."""
        self.stop.set()
        self.go.set()  # releases workers still waiting, so they can leave
        deadline = time.monotonic() + 3.0
        for proc in self._procs.values():
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self._procs.values():
            if proc.is_alive():
                proc.terminate()
                proc.join(2.0)
            if proc.is_alive():
                proc.kill()
                proc.join(2.0)
        self.reports.close()
        self.reports.join_thread()

    def spawn(self, job: PublishJob | SubscribeJob | IdleJob) -> str:
        """Start a worker process for `job`; returns its name."""
        proc = self._ctx.Process(
            target=worker_main,
            args=(job, self.reports, self.go, self.stop),
            name=f"loadgen-{job.name}",
            daemon=True,
        )
        proc.start()
        self._procs[job.name] = proc
        return job.name

    def start(self) -> int:
        """Release every worker; returns the start time (monotonic ns)."""
        started = monotonic_ns()
        self.go.set()
        return started

    def collect(self, kind: str, names: Sequence[str], timeout_s: float) -> dict[str, Report]:
        """Wait for a `kind` report from each of `names`; missing ones go to `errors`."""
        deadline = time.monotonic() + timeout_s
        wanted = [n for n in names if n not in self.errors]
        while True:
            missing = [n for n in wanted if (n, kind) not in self._inbox and n not in self.errors]
            if not missing or time.monotonic() > deadline:
                break
            try:
                report = self.reports.get(timeout=0.1)
            except queue.Empty:
                for name in missing:
                    proc = self._procs[name]
                    if not proc.is_alive() and (name, kind) not in self._inbox:
                        self._drain()
                        if (name, kind) not in self._inbox and name not in self.errors:
                            self.errors[name] = f"exited with code {proc.exitcode}"
                continue
            self._file(report)
        for name in missing:
            self.errors.setdefault(name, f"no {kind!r} report within {timeout_s:.0f} s")
        return {n: self._inbox[n, kind] for n in wanted if (n, kind) in self._inbox}

    def _drain(self) -> None:
        while True:
            try:
                self._file(self.reports.get_nowait())
            except queue.Empty:
                return

    def _file(self, report: Report) -> None:
        if report.kind == "error":
            self.errors[report.worker] = str(report.data.get("error", "unknown error"))
        else:
            self._inbox[report.worker, report.kind] = report


class CpuSampler:
    """Samples the broker's CPU time every 50 ms, to report its load over any window."""

    def __init__(self, broker: RunningBroker) -> None:
        """Sample `broker` once entered."""
        self._broker = broker
        self._samples: list[tuple[int, float]] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench[cpu].loop", daemon=True)

    def __enter__(self) -> Self:
        """Take the first sample and start the sampling thread."""
        self._samples.append((monotonic_ns(), self._broker.cpu_s()))
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        """Stop sampling; the samples stay readable."""
        self._done.set()
        self._thread.join(1.0)

    def _run(self) -> None:
        while not self._done.wait(0.05):
            try:
                self._samples.append((monotonic_ns(), self._broker.cpu_s()))
            except Exception:  # noqa: BLE001  # the broker may be gone; stop sampling
                return

    def share(self, start_ns: int, end_ns: int) -> float | None:
        """The broker's CPU time between two instants, as a share of one core."""
        if end_ns <= start_ns:
            return None
        inside = [s for s in self._samples if start_ns <= s[0] <= end_ns]
        before = [s for s in self._samples if s[0] <= start_ns][-1:]
        after = [s for s in self._samples if s[0] >= end_ns][:1]
        window = before + inside + after
        if len(window) < 2 or window[-1][0] == window[0][0]:
            return None
        return (window[-1][1] - window[0][1]) / ((window[-1][0] - window[0][0]) / 1e9)
