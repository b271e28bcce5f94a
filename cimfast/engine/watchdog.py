"""The step watchdog: a host thread that ends the process when the training
loop makes no progress in time, whatever it waits on (a collective whose peer
stopped answering, a data worker, the file system).

Two bounds: the training bound for a step (its collectives included), and a
long one for what may rightly take minutes (start-up, the first step with
its compilation, evaluations, checkpoints, pictures). When a bound passes,
the process prints which step and phase it was in, dumps every thread's
stack and exits with code 5; the launcher then ends the other ranks. A
frozen rank (a hung GPU, a stopped node) so ends the job within the
training bound, instead of the collective's own timeout (30 minutes).

The same two bounds, plus a minute, are the process groups' own timeouts
(``retime``): a collective begun in a training phase fails after the
training bound, one begun in a long phase (a rank-0 evaluation the others
wait for) only after the long bound. That is the backstop where the host
thread never blocks (NCCL runs its collectives asynchronously and aborts
them on its own timeout); the minute lets the watchdog, which names where
the loop stood, fire first where it can."""
from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from typing import Callable, Optional

from cimfast.config.preflight import record_exit

EXIT_STALLED = 5
GROUP_MARGIN_S = 60.0  # the process groups' timeout over the watchdog's bound


class StepWatchdog:
    def __init__(self, step_minutes: float, long_minutes: float, rank: int,
                 retime: Optional[Callable[[float], None]] = None):
        self.step_s, self.long_s, self.rank = 60 * step_minutes, 60 * long_minutes, rank
        self.phase, self.step, self.bound = "start-up", 0, self.long_s
        self.since = time.monotonic()
        self._retime = retime if step_minutes > 0 else None  # (seconds) -> None: the process groups' timeout
        if retime is not None:  # groups made after start-up (ZeRO's, the stop request's) had torch's default
            retime(self.long_s + GROUP_MARGIN_S)
        self._done = threading.Event()
        self._thread = None
        if step_minutes > 0:
            self._thread = threading.Thread(target=self._watch, name="cimfast-watchdog", daemon=True)
            self._thread.start()

    def enter(self, phase: str, step: int, long: bool = False) -> None:
        """The loop is now in ``phase`` of ``step``: the clock restarts with that phase's bound."""
        self.phase, self.step = phase, step
        bound = self.long_s if long else self.step_s
        if bound != self.bound and self._retime is not None:
            self._retime(bound + GROUP_MARGIN_S)
        self.since = time.monotonic()  # before the bound: the thread never sees a new bound with an old start
        self.bound = bound

    def where(self) -> str:
        return f"step {self.step} ({self.phase})"

    def close(self) -> None:
        self._done.set()

    def failed(self, error: BaseException) -> None:
        """The loop raised ``error``: say where. A collective that timed out (a peer stopped
        answering) ends the process like the watchdog does, with exit code 5."""
        self.close()
        if isinstance(error, (KeyboardInterrupt, SystemExit)):
            return
        timed_out = "Timed out waiting" in str(error) and isinstance(error, RuntimeError)  # gloo's words
        print(f"cimfast: rank {self.rank}: {type(error).__name__} in {self.where()}"
              + (f": a collective timed out ({error}); another rank stopped answering. Exit code 5. Resume with "
                 "--resume auto." if timed_out else ""), file=sys.stderr, flush=True)
        if timed_out:
            raise SystemExit(EXIT_STALLED) from error

    def _watch(self) -> None:
        while not self._done.wait(min(5.0, max(0.5, self.step_s / 20))):
            waited = time.monotonic() - self.since
            if waited > self.bound:
                self._fire(waited)

    def _fire(self, waited: float) -> None:
        print(f"cimfast: rank {self.rank}: no progress for {waited:.0f} s in {self.where()}, "
              f"past the bound of {self.bound:.0f} s (--step_timeout_minutes / --long_timeout_minutes): another "
              "rank stopped answering, or a data worker or the file system hangs. Every thread's stack follows; "
              "exit code 5. Resume with --resume auto.", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        record_exit(EXIT_STALLED)
        os._exit(EXIT_STALLED)
