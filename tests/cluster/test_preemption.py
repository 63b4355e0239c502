"""PreemptionGuard in one process: stop signals set a flag (the process lives on), handlers come back on exit.
Cross-rank agreement runs on 2 ranks in test_deepspeed_launcher; the whole SLURM path in test_slurm_gate_search."""

import os
import signal
import threading

import pytest

from flashmorph.errors import Preempted
from flashmorph.training.preemption import PREEMPTED_EXIT_CODE, STOP_SIGNALS, PreemptionGuard


@pytest.mark.parametrize("sig", STOP_SIGNALS)
def test_a_stop_signal_sets_the_flag_instead_of_killing(sig):
    with PreemptionGuard() as guard:
        assert guard.received is None and not guard.stop_requested()
        os.kill(os.getpid(), sig)
        assert guard.received == sig.name
        os.kill(os.getpid(), signal.SIGUSR1 if sig == signal.SIGTERM else signal.SIGTERM)
        assert guard.received == sig.name  # the first one is reported; repeats change nothing
        assert guard.stop_requested()  # a world of one: no process group, the local flag decides
        assert guard.reason == sig.name


def test_previous_handlers_come_back():
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda *a: seen.append("outer"))
    try:
        with PreemptionGuard():
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        os.kill(os.getpid(), signal.SIGUSR1)
        assert seen == ["outer"]
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_off_the_main_thread_the_guard_installs_nothing():
    result = {}

    def body():
        with PreemptionGuard() as guard:
            result["handler"] = signal.getsignal(signal.SIGTERM)
            result["stop"] = guard.stop_requested()

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert result == {"handler": signal.SIG_DFL, "stop": False}


def test_preempted_message_and_exit_code(tmp_path):
    stop = Preempted(40, tmp_path / "checkpoints" / "step_40", "SIGUSR1")
    assert "step 40" in str(stop) and "SIGUSR1" in str(stop) and "--resume" in str(stop) and "\n" not in str(stop)
    assert PREEMPTED_EXIT_CODE not in (0, 1, 2)  # apart from success, crashes and bad input
