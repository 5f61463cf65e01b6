"""Canaries: planted known-bad segments that catch a verifier who approves without replaying.

A verifier is paid to replay; one that approves everything earns the same for no work, and every cheat it is handed
goes free. So now and then (``Settings.canary_rate`` of the tasks it polls, drawn from the OS's randomness, so it
cannot be predicted) the task a verifier is handed is a *canary*: the very task it was about to get (same id, unit,
provider, spec, segment and start checkpoint), except that the claim for that segment is forged (:func:`forge`). A
replay always exposes it, on its own plan bit for bit, across plans past the tolerance (a verifier on another plan
that approves one lying within twice its tolerance of the truth is excused: the referee voids that canary,
:func:`marketplace.referee.canary_excuse`). An honest verifier flags it; approved, it proves the verifier lazy (or
broken): it is benched, its stake is slashed, and the checks it passed on units not yet credited go back to the
pool. Either way the real check of that segment is queued again, so the unit is still verified.

The forgery (:func:`forge`). An fp32 job whose segment the operator can afford to train again (:func:`retrainable`:
the default job shape) gets the segment trained again from its start: its first steps the true ones (a random
number of them, :func:`prefix_steps`), each step after on its own batch with one sequence swapped for one of
another batch of the segment (:func:`retrained`). Other jobs (bf16, whose honest replays across plans drift as far
apart as that forgery lies from the truth; or too large to train again) get the start trained on made-up gradients
with a neighbouring segment's shares of the AdamW moments (:func:`carried`), the *elementwise* forgery; a bf16 job's
decoy also carries a retrained variant, planted for a verifier on the unit's own plan and kernels, which replays it
bit for bit (:func:`for_verifier`).

What keeps a canary from being told without a replay:
- a task shows only its own segment's claim (``protocol.proof.segment_view``): no Merkle root or neighbour's hash
  to compare across tasks of one unit;
- its end is a real AdamW trajectory from the start, so every exact test a verifier can run on a segment's start and
  end without replaying passes, as on an honest end: the second moments never fall below ``beta2 ** segment_len`` of
  the start's (:func:`moment_floor_breaches`), the first moments moved no farther than the second allow
  (:func:`moment_cs_breaches`), no weight moves farther than AdamW's steps from the start's moments can move it
  (:func:`step_bound_breaches`), and the embedding rows of bytes the segment's batches never hold (the data order is
  public) end where zero gradients take them (:func:`idle_row_breaches`);
- a retrained one moves along real gradients of the segment's own data: the loss of its end on the segment's
  batches falls as an honest end's does, and its moments have an honest end's statistics. Over 88 segments of the
  default job (stop 30) no feature ``gridmint bench canary`` measures told it at an AUC above 0.56 (0.5: none),
  the loss on the segment's last batch among them. The elementwise one moves along no data's gradients: one forward
  pass on that batch told it at an AUC of 1.0 without a true prefix, 0.95 with half the segment's;
- its first steps are the segment's true ones: a verifier that replays a task's first j steps holds the exact state
  there and can run the exact tests from it, which tell a canary only once the replay has passed its prefix (on the
  default job shape at stop 30, one replayed step told 7% of the retrained canaries, half the segment 50%; every
  elementwise one without a prefix). That is inherent to any end off the true trajectory: from a true state past
  the prefix the steps left cannot reach it (one step past, 1 to 1,400 of 137,216 entries broke the floor or the
  Cauchy-Schwarz bound; two steps from the end, most of them). So laziness saves work only in proportion to the
  canaries it lets through, each of which costs it its whole stake;
- it is never planted where the verifier was handed a segment that tells it (:func:`plantable`: the segment itself,
  the one starting at the true end, and for an elementwise one those the forgery is made of), nor twice on one unit
  for one verifier; a verifier holds one task at a time, so it cannot fetch those while holding a canary;
- verifiers comparing notes: it is never planted where *another* verifier was handed a segment that tells it
  (:func:`telling`), and while it is out those segments' checks go to no other verifier; so what a ring of lazy
  verifiers knows between them never contradicts a canary before it is answered (after, its verdict stands);
- it is forged when the check is queued (:func:`stock`, ``stock_share`` of the checks, on a worker; the unit's
  checks all wait for it), not when it is handed out: a hand-out costs the same database work either way, nothing
  a verifier could time.
Every segment can be a canary. An elementwise one of the last segment of a unit of one or two segments takes its
gradients' shares from the same segment of another unit of its job and round handed in before it, when there is
one (none for a verifier handed any segment of that unit; none at all for the round's first unit handed in). What
a canary cannot hide: an elementwise canary (a bf16 job's, planted for a verifier on another plan; a job too large
to train again) is told by a forward pass, and one borrowed from another unit by a verifier comparing notes with
one handed that unit; a verifier colluding with the unit's provider (who knows every true state) tells them all:
what the referee's audits of passes are for (:func:`marketplace.checking.audit_check`), which it cannot tell apart.

Cost: per stocked check the operator trains the segment again (0.4-0.7 s on the default job shape, where a segment
trains in 0.3 s: loading, hashing and writing the checkpoint included), or, elementwise, replays the true prefix
(at most :data:`BUDGET` of work, else none) and computes the rest as elementwise AdamW steps (a bf16 job within the
budget: both). The verifier replays one segment. The stocking runs on a worker once the unit is handed in
(:func:`marketplace.checking.stock_canaries`), not in the submission's request; the unit's checks wait for it.
"""
from __future__ import annotations

