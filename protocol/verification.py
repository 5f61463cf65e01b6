"""How much of a unit gets re-executed, which segments, and what that buys: the verification policy.

Pure functions, no I/O. The buyer picks a level per job; the level fixes the share of committed segments a verifier
replays (``rate``). Which segments: a uniform sample ranked by SHA-256 of a seed the provider cannot know when it
commits (a later block hash, or the marketplace's secret drawn after the proof is in), plus a few *targeted* picks —
the segments whose committed loss departs most from their neighbours (a faked loss curve, or a sloppy forgery, shows
up there without any compute). Targeted picks come out of the same budget. On top of it, up to
``UPDATE_OUTLIER_PICKS`` segments whose model *moved* far more or far less than their neighbours' (Proof-of-Learning's
largest updates, and the idle segment that did not train at all): the marketplace measures each segment's update on
the checkpoints it was handed (which hash to the commitments), so a provider cannot shade it; honest units have none
(measured: every honest segment within 0.8-2.6x its neighbours' median), so honest work costs no extra replay.

What it buys, exactly (no simulation): a unit with ``n`` committed segments of which ``bad`` were faked, checked with
``k`` uniform picks, escapes with probability ``C(n-bad, k) / C(n, k)`` (hypergeometric). A cheater's unearned pay is
bounded by its stake only if it is caught within ``stake / unit price`` cheating units; :func:`catch_within` is the
chance of that. With ``n`` = 2,048 one-step segments and the standard rate, a provider faking 1% of its steps escapes
one unit with p ≈ 0.72 and 21 units in a row with p ≈ 0.0009. That is why units are long and commitments fine-grained:
the sampling rate alone cannot do it at 2% cost, the number of committed transitions per unit can.

Trust (BOINC's adaptive replication): a host with a long record of verified units (each with at least one segment
replayed) is sampled at half the rate, but only where the halved rate still catches a provider faking 1% of a unit's
segments before its unearned pay exceeds its stake with probability at least 0.995 (:func:`sampling_rate`; the target
is 0.99, and at that very line the bench measured 0.990 over 1,000 trials: no room for its noise): trust must not buy a
cheat better odds than the target. So the discount goes to trusted hosts whose stake covers more units (a unit of
2,048 segments at the standard rate needs 39x the unit price staked, against 20x without it).
"""
from __future__ import annotations

#: what a benched verifier's refusal adds while the referee has yet to rule on the canary it approved (the ruling may
#: void the canary and put it back to work): its agent waits and asks again instead of stopping
UNDER_REVIEW = "the referee is replaying the segment it approved: ask again later"

import functools
import hashlib
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Sequence

from eth_utils import keccak

from protocol.errors import GridMintValueError
from protocol.money import MAX_AMOUNT

#: Share of committed segments replayed per unit, by level. "standard" leaves room under a 2% compute budget for
#: the verifier's own overhead (building its replayer, loading the state and hashing it twice per replayed step:
#: measured ~7% per replayed step plus ~45 ms per unit on the default job shape; at 18/1000 the bench's ratio was
#: 0.0195-0.0216, over budget in two runs of three). That was on AVX2. On AVX-512/AMX the step is cheaper and the
#: two SHA-256 hashes of the state were not (SHA-NI either way): 27% per replayed step, 0.0204-0.0208 at 16/1000.
#: The v3 state hash (BLAKE3, node.statehash) halves them: 20% per replayed step, 0.0192 (``bench proof``'s
#: verify_segment_steps, verify_hash_steps say where it goes). Those runs spread +-15%; timed interleaved with the
#: provider's unit (stop 41) they spread 0.0191-0.021: 0.0203, a replayed step costing 1.27 provider steps (two
#: state hashes 0.11, loading the state 0.04, the claim's checks 0.01, the rest a step run cold), over 2% by 1.5%.
#: Since the verifier's kept model + AdamW hold their state in the hash's own layout (node.trainer.
#: KeptTrainingState: the load is the hash's one copy, each hash a bare digest), loading and both hashes cost 0.045
#: provider steps, and the same measurement, alternating the old code and the new on one machine, went 0.019 ->
#: 0.0183 and 0.0196 -> 0.0189 (stop 42; ``verify_load_steps``, ``verify_digest_steps``).
LEVELS: dict[str, Fraction] = {
    "none": Fraction(0),
    "standard": Fraction(16, 1000),
    "paranoid": Fraction(1, 10),
    "full": Fraction(1),
}
TRUST_AFTER_UNITS = 50  # consecutive verified units before a host counts as trusted
#: A provider's stake covers at least this many units at its ask (and the marketplace's flat minimum): its stake
#: horizon (:func:`stake_horizon`) is then over this many units, the horizon ``gridmint bench proof`` measures
#: ``caught_rate`` at (``--stake-units``). A flat minimum alone let a provider asking more than a twentieth of it
#: take work on which a 1% cheat was caught before its pay passed its stake less often than measured.
STAKE_UNITS = 20


