"""The matching engine's index: offers ranked once, then each query and each capacity change in O(log n).

Offers are sorted once by the caller's ranking key (effective price, region floor, address) and laid out as the
leaves of one array segment tree in that order. Every node keeps, over the live leaves below it (online, with
a free slot): the largest VRAM, the largest stake, the smallest ask and the set of regions (a bit mask). The
cheapest offer with VRAM >= v, stake >= s, ask <= cap in an allowed region is the leftmost leaf reached by
descending only into children whose aggregates qualify. A leaf that runs out of slots, goes offline or is
hidden for one query is set dead by a point update that stops as soon as an ancestor's aggregates do not change.

Cost: a point update is O(log n) and usually a few levels. A descent is O(log n) when the aggregates qualify
along one path; because they are independent maxima/minima it can backtrack (a subtree whose VRAM-rich and
cheap leaves differ). On realistic books that costs a few extra nodes per query (``gridmint bench matching``
measures it), but an adversarial book can make one query O(n). Repeats of a query that found nothing are
answered from a cache until capacity comes back, which keeps a saturated market (most queued units fail, and
a failing descent is the costly kind) from paying that price once per queued unit.

Values are stored as their rank among the book's distinct values, one shared int object per value, in plain
lists: the query loop runs in pure Python, and list reads of a few thousand shared ints stay in cache.
"""
from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Sequence

import numpy as np

#: Failing queries remembered at once (cleared whenever capacity comes back).
_MAX_FAILED = 4096


def _compress(values: list[int]) -> tuple[np.ndarray, list[int]]:
    """Each value's rank among the distinct values, and the sorted distinct values (for bisecting bounds)."""
    try:
        arr = np.array(values, dtype=np.int64)
    except OverflowError:  # money beyond int64 (e.g. stakes in base units): rank through Python ints
        distinct = sorted(set(values))
        where = {x: k for k, x in enumerate(distinct)}
        return np.fromiter(map(where.__getitem__, values), dtype=np.int64, count=len(values)), distinct
    uniq, inverse = np.unique(arr, return_inverse=True)
    return inverse.astype(np.int64).reshape(-1), uniq.tolist()


def _canonical(values: np.ndarray) -> list[int]:
    """``values.tolist()`` with one int object per distinct value. A pure-Python loop reading a million
    distinct int objects scattered over the heap takes a cache miss per read; a few thousand shared ones stay
    in cache."""
    if not len(values):
        return []
    low = int(values.min())
    canon = list(range(low, int(values.max()) + 1))
    return list(map(canon.__getitem__, (values - low).tolist()))


def _levels(leaves: np.ndarray, size: int, pad: int, combine: np.ufunc) -> list[int]:
    """Level-order array [unused, root, level 1, ..., leaves] of ``size`` leaves, each parent ``combine`` of
    its two children."""
    level = np.full(size, pad, dtype=np.int64)
    level[: len(leaves)] = leaves
    levels = [level]
    while len(level) > 1:
        level = combine.reduce(level.reshape(-1, 2), axis=1)
        levels.append(level)
    return _canonical(np.concatenate(([0], *levels[::-1])))