import math
import secrets
from dataclasses import replace
from fractions import Fraction
from typing import Any, Mapping

import torch
from eth_utils import keccak
from torch import Tensor

from marketplace.blobs import BlobStore
from node import checkpoint, data
from node.crosscheck import PlanRunner, distance
from node.model import param_shapes
from node.trainer import (ADAMW_BETAS, ADAMW_EPS, ADAMW_WEIGHT_DECAY, PROVIDER_PLAN, UnitSpec, checkpoint_metadata,
                          deterministic, plan_step, segment_batches, state_hash)
from protocol.proof import TrainingProof, make_proof


def draw(rate: float | Fraction) -> bool:
    """Whether the next task handed out is a canary: true with probability ``rate``, from the OS's randomness."""
    if rate <= 0:
        return False
    if rate >= 1:
        return True
    r = Fraction(rate).limit_denominator(1_000_000)
    return secrets.randbelow(r.denominator) < r.numerator




#: The share of checks a canary is forged for when they are queued is this many times the canary rate (at most all):
#: a check handed out is planted with probability rate x (1 + the unit's other checks that tell it) / share when it
#: has one and the rules allow it (plant_odds), so the rate holds while that stays at most 1: a retrained canary
#: (the default job's) is told by one other check at most, an elementwise one by two, so the rate set later may
#: rise to 2x (4/3x) the one the stock was drawn at
STOCK_FACTOR = 4


def stock_share(rate: float | Fraction) -> Fraction:
    """The share of checks to forge a canary for ahead (:data:`STOCK_FACTOR` x ``rate``, at most 1)."""
    r = Fraction(rate).limit_denominator(1_000_000)
    return min(Fraction(1), max(Fraction(0), r * STOCK_FACTOR))


#: The last segment of a unit of at least this many segments borrows the update before it; of fewer (its start's
#: moments a segment back are a fresh optimizer's zeros, a tell), another unit's final state
BACKWARD_MIN_SEGMENTS = 3


def needs_sibling(seg: int, n_segments: int) -> bool:
    """Whether segment ``seg`` of a unit of ``n_segments`` is forged from another unit's final state (where it is
    forged elementwise: not :func:`retrainable`)."""
    return seg == n_segments - 1 and n_segments < BACKWARD_MIN_SEGMENTS


def stock(spec: UnitSpec, proof: TrainingProof, picks: list[int], segment_blobs: list[str], final_blob: str,
          blobs: BlobStore, rate: float | Fraction,
          sibling: tuple[str, list[str], str] | None = None) -> dict[int, dict[str, Any]]:
    """Canaries forged ahead for a share of a unit's sampled segments ``picks`` (each drawn with probability
    :func:`stock_share` of ``rate``): segment -> its decoy (:func:`forge`'s output, plus the ``root`` of the proof it
    was forged from, the ``share`` it was drawn at and the unit's ``checked`` segments, ``picks``, both for
    :func:`plant_odds`; for a bf16 job within :data:`BUDGET` also ``exact``, the retrained variant:
    :func:`for_verifier`). ``sibling``: (unit id, segment checkpoints, final checkpoint) of another unit of the same
    job and round, the source of the last segment's elementwise forgery in a unit of one or two segments
    (:func:`needs_sibling`; named in its decoy's ``source_unit``: a verifier handed any of that unit's segments gets
    no such canary). Segments :func:`forge` declines have none."""
    share = stock_share(rate)
    out: dict[int, dict[str, Any]] = {}
    for seg in sorted(set(picks)):
        if share > 0 and draw(share):
            other = (sibling if sibling is not None and needs_sibling(seg, len(proof.segments))
                     and not retrainable(spec) and len(sibling[1]) > seg else None)
            states: dict[str, dict[str, Tensor]] = {}  # (a bf16 job's two forgeries load the checkpoints once)
            fake = forge(spec, proof, seg, segment_blobs, final_blob, blobs,
                         (other[1][seg], other[2]) if other else None, states=states)
            decoy = {**fake, **({"source_unit": other[0]} if other else {})} if fake is not None else {}
            if not retrainable(spec) and affordable(spec):  # (a bf16 job) for a bit-for-bit replay
                exact = forge(spec, proof, seg, segment_blobs, final_blob, blobs, retrain=True, states=states)
                if exact is not None:
                    decoy["exact"] = {k: exact[k] for k in DECOY_CLAIM}
            if decoy:
                out[seg] = {**decoy, "root": proof.merkle_root, "share": str(share), "checked": sorted(set(picks))}
    return out


#: What a decoy's claim is made of: the keys :func:`for_verifier` takes from its ``exact`` variant
DECOY_CLAIM = ("proof", "end_blob", "true_end", "telling", "prefix")


def decoy_blobs(decoy: Mapping[str, Any] | None) -> list[str]:
    """The forged checkpoints a decoy (or a planted canary) names: its own and its ``exact`` variant's."""
    if not decoy:
        return []
    return [d["end_blob"] for d in (decoy, decoy.get("exact") or {}) if d.get("end_blob")]


