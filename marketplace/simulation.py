"""A synthetic market run through the real matching core, hour by hour. Pure: a seed in, a report out.

Providers (regions, asks above their floor, GPUs, stake, slots, speed, track record, operators) join and
leave; jobs arrive over the day (more by day than by night) with units, replicas, VRAM, price caps, stake
needs and region allow-lists. Each hour: churn (a provider that leaves drops its running units, which go
back to the pool with it excluded), finished units free their slots, new units queue behind older ones, and
``MatchingBook.assign`` matches the queue. The report gives utilisation per region, the price paid against
the cheapest possible (the k cheapest free asks each hour, ignoring every constraint: a lower bound), and the
share of online providers left idle. numpy draws the population; no clock is read.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from marketplace.matching import Demand, MatchingBook, Offer
from marketplace.pricing import DEFAULT_TABLE, REFERENCE_THROUGHPUT, reliability_ppm, required_stake
from protocol.money import ONE_TOKEN

MILLI = ONE_TOKEN // 1000
_REGION_SHARE = {"eu-north": 0.30, "us-east": 0.25, "ap-south": 0.15, "eu-west": 0.20, "ap-east": 0.10}
_GPU_MB = np.array([8192, 12288, 16384, 24576, 40960, 49152, 81920])
_GPU_SHARE = [0.10, 0.15, 0.20, 0.30, 0.10, 0.05, 0.10]
_GPU_SPEED_PCT = np.array([30, 45, 60, 100, 160, 180, 300])  # % of the reference node's tokens/s
_NEED_MB = [4096, 8192, 16384, 24576, 40960, 81920]
_NEED_SHARE = [0.20, 0.25, 0.25, 0.15, 0.10, 0.05]


@dataclass(frozen=True)
class SimConfig:
    providers: int = 10_000  # population over the run; about 85% online at the start
    jobs: int | None = None  # jobs arriving over the run; default providers // 10
    hours: int = 24
    seed: int = 0
    leave_per_hour_pct: int = 2  # of online providers
    join_per_hour_pct: int = 10  # of offline providers

    @property
    def job_count(self) -> int:
        return self.providers // 10 if self.jobs is None else self.jobs


@dataclass(frozen=True)
class RegionStats:
    region: str
    providers: int
    online_slot_hours: int
    busy_slot_hours: int

    @property
    def utilisation(self) -> float:  # a ratio for display, not money
        return self.busy_slot_hours / self.online_slot_hours if self.online_slot_hours else 0.0


@dataclass(frozen=True)
class SimReport:
    config: SimConfig
    units: int  # replicas included
    assigned: int
    completed: int
    dropouts: int
    pending_at_end: int
    paid: int  # base units, sum of asks of every assignment
    cheapest_possible: int  # base units, hourly lower bound (see module docstring)
    idle_provider_hours: int
    online_provider_hours: int
    regions: tuple[RegionStats, ...]

    @property
    def paid_vs_cheapest(self) -> float:
        return self.paid / self.cheapest_possible if self.cheapest_possible else 1.0

    @property
    def idle_share(self) -> float:
        return self.idle_provider_hours / self.online_provider_hours if self.online_provider_hours else 0.0


def synthetic_offers(n: int, rng: np.random.Generator) -> list[Offer]:
    """``n`` providers drawn from a plausible market (asks in whole milli-tokens above the region floor)."""
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
    rel = list(map(reliability_ppm, completed.tolist(), dropped.tolist(), uptime.tolist()))
    return [
        Offer(f"0x{i:040x}", names[r], a * MILLI, int(_GPU_MB[g]), s * ONE_TOKEN, sl, t, rp, f"op{f}" if f >= 0 else "")
        for i, r, a, g, s, sl, t, rp, f in zip(range(n), region.tolist(), ask_milli.tolist(), gpu.tolist(),
                                               stake.tolist(), slots.tolist(), tps.tolist(), rel, farm.tolist())
    ]


def synthetic_demands(m: int, rng: np.random.Generator, prefix: str = "u",
                      units: np.ndarray | None = None) -> list[Demand]:
    """``m`` units, each standing for a job of ``units[k]`` units (default 1 to 8): VRAM need, a price cap,
    stake scaled with the job's value at risk, some with a region allow-list, some replicated, a few with an
    excluded provider."""
    names = list(DEFAULT_TABLE.regions)
    need = rng.choice(_NEED_MB, m, p=_NEED_SHARE)
    cap_milli = 800 + rng.integers(0, 2500, m)
    if units is None:
        units = rng.integers(1, 9, m)
    replicas = np.where(rng.random(m) < 0.1, 2, 1)
    restrict = rng.random(m) < 0.25
    excluded = rng.random(m) < 0.02
    out = []
    for k in range(m):
        allow = None
        if restrict[k]:
            allow = frozenset(names[j] for j in rng.choice(len(names), int(rng.integers(1, 4)), replace=False))
        cap = int(cap_milli[k]) * MILLI
        stake = required_stake(cap * int(units[k]) * 10, 100 * ONE_TOKEN)
        ex = frozenset({f"0x{int(rng.integers(0, 1 << 16)):040x}"}) if excluded[k] else frozenset()
        out.append(Demand(f"{prefix}{k}", int(need[k]), stake, cap, ex, allow, int(replicas[k])))
    return out


def simulate(config: SimConfig, progress: Callable[[int], None] | None = None) -> SimReport:
    """Run ``config.hours`` hourly ticks; ``progress(hour)`` is called after each (for a progress bar)."""
    rng = np.random.default_rng(config.seed)
    n, hours = config.providers, config.hours
    offers = synthetic_offers(n, rng)
    online = rng.random(n) < 0.85
    book = MatchingBook(offers, DEFAULT_TABLE, online.tolist())
    index_of = book.index.index_of
    names = list(DEFAULT_TABLE.regions)
    region = np.array([names.index(o.region) for o in offers])
    asks = np.array([o.price // MILLI for o in offers], dtype=np.int64)
    slots = np.array([max(0, o.free_slots) for o in offers], dtype=np.int64)
    speed = [o.throughput for o in offers]
    operator = [o.operated_by for o in offers]
    busy = np.zeros(n, dtype=np.int64)

    jobs = config.job_count
    arrive_weight = 2 + np.sin(np.arange(hours) * 2 * np.pi / 24 - np.pi / 2)  # night trough, afternoon peak
    arrival = np.sort(rng.choice(hours, jobs, p=arrive_weight / arrive_weight.sum())) if hours else np.zeros(0, int)
    work_hours = rng.integers(4, 21, jobs)  # per unit, at reference speed
    units_of = rng.integers(1, 9, jobs)
    job_demands = synthetic_demands(jobs, rng, prefix="job", units=units_of)
    units_total = 0
    pending: list[tuple[Demand, int]] = []  # (demand, job)
    finishing: list[list[tuple[int, int]]] = [[] for _ in range(hours + 1)]  # (provider, run id)
    running: dict[int, tuple[int, str, Demand, int]] = {}  # run id -> (provider, operator, unit, job)
    runs_of: dict[int, list[int]] = {}  # provider -> its run ids
    unit_ops: dict[str, set[str]] = {}  # unit -> operators running a replica
    next_run = 0
    assigned = completed = dropouts = 0
    paid = cheapest = idle_hours = online_hours = 0
    online_slot_hours = np.zeros(len(names), dtype=np.int64)
    busy_slot_hours = np.zeros(len(names), dtype=np.int64)
    job_k = 0

    for hour in range(hours):
        if hour:
            leave = np.flatnonzero(online & (rng.integers(0, 100, n) < config.leave_per_hour_pct))
            join = np.flatnonzero(~online & (rng.integers(0, 100, n) < config.join_per_hour_pct))
            online[leave] = False
            online[join] = True
            for i in leave.tolist():
                book.set_online(i, False)
                for run in runs_of.pop(i, []):
                    _, op, d, job = running.pop(run)
                    book.release(i)
                    busy[i] -= 1
                    dropouts += 1
                    unit_ops[d.unit_id].discard(op)
                    pending.append((Demand(d.unit_id, d.vram_mb, d.min_stake, d.max_price, d.excluded | {offers[i].provider},
                                           d.regions, 1, frozenset(unit_ops[d.unit_id])), job))
            for i in join.tolist():
                book.set_online(i, True)
        for i, run in finishing[hour]:
            if run in running:
                del running[run]
                runs_of[i].remove(run)
                book.release(i)
                busy[i] -= 1
                completed += 1
        while job_k < jobs and arrival[job_k] == hour:
            base = job_demands[job_k]
            for u in range(int(units_of[job_k])):
                pending.append((Demand(f"{base.unit_id}-{u}", base.vram_mb, base.min_stake, base.max_price,
                                       base.excluded, base.regions, base.replicas), job_k))
                units_total += base.replicas
            job_k += 1

        free = np.where(online, slots - busy, 0)
        waiting: list[tuple[Demand, int]] = []
        hour_paid = hour_assigned = 0
        for d, job in pending:
            got = book.assign(d)
            for a in got:
                i = index_of[a.rank - 1]
                busy[i] += 1
                hour_paid += a.price
                run = next_run
                next_run += 1
                running[run] = (i, operator[i], d, job)
                runs_of.setdefault(i, []).append(run)
                unit_ops.setdefault(d.unit_id, set()).add(operator[i])
                took = -(-int(work_hours[job]) * REFERENCE_THROUGHPUT // speed[i])  # faster nodes finish sooner
                finishing[min(hours, hour + max(1, took))].append((i, run))
            hour_assigned += len(got)
            if len(got) < d.replicas:
                waiting.append((Demand(d.unit_id, d.vram_mb, d.min_stake, d.max_price, d.excluded, d.regions,
                                       d.replicas - len(got), frozenset(unit_ops.get(d.unit_id, ()))), job))
        pending = waiting
        assigned += hour_assigned
        paid += hour_paid
        if hour_assigned:
            pool = np.repeat(asks, free)
            k = min(hour_assigned, len(pool))
            cheapest += sum(np.partition(pool, k - 1)[:k].tolist()) * MILLI if k else 0
        on = int(online.sum())
        online_hours += on
        idle_hours += int((online & (busy == 0)).sum())
        online_slot_hours += np.bincount(region[online], weights=slots[online], minlength=len(names)).astype(np.int64)
        busy_slot_hours += np.bincount(region, weights=busy, minlength=len(names)).astype(np.int64)
        if progress is not None:
            progress(hour)

    counts = np.bincount(region, minlength=len(names))
    return SimReport(config, units_total, assigned, completed, dropouts, sum(d.replicas for d, _ in pending), paid,
                     cheapest, idle_hours, online_hours,
                     tuple(RegionStats(name, int(counts[k]), int(online_slot_hours[k]), int(busy_slot_hours[k]))
                           for k, name in enumerate(names)))
