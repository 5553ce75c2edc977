"""StopRequest with real signals sent to this process: the first SIGTERM / SIGINT is recorded so the
step can finish and save, the launcher's echo of a Ctrl-C (a later SIGTERM) is ignored, a second
Ctrl-C stops at once, and the previous handlers come back however the block is left."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest

from step2_reward_model.training import HANDLED, StopRequest


def deliver(signum: int) -> None:
    """Send `signum` to this process and let Python run its handler, which it does in the main
    thread at the latest during the sleep; a handler that raises raises from here."""
    os.kill(os.getpid(), signum)
    time.sleep(0.2)


def sentinel(signum: int, _frame) -> None:
    raise AssertionError(f"the handler from before StopRequest got {signal.Signals(signum).name}")


@pytest.fixture
def own_handlers() -> Iterator[dict[int, object]]:
    """Known handlers before each test (so a restore is visible), and the originals back after it,
    even if StopRequest failed to restore them."""
    originals = {signum: signal.signal(signum, sentinel) for signum in HANDLED}
    yield {signum: sentinel for signum in HANDLED}
    for signum, handler in originals.items():
        signal.signal(signum, handler)


def test_first_sigint_is_recorded_and_a_later_sigterm_ignored(own_handlers, capsys):
    with StopRequest(rank=0) as stop:
        assert stop.signum is None and stop.name == ""
        deliver(signal.SIGINT)
        assert stop.signum == signal.SIGINT and stop.name == "SIGINT"
        deliver(signal.SIGTERM)  # the deepspeed launcher forwards the same Ctrl-C as SIGTERM
        assert stop.signum == signal.SIGINT
    assert {signum: signal.getsignal(signum) for signum in HANDLED} == own_handlers
    err = capsys.readouterr().err
    assert err.count("SIGINT: finishing this step, then saving a checkpoint") == 1
    assert "Ctrl-C again stops at once, without saving" in err


def test_second_sigint_raises_at_once_and_handlers_are_restored(own_handlers, capsys):
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt), StopRequest(rank=1) as stop:
        deliver(signal.SIGINT)
        assert stop.signum == signal.SIGINT
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # only a KeyboardInterrupt ends this early
    assert time.monotonic() - started < 3
    assert {signum: signal.getsignal(signum) for signum in HANDLED} == own_handlers
    assert capsys.readouterr().err == ""  # only rank 0 speaks


def test_after_a_sigterm_every_further_signal_is_ignored(own_handlers):
    """A scheduler's SIGTERM, then a Ctrl-C: still one orderly stop with a checkpoint."""
    with StopRequest(rank=1) as stop:
        deliver(signal.SIGTERM)
        try:
            deliver(signal.SIGINT)
        except KeyboardInterrupt:  # would end the whole pytest session, not just fail this test
            pytest.fail("a SIGINT after a SIGTERM stopped at once")
        deliver(signal.SIGTERM)
        assert stop.signum == signal.SIGTERM and stop.name == "SIGTERM"
    assert {signum: signal.getsignal(signum) for signum in HANDLED} == own_handlers