def provider_min_stake(ask: int, min_stake: int, units: int = STAKE_UNITS) -> int:
    """The least stake (base units) a provider asking ``ask`` per unit is matched and paid with: ``units`` units at
    its ask (:data:`STAKE_UNITS`; a node passes what its marketplace's ``/config`` says), never below the
    marketplace's flat ``min_stake``."""
    if min(ask, min_stake, units) < 0:
        raise GridMintValueError(f"ask, min stake and units must be >= 0, got {ask}, {min_stake}, {units}")
    return max(min_stake, units * ask)
TRUSTED_DISCOUNT = Fraction(1, 2)
#: The catch probability (1% of segments faked, within the stake horizon) the trusted discount must keep: the 0.99
#: target with room for the measurement's noise.
TRUSTED_MIN_CATCH = Fraction(995, 1000)
TARGETED_SHARE = Fraction(1, 8)  # of the budget, spent on the most anomalous committed losses
#: A segment whose model update (the L2 distance its checkpoints moved) is more than this factor above or below the
#: median of its neighbours' is an update outlier. Honest segments measured at most 2.52x off it either way (1,408
#: segments: 6 unit shapes, fp32 and bf16, two DiLoCo rounds; 0 outliers; the first segment of a unit, from fresh
#: AdamW moments, moves most); a skipped segment is 0, a jump to copied or random weights is huge.
UPDATE_OUTLIER_FACTOR = 8
#: Update outliers replayed on top of the level's budget, most extreme first (one hit is enough to convict).
UPDATE_OUTLIER_PICKS = 2
#: Share of a verifier's tasks that are planted known-bad segments (marketplace.canary). Each costs the verifier one
#: segment replay, so this adds 2% to its compute (verify_cost_ratio x 1.02); a verifier approving everything meets
#: its first canary within 228 tasks with probability 0.99, and loses its stake there.
CANARY_RATE = Fraction(1, 50)
#: Share of the passes (on CPU work; on GPU work where a referee runs on that GPU) that the referee replays itself
#: before the unit is paid (marketplace.checking.audit_check): what catches a verifier colluding with the provider,
#: who tells canaries apart. It costs the operator about this share of the verifiers' replays where ``AUDIT_PEERS``
#: providers or more share the plan, more on thinner plans (``bench proof``'s honest_audit_rate, 10 providers on the
#: plan: 0.120-0.125). A cheat whose checks go to
#: its friend is caught where an audited pass lands on a segment it faked, before its pay exceeds a 20x stake
#: (``bench proof``, 1% of the steps faked, the ring taking the share of its friend's checks that suits it best;
#: 1,000 trials): 0.997 where it is its plan's only provider (colluding_caught_rate; 0.41 before ``AUDIT_PEERS``),
#: 0.996 / 0.995 / 0.997 as one of 2 / 5 / 10 providers of equal work on its plan (colluding_by_providers: the
#: audit odds rise with the ring's share, :func:`audit_rate`; with ``AUDIT_PEERS`` 8: 0.981 / 0.980 / 0.994), as
#: often as a cheat on its own (min_caught_rate 0.995); 1.0 for one faking whole units.
AUDIT_RATE = Fraction(1, 10)
#: The audit rate rises where one verifier does more of one provider's checking than of the checking of the
#: provider's plan across the market (the shape of a ring: a friend polling the moment its provider's checks are
#: queued, and for little else). Measured over the provider's last ``AUDIT_WINDOW`` real verdicts, against the
#: market's real verdicts on that plan over the same time (the last ``AUDIT_MARKET_WINDOW`` at most), each shrunk
#: toward the fair share by ``AUDIT_PRIOR`` checks per verifier (:func:`audit_rate`).
AUDIT_WINDOW = 256
#: At a provider's conviction the referee audits the passes of its work that still stand, its latest this many
#: (marketplace.checking._audit_passes): a verifier that passed one of its faked segments among them loses its fee
#: and, replaying on the unit's own plan and kernels, its stake. Each is one segment's replay: at most this many
#: segments of the cheat's work, about ``rate`` of the work those passes checked (a cheat caught within its stake
#: horizon gave far fewer: ``bench proof``'s 21 units of 2,048 steps at the standard level, ~34 checks each, 714).
#: ``bench proof``'s ``colluding_ring_slashed_rate``: of the rings that passed a fake, the share this costs its stake:
#: 1.0 where the cheat is its plan's only provider, 0.998 / 0.996 / 0.996 as one of 2 / 5 / 10 (1,000 trials; the
#: rest are the trials in which the cheat itself escapes within its stake horizon). With 256: 0.88-0.98 (200 trials,
#: ``AUDIT_PEERS`` 8).
CONVICTION_AUDITS = 2048
AUDIT_MARKET_WINDOW = 8192
AUDIT_PRIOR = 2
#: The plan's checking is compared as if at least this many providers did it: where fewer did (over the same time),
#: the missing ones count as checked by other verifiers, at the average volume of those there. Without it a ring
#: would declare a plan of its own (any name: ``cpu/mb7``), its friend that plan's only provider and itself its only
#: verifier, and have the very same shares both ways (the base rate: caught 0.41 before a 20x stake is paid out, for a
#: 1% cheat; 0.997 with it). With it, every pass on a plan of one provider is audited once it has a few verdicts
#: (2 providers: 0.6 for an honest verifier, every pass for a ring; 5: 0.24; 10: 0.12), falling to ``AUDIT_RATE`` from
#: this many on: the price of a thin market, paid by the operator's referee (``bench proof``'s
#: honest_audit_rate_by_providers; audit_cost_ratio_by_providers: at most the verifiers' own compute, ~0.019 of the
#: provider's, on a plan of one). Why 12, not 8: with 8 a ring's passes on a plan of 2-5 providers were audited at
#: about 0.74 at steady state, and such a ring's cheat caught 0.98 of the time (1,000 trials); with 12 at 1.0 for any
#: plan of up to 12 providers (0.996 / 0.995 for 2 / 5), at 1.2x the base for an honest market of 10. A ring could
#: still staff a plan of its own with this many providers' work of its own (each staked, each winning real work) to
#: get back to the base.
AUDIT_PEERS = 12


