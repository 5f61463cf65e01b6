"""The matching engine's index: offers ranked once, then each query and each capacity change in O(log n).

Offers are sorted once by the caller's ranking key (effective price, region floor, address). They are split
into trees by scope (each region, plus one scope holding every region, for units allowed anywhere) and by
VRAM tier (a few bands of the book's VRAM sizes). Each tree is an array segment tree over its offers in rank
order; every node keeps, over the live leaves below it (online, with a free slot), the largest VRAM, the
largest stake and the smallest ask. The cheapest offer meeting VRAM >= v, stake >= s and ask <= cap in a tree
is its leftmost leaf reached by descending only into children whose aggregates qualify; the answer is the
lowest rank over the trees of the allowed scopes whose tier can hold v. A leaf that runs out of slots, goes
offline or is hidden for one query is set dead with a point update in its two trees.

Cost: a point update is O(log n). A descent is O(log n) when the aggregates qualify along one path. Because
they are independent maxima/minima it can backtrack (a subtree whose VRAM-rich and cheap leaves differ); the
VRAM tiers remove most of that (within a tier VRAM hardly varies), but an adversarial book can still make one
query O(n). Values are stored as their rank among the book's distinct values (small ints, numpy-built) and
nodes are plain lists, since the query loop runs in pure Python.
"""
from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Sequence

import numpy as np

#: VRAM tiers per scope: more tiers prune better but cost a descent each for small-VRAM units.
MAX_TIERS = 4
#: Failed queries remembered at once (each later query checks them all).
_MAX_FAILED = 64


class _Tree:
    """One segment tree. Leaf ``pos`` holds the offer of global rank ``ranks[pos]``."""

    __slots__ = ("size", "mv", "ms", "mp", "ranks", "dead_price")

    def __init__(self, ranks: list[int], vram: np.ndarray, stake: np.ndarray, price: np.ndarray, dead_price: int) -> None:
        size = 1
        while size < max(1, len(ranks)):
            size *= 2
        self.size = size
        self.ranks = ranks
        self.dead_price = dead_price
        self.mv = _build(vram, size, -1, False)
        self.ms = _build(stake, size, -1, False)
        self.mp = _build(price, size, dead_price, True)

    def set(self, pos: int, v: int, s: int, p: int) -> None:
        mv, ms, mp = self.mv, self.ms, self.mp
        i = pos + self.size
        mv[i], ms[i], mp[i] = v, s, p
        i >>= 1
        while i:
            left = i + i
            a, b = mv[left], mv[left + 1]
            nv = a if a > b else b
            a, b = ms[left], ms[left + 1]
            ns = a if a > b else b
            a, b = mp[left], mp[left + 1]
            np_ = a if a < b else b
            if nv == mv[i] and ns == ms[i] and np_ == mp[i]:
                break  # ancestors depend only on this node: nothing above changes either
            mv[i], ms[i], mp[i] = nv, ns, np_
            i >>= 1

    def leftmost(self, v: int, s: int, cap: int) -> int:
        """Position of the first live leaf with VRAM >= v, stake >= s, ask <= cap (all ranks); -1 if none."""
        mv, ms, mp = self.mv, self.ms, self.mp
        if mv[1] < v or ms[1] < s or mp[1] > cap:
            return -1
        size = self.size
        i = 1
        stack: list[int] = []
        push = stack.append
        pop = stack.pop
        while i < size:
            i += i
            if mv[i] >= v and ms[i] >= s and mp[i] <= cap:
                push(i + 1)  # the right sibling, checked only if we come back for it
                continue
            i += 1
            if mv[i] >= v and ms[i] >= s and mp[i] <= cap:
                continue
            # the aggregates qualified but no single leaf below does (they sit on different leaves): backtrack
            while stack:
                i = pop()
                if mv[i] >= v and ms[i] >= s and mp[i] <= cap:
                    break
            else:
                return -1
        return i - size


def _build(leaves: np.ndarray, size: int, pad: int, is_min: bool) -> list[int]:
    """Level-order array [unused, root, level 1, ..., leaves], each parent the max (or min) of its children."""
    level = np.full(size, pad, dtype=np.int64)
    level[: len(leaves)] = leaves
    levels = [level]
    while len(level) > 1:
        pairs = level.reshape(-1, 2)
        level = pairs.min(axis=1) if is_min else pairs.max(axis=1)
        levels.append(level)
    return [0] + np.concatenate(levels[::-1]).tolist()


def _compress(values: list[int]) -> tuple[np.ndarray, list[int]]:
    """Each value's rank among the distinct values, and the sorted distinct values (for bisecting bounds)."""
    try:
        arr = np.array(values, dtype=np.int64)
    except OverflowError:  # money beyond int64: rank through Python ints
        distinct = sorted(set(values))
        where = {x: k for k, x in enumerate(distinct)}
        return np.array([where[x] for x in values], dtype=np.int64), distinct
    uniq, inverse = np.unique(arr, return_inverse=True)
    return inverse.astype(np.int64), uniq.tolist()