class MatchIndex:
    """Mutable index over one offer book. Offers are addressed by input position ``i`` or by global rank ``r``
    (``order[r]`` is the input position of the r-th cheapest offer); ``rank_of[i]`` and ``index_of[r]`` convert.
    Everything below takes ranks."""

    def __init__(self, order: list[int], regions: Sequence[str], prices: Sequence[int], vram: Sequence[int],
                 stakes: Sequence[int], free: Sequence[int], online: Sequence[bool] | None = None) -> None:
        n = len(order)
        self.index_of = order
        rank_of = np.empty(n, dtype=np.int64)
        rank_of[np.array(order, dtype=np.int64)] = np.arange(n, dtype=np.int64)
        self.rank_of: list[int] = rank_of.tolist()
        self.price = list(map(prices.__getitem__, order))
        self.free = [x if x > 0 else 0 for x in map(free.__getitem__, order)]
        self.online = [True] * n if online is None else [bool(x) for x in map(online.__getitem__, order)]
        vr, self.vram_values = _compress(list(map(vram.__getitem__, order)))
        sr, self.stake_values = _compress(list(map(stakes.__getitem__, order)))
        pr, self.price_values = _compress(self.price)
        self.region_bit = {name: 1 << k for k, name in enumerate(sorted(set(regions)))}
        self.all_regions = sum(self.region_bit.values())
        rb = np.array([self.region_bit[regions[i]] for i in order], dtype=np.int64)
        self.vr, self.sr, self.pr, self.rb = _canonical(vr), _canonical(sr), _canonical(pr), _canonical(rb)
        self.dead_price = len(self.price_values)  # above every price rank: a dead leaf never meets a cap
        self.hidden = 0
        # (vram rank, stake rank, price rank, region mask) of queries that found nothing, valid until capacity
        # comes back (take() only removes capacity; hide() is for one query, which records nothing meanwhile)
        self.failed: set[tuple[int, int, int, int]] = set()

        size = 1
        while size < max(1, n):
            size *= 2
        self.size = size
        live = (np.array(self.free, dtype=np.int64) > 0) & np.array(self.online, dtype=bool)
        self.mv = _levels(np.where(live, vr, -1), size, -1, np.maximum)
        self.ms = _levels(np.where(live, sr, -1), size, -1, np.maximum)
        self.mp = _levels(np.where(live, pr, self.dead_price), size, self.dead_price, np.minimum)
        self.mr = _levels(np.where(live, rb, 0), size, 0, np.bitwise_or)

    # ------------------------------------------------------------------ queries

    def regions_for(self, allowed: frozenset[str] | None) -> int:
        """The region mask of an allow-list (None: anywhere). Regions no offer is in add nothing."""
        if allowed is None:
            return self.all_regions
        bit = self.region_bit
        return sum(bit[name] for name in allowed if name in bit)

    def best(self, vram: int, stake: int, cap: int, regions: int) -> int:
        """Global rank of the cheapest live offer with VRAM >= vram, stake >= stake, ask <= cap, in a region of
        the mask ``regions`` (``regions_for``); -1 if none."""
        v = bisect_left(self.vram_values, vram)
        s = bisect_left(self.stake_values, stake)
        c = bisect_right(self.price_values, cap) - 1
        mv, ms, mp, mr = self.mv, self.ms, self.mp, self.mr
        if mv[1] < v or ms[1] < s or mp[1] > c or not mr[1] & regions:
            return -1
        key = (v, s, c, regions)
        if key in self.failed:
            return -1  # the same query found nothing and no capacity has come back since
        size = self.size
        i = 1
        stack: list[int] = []
        push, pop = stack.append, stack.pop
        while i < size:
            i += i
            if mv[i] >= v and ms[i] >= s and mp[i] <= c and mr[i] & regions:
                push(i + 1)  # the right sibling, looked at only if the left subtree holds no match after all
                continue
            i += 1
            if mv[i] >= v and ms[i] >= s and mp[i] <= c and mr[i] & regions:
                continue
            # the aggregates qualified but no single leaf below does (they sit on different leaves): backtrack
            while stack:
                i = pop()
                if mv[i] >= v and ms[i] >= s and mp[i] <= c and mr[i] & regions:
                    break
            else:
                if not self.hidden and len(self.failed) < _MAX_FAILED:
                    self.failed.add(key)  # only with nothing hidden: a hidden leaf comes back on restore
                return -1
        return i - size

    # ------------------------------------------------------------------ capacity changes

    def _set(self, r: int, alive: bool) -> None:
        """Point update of leaf ``r``; each aggregate climbs only while it changes."""
        i = r + self.size
        if alive:
            self.mv[i], self.ms[i], self.mp[i], self.mr[i] = self.vr[r], self.sr[r], self.pr[r], self.rb[r]
        else:
            self.mv[i], self.ms[i], self.mp[i], self.mr[i] = -1, -1, self.dead_price, 0
        for agg, lower in ((self.mv, False), (self.ms, False), (self.mp, True)):
            j = i >> 1
            while j:
                a, b = agg[j + j], agg[j + j + 1]
                x = (a if a < b else b) if lower else (a if a > b else b)
                if agg[j] == x:
                    break  # nothing above depends on anything but this node
                agg[j] = x
                j >>= 1
        mr = self.mr
        j = i >> 1
        while j:
            x = mr[j + j] | mr[j + j + 1]
            if mr[j] == x:
                break
            mr[j] = x
            j >>= 1

    def take(self, r: int) -> None:
        """Use one slot of offer ``r``."""
        self.free[r] -= 1
        if self.free[r] == 0:
            self._set(r, False)

    def give(self, r: int) -> None:
        """Return one slot to offer ``r`` (its unit finished or was dropped)."""
        self.free[r] += 1
        if self.free[r] == 1 and self.online[r]:
            self.failed.clear()
            self._set(r, True)

    def set_online(self, r: int, online: bool) -> None:
        if self.online[r] != online:
            self.online[r] = online
            if self.free[r] > 0:
                if online:
                    self.failed.clear()
                self._set(r, online)

    def hide(self, r: int) -> None:
        """Take ``r`` out of queries until ``restore(r)`` (same state otherwise)."""
        self.hidden += 1
        self._set(r, False)

    def restore(self, r: int) -> None:
        self.hidden -= 1
        self._set(r, self.online[r] and self.free[r] > 0)
