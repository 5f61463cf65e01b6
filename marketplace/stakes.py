"""Stakes read from the chain, kept for a few seconds so that polling does not cost a chain read per request.

A provider polls for work about every half second, a verifier for tasks as often: reading each one's stake on every
poll puts the chain node's load at (nodes x 2) reads per second. A read that showed enough stake is reused for
``stake_read_ttl_s`` seconds; that loses nothing, because stake cannot leave faster than that: an unbond keeps it
slashable for the unbonding delay (a week by default), and a slashed provider or a benched verifier is refused on its
database status whatever its stake. A read that showed too little is never reused (a node that just staked up is
served at its next request), nor is a read where the stake is about to back new work (a submitted result): those
read the chain again."""
from __future__ import annotations

import threading
import time


class StakeCache:
    def __init__(self) -> None:
        self._seen: dict[str, tuple[int, float]] = {}
        self._lock = threading.Lock()

    def enough(self, address: str, need: int, ttl_s: float) -> int | None:
        """The stake last read for ``address`` if it was at least ``need`` and was read under ``ttl_s`` seconds ago."""
        with self._lock:
            got = self._seen.get(address)
        if got is None or got[0] < need or time.monotonic() - got[1] >= ttl_s:
            return None
        return got[0]

    def put(self, address: str, stake: int) -> None:
        with self._lock:
            self._seen[address] = (stake, time.monotonic())
