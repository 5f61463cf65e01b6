"""Signs of life sent from a background thread while a long piece of work (training a unit, replaying a segment)
runs on the calling thread."""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


def beat_interval(timeout_s: float) -> float:
    """How often to beat against a marketplace deadline of ``timeout_s``: every quarter of it, at most every 15 s
    and at least every 0.5 s."""
    return min(15.0, max(0.5, timeout_s / 4))


@contextmanager
def beating(interval_s: float, beat: Callable[[], bool]) -> Iterator[None]:
    """Call ``beat`` every ``interval_s`` seconds on a daemon thread while the block runs; a beat that returns False
    stops the beating (the work it kept alive is gone). The thread is joined when the block exits."""
    done = threading.Event()

    def run() -> None:
        while not done.wait(interval_s):
            if not beat():
                return

    thread = threading.Thread(target=run, name="heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
