"""The matching engine's index: offers ranked once, then each query and each capacity change in O(log n).

Offers are sorted once by the caller's ranking key (effective price, region floor, address) and laid out in
that order as the leaves of segment trees: one per region, plus one "everywhere" tree holding every offer for
units allowed anywhere. Every node keeps, over the leaves below it that it counts as live, the largest VRAM,
the largest stake and the smallest ask. The cheapest offer with VRAM >= v, stake >= s and ask <= cap in a tree
is its leftmost leaf reached by descending only into children whose aggregates qualify; the answer is the
lowest rank over the trees searched (everywhere's, or each allowed region's).

Capacity changes are lazy where that is free of risk. A tree may count a leaf that is no longer live (it went
offline, or, in its region's tree, its last slot was taken): the aggregates then only over-promise, and the
first query that lands on such a leaf drops it from that tree (O(log n), the cost an eager update would have
paid) and goes on to the next leaf to the right. So going offline is O(1), a leaf that comes back before any
query reached it costs nothing, and only a leaf some tree dropped is put back (O(log n)). Most churn in a large
market is among offers no query gets to. A per-query filter (providers excluded from a unit, operators already
holding one of its replicas) is applied at the leaves the same way, the trees untouched.

Cost: an update is O(log n), usually a few levels (it stops where an aggregate no longer changes). A descent is
O(log n) when the aggregates qualify along one path. Because they are independent maxima/minima they can
over-promise (a subtree whose VRAM-rich and cheap leaves differ) and the descent goes back up and right; on the
synthetic market that is a few nodes per query, but a query that no leaf satisfies while many subtrees seem
to (big GPUs under a low cap once the cheap ones are taken) visits a large part of the tree, and an adversarial
book can make any query O(n). Two caches keep repeats cheap until capacity comes back: a query that found
nothing answers its repeats and any stricter query at once, and the units of one job, matched one after the
other with equal bounds, each resume where the last one stopped (a step right instead of a root descent).
(Per-VRAM-band ask aggregates make the failing case O(log n) too, but cost more than they save here: each band
is one more list to update per change, and big GPUs, the ones that fill first, sit in every band.)

Values are stored as their rank among the book's distinct values, one shared int object per value, in plain
lists: the query loop runs in pure Python, and reading a few thousand shared ints stays in cache (and in
memory) where millions of separate ones would not.
"""
from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Callable, Sequence

import numpy as np

#: Failing queries remembered per region allow-list (all forgotten whenever capacity comes back).
_MAX_FAILED = 256
#: Search cursors kept at once (all dropped whenever capacity comes back).
_MAX_CURSORS = 1 << 16
#: Distinct region allow-lists whose scopes are cached.
_MAX_SCOPES = 4096


