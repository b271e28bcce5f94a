"""The step watchdog: a host thread that ends the process when the training
loop makes no progress in time, whatever it waits on (a collective whose peer
stopped answering, a data worker, the file system).

Two bounds: the training bound for a step (its collectives included), and a
long one for what may rightly take minutes (start-up, the first step with
its compilation, evaluations, checkpoints, pictures). When a bound passes,
the process prints which step and phase it was in, dumps every thread's
stack and exits with code 5; the launcher then ends the other ranks. A
frozen rank (a hung GPU, a stopped node) so ends the job within the
training bound, instead of the collective's own timeout (30 minutes)."""
from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time

EXIT_STALLED = 5


class StepWatchdog:
    def __init__(self, step_minutes: float, long_minutes: float, rank: int):
        self.step_s, self.long_s, self.rank = 60 * step_minutes, 60 * long_minutes, rank
        self.phase, self.step, self.bound = "start-up", 0, self.long_s
        self.since = time.monotonic()
        self._done = threading.Event()
        self._thread = None
        if step_minutes > 0:
            self._thread = threading.Thread(target=self._watch, name="cimfast-watchdog", daemon=True)
            self._thread.start()

    def enter(self, phase: str, step: int, long: bool = False) -> None:
        """The loop is now in ``phase`` of ``step``: the clock restarts with that phase's bound."""
        self.phase, self.step = phase, step
        self.bound = self.long_s if long else self.step_s
        self.since = time.monotonic()

    def close(self) -> None:
        self._done.set()

    def _watch(self) -> None:
        while not self._done.wait(min(5.0, max(0.5, self.step_s / 20))):
            waited = time.monotonic() - self.since
            if waited > self.bound:
                self._fire(waited)

    def _fire(self, waited: float) -> None:
        print(f"cimfast: rank {self.rank}: no progress for {waited:.0f} s in step {self.step} ({self.phase}), "
              f"past the bound of {self.bound:.0f} s (--step_timeout_minutes / --long_timeout_minutes): another "
              "rank stopped answering, or a data worker or the file system hangs. Every thread's stack follows; "
              "exit code 5. Resume with --resume auto.", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        os._exit(EXIT_STALLED)