def _tier_bounds(vram_distinct: list[int], vram_rank: np.ndarray) -> list[int]:
    """Lowest VRAM rank of each tier: up to MAX_TIERS bands holding similar numbers of offers."""
    if len(vram_distinct) <= MAX_TIERS:
        return list(range(len(vram_distinct))) or [0]
    counts = np.cumsum(np.bincount(vram_rank, minlength=len(vram_distinct)))
    bounds = [0]
    for k in range(1, MAX_TIERS):
        b = int(np.searchsorted(counts, counts[-1] * k // MAX_TIERS, side="right"))
        if bounds[-1] < b < len(vram_distinct):
            bounds.append(b)
    return bounds


class MatchIndex:
    """Mutable index over one offer book. Offers are addressed by input position ``i`` or by global rank ``r``
    (``order[r]`` is the input position of the r-th cheapest offer); ``rank_of[i]`` and ``index_of[r]`` convert.

    Remembers the queries that found nothing until capacity comes back (``give``/``set_online``): in a
    saturated market most queued units fail, and a failed query is the costly kind.
    """

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
        self.vr, self.sr, self.pr = vr.tolist(), sr.tolist(), pr.tolist()
        self.dead_price = len(self.price_values)
        self.hidden = 0
        self.failed: list[tuple[int, int, int, frozenset[int]]] = []  # (v, s, c, regions) that found nothing

        region_names = sorted(set(regions))
        self.region_id = {name: k for k, name in enumerate(region_names)}
        self.everywhere = (len(region_names),)
        self.all_region_ids = frozenset(range(len(region_names)))
        region_of = np.array(list(map(self.region_id.__getitem__, map(regions.__getitem__, order))), dtype=np.int64)
        self.tier_low = _tier_bounds(self.vram_values, vr) if n else [0]
        tier_of = np.searchsorted(np.array(self.tier_low), vr, side="right") - 1
        live = (np.array(self.free, dtype=np.int64) > 0) & np.array(self.online, dtype=bool)
        dead_v = np.where(live, vr, -1)
        dead_s = np.where(live, sr, -1)
        dead_p = np.where(live, pr, self.dead_price)
        # trees[scope][tier]; scope len(region_names) is "everywhere". Each leaf sits in two trees: its region's
        # (tree_a/pos_a) and everywhere's (tree_b/pos_b), both of its tier.
        self.trees: list[list[_Tree]] = []
        self.all_trees: list[_Tree] = []
        tree_a, pos_a = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
        tree_b, pos_b = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
        for scope in range(len(region_names) + 1):
            everywhere = scope == len(region_names)
            in_scope = np.ones(n, dtype=bool) if everywhere else region_of == scope
            row = []
            for tier in range(len(self.tier_low)):
                members = np.flatnonzero(in_scope & (tier_of == tier))
                tree = _Tree(members.tolist(), dead_v[members], dead_s[members], dead_p[members], self.dead_price)
                (tree_b if everywhere else tree_a)[members] = len(self.all_trees)
                (pos_b if everywhere else pos_a)[members] = np.arange(len(members))
                self.all_trees.append(tree)
                row.append(tree)
            self.trees.append(row)
        self.tree_a, self.pos_a = tree_a.tolist(), pos_a.tolist()
        self.tree_b, self.pos_b = tree_b.tolist(), pos_b.tolist()

    def regions_for(self, allowed: frozenset[str] | None) -> tuple[int, ...]:
        """Scopes to search for a region allow-list (None: anywhere, one scope)."""
        if allowed is None or allowed.issuperset(self.region_id):
            return self.everywhere
        return tuple(sorted(self.region_id[name] for name in allowed if name in self.region_id))

    def best(self, vram: int, stake: int, cap: int, scopes: tuple[int, ...]) -> int:
        """Global rank of the cheapest live offer with VRAM >= vram, stake >= stake, ask <= cap; -1 if none."""
        v = bisect_left(self.vram_values, vram)
        s = bisect_left(self.stake_values, stake)
        c = bisect_right(self.price_values, cap) - 1
        if v == len(self.vram_values) or s == len(self.stake_values) or c < 0:
            return -1
        cover = self.all_region_ids if scopes == self.everywhere else frozenset(scopes)
        for fv, fs, fc, fcover in self.failed:
            if v >= fv and s >= fs and c <= fc and cover <= fcover:
                return -1  # a looser query found nothing and no capacity has come back since
        first_tier = bisect_right(self.tier_low, v) - 1
        best = -1
        for scope in scopes:
            for tree in self.trees[scope][first_tier:]:
                pos = tree.leftmost(v, s, c)
                if pos >= 0:
                    r = tree.ranks[pos]
                    if best < 0 or r < best:
                        best = r
        if best < 0 and not self.hidden and len(self.failed) < _MAX_FAILED:
            self.failed.append((v, s, c, cover))  # only with nothing hidden: a hidden leaf comes back on restore
        return best

    def _refresh(self, r: int, alive: bool) -> None:
        if alive:
            v, s, p = self.vr[r], self.sr[r], self.pr[r]
        else:
            v, s, p = -1, -1, self.dead_price
        self.all_trees[self.tree_a[r]].set(self.pos_a[r], v, s, p)
        self.all_trees[self.tree_b[r]].set(self.pos_b[r], v, s, p)

    def take(self, r: int) -> None:
        """Use one slot of offer ``r``."""
        self.free[r] -= 1
        if self.free[r] == 0:
            self._refresh(r, False)

    def give(self, r: int) -> None:
        """Return one slot to offer ``r`` (its unit finished or was dropped)."""
        self.free[r] += 1
        if self.free[r] == 1 and self.online[r]:
            self.failed.clear()
            self._refresh(r, True)

    def set_online(self, r: int, online: bool) -> None:
        if self.online[r] != online:
            self.online[r] = online
            if online and self.free[r] > 0:
                self.failed.clear()
            self._refresh(r, online and self.free[r] > 0)

    def hide(self, r: int) -> None:
        """Take ``r`` out of queries until ``restore(r)`` (same state otherwise)."""
        self.hidden += 1
        self._refresh(r, False)

    def restore(self, r: int) -> None:
        self.hidden -= 1
        self._refresh(r, self.online[r] and self.free[r] > 0)
