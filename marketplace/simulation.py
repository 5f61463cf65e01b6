"""A synthetic market run through the real matching core, hour by hour. Pure: a seed in, a report out.

Providers (regions, asks above their floor, GPUs, stake, slots, speed, track record, operators) join and
leave; jobs arrive over the day (more by day than by night) with units, replicas, VRAM, price caps, stake
needs and region allow-lists. Each hour: churn (a provider that leaves drops its running units, which go
back to the queue with it excluded), finished units free their slots, new units queue behind older ones, and
``MatchingBook.assign`` matches the queue, oldest first. The report gives utilisation per region, the price
paid against the cheapest possible, and the share of online providers left idle.

"Cheapest possible" is a lower bound per hour: the k cheapest free slots of that hour (k = assignments made),
ignoring every constraint (VRAM, stake, caps, allow-lists, replicas on distinct operators). It is computed
twice: by ask (what customers pay per unit) and by effective price (what the matcher minimises: a fast,
reliable node is worth a higher ask). numpy draws the population; no clock is read.
"""
from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np

from marketplace.matching import Demand, MatchingBook, Offer, OfferColumns
from marketplace.pricing import (DEFAULT_TABLE, PPM, REFERENCE_THROUGHPUT, RELIABILITY_PRIOR, effective_price,
                                 required_stake)
from protocol.errors import GridMintValueError
from protocol.money import ONE_TOKEN

MILLI = ONE_TOKEN // 1000
_MICRO = ONE_TOKEN // 1_000_000
_REGION_SHARE = {"eu-north": 0.30, "us-east": 0.25, "ap-south": 0.15, "eu-west": 0.20, "ap-east": 0.10}
_GPU_MB = np.array([8192, 12288, 16384, 24576, 40960, 49152, 81920])
_GPU_SHARE = [0.10, 0.15, 0.20, 0.30, 0.10, 0.05, 0.10]
_GPU_SPEED_PCT = np.array([30, 45, 60, 100, 160, 180, 300])  # % of the reference node's tokens/s
_NEED_MB = [4096, 8192, 16384, 24576, 40960, 81920]
_NEED_SHARE = [0.20, 0.25, 0.25, 0.15, 0.10, 0.05]
_ONLINE_AT_START = 0.85


@dataclass(frozen=True)
class SimConfig:
    providers: int = 10_000  # population over the run; about 85% online at the start
    jobs: int | None = None  # jobs arriving over the run; default providers // 10 (1 to 8 units each)
    hours: int = 24
    seed: int = 0
    leave_per_hour_pct: int = 2  # of online providers
    join_per_hour_pct: int = 10  # of offline providers

    def __post_init__(self) -> None:
        if self.providers < 0 or self.hours < 0 or (self.jobs is not None and self.jobs < 0):
            raise GridMintValueError(f"providers, jobs and hours must be >= 0: {self}")
        if not (0 <= self.leave_per_hour_pct <= 100 and 0 <= self.join_per_hour_pct <= 100):
            raise GridMintValueError(f"churn percentages must be in [0, 100]: {self}")

    @property
    def job_count(self) -> int:
        return self.providers // 10 if self.jobs is None else self.jobs


@dataclass(frozen=True)
class RegionStats:
    region: str
    providers: int
    online_slot_hours: int
    busy_slot_hours: int
    assigned: int = 0  # assignments made to providers of the region
    paid: int = 0  # base units, sum of their asks

    @property
    def utilisation(self) -> float:  # a ratio for display, not money
        return self.busy_slot_hours / self.online_slot_hours if self.online_slot_hours else 0.0


@dataclass(frozen=True)
class SimReport:
    config: SimConfig
    units: int  # replicas included
    assigned: int  # assignments made, re-assignments after a dropout included
    completed: int
    dropouts: int
    pending_at_end: int  # replicas still waiting for a provider
    paid: int  # base units, sum of the asks of every assignment
    cheapest_possible: int  # base units, hourly lower bound by ask (module docstring)
    idle_provider_hours: int
    online_provider_hours: int
    regions: tuple[RegionStats, ...]
    paid_effective: int = 0  # base units, sum of the effective prices of every assignment
    cheapest_effective: int = 0  # base units, hourly lower bound by effective price

    @property
    def paid_vs_cheapest(self) -> float:
        return self.paid / self.cheapest_possible if self.cheapest_possible else 1.0

    @property
    def effective_vs_cheapest(self) -> float:
        return self.paid_effective / self.cheapest_effective if self.cheapest_effective else 1.0

    @property
    def idle_share(self) -> float:
        return self.idle_provider_hours / self.online_provider_hours if self.online_provider_hours else 0.0