class _Tree:
    """One segment tree over some offers in rank order. Leaf ``pos`` holds the offer of global rank
    ``ranks[pos]``; ``counted[pos]`` says whether the aggregates include it."""

    __slots__ = ("size", "mv", "ms", "mp", "ranks", "counted")

    def __init__(self, ranks: list[int], vram: np.ndarray, stake: np.ndarray, price: np.ndarray,
                 live: np.ndarray, dead_price: int) -> None:
        size = 1
        while size < max(1, len(ranks)):
            size *= 2
        self.size = size
        self.ranks = ranks
        self.counted: list[bool] = live.tolist()
        self.mv = _levels(np.where(live, vram, -1), size, -1, np.maximum)
        self.ms = _levels(np.where(live, stake, -1), size, -1, np.maximum)
        self.mp = _levels(np.where(live, price, dead_price), size, dead_price, np.minimum)

    def kill(self, pos: int, dead_price: int) -> None:
        """Stop counting leaf ``pos``: each aggregate above it is recomputed only while it changes (usually a
        few levels: the sibling subtree mostly holds as good a value)."""
        self.counted[pos] = False
        i = pos + self.size
        mv, ms, mp = self.mv, self.ms, self.mp
        mv[i] = ms[i] = -1
        mp[i] = dead_price
        for agg in (mv, ms):
            j = i >> 1
            while j:
                a, b = agg[j + j], agg[j + j + 1]
                x = a if a > b else b
                if agg[j] == x:
                    break  # nothing above depends on anything but this node
                agg[j] = x
                j >>= 1
        j = i >> 1
        while j:
            a, b = mp[j + j], mp[j + j + 1]
            x = a if a < b else b
            if mp[j] == x:
                break
            mp[j] = x
            j >>= 1

    def revive(self, pos: int, v: int, s: int, p: int) -> None:
        """Count leaf ``pos`` again, with (v, s, p): each aggregate climbs while the new value improves it."""
        self.counted[pos] = True
        i = pos + self.size
        mv, ms, mp = self.mv, self.ms, self.mp
        mv[i], ms[i], mp[i] = v, s, p
        j = i >> 1
        while j and mv[j] < v:
            mv[j] = v
            j >>= 1
        j = i >> 1
        while j and ms[j] < s:
            ms[j] = s
            j >>= 1
        j = i >> 1
        while j and mp[j] > p:
            mp[j] = p
            j >>= 1

    def search(self, v: int, s: int, c: int, live: list[bool], dead_price: int,
               skip: Callable[[int], bool] | None, i: int = 1) -> int:
        """Leaf node (>= size) of the first leaf with VRAM >= v, stake >= s, ask <= c (value ranks) that is
        ``live`` (by global rank) and not ``skip``-ped, searching from node ``i``: the root, or a leaf a search
        with the same bounds returned before (a cursor: nothing left of it qualified then, and capacity has only
        shrunk since). 0 if none. Counted leaves found dead on the way are dropped."""
        mv, ms, mp = self.mv, self.ms, self.mp
        if not (mv[i] >= v and ms[i] >= s and mp[i] <= c):
            if i == 1:
                return 0
            i = self._right_of(i, v, s, c)
            if not i:
                return 0
        size, ranks = self.size, self.ranks
        while True:
            if i < size:
                i += i  # left child
                if mv[i] >= v and ms[i] >= s and mp[i] <= c:
                    continue
                i += 1  # right child
                if mv[i] >= v and ms[i] >= s and mp[i] <= c:
                    continue
                # the aggregates above over-promised (what qualified sits on different leaves): move right
            else:
                r = ranks[i - size]
                if live[r]:
                    if skip is None or not skip(r):
                        return i
                else:
                    self.kill(i - size, dead_price)  # went offline or full since; the nodes above i are fixed now
            # everything left of i and below it is searched: go on with the first right sibling of i or of an
            # ancestor whose aggregates qualify (_right_of, inlined: this loop is the hot path)
            while True:
                while i & 1:
                    i >>= 1  # a right child: climb
                if not i:
                    return 0  # climbed past the root
                i += 1
                if mv[i] >= v and ms[i] >= s and mp[i] <= c:
                    break

    def _right_of(self, i: int, v: int, s: int, c: int) -> int:
        """The first right sibling of node ``i`` or of an ancestor whose aggregates qualify; 0 if none."""
        mv, ms, mp = self.mv, self.ms, self.mp
        while True:
            while i & 1:
                i >>= 1
            if not i:
                return 0
            i += 1
            if mv[i] >= v and ms[i] >= s and mp[i] <= c:
                return i


def _compress(values: Sequence[int]) -> tuple[np.ndarray, list[int]]:
    """Each value's rank among the distinct values (by position), and the sorted distinct values (for bisecting
    bounds). Values must be >= 0; money beyond int64 (stakes in base units, say) is ranked exactly too."""
    n = len(values)
    try:
        arr = np.array(values, dtype=np.int64).reshape(-1)
    except OverflowError:
        big = np.array(values, dtype=object).reshape(-1)
        try:  # as two int64 halves, sorted together
            hi = (big >> 62).astype(np.int64)
            lo = (big & ((1 << 62) - 1)).astype(np.int64)
        except OverflowError:  # beyond 2**125: through Python ints
            distinct = sorted(set(values))
            where = {x: k for k, x in enumerate(distinct)}
            return np.fromiter(map(where.__getitem__, values), dtype=np.int64, count=n), distinct
        order = np.lexsort((lo, hi))
        hs, ls = hi[order], lo[order]
        first = np.ones(n, dtype=bool)
        first[1:] = (hs[1:] != hs[:-1]) | (ls[1:] != ls[:-1])
        inverse = np.empty(n, dtype=np.int64)
        inverse[order] = np.cumsum(first) - 1
        return inverse, big[order[first]].tolist()
    uniq, inverse = np.unique(arr, return_inverse=True)
    return inverse.astype(np.int64).reshape(-1), uniq.tolist()


