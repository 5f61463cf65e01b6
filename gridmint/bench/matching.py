"""``gridmint bench matching``: the matching core against the naive matcher, and a simulated day at scale.

What runs (one thread, this process; everything is measured in the same run):

1. A synthetic book of ``--providers`` offers and ``--jobs`` jobs of 1 to 8 units each (``marketplace.simulation``:
   regions with their floors, asks, GPUs, stake, slots, speed, track record, operators; VRAM needs, price caps,
   stake scaled with the value at risk, region allow-lists, replicas, exclusions). The units are matched in
   job order by ``MatchingBook.assign``, each call timed: ``assignments_per_s`` is assignments over the summed
   call time, ``p99_ms`` the 99th percentile of one call (one unit: up to its replicas, failures included).
2. The naive matcher (``NaiveBook``: every offer scored for every replica of every unit) on a fresh copy of the
   same book, over the first ``--naive-jobs`` jobs only (it needs tens of milliseconds per assignment). Its
   assignments must equal the fast matcher's for those jobs, field by field (``agree``). ``speedup_vs_naive``
   is its time per assignment over the fast matcher's time per assignment on all jobs (extrapolated per
   assignment, as the JSON says); ``speedup_same_jobs`` compares the two on the same subset. The same scan
   vectorised with numpy (every offer still scored per replica, at C speed) runs on ``--scan-jobs`` jobs:
   ``speedup_vs_numpy_scan``, a stronger baseline than pure Python, reported beside it and checked the same way.
3. ``simulation.simulate`` for ``--sim-hours`` hours with ``--sim-providers`` providers (default: a day with
   1,000,000): churn, jobs arriving, units finishing, all through the real ``MatchingBook``; wall time, book
   build included, is ``sim_day_1m_providers_s``.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import time
from bisect import bisect_left, bisect_right
from typing import Any, Callable, Protocol

import numpy as np

from marketplace.matching import Assignment, Demand, MatchingBook, NaiveBook, OfferColumns
from marketplace.simulation import SimConfig, simulate, synthetic_demands, synthetic_offers


def unit_demands(jobs: int, rng: np.random.Generator) -> list[list[Demand]]:
    """``jobs`` jobs, each a list of its units' demands (the units of a job share its requirements)."""
    units = rng.integers(1, 9, jobs)
    out = []
    for base, k in zip(synthetic_demands(jobs, rng, prefix="job", units=units), units.tolist()):
        out.append([Demand(f"{base.unit_id}-{u}", base.vram_mb, base.min_stake, base.max_price, base.excluded,
                           base.regions, base.replicas) for u in range(k)])
    return out


class NumpyScan:
    """Every offer scored for every replica like ``NaiveBook``, but vectorised with numpy: the naive matcher at C
    speed, a stronger baseline than the pure-Python one. Reads the value ranks ``MatchingBook`` computed (exact
    for money beyond int64) and keeps its own slots."""

    def __init__(self, book: MatchingBook) -> None:
        ix, cols = book.index, book.cols
        self.ix, self.cols = ix, cols
        self.vr, self.sr, self.pr = (np.array(x, dtype=np.int64) for x in (ix.vr, ix.sr, ix.pr))
        self.free = np.array(ix.free, dtype=np.int64)
        by_rank = ix.index_of
        names = sorted(set(cols.regions))
        self.region_names = names
        self.region = np.array([names.index(cols.regions[i]) for i in by_rank], dtype=np.int64) if names else \
            np.zeros(0, dtype=np.int64)
        self.rank_of_provider = {cols.providers[i]: r for r, i in enumerate(by_rank)}
        self.ranks_of_operator: dict[str, list[int]] = {}
        for r, i in enumerate(by_rank):
            self.ranks_of_operator.setdefault(book.operators[i], []).append(r)

    def assign(self, d: Demand) -> list[Assignment]:
        ix, cols = self.ix, self.cols
        mask = ((self.vr >= bisect_left(ix.vram_values, d.vram_mb))
                & (self.sr >= bisect_left(ix.stake_values, d.min_stake))
                & (self.pr <= bisect_right(ix.price_values, d.max_price) - 1) & (self.free > 0))
        if d.regions is not None:
            mask &= np.isin(self.region, [k for k, name in enumerate(self.region_names) if name in d.regions])
        for p in d.excluded:
            if p in self.rank_of_provider:
                mask[self.rank_of_provider[p]] = False
        out: list[Assignment] = []
        used = set(d.excluded_operators)
        for op in used:
            mask[self.ranks_of_operator.get(op, [])] = False
        for replica in range(d.replicas):
            r = int(np.argmax(mask)) if len(mask) else 0
            if not len(mask) or not mask[r]:
                break
            self.free[r] -= 1
            i = ix.index_of[r]
            op = cols.operators[i] or cols.providers[i]
            mask[self.ranks_of_operator[op]] = False
            out.append(Assignment(d.unit_id, cols.providers[i], cols.prices[i], cols.regions[i], r + 1, replica))
        return out