def audit_rate(base: float, by_verifier: int, window: int, plan_by_verifier: int, plan_window: int,
               verifiers: int, peers: int) -> float:
    """The probability the referee audits a pass by a verifier that gave ``by_verifier`` of its provider's last
    ``window`` real verdicts (this one included), and ``plan_by_verifier`` of the ``plan_window`` real verdicts the
    market gave over the same time on work of the provider's plan (the provider's own among them), where
    ``verifiers`` verifiers gave those, on the work of ``peers`` providers. ``base`` (``AUDIT_RATE``) times the ratio
    of its share of the provider's checking to its share of the plan's, each shrunk by ``AUDIT_PRIOR`` checks a
    verifier toward the fair share, the plan's counted as if ``AUDIT_PEERS`` providers at least did its work (the
    missing ones checked by others); never below ``base``, at most 1.

    An honest verifier takes the checks as they come, whoever's: its two shares agree (a fast one has both large),
    and the rate is about ``base`` on a plan of ``AUDIT_PEERS`` providers or more. A ring that takes its friend's
    checks and does little else has a share of its friend's checking ``m`` times its share of the plan's, for a
    friend doing ``1 / m`` of the plan's work (the plan counted as ``AUDIT_PEERS`` providers' at least): in a market
    of ten such providers, every pass of it is audited once its friend's last 256 verdicts are its own, whichever
    number of wallets it splits them over (each has both shares cut alike); to bring the ratio down it must check
    the other providers' work, honestly (a lazy pass there meets the canaries). Nor does a plan of the ring's own,
    where its friend is the only provider: the plan's checking then counts ``AUDIT_PEERS`` times its friend's, and
    every pass is audited once it has a few (so are an honest lone provider's: a thin market is audited more)."""
    for name, v in (("by_verifier", by_verifier), ("window", window), ("plan_by_verifier", plan_by_verifier),
                    ("plan_window", plan_window), ("verifiers", verifiers), ("peers", peers)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise GridMintValueError(f"{name} must be a non-negative int, got {v!r}")
    if not 0 <= base <= 1 or by_verifier > window or plan_by_verifier > plan_window:
        raise GridMintValueError(f"audit_rate: base {base!r} outside [0, 1], or a count over its window "
                                 f"({by_verifier}/{window}, {plan_by_verifier}/{plan_window})")
    if base == 0:
        return 0.0
    n = max(1, verifiers)
    plan = Fraction(plan_window) * max(1, Fraction(AUDIT_PEERS, max(1, peers)))  # the missing peers' checking
    over = (Fraction(by_verifier + AUDIT_PRIOR, window + AUDIT_PRIOR * n)
            / (Fraction(plan_by_verifier + AUDIT_PRIOR) / (plan + AUDIT_PRIOR * n)))
    return min(1.0, float(base * max(Fraction(1), over)))


def level_rate(level: str, consecutive_verified: int = 0) -> Fraction:
    """Replay share for ``level``; halved for a trusted host (never for "full")."""
    if level not in LEVELS:
        raise GridMintValueError(f"unknown verification level {level!r}; choose one of {sorted(LEVELS)}")
    if not isinstance(consecutive_verified, int) or consecutive_verified < 0:
        raise GridMintValueError(f"consecutive_verified must be a non-negative int, got {consecutive_verified!r}")
    rate = LEVELS[level]
    if level != "full" and consecutive_verified >= TRUST_AFTER_UNITS:
        rate *= TRUSTED_DISCOUNT
    return rate


def challenge_budget(n_segments: int, rate: Fraction) -> int:
    """How many segments to replay: ``floor(rate * n)``, at least one unless the rate is zero, at most ``n``."""
    if not isinstance(n_segments, int) or n_segments < 1:
        raise GridMintValueError(f"n_segments must be a positive int, got {n_segments!r}")
    if rate <= 0:
        return 0
    return min(n_segments, max(1, math.floor(rate * n_segments)))


def _seed_bytes(seed: int | bytes) -> bytes:
    if isinstance(seed, bool) or not isinstance(seed, (int, bytes)):
        raise GridMintValueError(f"challenge seed must be an int or bytes, got {seed!r}")
    if isinstance(seed, int):
        if seed < 0:
            raise GridMintValueError(f"challenge seed must be non-negative, got {seed}")
        return seed.to_bytes(max(1, (seed.bit_length() + 7) // 8), "big")
    return seed


def loss_anomalies(loss_micro: Sequence[int], window: int = 4) -> list[int]:
    """Segment indices ordered by how far each committed loss is from the median of its ``window`` neighbours
    on each side (largest first; ties by index). Integer arithmetic on micro-nats."""
    n = len(loss_micro)
    scored = []
    for i in range(n):
        nb = sorted(loss_micro[max(0, i - window) : i] + loss_micro[i + 1 : i + 1 + window])
        med = nb[len(nb) // 2] if nb else loss_micro[i]
        scored.append((-abs(loss_micro[i] - med), i))
    return [i for _, i in sorted(scored)]


def update_outliers(update_norms: Sequence[float], window: int = 4, factor: float = UPDATE_OUTLIER_FACTOR) -> list[int]:
    """Segments whose update is more than ``factor`` times above or below the median update of its ``window``
    neighbours on each side, most extreme first (ties by index). A zero update among moving neighbours is the most
    extreme there is, and so is a non-finite one (weights that overflowed: honest divergence replays the same, so
    it is replayed, never refused)."""
    if factor <= 1:
        raise GridMintValueError(f"factor must be > 1, got {factor}")
    norms = []
    for x in update_norms:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or x < 0:
            raise GridMintValueError(f"update norms must be non-negative numbers, got {x!r}")
        norms.append(float(x) if math.isfinite(x) else math.inf)

    def off(x: float, med: float) -> float:  # how many times apart, either way
        if x == med:
            return 1.0
        if 0 in (x, med) or math.inf in (x, med):
            return math.inf
        return max(x / med, med / x)

    scored = []
    for i, x in enumerate(norms):
        nb = sorted(norms[max(0, i - window) : i] + norms[i + 1 : i + 1 + window])
        if nb and (o := off(x, nb[len(nb) // 2])) > factor:
            scored.append((-o, i))
    return [i for _, i in sorted(scored)]


def choose_challenges(unit_id: str, loss_micro: Sequence[int], rate: Fraction, seed: int | bytes,
                      update_norms: Sequence[float] | None = None) -> list[int]:
    """Sorted segment indices to replay: segment 0 (when the budget is two or more), targeted picks (most anomalous
    committed losses), then a uniform sample, ``challenge_budget`` in all; plus the ``UPDATE_OUTLIER_PICKS`` most extreme update outliers
    (:func:`update_outliers` of ``update_norms``, each segment's measured update, when given), if not picked already.

    ``seed`` must be unknown to the provider when it committed; the uniform part is SHA-256(seed, unit, i) ranked.
    """
    n = len(loss_micro)
    if update_norms is not None and len(update_norms) != n:
        raise GridMintValueError(f"{len(update_norms)} update norms for {n} segments")
    budget = challenge_budget(n, rate)
    if budget == 0:
        return []
    if budget >= n:
        return list(range(n))
    extra = update_outliers(update_norms)[:UPDATE_OUTLIER_PICKS] if update_norms is not None else []
    # Segment 0 always, from two picks on: it is the one transition that ties the whole chain to the job's start
    # state (a provider that trains honestly from an old or foreign checkpoint fakes only that one). A budget of one
    # (a short unit: the default job's four segments at "standard") is drawn uniformly instead: fixed on segment 0,
    # it would never look at the others, and a careful forger would fake only those.
    picked = {0} if budget >= 2 else set()
    for i in loss_anomalies(list(loss_micro))[: math.floor(budget * TARGETED_SHARE)]:
        if len(picked) < budget:
            picked.add(i)
    prefix = b"GridMint/challenge/v1" + _seed_bytes(seed) + b"\x00" + unit_id.encode()
    for i in sorted(range(n), key=lambda i: hashlib.sha256(prefix + i.to_bytes(8, "big")).digest()):
        if len(picked) >= budget:
            break
        picked.add(i)
    return sorted(picked | set(extra))


def miss_probability(n: int, bad: int, picks: int) -> Fraction:
    """Exact chance that ``picks`` uniform draws without replacement from ``n`` segments miss all ``bad`` ones."""
    if not 0 <= bad <= n or not 0 <= picks <= n:
        raise GridMintValueError(f"need 0 <= bad, picks <= n; got n={n}, bad={bad}, picks={picks}")
    if picks > n - bad:
        return Fraction(0)
    return Fraction(math.comb(n - bad, picks), math.comb(n, picks))


#: Horizons up to this many units are computed exactly (Fraction powers); beyond, in floating point (a stake over a
#: tiny unit price is a horizon of 10**20 units: the exact power never returned, holding the GIL)
EXACT_HORIZON = 1024


def catch_within(n: int, bad: int, picks: int, units: int) -> Fraction:
    """Chance a provider faking ``bad`` of ``n`` segments in every unit is caught within ``units`` units (exact up to
    ``EXACT_HORIZON`` units, to double precision beyond)."""
    return _catch(miss_probability(n, bad, picks), units)


def _catch(miss: Fraction, units: int) -> Fraction:
    """Chance of at least one catch in ``units`` units, each missed with probability ``miss`` (see catch_within)."""
    if units <= EXACT_HORIZON or miss in (0, 1):
        return 1 - miss ** units
    log_miss = math.log(miss.numerator) - math.log(miss.denominator)  # big ints: no float underflow
    return Fraction(-math.expm1(units * log_miss))


def stake_horizon(stake: int, unit_price: int) -> int:
    """Cheating units a provider can be paid for before its unearned pay exceeds its stake (then one more is caught
    before its pay is released, since pay follows verification)."""
    if unit_price <= 0 or stake < 0:
        raise GridMintValueError(f"need unit_price > 0 and stake >= 0, got {unit_price}, {stake}")
    return stake // unit_price + 1


def check_fee(unit_price: int, n_segments: int) -> int:
    """What a verifier earns for one replayed segment that passes: the provider's own price for that share of the
    unit's compute, rounded up (base units)."""
    return -(-unit_price // n_segments)


def max_checks(level: str, n_segments: int) -> int:
    """The most replayed segments one unit can pay for at ``level``: its budget and the update outliers replayed on
    top of it (a trusted host's halved budget is never more). What the escrow holds the fees for."""
    rate = level_rate(level)
    return 0 if rate == 0 else min(n_segments, challenge_budget(n_segments, rate) + UPDATE_OUTLIER_PICKS)


@dataclass(frozen=True)
class VerificationQuote:
    level: str
    rate: Fraction
    replayed_segments: int
    fee: int  # base units per unit, paid to the verifiers on top of the provider's price (the level's replays)
    catch_probability_1pct: Fraction  # one unit, 1% of segments faked
    catch_within_stake_1pct: Fraction  # before unearned pay exceeds the stake, 1% faked in every unit


def quote(level: str, *, n_segments: int, unit_price: int, stake: int) -> VerificationQuote:
    """What a level costs per unit and what it buys, for a buyer choosing it. Money in integer base units.

    The fee pays the verifiers the provider's own price for the share of compute they re-run (:func:`check_fee` per
    replayed segment that passes); the escrow also holds the fees of the update outliers that may be replayed on
    top (:func:`max_checks`), refunded when unused.
    """
    rate = level_rate(level)
    k = challenge_budget(n_segments, rate)
    fee = check_fee(unit_price, n_segments) * k
    # Conservative: count only the uniform picks (segment 0 and the targeted ones may miss a careful forger).
    return VerificationQuote(level, rate, k, fee, _catch_1pct(n_segments, rate, 1),
                             _catch_1pct(n_segments, rate, stake_horizon(stake, unit_price)))


def sampling_rate(level: str, *, consecutive_verified: int, n_segments: int, unit_price: int,
                  stake: int) -> tuple[Fraction, bool]:
    """The replay share for one submitted unit, and whether the trusted-host discount applied: ``level_rate`` with
    the host's record, unless the halved rate would catch a provider faking 1% of the unit's ``n_segments`` within
    its stake horizon (``stake`` / ``unit_price``) with probability under :data:`TRUSTED_MIN_CATCH` while the
    level's own rate does not: then the level's rate (counted as :func:`quote` counts it, uniform picks only)."""
    rate = level_rate(level)
    trusted = level_rate(level, consecutive_verified)
    if trusted == rate:
        return rate, False
    if challenge_budget(n_segments, trusted) == challenge_budget(n_segments, rate):
        return trusted, True  # the same number of picks either way
    horizon = stake_horizon(stake, unit_price)
    if _catch_1pct(n_segments, trusted, horizon) >= min(TRUSTED_MIN_CATCH, _catch_1pct(n_segments, rate, horizon)):
        return trusted, True
    return rate, False


def trusted_min_stake(level: str, *, n_segments: int, unit_price: int, max_units: int = 10_000) -> int | None:
    """The least stake (base units) at which a trusted host gets :func:`sampling_rate`'s discount on a unit of
    ``n_segments`` at ``unit_price``: 0 where the discount costs nothing, None where there is none (level "none" or
    "full") or it would take more than ``max_units`` unit prices, or more than any stake can be (MAX_AMOUNT)."""
    rate, trusted = level_rate(level), level_rate(level, TRUST_AFTER_UNITS)
    if trusted == rate:
        return None
    if challenge_budget(n_segments, trusted) == challenge_budget(n_segments, rate):
        return 0
    horizon = _trusted_horizon(n_segments, rate, trusted, max_units)
    if horizon is None:
        return None
    least = (horizon - 1) * unit_price  # stake_horizon = stake // price + 1
    return least if least <= MAX_AMOUNT else None


@functools.lru_cache(maxsize=4096)
def _trusted_horizon(n_segments: int, rate: Fraction, trusted: Fraction, max_units: int) -> int | None:
    """The fewest units of stake horizon at which ``trusted`` catches a 1% cheat as :func:`sampling_rate` asks (None:
    more than ``max_units + 1``). It does not depend on the unit price, so it is kept per (segments, rates): the
    search costs up to ~30 ms of exact fractions (a few hundred segments at "standard"), and every quote asks it."""
    miss_trusted, miss_rate = _miss_1pct(n_segments, trusted), _miss_1pct(n_segments, rate)
    for horizon in range(1, max_units + 2):
        if _catch(miss_trusted, horizon) >= min(TRUSTED_MIN_CATCH, _catch(miss_rate, horizon)):
            return horizon
    return None


def _miss_1pct(n_segments: int, rate: Fraction) -> Fraction:
    """Chance one unit with 1% of its ``n_segments`` faked escapes the uniform picks of ``rate``."""
    k = challenge_budget(n_segments, rate)
    bad = max(1, math.ceil(n_segments / 100))
    uniform = k if k >= n_segments or k == 1 else max(0, k - 1 - math.floor(k * TARGETED_SHARE))
    return miss_probability(n_segments, bad, uniform)


def _catch_1pct(n_segments: int, rate: Fraction, horizon: int) -> Fraction:
    return _catch(_miss_1pct(n_segments, rate), horizon)


def plant_canaries(n_tasks: int, seed: int | bytes, rate: Fraction = CANARY_RATE) -> list[bool]:
    """Which of a verifier's next ``n_tasks`` tasks are planted known-bad segments (True). A verifier that approves
    one is lazy or colluding and loses its stake; the verifier cannot tell canaries from real tasks."""
    s = _seed_bytes(seed)
    out = []
    for i in range(n_tasks):
        h = int.from_bytes(hashlib.sha256(b"GridMint/canary/v1" + s + i.to_bytes(8, "big")).digest()[:8], "big")
        out.append(Fraction(h, 2**64) < rate)
    return out


def fraud_evidence(unit_id: str, segment: int, provider: str) -> bytes:
    """The on-chain evidence id of "segment ``segment`` of ``unit_id`` by ``provider`` does not replay": what a
    verifier's accusation names and GridStaking uses at most once. keccak256(unitId || uint256 segment || provider)."""
    unit = bytes.fromhex(unit_id[2:] if unit_id.startswith("0x") else unit_id)
    if len(unit) != 32 or segment < 0:
        raise GridMintValueError(f"bad evidence inputs: unit {unit_id!r}, segment {segment}")
    return keccak(unit + segment.to_bytes(32, "big") + bytes.fromhex(provider[2:]))