def synthetic_offer_columns(n: int, rng: np.random.Generator) -> OfferColumns:
    """``n`` providers drawn from a plausible market (asks in whole milli-tokens above the region floor), column
    by column: a million ``Offer`` objects would cost more to build than a simulated day of matching."""
    names = list(DEFAULT_TABLE.regions)
    region = rng.choice(len(names), n, p=[_REGION_SHARE[r] for r in names])
    floors = np.array([DEFAULT_TABLE.floor(r) // MILLI for r in names])
    ask_milli = floors[region] + rng.integers(0, 1500, n)
    gpu = rng.choice(len(_GPU_MB), n, p=_GPU_SHARE)
    tps = REFERENCE_THROUGHPUT * _GPU_SPEED_PCT[gpu] * rng.integers(80, 121, n) // 10_000
    stake = rng.integers(100, 2001, n)
    slots = rng.choice([1, 2, 4], n, p=[0.80, 0.15, 0.05])
    completed = rng.integers(0, 200, n)
    dropped = rng.binomial(completed, rng.choice([0.01, 0.05, 0.2], n, p=[0.7, 0.25, 0.05]))
    uptime = rng.integers(900_000, 1_000_001, n)
    farm = np.where(rng.random(n) < 0.1, rng.integers(0, max(1, n // 200), n), -1)
    return OfferColumns(
        providers=[f"0x{i:040x}" for i in range(n)],
        regions=list(map(names.__getitem__, region.tolist())),
        prices=[a * MILLI for a in ask_milli.tolist()],
        vram_mb=_GPU_MB[gpu].tolist(),
        stakes=[s * ONE_TOKEN for s in stake.tolist()],
        free_slots=slots.tolist(),
        throughput=tps.tolist(),
        reliability_ppm=_reliability_ppm(completed, dropped, uptime).tolist(),
        operators=[f"op{f}" if f >= 0 else "" for f in farm.tolist()],
    )


def _reliability_ppm(completed: np.ndarray, dropped: np.ndarray, uptime_ppm: np.ndarray) -> np.ndarray:
    """``pricing.reliability_ppm`` over arrays, the same integer arithmetic (exact in int64 here)."""
    done = (completed + RELIABILITY_PRIOR) * PPM // (completed + dropped + RELIABILITY_PRIOR)
    return np.clip(done * np.clip(uptime_ppm, 0, PPM) // PPM, 1, PPM)


def synthetic_offers(n: int, rng: np.random.Generator) -> list[Offer]:
    """``synthetic_offer_columns`` as ``Offer`` objects (for the reference matcher and small books)."""
    cols = synthetic_offer_columns(n, rng)
    return [cols.offer(i) for i in range(n)]


def synthetic_demands(m: int, rng: np.random.Generator, prefix: str = "u",
                      units: np.ndarray | None = None) -> list[Demand]:
    """``m`` units, each standing for a job of ``units[k]`` units (default 1 to 8): VRAM need, a price cap,
    stake scaled with the job's value at risk, a quarter with a region allow-list (1 to 3 regions), a tenth
    replicated twice, a few with an excluded provider."""
    names = list(DEFAULT_TABLE.regions)
    need = rng.choice(_NEED_MB, m, p=_NEED_SHARE).tolist()
    cap_milli = (800 + rng.integers(0, 2500, m)).tolist()
    if units is None:
        units = rng.integers(1, 9, m)
    units_l = units.tolist()
    replicas = np.where(rng.random(m) < 0.1, 2, 1).tolist()
    allow_size = np.where(rng.random(m) < 0.25, rng.integers(1, 4, m), 0).tolist()
    shuffled = np.argsort(rng.random((m, len(names))), axis=1).tolist()  # a random order of the regions per unit
    excluded = np.where(rng.random(m) < 0.02, rng.integers(0, 1 << 16, m), -1).tolist()
    allow_lists: dict[tuple[int, ...], frozenset[str]] = {}
    out = []
    for k in range(m):
        allow = None
        if allow_size[k]:
            key = tuple(sorted(shuffled[k][: allow_size[k]]))
            allow = allow_lists.get(key)
            if allow is None:
                allow = allow_lists[key] = frozenset(names[j] for j in key)
        cap = cap_milli[k] * MILLI
        stake = required_stake(cap * units_l[k] * 10, 100 * ONE_TOKEN)
        ex = frozenset({f"0x{excluded[k]:040x}"}) if excluded[k] >= 0 else frozenset()
        out.append(Demand(f"{prefix}{k}", need[k], stake, cap, ex, allow, replicas[k]))
    return out


def simulate(config: SimConfig, progress: Callable[[int], None] | None = None) -> SimReport:
    """Run ``config.hours`` hourly ticks; ``progress(hour)`` is called after each (for a progress bar)."""
    with _gc_paused():
        return _simulate(config, progress)


@contextmanager
def _gc_paused() -> Iterator[None]:
    """The run holds millions of small objects that live as long as it does and form no cycles: the cyclic
    collector's full passes over them cost about a fifth of a large run, and would find nothing."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _simulate(config: SimConfig, progress: Callable[[int], None] | None) -> SimReport:
    rng = np.random.default_rng(config.seed)
    n, hours = config.providers, config.hours
    cols = synthetic_offer_columns(n, rng)
    online = rng.random(n) < _ONLINE_AT_START
    book = MatchingBook(cols, DEFAULT_TABLE, online.tolist())
    assign = book.assign
    index_of = book.index.index_of
    names = list(DEFAULT_TABLE.regions)
    region_id = {name: k for k, name in enumerate(names)}
    region = np.fromiter(map(region_id.__getitem__, cols.regions), dtype=np.int64, count=n)
    ask_milli = np.array(cols.prices, dtype=object) // MILLI
    ask_milli = ask_milli.astype(np.int64) if n else np.zeros(0, dtype=np.int64)
    tps = np.array(cols.throughput, dtype=np.int64)
    rel = np.array(cols.reliability_ppm, dtype=np.int64)
    # effective price in whole micro-tokens, rounded down, for the lower bound only (int64: asks here are < 3 tokens)
    eff_micro = ask_milli * (1000 * REFERENCE_THROUGHPUT * PPM) // (tps * rel)
    slots = np.maximum(np.array(cols.free_slots, dtype=np.int64), 0)
    speed, providers, prices, reliability = cols.throughput, cols.providers, cols.prices, cols.reliability_ppm
    operator = [op or p for op, p in zip(cols.operators, providers)]
    busy = np.zeros(n, dtype=np.int64)
    assigned_to = np.zeros(n, dtype=np.int64)
    eff_of: dict[int, int] = {}  # provider -> exact effective price, computed when first assigned

    jobs = config.job_count
    arrive_weight = 2 + np.sin(np.arange(hours) * 2 * np.pi / 24 - np.pi / 2)  # night trough, afternoon peak
    arrival = (np.sort(rng.choice(hours, jobs, p=arrive_weight / arrive_weight.sum())) if hours
               else np.zeros(0, dtype=np.int64)).tolist()
    work_hours = rng.integers(4, 21, jobs).tolist()  # per unit, at reference speed
    units_of = rng.integers(1, 9, jobs)
    job_demands = synthetic_demands(jobs, rng, prefix="job", units=units_of)
    units_of_l = units_of.tolist()

    # runs (one assignment each), column by column; a run is alive until it completes or its provider leaves
    run_provider: list[int] = []
    run_unit: list[Demand] = []
    run_job: list[int] = []
    run_alive: list[bool] = []
    runs_of: dict[int, list[int]] = {}  # provider -> its runs (finished ones too)
    unit_ops: dict[str, set[str]] = {}  # unit -> operators holding a live replica
    finishing: list[list[int]] = [[] for _ in range(hours + 1)]  # runs due to complete at the start of hour h
    pending: list[tuple[Demand, int]] = []  # (unit, job), oldest first
    units_total = assigned = completed = dropouts = 0
    paid = cheapest = paid_eff = cheapest_eff = idle_hours = online_hours = 0
    online_slot_hours = np.zeros(len(names), dtype=np.int64)
    busy_slot_hours = np.zeros(len(names), dtype=np.int64)
    job_k = 0

    for hour in range(hours):
        freed: list[int] = []  # providers with a run that ended this hour (one entry per run)
        if hour:
            leave = np.flatnonzero(online & (rng.integers(0, 100, n) < config.leave_per_hour_pct))
            join = np.flatnonzero(~online & (rng.integers(0, 100, n) < config.join_per_hour_pct))
            online[leave] = False
            online[join] = True
            leaving = leave.tolist()
            book.set_online_many(leaving, False)
            for i in leaving:
                for run in runs_of.pop(i, ()):
                    if run_alive[run]:  # dropped: back to the queue, never to this provider again
                        run_alive[run] = False
                        freed.append(i)
                        dropouts += 1
                        d = run_unit[run]
                        ops = unit_ops[d.unit_id]
                        ops.discard(operator[i])
                        pending.append((Demand(d.unit_id, d.vram_mb, d.min_stake, d.max_price,
                                               d.excluded | {providers[i]}, d.regions, 1, frozenset(ops)),
                                        run_job[run]))
            book.set_online_many(join.tolist(), True)
        for run in finishing[hour]:
            if run_alive[run]:
                run_alive[run] = False
                freed.append(run_provider[run])
                completed += 1
        book.release_many(freed)
        while job_k < jobs and arrival[job_k] == hour:
            base = job_demands[job_k]
            for u in range(units_of_l[job_k]):
                pending.append((Demand(f"{base.unit_id}-{u}", base.vram_mb, base.min_stake, base.max_price,
                                       base.excluded, base.regions, base.replicas), job_k))
                units_total += base.replicas
            job_k += 1
        if freed:
            busy -= np.bincount(freed, minlength=n)

        free = np.where(online, slots - busy, 0)
        taken: list[int] = []  # providers assigned this hour (one entry per run)
        waiting: list[tuple[Demand, int]] = []
        for d, job in pending:
            # the operators the unit's other replicas are on now (a demand queued earlier carries those of then: two
            # of its demands, a replica's and a dropout's, both went to the operator the first of them took)
            ops_now = frozenset(unit_ops.get(d.unit_id, ()))
            if ops_now != d.excluded_operators:
                d = replace(d, excluded_operators=ops_now)
            got = assign(d)
            if not got:
                waiting.append((d, job))
                continue
            ops = unit_ops.setdefault(d.unit_id, set())
            for a in got:
                i = index_of[a.rank - 1]
                taken.append(i)
                paid += a.price
                e = eff_of.get(i)
                if e is None:
                    e = eff_of[i] = effective_price(prices[i], speed[i], reliability[i])
                paid_eff += e
                run = len(run_provider)
                run_provider.append(i)
                run_unit.append(d)
                run_job.append(job)
                run_alive.append(True)
                runs_of.setdefault(i, []).append(run)
                ops.add(operator[i])
                took = -(-work_hours[job] * REFERENCE_THROUGHPUT // speed[i])  # faster nodes finish sooner
                finishing[min(hours, hour + max(1, took))].append(run)
            if len(got) < d.replicas:
                waiting.append((Demand(d.unit_id, d.vram_mb, d.min_stake, d.max_price, d.excluded, d.regions,
                                       d.replicas - len(got), frozenset(ops)), job))
        pending = waiting
        assigned += len(taken)
        if taken:
            cheapest += _k_smallest_sum(ask_milli, free, len(taken)) * MILLI
            cheapest_eff += _k_smallest_sum(eff_micro, free, len(taken)) * _MICRO
            took_now = np.bincount(taken, minlength=n)
            busy += took_now
            assigned_to += took_now
        online_hours += int(online.sum())
        idle_hours += int((online & (busy == 0)).sum())
        online_slot_hours += np.bincount(region[online], weights=slots[online], minlength=len(names)).astype(np.int64)
        busy_slot_hours += np.bincount(region, weights=busy, minlength=len(names)).astype(np.int64)
        if progress is not None:
            progress(hour)

    counts = np.bincount(region, minlength=len(names))
    region_assigned = np.bincount(region, weights=assigned_to, minlength=len(names)).astype(np.int64)
    region_paid = [0] * len(names)
    for i in np.flatnonzero(assigned_to).tolist():
        region_paid[region[i]] += prices[i] * int(assigned_to[i])
    return SimReport(config, units_total, assigned, completed, dropouts, sum(d.replicas for d, _ in pending), paid,
                     cheapest, idle_hours, online_hours,
                     tuple(RegionStats(name, int(counts[k]), int(online_slot_hours[k]), int(busy_slot_hours[k]),
                                       int(region_assigned[k]), region_paid[k])
                           for k, name in enumerate(names)),
                     paid_eff, cheapest_eff)


def _k_smallest_sum(values: np.ndarray, copies: np.ndarray, k: int) -> int:
    """Sum of the ``k`` smallest of ``values``, value ``j`` counted ``copies[j]`` times. int64 is exact here:
    the simulation's values are below 2**25 and there are fewer than 2**38 copies."""
    pool = np.repeat(values, copies)
    k = min(k, len(pool))
    return int(np.partition(pool, k - 1)[:k].sum()) if k > 0 else 0