def run_fast(book: MatchingBook, units: list[Demand]) -> tuple[list[Assignment], list[float]]:
    got: list[Assignment] = []
    lat: list[float] = []
    clock, assign, keep, note = time.perf_counter, book.assign, got.extend, lat.append
    for d in units:
        t0 = clock()
        a = assign(d)
        note(clock() - t0)
        keep(a)
    return got, lat


class _Matcher(Protocol):
    def assign(self, demand: Demand) -> list[Assignment]: ...


def run_naive(book: _Matcher, units: list[Demand]) -> tuple[list[Assignment], float]:
    got: list[Assignment] = []
    t0 = time.perf_counter()
    for d in units:
        got.extend(book.assign(d))
    return got, time.perf_counter() - t0


def bench(a: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    rng = np.random.default_rng(a.seed)
    t0 = time.perf_counter()
    offers = synthetic_offers(a.providers, rng)
    jobs = unit_demands(a.jobs, rng)
    units = [d for job in jobs for d in job]
    naive_units = [d for job in jobs[: a.naive_jobs] for d in job]
    log(f"book: {len(offers):,} offers; {a.jobs:,} jobs, {len(units):,} units "
        f"({sum(d.replicas for d in units):,} replicas) [{time.perf_counter() - t0:.1f} s]")

    gc.collect()
    gc.disable()  # the same for both matchers: a collector pass in one timed call is noise, not matching
    try:
        t0 = time.perf_counter()
        book = MatchingBook(OfferColumns.from_offers(offers))
        build_s = time.perf_counter() - t0
        got, lat = run_fast(book, units)
        fast_s = sum(lat)
        log(f"fast: built in {build_s:.2f} s; {len(got):,} assignments in {fast_s:.2f} s "
            f"({len(got) / fast_s:,.0f}/s), p99 {np.percentile(lat, 99) * 1e3:.3f} ms per unit")

        t0 = time.perf_counter()
        naive = NaiveBook(offers)
        naive_build_s = time.perf_counter() - t0
        log(f"naive: scoring every offer for each of {len(naive_units):,} units ({a.naive_jobs} jobs) ...")
        naive_got, naive_s = run_naive(naive, naive_units)
        scan_units = [d for job in jobs[: a.scan_jobs] for d in job]
        scan = NumpyScan(MatchingBook(OfferColumns.from_offers(offers)))
        scan_got, scan_s = run_naive(scan, scan_units)
    finally:
        gc.enable()
    same = got[: len(naive_got)]
    agree = same == naive_got
    fast_same_s = sum(lat[: len(naive_units)])
    naive_per = naive_s / max(1, len(naive_got))
    fast_per = fast_s / max(1, len(got))
    log(f"naive: {len(naive_got):,} assignments in {naive_s:.2f} s ({naive_per * 1e3:.2f} ms each); "
        f"{'identical to' if agree else 'DIFFERENT FROM'} the fast matcher's")
    scan_agree = got[: len(scan_got)] == scan_got
    agree = agree and scan_agree
    scan_per = scan_s / max(1, len(scan_got))
    log(f"numpy scan: {len(scan_got):,} assignments ({a.scan_jobs} jobs) in {scan_s:.2f} s ({scan_per * 1e3:.3f} ms "
        f"each); {'identical to' if scan_agree else 'DIFFERENT FROM'} the fast matcher's")
    if not agree:
        bad = next(k for k, (x, y) in enumerate(zip(same, naive_got)) if x != y) if len(same) == len(naive_got) else -1
        log(f"first difference at assignment {bad}: fast {same[bad] if bad >= 0 else len(same)} "
            f"naive {naive_got[bad] if bad >= 0 else len(naive_got)}")

    figures: dict[str, Any] = {
        "providers": a.providers,
        "jobs": a.jobs,
        "units": len(units),
        "assignments": len(got),
        "assignments_per_s": round(len(got) / fast_s),
        "p99_ms": round(float(np.percentile(lat, 99)) * 1e3, 4),
        "p50_ms": round(float(np.percentile(lat, 50)) * 1e3, 4),
        "max_ms": round(max(lat) * 1e3, 3),
        "build_s": round(build_s, 2),
        "naive_jobs": a.naive_jobs,
        "naive_assignments": len(naive_got),
        "naive_ms_per_assignment": round(naive_per * 1e3, 3),
        "naive_build_s": round(naive_build_s, 2),
        "speedup_vs_naive": round(naive_per / fast_per, 1),
        "speedup_basis": (f"naive timed on the first {a.naive_jobs} jobs, extrapolated per assignment; fast timed "
                          f"on all {a.jobs} jobs"),
        "speedup_same_jobs": round(naive_s / max(fast_same_s, 1e-9), 1),
        "numpy_scan_ms_per_assignment": round(scan_per * 1e3, 4),
        "speedup_vs_numpy_scan": round(scan_per / fast_per, 1),  # the naive scan vectorised: a stronger baseline
        "agree": agree,
    }
    if a.sim_providers:
        cfg = SimConfig(providers=a.sim_providers, hours=a.sim_hours, seed=a.seed)
        log(f"simulating {cfg.hours} h with {cfg.providers:,} providers and {cfg.job_count:,} jobs ...")
        t0 = time.perf_counter()
        rep = simulate(cfg, progress=lambda h: log(f"  hour {h + 1}/{cfg.hours} [{time.perf_counter() - t0:.1f} s]")
                       if (h + 1) % 6 == 0 else None)
        sim_s = time.perf_counter() - t0
        log(f"simulated: {rep.assigned:,} assignments, {rep.completed:,} completed, {rep.dropouts:,} dropouts, "
            f"idle share {rep.idle_share:.1%} [{sim_s:.1f} s]")
        key = "sim_day_1m_providers_s" if (cfg.providers, cfg.hours) == (1_000_000, 24) else "sim_s"
        figures[key] = round(sim_s, 1)
        figures.update(sim_providers=cfg.providers, sim_hours=cfg.hours, sim_assignments=rep.assigned,
                       sim_assignments_per_s=round(rep.assigned / sim_s))
    figures["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    figures["load_avg_1m"] = round(os.getloadavg()[0], 2)  # other work on this machine slows every figure
    return figures


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="gridmint bench matching", description=__doc__.split("\n\n")[0])
    p.add_argument("--providers", type=int, default=100_000)
    p.add_argument("--jobs", type=int, default=10_000)
    p.add_argument("--naive-jobs", type=int, default=100, help="jobs the naive matcher is timed on (a prefix)")
    p.add_argument("--scan-jobs", type=int, default=1000, help="jobs the vectorised (numpy) scan is timed on")
    p.add_argument("--sim-providers", type=int, default=1_000_000, help="0: skip the simulated day")
    p.add_argument("--sim-hours", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    log = lambda s: print(s, flush=True)  # noqa: E731
    log(f"matching bench: one thread, {os.cpu_count()} CPUs here, load average {os.getloadavg()[0]:.2f}")
    t0 = time.perf_counter()
    figures = bench(a, log)
    figures["bench_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(figures))
    return 0 if figures["agree"] else 1
