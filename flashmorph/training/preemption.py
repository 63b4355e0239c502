"""Preemption: SIGTERM/SIGUSR1 become a flag that every rank checks at a step boundary, so the stage saves a
complete checkpoint and exits with PREEMPTED_EXIT_CODE; a requeued job then resumes exactly with --resume.

Launchers own the guard (signal handlers are process state); stages only ask it, at the end of each step:

    try:
        with distributed_session() as info, PreemptionGuard() as guard:
            run_stage(recipe, info, preemption=guard)   # per step: if guard.stop_requested(device): save, raise
    except Preempted as stop:
        print(f"preempted: {stop}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
"""

from __future__ import annotations

import logging
import signal
import threading
import time

import torch

from flashmorph.parallel import distributed

log = logging.getLogger(__name__)

# sysexits.h EX_TEMPFAIL, "try again later": a complete checkpoint exists and `--resume` continues from it.
# Distinct from 0 (finished), 1 (crash) and 2 (bad recipe/input), so job scripts can tell a clean stop apart.
PREEMPTED_EXIT_CODE = 75
# SIGTERM: what schedulers send before killing (SLURM preemption, scancel, the time limit, torchrun/deepspeed
# shutting their workers down); SIGUSR1: SLURM's early warning (`--signal=B:USR1@secs`, forwarded by the job script)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionGuard:
    """While open, the stop signals set a flag instead of killing the process; on exit the old handlers return.

    Signals are idempotent: SLURM, srun/torchrun and the job script may each deliver one to the same rank.
    SIGINT (Ctrl-C) is left alone, so an interactive user can still stop a run at once.
    """

    def __init__(self, signals=STOP_SIGNALS):
        self._signals = tuple(signals)
        self._previous: dict[int, object] = {}
        self.received: str | None = None  # name of the first stop signal this process got, e.g. "SIGTERM"

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
            log.warning("got %s: finishing the current step, then saving a checkpoint and stopping", self.received)

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is not threading.main_thread():
            # Python only installs handlers from the main thread; the run still works, it just cannot stop cleanly
            log.warning("preemption handling is off: the stage does not run in the main thread")
            return self
        for sig in self._signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def stop_requested(self, device: torch.device | str = "cpu") -> bool:
        """True on every rank once any rank got a stop signal. Collective: all ranks call it at the same step."""
        # one all-reduce of a flag, so ranks signalled a moment apart still stop after the same step
        flag = torch.tensor([0.0 if self.received is None else 1.0], device=device)
        return distributed.all_reduce_sum(flag).item() > 0

    @property
    def reason(self) -> str:
        return self.received or "a stop signal on another rank"


class Deadline:
    """Quacks like PreemptionGuard for a single-process stage: the stop 'signal' arrives once a wall-clock budget is
    spent (or when `guard`, if given, got a real one), so the stage saves a checkpoint and raises Preempted."""

    def __init__(self, seconds: float | None, guard: PreemptionGuard | None = None):
        self.until = None if seconds is None else time.monotonic() + seconds
        self.guard = guard

    def _expired(self) -> bool:
        return self.until is not None and time.monotonic() > self.until

    @property
    def received(self) -> str | None:
        signalled = self.guard.received if self.guard is not None else None
        return signalled or ("deadline" if self._expired() else None)

    @property
    def reason(self) -> str:
        signalled = self.guard.received if self.guard is not None else None
        return signalled or "the wall-clock budget"