def for_verifier(decoy: dict[str, Any], exact: bool) -> dict[str, Any] | None:
    """The decoy to plant for a verifier that replays the unit's plan bit for bit (``exact``: the same plan and
    kernels, as :func:`marketplace.referee.canary_excuse` has it) or not: a bf16 job's retrained variant (``exact``,
    from :func:`stock`) for the first, where there is one, which no forward pass tells and its replay must miss by
    bits; else the decoy itself, where it has one of its own (an elementwise forgery may be declined where the
    retrained one is not: a last segment with no other unit to borrow from). None: no canary for that verifier."""
    variant = decoy.get("exact") if exact else None
    if variant:
        return {**{k: v for k, v in decoy.items() if k not in ("exact", "source_unit")}, **variant}
    return decoy if "proof" in decoy else None


def plant_odds(rate: float | Fraction, decoy: dict[str, Any], seg: int | None = None) -> Fraction:
    """The probability that a check of segment ``seg`` with ``decoy`` is planted when handed out, where the rules
    allow it (:func:`plantable`, and no other verifier handed what tells it: ``checking.next_verification``): ``rate``
    over the share the decoy was stocked at, and over the odds that the rules allow it (at most 1), so that ``rate``
    of all the checks handed out are canaries.

    Those odds: a canary of ``seg`` is allowed only while no other check of the unit among its :func:`telling`
    segments was handed out before it, to anyone; a unit's checks go out in a random order, so that is 1 in
    1 + (how many of them the unit has: the decoy's ``checked``, its unit's checks when stocked). Under full
    verification (every segment checked, each retrained canary told by the next but the last segment's) about half
    the hand-outs are allowed: without this, 0.60-0.65 of the rate set was planted (``gridmint bench planting``).
    (A decoy stocked before ``checked`` was kept: taken as allowed always.)"""
    share = Fraction(decoy.get("share", "1"))
    if share <= 0:
        return Fraction(0)
    others = len(set(telling(seg, decoy)) & set(decoy.get("checked", ())) - {seg}) if seg is not None else 0
    return min(Fraction(1), Fraction(rate).limit_denominator(1_000_000) * (1 + others) / share)


def telling(seg: int, decoy: Mapping[str, Any] | None) -> list[int]:
    """The segments whose hand-out tells a canary of segment ``seg`` made from ``decoy`` (its ``telling``, from
    :func:`forge`; a decoy stocked before that was kept: ``seg`` to ``seg`` + 2). Whoever was handed one of them
    could tell the canary, and so could any verifier it compares notes with: a canary is planted only where no
    verifier but its own was handed any, and none is handed out while the canary is out
    (``marketplace.checking.next_verification``)."""
    told = (decoy or {}).get("telling")
    return [int(t) for t in told] if told is not None else [seg, seg + 1, seg + 2]


def plantable(seg: int, seen: list[tuple[int, bool]], told: list[int] | None = None) -> bool:
    """Whether a canary of segment ``seg`` may be handed to a verifier that was handed ``seen`` of the same unit
    before: (segment, was it a canary) per hand-out. Not where it had a canary of the unit already, nor where it was
    handed one of ``told`` (the decoy's :func:`telling`, from :func:`forge`): the segment itself (its real claim,
    should the task have come back to it), the one starting at the true end, and those whose checkpoints the forgery
    is made of (with the start it is handed, a verifier holding them could recompute it). A forward forgery's:
    ``seg`` to ``seg`` + 2 (also the rule for decoys stocked before ``telling`` existed: the default); a backward
    one's: ``seg`` - 2 to ``seg``. The other segments before tell nothing: they end where this one starts or
    before."""
    tells = set(told if told is not None else telling(seg, None))
    return not any(was_canary or s in tells for s, was_canary in seen)


def moment_floor_breaches(spec: UnitSpec, start: Mapping[str, Tensor], end: Mapping[str, Tensor]) -> int:
    """How many second-moment entries of ``end`` lie below what ``segment_len`` AdamW steps from ``start`` always
    leave (``beta2 ** segment_len`` of the start's; each step adds a square): a test any verifier holding a task's
    start and claimed end can run without replaying. An honest end has none (up to fp32 rounding, allowed for); a
    forgery with another state's moments had thousands."""
    decay = ADAMW_BETAS[1] ** spec.segment_len
    breaches = 0
    for k, v in start.items():
        if k.endswith(".exp_avg_sq"):
            floor = decay * v.double()
            breaches += int((end[k].double() < floor * (1 - MOMENT_FLOOR_RTOL)).sum())
    return breaches


#: fp32 rounding of ``segment_len`` decays (a relative error of about 1e-7 a step) is not a breach
MOMENT_FLOOR_RTOL = 1e-5


