"""Process plumbing of the scenarios: the load-generator workers and a broker CPU sampler."""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import queue
import sys
import threading
import time
from typing import TYPE_CHECKING, Self

import psutil
from loadgen import IdleJob, PublishJob, Report, SubscribeJob, monotonic_ns, worker_main

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence
    from multiprocessing.context import SpawnProcess
    from types import TracebackType

    from brokers import RunningBroker

__all__ = ["CpuSampler", "Workers"]


@contextlib.contextmanager
def _main_not_rerun() -> Iterator[None]:
    """Start processes that do not run the benchmark's main script again.

    A spawned process runs the parent's ``__main__`` file again (as ``__mp_main__``), so that
    objects defined there can be unpickled. Workers need none: their target and jobs live in
    `loadgen`. The main script imports rich, the brokers and meshchat's directory, about 0.25 s
    of CPU per worker on the load generator's one core, which made every scenario wait 0.7 s
    before it could start. Without a ``__file__`` multiprocessing leaves ``__main__`` alone.
    """
    main = sys.modules["__main__"]
    path = main.__dict__.pop("__file__", None)
    try:
        yield
    finally:
        if path is not None:
            main.__file__ = path


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
        with _main_not_rerun():
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
    """Samples the broker's CPU time every 50 ms, to report its load over any window.

    When the broker is pinned to one core, it also samples that core's user time: what the
    broker did not spend of it went to other processes (this machine is shared), which slows the
    broker down and makes a number unreliable. User time only: the kernel's own network work
    for the benchmark's traffic (softirq, ksoftirqd) lands on the broker's core too, as system
    time, and is no one else's load.
    """

    def __init__(self, broker: RunningBroker) -> None:
        """Sample `broker` once entered."""
        self._broker = broker
        cores = broker.process().cpu_affinity()
        self._core = cores[0] if len(cores) == 1 else None
        self._samples: list[tuple[int, float, float, float]] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench[cpu].loop", daemon=True)

    def __enter__(self) -> Self:
        """Take the first sample and start the sampling thread."""
        self._samples.append(self._sample())
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        """Stop sampling; the samples stay readable."""
        self._done.set()
        self._thread.join(1.0)

    def _sample(self) -> tuple[int, float, float, float]:
        """(now, the broker's CPU seconds, its user seconds, its core's user seconds or NaN)."""
        core_user = math.nan
        if self._core is not None:
            core = psutil.cpu_times(percpu=True)[self._core]
            core_user = core.user + core.nice
        times = self._broker.process().cpu_times()
        return monotonic_ns(), times.user + times.system, times.user, core_user

    def _run(self) -> None:
        while not self._done.wait(0.05):
            try:
                self._samples.append(self._sample())
            except Exception:  # noqa: BLE001  # the broker may be gone; stop sampling
                return

    def _window(self, start_ns: int, end_ns: int) -> tuple[float, float, float, float] | None:
        """(seconds, broker CPU, broker user, core user seconds) around a window, or None."""
        if end_ns <= start_ns:
            return None
        inside = [s for s in self._samples if start_ns <= s[0] <= end_ns]
        before = [s for s in self._samples if s[0] <= start_ns][-1:]
        after = [s for s in self._samples if s[0] >= end_ns][:1]
        window = before + inside + after
        if len(window) < 2 or window[-1][0] == window[0][0]:
            return None
        first, last = window[0], window[-1]
        return (
            (last[0] - first[0]) / 1e9,
            last[1] - first[1],
            last[2] - first[2],
            last[3] - first[3],
        )

    def share(self, start_ns: int, end_ns: int) -> float | None:
        """The broker's CPU time between two instants, as a share of one core."""
        window = self._window(start_ns, end_ns)
        return None if window is None else window[1] / window[0]

    def others(self, start_ns: int, end_ns: int) -> float | None:
        """The share of the broker's core that other processes used between two instants.

        None when the broker is not pinned to one core. Counts user time (see the class).
        """
        window = self._window(start_ns, end_ns)
        if window is None or math.isnan(window[3]):
            return None
        seconds, _, broker_user, core_user = window
        return max(0.0, (core_user - broker_user) / seconds)