def _canonical(values: np.ndarray) -> list[int]:
    """``values.tolist()`` with one int object per distinct value (see the module docstring)."""
    if not len(values):
        return []
    low = int(values.min())
    canon = np.array(range(low, int(values.max()) + 1), dtype=object)  # Python ints, one per value
    return canon[values - low].tolist()


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
    (``index_of[r]`` is the input position of the r-th cheapest offer; ``rank_of[i]`` the other way).
    Everything below takes ranks. Values (VRAM, stake, ask) must be ints >= 0."""

    def __init__(self, order: list[int], regions: Sequence[str], vram: Sequence[int], stakes: Sequence[int],
                 prices: Sequence[int], free: Sequence[int], online: Sequence[bool] | None = None) -> None:
        n = len(order)
        self.index_of = order
        by_rank = np.array(order, dtype=np.int64).reshape(-1)
        rank_of = np.empty(n, dtype=np.int64)
        rank_of[by_rank] = np.arange(n, dtype=np.int64)
        self.rank_of: list[int] = rank_of.tolist()
        free_arr = np.maximum(np.array(free, dtype=np.int64).reshape(-1)[by_rank], 0)
        online_arr = np.ones(n, dtype=bool) if online is None else np.array(online, dtype=bool).reshape(-1)[by_rank]
        live = (free_arr > 0) & online_arr
        self.free: list[int] = free_arr.tolist()
        self.online: list[bool] = online_arr.tolist()
        self.live: list[bool] = live.tolist()  # what queries may return: online with a free slot
        vr, self.vram_values = _compress(vram)
        sr, self.stake_values = _compress(stakes)
        pr, self.price_values = _compress(prices)
        vr, sr, pr = vr[by_rank], sr[by_rank], pr[by_rank]
        self.vr, self.sr, self.pr = _canonical(vr), _canonical(sr), _canonical(pr)
        self.dead_price = len(self.price_values)  # above every price rank: a dead leaf never meets a cap
        # allow-list (None: anywhere) -> the loosest (vram rank, stake rank, price rank) bounds that found nothing
        # (a stricter query fails too). Valid until capacity comes back: taking a slot only removes capacity.
        self.failed: dict[tuple[int, ...] | None, list[tuple[int, int, int]]] = {}
        # (vram rank, stake rank, price rank, scope) -> per tree searched, the leaf node the last unfiltered search
        # with these bounds found (0: none). The next such search starts there. Valid, like ``failed``, until
        # capacity comes back.
        self.cursors: dict[tuple[int, int, int, tuple[int, ...] | None], list[int]] = {}

        region_names = sorted(set(regions))
        self.region_id = {name: k for k, name in enumerate(region_names)}
        self.everywhere = len(region_names)
        self._scopes: dict[frozenset[str], tuple[int, ...] | None] = {}
        self._search: dict[tuple[int, ...] | None, list[_Tree]] = {}
        region_of = np.fromiter(map(self.region_id.__getitem__, regions), dtype=np.int64, count=n)[by_rank]
        # trees[scope]; scope len(region_names) is "everywhere". Each leaf sits in two trees: its region's
        # (tree_a/pos_a) and everywhere's (at position r: that tree holds every offer in rank order).
        self.trees: list[_Tree] = []
        tree_a, pos_a = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
        for scope in range(len(region_names) + 1):
            members = np.arange(n) if scope == len(region_names) else np.flatnonzero(region_of == scope)
            self.trees.append(_Tree(members.tolist(), vr[members], sr[members], pr[members], live[members],
                                    self.dead_price))
            if scope < len(region_names):
                tree_a[members] = scope
                pos_a[members] = np.arange(len(members))
        self.tree_a, self.pos_a = tree_a.tolist(), pos_a.tolist()

    # ------------------------------------------------------------------ queries

    def regions_for(self, allowed: frozenset[str] | None) -> tuple[int, ...] | None:
        """The scope of a region allow-list: None (anywhere) or the ids of its regions that hold offers."""
        if allowed is None:
            return None
        ids = self._scopes.get(allowed, ())
        if ids == ():
            ids = None if allowed.issuperset(self.region_id) else \
                tuple(sorted(self.region_id[name] for name in allowed if name in self.region_id))
            if len(self._scopes) < _MAX_SCOPES:
                self._scopes[allowed] = ids
        return ids

    def best(self, vram: int, stake: int, cap: int, regions: tuple[int, ...] | None,
             skip: Callable[[int], bool] | None = None) -> int:
        """Global rank of the cheapest live offer with VRAM >= vram, stake >= stake, ask <= cap, in the scope
        ``regions`` (``regions_for``) and not ``skip(rank)``; -1 if none."""
        v = bisect_left(self.vram_values, vram)
        s = bisect_left(self.stake_values, stake)
        c = bisect_right(self.price_values, cap) - 1
        if v == len(self.vram_values) or s == len(self.stake_values) or c < 0:
            return -1
        failed = self.failed
        if failed:
            for fv, fs, fc in failed.get(None, ()):
                if v >= fv and s >= fs and c <= fc:
                    return -1  # a looser query found nothing anywhere, and no capacity has come back since
            if regions is not None:
                for fv, fs, fc in failed.get(regions, ()):
                    if v >= fv and s >= fs and c <= fc:
                        return -1
        trees = self._search.get(regions)
        if trees is None:
            scopes = (self.everywhere,) if regions is None else regions
            trees = self._search[regions] = [self.trees[k] for k in scopes]
        key = (v, s, c, regions)
        starts = self.cursors.get(key) if skip is None else None
        live, dead = self.live, self.dead_price
        best = -1
        found = []
        for k, tree in enumerate(trees):
            start = 1 if starts is None else starts[k]
            node = tree.search(v, s, c, live, dead, skip, start) if start else 0
            found.append(node)
            if node:
                r = tree.ranks[node - tree.size]
                if best < 0 or r < best:
                    best = r
        if skip is None:  # what a filtered search found says nothing about the next unit
            if len(self.cursors) < _MAX_CURSORS:
                self.cursors[key] = found
            if best < 0:
                known = failed.setdefault(regions, [])
                if len(known) < _MAX_FAILED:  # the looser bounds replace the stricter ones they cover
                    known[:] = [f for f in known if not (f[0] >= v and f[1] >= s and f[2] <= c)]
                    known.append((v, s, c))
        return best

    # ------------------------------------------------------------------ capacity changes

    def _revive(self, r: int) -> None:
        """``r`` is live again: put it back in the trees that dropped it (often none)."""
        self.failed.clear()
        self.cursors.clear()
        a, b = self.trees[self.tree_a[r]], self.trees[self.everywhere]
        pa = self.pos_a[r]
        if not a.counted[pa]:
            a.revive(pa, self.vr[r], self.sr[r], self.pr[r])
        if not b.counted[r]:
            b.revive(r, self.vr[r], self.sr[r], self.pr[r])

    def take(self, r: int) -> None:
        """Use one slot of live offer ``r``. Its last slot leaves the "everywhere" tree at once (the next query
        there would land on it: dropping it now saves that detour) and its region's tree lazily."""
        self.free[r] -= 1
        if self.free[r] == 0:
            self.live[r] = False
            self.trees[self.everywhere].kill(r, self.dead_price)

    def give(self, r: int) -> None:
        """Return one slot to offer ``r`` (its unit finished or was dropped)."""
        self.free[r] += 1
        if self.free[r] == 1 and self.online[r]:
            self.live[r] = True
            self._revive(r)

    def set_online(self, r: int, online: bool) -> None:
        """Offer ``r`` comes online or goes offline (going offline is O(1))."""
        if self.online[r] != online:
            self.online[r] = online
            if self.free[r] > 0:
                self.live[r] = online
                if online:
                    self._revive(r)

    def set_online_many(self, ranks: Sequence[int], online: bool) -> None:
        """``set_online(r, online)`` for each of ``ranks`` (one call for a churn step)."""
        is_online, free, live, revive = self.online, self.free, self.live, self._revive
        for r in ranks:
            if is_online[r] != online:
                is_online[r] = online
                if free[r] > 0:
                    live[r] = online
                    if online:
                        revive(r)

    def give_many(self, ranks: Sequence[int]) -> None:
        """``give(r)`` for each of ``ranks`` (repeats give several slots)."""
        is_online, free, live, revive = self.online, self.free, self.live, self._revive
        for r in ranks:
            free[r] += 1
            if free[r] == 1 and is_online[r]:
                live[r] = True
                revive(r)