def moment_cs_sides(spec: UnitSpec, start: Mapping[str, Tensor], end: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Per moment entry (all tensors, flattened), the two sides of the Cauchy-Schwarz test of
    :func:`moment_cs_breaches`: the square of the first moment's gain over the segment, and ``C`` times the second
    moment's gain (fp32 rounding allowed for). An entry breaches where the first exceeds the second; how near it
    comes is a statistical tell (``gridmint bench canary``: ``cs_near``)."""
    (b1, b2), n = ADAMW_BETAS, spec.segment_len
    c = _least_energy(n)[3]
    lhs, rhs = [], []
    for k, v in sorted(start.items()):
        if not k.endswith(".exp_avg_sq"):
            continue
        mk = k[: -len("_sq")]
        vs, ve = v.double(), end[k].double()
        rm = end[mk].double() - b1 ** n * start[mk].double()
        rv = ve - b2 ** n * vs
        slack = MOMENT_FLOOR_RTOL * (b2 ** n * vs + ve)  # the rounding of n fp32 updates of both moments
        lhs.append((rm * rm).flatten())
        rhs.append((c * (rv + slack) * (1 + MOMENT_FLOOR_RTOL) + 1e-30).flatten())
    empty = torch.zeros(0, dtype=torch.float64)
    return (torch.cat(lhs), torch.cat(rhs)) if lhs else (empty, empty)


def moment_cs_breaches(spec: UnitSpec, start: Mapping[str, Tensor], end: Mapping[str, Tensor]) -> int:
    """How many entries of ``end``'s moments no gradients could give from ``start``'s: over a segment the first moment
    gains ``sum a_i g_i`` and the second ``sum b_i g_i ** 2`` (AdamW's weights ``a_i``, ``b_i``), and Cauchy-Schwarz
    bounds the first's square by ``C`` (``sum a_i ** 2 / b_i``) times the second (fp32 rounding allowed for:
    :func:`moment_cs_sides`). A test a verifier can run without replaying; an honest end passes it."""
    lhs, rhs = moment_cs_sides(spec, start, end)
    return int((lhs > rhs).sum())


def step_bound_breaches(spec: UnitSpec, start: Mapping[str, Tensor], end: Mapping[str, Tensor]) -> int:
    """How many weights of ``end`` moved farther from ``start`` than ``segment_len`` AdamW steps from the start's
    moments can move them, whatever the gradients: step t moves a weight by at most lr x the bias corrections x
    (``beta1 ** t |m| / sqrt(beta2 ** t v)`` of the start's moments + ``sqrt(C_t)``), ``C_t`` the sum over the
    steps so far of ``a_i ** 2 / b_i`` (the moments' gradient weights: Cauchy-Schwarz). Another test a verifier can run
    without replaying; an honest end has none (worst 0.79 of the bound on the toy model). A forgery whose weights
    took another segment's update (moved from that segment's start moments) broke it in 2 of 14 toy segments."""
    (b1, b2), lr, n = ADAMW_BETAS, spec.lr, spec.segment_len
    breaches = 0
    for k, w in start.items():
        if not k.startswith("model."):
            continue
        name = k[len("model."):]
        m, v = start[f"optim.{name}.exp_avg"].double().abs(), start[f"optim.{name}.exp_avg_sq"].double()
        t0 = float(start[f"optim.{name}.step"])
        bound, c = torch.zeros_like(m), 0.0
        for t in range(1, n + 1):
            c += ((1 - b1) * b1 ** (t - 1)) ** 2 / ((1 - b2) * b2 ** (t - 1))
            first = torch.where(v > 0, b1 ** t * m / (b2 ** t * v).sqrt(), torch.where(m > 0, math.inf, 0.0))
            bound += math.sqrt(1 - b2 ** (t0 + t)) / (1 - b1 ** (t0 + t)) * (first + math.sqrt(c))
        moved = (end[k].double() - w.double()).abs()
        breaches += int((moved > lr * bound * (1 + MOMENT_FLOOR_RTOL) + 1e-12).sum())
    return breaches


def _least_energy(n: int) -> tuple[list[float], list[float], list[float], float]:
    """For :func:`carried`: ``a_i`` and ``b_i``, the weights the step-i gradient and its square carry in the moments
    after ``n`` steps, ``w_i = a_i / b_i`` (the least-energy way to a given first-moment share) and ``C = sum a_i
    w_i``."""
    b1, b2 = ADAMW_BETAS
    a = [(1 - b1) * b1 ** (n - i) for i in range(1, n + 1)]
    b = [(1 - b2) * b2 ** (n - i) for i in range(1, n + 1)]
    w = [x / y for x, y in zip(a, b)]
    return a, b, w, sum(x * y for x, y in zip(a, w))


def _noise_shapes(n: int, gen: torch.Generator) -> tuple[list[float], list[float], float, float]:
    """Two random step patterns ``z`` and ``y`` over ``n`` steps for :func:`carried`'s noise, each carrying no
    first-moment share (``sum a_i z_i = 0``) and apart in the second (``sum b_i z_i y_i = 0``), with their energies
    ``Z = sum b_i z_i ** 2`` and ``Y``: a weight's noise is ``s z + u y``, ``s`` and ``u`` its own Gaussian draws (two
    numbers a weight instead of two a step: drawing is most of the cost)."""
    a, b, w, c = _least_energy(n)
    z0, y0 = (torch.randn(n, generator=gen, dtype=torch.float64).tolist() for _ in range(2))

    def no_first_share(e: list[float]) -> list[float]:
        k = sum(x * y for x, y in zip(a, e)) / c
        return [x - k * y for x, y in zip(e, w)]

    z, y = no_first_share(z0), no_first_share(y0)
    zz = sum(bi * x * x for bi, x in zip(b, z))
    if zz > 0:
        k = sum(bi * x * v for bi, x, v in zip(b, y, z)) / zz
        y = [x - k * v for x, v in zip(y, z)]
    return z, y, zz, sum(bi * x * x for bi, x in zip(b, y))


def _drift_as_trained(start: Tensor, borrowed: Tensor, true_end: Tensor) -> Tensor:
    """``borrowed`` (a tensor's first moments as the borrowed share leaves them) moved along its own drift from
    ``start`` only as far as the true segment moved them (``true_end``'s drift, in norm). As it came, a neighbour's
    share moved the first moments less than honest training does (over 88 segments of the default job a mean drift
    of 0.97 x the start's norm, against 1.39), a tell on its own. Measured on those segments, the same ends, prefixes
    and noise draws both ways (stop 29), the AUC of telling a canary from an honest end: by that drift 0.71 -> 0.50;
    by the weights' movement against Adam's step from the end moments 0.72 -> 0.53; by the share of moments near
    their Cauchy-Schwarz bound 0.70 -> 0.55. The cosine of the weights' move with that step (0.74 -> 0.75) it does
    not change."""
    drift = borrowed - start
    norm = float(drift.norm())
    return borrowed if norm == 0 else start + drift * (float((true_end - start).norm()) / norm)


def carried(spec: UnitSpec, start: Mapping[str, Tensor], before: Mapping[str, Tensor],
            after: Mapping[str, Tensor], counters: Mapping[str, Tensor], seed: int | None = None,
            prefix: tuple[int, Mapping[str, Tensor]] | None = None) -> dict[str, Tensor]:
    """``start`` trained ``segment_len`` AdamW steps, those after ``prefix`` on made-up gradients, to end with the
    moments a real segment's gradients gave ``before`` on the way to ``after`` (its shares: ``after - beta **
    segment_len x before``) added to the start's (the first moments' drift scaled to the true segment's:
    :func:`_drift_as_trained`), in float64, rounded once; the step counters are ``counters'`` (the true end's).

    ``prefix``: ``(k, state)``, the segment's true state after its first ``k`` steps (:func:`true_prefix`); the
    made-up steps are the ``segment_len - k`` after it. Per weight, the step-i gradient is ``p w_i + q e_i``
    (:func:`_least_energy` over those steps), ``e`` random noise (:func:`_noise_shapes`, from ``seed``; default: the
    OS's randomness) that carries no first-moment share, ``p`` and ``q`` solved so that both moments end exactly
    where meant (the second raised where no gradients could reach it from the prefix's state: Cauchy-Schwarz). The
    second-moment share is at least the true segment's own, entry by entry (a replay of its first steps never finds
    it short). So every relation a verifier can check without replaying holds (:func:`moment_floor_breaches`,
    :func:`moment_cs_breaches`, :func:`step_bound_breaches`: none), and so do those from any state a replay of up to
    ``k`` steps reaches: the forgery is a real AdamW trajectory through the true one's first ``k`` states. Without
    the noise (the least-energy gradients alone) the weights moved along the end moments far more than honest
    training moves them: an AUC of 0.99 on the toy model."""
    (b1, b2), lr, n = ADAMW_BETAS, spec.lr, spec.segment_len
    k, mid = prefix if prefix is not None else (0, start)
    left = n - k
    _, _, w, c = _least_energy(left)
    gen = torch.Generator().manual_seed(secrets.randbits(63) if seed is None else seed)
    z, y, zz, yy = _noise_shapes(left, gen)
    out = dict(counters)
    for key, t in counters.items():
        if not key.startswith("model."):
            continue
        name = key[len("model."):]
        mk, vk, sk = f"optim.{name}.exp_avg", f"optim.{name}.exp_avg_sq", f"optim.{name}.step"
        own = (counters[vk].double() - b2 ** n * start[vk].double()).clamp(min=0)
        # the first moments move the way the borrowed share takes them, as far as the true segment moved them
        # (:func:`_drift_as_trained`)
        m_end = _drift_as_trained(start[mk].double(), b1 ** n * start[mk].double() + after[mk].double()
                                  - b1 ** n * before[mk].double(), counters[mk].double())
        v_end = b2 ** n * start[vk].double() + torch.maximum(
            (after[vk].double() - b2 ** n * before[vk].double()).clamp(min=0), own)  # (a sum of squares)
        rm = m_end - b1 ** left * mid[mk].double()  # what the made-up steps must add
        rv = (v_end - b2 ** left * mid[vk].double()).clamp(min=0)
        sn, un = (torch.randn(rm.shape, generator=gen, dtype=torch.float64) for _ in range(2))
        energy = sn * sn * zz + un * un * yy  # sum b_i e_i^2 of this weight's noise (which has no first share)
        # (one step left: the noise can carry no energy without a first share, and that step's gradient sets both
        # moments; the second then ends where it does)
        free = energy > 1e-12
        q = torch.where(free, ((rv - rm * rm / c).clamp(min=0) / energy.clamp(min=1e-300)).sqrt(), 0.0)
        p = rm / c
        m, v, x = mid[mk].double(), mid[vk].double(), mid[key].double()
        t0 = float(mid[sk])
        qs, qu = q * sn, q * un
        for i in range(left):
            g = p * w[i] + qs * z[i] + qu * y[i]
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            step = t0 + i + 1
            x = x * (1 - lr * ADAMW_WEIGHT_DECAY) - (lr / (1 - b1 ** step)) * m / (
                (v / (1 - b2 ** step)).sqrt() + ADAMW_EPS)
        out[key], out[mk], out[vk] = x.to(t.dtype), m.to(t.dtype), v.to(t.dtype)
    return out


#: The most work forging a canary may cost the operator, in parameter x token steps (a job's parameters x batch x
#: context, times the steps trained): the default job's whole segment is ~2e9, so its canaries are retrained
#: (:func:`retrainable`); the largest model a job may ask for makes ~3e11 a step: its canaries are made up
#: elementwise (:func:`carried`), with no true prefix (:func:`prefix_steps`)
BUDGET = 20_000_000_000


def _step_work(spec: UnitSpec) -> int:
    return sum(math.prod(shape) for shape in param_shapes(spec.model).values()) * spec.batch_size * spec.model.ctx


def affordable(spec: UnitSpec) -> bool:
    """Whether training a whole segment of ``spec``'s unit again is within :data:`BUDGET`."""
    return _step_work(spec) * spec.segment_len <= BUDGET


def retrainable(spec: UnitSpec) -> bool:
    """Whether a canary of ``spec``'s unit is forged by training its segment again (:func:`retrained`) for every
    verifier: an fp32 job within :data:`BUDGET`. Not a bf16 job: honest bf16 replays on two plans drift apart as far
    as such a forgery lies from the truth (the default job shape's tolerance across plans is half the state's norm,
    the forgery a fifth), so a verifier on another plan approving one would be excused
    (:func:`marketplace.referee.canary_excuse`) and a lazy one never caught there. Its canary is made up elementwise,
    which lies past that (``gridmint bench canary``: ``margins``) but a forward pass tells; a retrained one is stocked
    beside it for a verifier that replays the unit's plan bit for bit (:func:`for_verifier`)."""
    return spec.precision == "fp32" and affordable(spec)


def prefix_steps(spec: UnitSpec) -> int:
    """How many of a segment's first steps a canary takes from the truth: uniform over ``0 .. segment_len - 1`` (from
    the OS's randomness), capped by :data:`BUDGET`. A verifier that replays ``j`` steps of a task and runs the
    exact tests from there tells a canary only if it replayed past the prefix: about ``j / segment_len`` of them."""
    most = min(spec.segment_len - 1, BUDGET // max(1, _step_work(spec)))
    return secrets.randbelow(most + 1) if most > 0 else 0


def made_up_batches(spec: UnitSpec, seg: int, first: int) -> list[list[int]]:
    """The batches :func:`retrained` trains steps ``first ..`` of segment ``seg`` on: each step's own, one sequence
    swapped for one of another step's batch of the segment (which, where and for which: the OS's randomness)."""
    own = [batch for _, batch in segment_batches(spec, seg)]
    out = []
    for i in range(first, spec.segment_len):
        batch = list(own[i])
        other = own[(i + 1 + secrets.randbelow(len(own) - 1)) % len(own)] if len(own) > 1 else own[i]
        batch[secrets.randbelow(len(batch))] = other[secrets.randbelow(len(other))]
        out.append(batch)
    return out


def retrained(spec: UnitSpec, seg: int, start: Mapping[str, Tensor], k: int) -> tuple[dict[str, Tensor], Tensor]:
    """Segment ``seg`` trained again from ``start`` on the provider's plan: its first ``k`` steps the true ones, the
    rest on :func:`made_up_batches`. Returns the end state and which input-embedding rows the made-up steps read
    (bool, one per byte value)."""
    tokens = data.train_tokens()
    read = torch.zeros(spec.model.vocab, dtype=torch.bool)
    runner = PlanRunner(spec, start)
    runner.run(seg * spec.segment_len, k)
    with deterministic(spec.threads):
        for batch in made_up_batches(spec, seg, k):
            x, y = data.make_batch(tokens, batch, spec.model.ctx)
            read[x.unique()] = True
            plan_step(runner.model, runner.opt, x, y, PROVIDER_PLAN)
    return runner.snapshot(), read


def true_prefix(spec: UnitSpec, seg: int, start: Mapping[str, Tensor], k: int) -> dict[str, Tensor]:
    """The full training state after the first ``k`` steps of segment ``seg`` from ``start``, replayed here (the
    referee's plan)."""
    state, _ = PlanRunner(spec, start).replay(start, seg * spec.segment_len, k)
    return state


#: The input embedding: a row gets a gradient only in a step whose batch holds its byte (public: the spec's data order)
EMBEDDING = "tok.weight"


def _bytes_seen(spec: UnitSpec, seg: int, first: int = 0) -> Tensor:
    """Which rows of the input embedding segment ``seg`` of ``spec``'s unit trains from its step ``first`` on (bool, one
    per byte value)."""
    tokens = data.train_tokens()
    seen = torch.zeros(spec.model.vocab, dtype=torch.bool)
    for _, offsets in segment_batches(spec, seg)[first:]:
        seen[data.make_batch(tokens, offsets, spec.model.ctx)[0].unique()] = True
    return seen


def idle_row_breaches(spec: UnitSpec, seg: int, start: Mapping[str, Tensor], end: Mapping[str, Tensor]) -> int:
    """How many input-embedding rows of bytes segment ``seg``'s batches never hold differ in ``end`` from where AdamW
    with zero gradients takes them from ``start`` (the optimizer's own kernel, run on those rows): a test a verifier
    can run from the spec without replaying. An honest end has none."""
    mk, vk, sk = f"optim.{EMBEDDING}.exp_avg", f"optim.{EMBEDDING}.exp_avg_sq", f"optim.{EMBEDDING}.step"
    if f"model.{EMBEDDING}" not in start:
        return 0
    idle = ~_bytes_seen(spec, seg)
    p = torch.nn.Parameter(start[f"model.{EMBEDDING}"][idle].clone())
    opt = torch.optim.AdamW([p], lr=spec.lr, betas=ADAMW_BETAS, eps=ADAMW_EPS, weight_decay=ADAMW_WEIGHT_DECAY,
                            fused=True)
    opt.state[p] = {"step": start[sk].clone(), "exp_avg": start[mk][idle].clone(),
                    "exp_avg_sq": start[vk][idle].clone()}
    for _ in range(spec.segment_len):
        p.grad = torch.zeros_like(p)
        opt.step()
    st = opt.state[p]
    rows = torch.zeros(int(idle.sum()), dtype=torch.bool)
    for mine, theirs in ((p.detach(), end[f"model.{EMBEDDING}"]), (st["exp_avg"], end[mk]),
                         (st["exp_avg_sq"], end[vk])):
        rows |= (mine != theirs[idle]).any(dim=1)
    return int(rows.sum())


def _embedding_rows_as_trained(spec: UnitSpec, seg: int, forged: dict[str, Tensor], true_end: Mapping[str, Tensor],
                               made_up: Tensor, first: int = 0) -> None:
    """Give ``forged`` the true end's input-embedding rows where its made-up steps (from step ``first`` on) would show
    which bytes the segment read: a byte absent from its batches has no gradient (its row evolves exactly as AdamW's
    with zero gradients, which a verifier computes from the spec without replaying), and a byte present has one; so a
    row is made up only for a byte both the made-up steps (``made_up``: the rows they gave gradients) and the
    segment's own batches from ``first`` on read."""
    mk, vk = f"optim.{EMBEDDING}.exp_avg", f"optim.{EMBEDDING}.exp_avg_sq"
    if f"model.{EMBEDDING}" not in forged:
        return
    # (an idle row of both: the true end's, which has the optimizer kernel's exact rounding)
    take = ~(made_up & _bytes_seen(spec, seg, first))
    for k in (f"model.{EMBEDDING}", mk, vk):
        forged[k] = torch.where(take.unsqueeze(1), true_end[k], forged[k])


def _lent_rows(spec: UnitSpec, before: Mapping[str, Tensor], after: Mapping[str, Tensor]) -> Tensor:
    """Which input-embedding rows the segment ``before`` -> ``after`` gave gradients (its second moments' share)."""
    vk = f"optim.{EMBEDDING}.exp_avg_sq"
    if vk not in after:
        return torch.zeros(spec.model.vocab, dtype=torch.bool)
    share = after[vk].double() - ADAMW_BETAS[1] ** spec.segment_len * before[vk].double()
    return (share > 1e-4 * after[vk].double()).any(dim=1)  # (rounding of an idle row's decay: ~1e-7 of it)


def forge(spec: UnitSpec, proof: TrainingProof, seg: int, segment_blobs: list[str], final_blob: str,
          blobs: BlobStore, sibling: tuple[str, str] | None = None, prefix: int | None = None,
          retrain: bool | None = None, states: dict[str, dict[str, Tensor]] | None = None) -> dict[str, Any] | None:
    """The forged claim for segment ``seg`` of a real unit: its first ``prefix`` steps the true ones (default:
    :func:`prefix_steps` draws how many), the step counters the true end's. The rest (``retrain``: which way; by
    default the first where the job is :func:`retrainable`):

    * where a whole fp32 segment's training is within :data:`BUDGET` (:func:`retrainable`; the default job), real
      AdamW steps on the segment's own batches, each with one sequence swapped for one of another of its batches
      (:func:`retrained`): real gradients of the segment's own data, so the end looks like an honest one by every
      measure a verifier can take without replaying its steps: the exact tests (module docstring), the moments'
      statistics, and the loss of the end on the segment's batches (``gridmint bench canary``). Made of nothing but
      the segment's start: only the segment's own hand-out and the next one's (which starts at the true end) tell
      it;
    * else, made-up gradients with another real segment's shares of the moments (:func:`carried`), taken from
      *forward* (every segment but the last): the next segment; *backward* (from the third segment on, and always
      for the last of a unit of :data:`BACKWARD_MIN_SEGMENTS` or more): the previous one, where both can the one
      whose forgery lands farther from the truth; the last segment of a unit of one or two segments: the same
      segment of another unit of the same job and round (trained from the same model, on another shard):
      ``sibling`` (its start checkpoint for that segment, its final checkpoint). Every exact test passes, but its
      weights move along no data's gradients: the loss of its end on the segment's last batch rises where an
      honest one falls, which one forward pass tells (AUC 1.0 without a true prefix, stop 30).

    Either way the embedding rows of bytes the made-up steps do not read (or the segment's own did not) are the
    true end's (:func:`_embedding_rows_as_trained`), and the state is new (no checkpoint or hash of any task is it).

    None for a sibling-forged segment without a sibling, and where the forgery is the claim itself. A forgery close
    to the claim (a late prefix, or a provider that shaped the claims it is made from) may pass an honest verifier
    on another plan within its tolerance: that approval is excused (:func:`marketplace.referee.canary_excuse`).

    Returns ``prefix`` (how many true steps it starts with), ``proof`` (the unit's proof with segment ``seg`` ending
    in the forged state), ``end_blob`` (that state, labelled like the unit's own checkpoint there, in the providers'
    file format), ``true_end`` (the hash an honest replay ends in) and ``telling`` (the segments whose hand-out
    tells it: :func:`plantable`).

    ``states``: checkpoints already loaded, by blob id; those this call loads are added (:func:`stock` forges a bf16
    job's segment twice from the same ones). Nothing here writes into a state it loaded."""
    n = len(proof.segments)
    cache: dict[str, dict[str, Tensor]] = {} if states is None else states

    def load(blob: str) -> dict[str, Tensor]:
        if blob not in cache:
            cache[blob] = checkpoint.load(blobs.read(blob))[0]
        return cache[blob]

    last = seg == n - 1
    retrain = retrainable(spec) if retrain is None else retrain
    sib = not retrain and needs_sibling(seg, n)
    if not 0 <= seg < n or len(segment_blobs) != n or (sib and sibling is None):
        return None
    true_end, start = load(final_blob if last else segment_blobs[seg + 1]), load(segment_blobs[seg])
    k = prefix_steps(spec) if prefix is None else prefix
    options: list[tuple[dict[str, Tensor], list[int]]] = []  # (forged end, telling)
    if retrain:
        forged, read = retrained(spec, seg, start, k)
        _embedding_rows_as_trained(spec, seg, forged, true_end, read, k)
        options.append((forged, [seg, seg + 1]))
    else:
        candidates: list[tuple[Any, Any, list[int]]] = []  # (before, after, telling) of each segment to borrow from
        if sib:
            assert sibling is not None
            before, after = (load(b) for b in sibling)
            if set(before) != set(true_end) or set(after) != set(true_end):
                return None  # (not a state of this model: no unit of the same job is)
            candidates.append((before, after, [seg, seg + 1, seg + 2]))
        else:
            if not last:  # forward: the next segment's move
                after = load(segment_blobs[seg + 2] if seg + 2 < n else final_blob)
                candidates.append((true_end, after, [seg, seg + 1, seg + 2]))
            if seg >= 2:  # backward: the one before's (not the first segment's: a fresh optimizer's moves are larger)
                candidates.append((load(segment_blobs[seg - 1]), start,
                                   [seg - 2, seg - 1, seg]))
        mid = (k, true_prefix(spec, seg, start, k)) if k else None
        for before, after, telling in candidates:
            forged = carried(spec, start, before, after, true_end, prefix=mid)
            _embedding_rows_as_trained(spec, seg, forged, true_end, _lent_rows(spec, before, after), k)
            options.append((forged, telling))
    best: tuple[float, dict[str, Tensor], str, list[int]] | None = None
    for forged, telling in options:
        # the same state as the claim (a provider that shaped what it is made from): no forgery at all. One merely
        # close to the claim may pass an honest verifier on another plan within its tolerance: the referee excuses
        # that approval (referee.canary_excuse), and any other verifier's replay still exposes it
        forged_hash = state_hash(forged)
        if forged_hash == proof.segments[seg].end_hash:
            continue
        # of two, the one farther from the truth (what an honest verifier on another plan must see past its
        # tolerance)
        far = distance(true_end, forged)
        if best is None or far > best[0]:
            best = (far, forged, forged_hash, telling)
    if best is None:
        return None
    _, forged_end, end_hash, telling = best
    end_blob = blobs.put_checkpoint(checkpoint.serialize(forged_end,
                                                         checkpoint_metadata(spec, None if last else seg + 1)))
    segments = list(proof.segments)
    segments[seg] = replace(segments[seg], end_hash=end_hash)
    if not last:
        segments[seg + 1] = replace(segments[seg + 1], start_hash=end_hash)  # the chain stays unbroken
    claim = make_proof(unit_id=proof.unit_id, spec_hash=proof.spec_hash, seed=proof.seed, steps=proof.steps,
                       segment_len=proof.segment_len, segments=segments)
    return {"proof": claim.to_dict(), "end_blob": end_blob, "true_end": proof.segments[seg].end_hash,
            "telling": [t for t in telling if 0 <= t < n], "prefix": k}


def evidence(verification_id: int, verifier: str) -> bytes:
    """The on-chain evidence id of "``verifier`` approved canary ``verification_id``" (its stake's slash, once)."""
    return keccak(b"GridMint/canary/v1" + verification_id.to_bytes(32, "big") + bytes.fromhex(verifier[2:]))
