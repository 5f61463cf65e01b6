"""Prices: the regional cost table, provider reliability, effective price and customer quotes.

The cost table holds each region's running cost (energy, bandwidth) and the price floor per work unit that
compensates it, so a provider in a costly region is paid more and the matching engine reaches those regions
only once cheaper capacity is taken. The table is versioned: governance edits it with ``amend`` (a new table,
version + 1), and a quote names the version that priced it.

Effective price is what one completed unit really costs at reference speed::

    effective = ask x (REFERENCE_THROUGHPUT / throughput) x (PPM / reliability_ppm)

A fast node is cheaper than its ask says, a node that drops work dearer (you pay again for the retry).
Ranking uses ``rank_key``: an exact integer, so two offers tie only if their effective prices are equal as
fractions. All money is integer base units; nothing here uses float.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import TYPE_CHECKING

from protocol.errors import GridMintValueError
from protocol.money import format_tokens, tokens

if TYPE_CHECKING:
    from marketplace.matching import Offer

PPM = 1_000_000
#: Training tokens/s of the reference node (``node.device.benchmark``); an offer at this speed and full
#: reliability has effective price == ask.
REFERENCE_THROUGHPUT = 1_000_000
#: Bounds that keep ``rank_key`` exact: throughput x reliability_ppm < 2**60, so 2**120 separates any two
#: distinct fractions ask/denominator (they differ by at least 1/(d1*d2) > 2**-120).
MAX_THROUGHPUT = 2**40 - 1
_KEY_SHIFT = 120
#: Pseudo-counts that start a new provider near full reliability without letting one early dropout sink it.
RELIABILITY_PRIOR = 4


@dataclass(frozen=True)
class RegionCost:
    """A region's running cost (what governance looks at) and the price floor per work unit it sets."""

    region: str
    energy_usd_per_mwh: int
    floor_per_unit: int  # base units
    bandwidth_usd_per_tb: int = 0

    def __post_init__(self) -> None:
        for name in ("energy_usd_per_mwh", "floor_per_unit", "bandwidth_usd_per_tb"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise GridMintValueError(f"region {self.region!r}: {name} must be an int >= 0, got {value!r}")


@dataclass(frozen=True)
class CostTable:
    """One version of the regional cost table. Immutable: ``amend`` returns the next version."""

    version: int
    regions: Mapping[str, RegionCost] = field(default_factory=dict, hash=False)  # hashed by version

    def __post_init__(self) -> None:
        if not isinstance(self.version, int) or self.version < 1:
            raise GridMintValueError(f"cost table version must be an int >= 1, got {self.version!r}")
        for name, cost in self.regions.items():
            if not isinstance(cost, RegionCost) or name != cost.region:
                raise GridMintValueError(f"bad cost table entry {name!r}: {cost}")
        object.__setattr__(self, "regions", MappingProxyType(dict(self.regions)))

    def floor(self, region: str) -> int:
        """The region's price floor per unit; an unknown region raises."""
        return self.cost(region).floor_per_unit

    def cost(self, region: str) -> RegionCost:
        try:
            return self.regions[region]
        except KeyError:
            raise GridMintValueError(f"unknown region {region!r}; known: {sorted(self.regions)}") from None

    def amend(self, changes: Mapping[str, RegionCost] = MappingProxyType({}), removed: frozenset[str] = frozenset()) -> CostTable:
        """A governance edit: set or add ``changes``, drop ``removed``; the result is version + 1."""
        unknown = removed - set(self.regions)
        if unknown:
            raise GridMintValueError(f"cannot remove unknown regions {sorted(unknown)}")
        regions = {k: v for k, v in self.regions.items() if k not in removed}
        regions.update(changes)
        return CostTable(self.version + 1, regions)


DEFAULT_TABLE = CostTable(1, {
    r.region: r
    for r in (
        RegionCost("eu-north", 45, tokens("0.5"), 2),
        RegionCost("us-east", 80, tokens("0.8"), 3),
        RegionCost("ap-south", 95, tokens("0.9"), 5),
        RegionCost("eu-west", 120, tokens("1.1"), 3),
        RegionCost("ap-east", 140, tokens("1.3"), 6),
    )
})
TABLE_VERSION = DEFAULT_TABLE.version
REGIONS: Mapping[str, RegionCost] = DEFAULT_TABLE.regions


def region_cost(region: str, table: CostTable = DEFAULT_TABLE) -> RegionCost:
    return table.cost(region)


def check_max_price(max_price: int, table: CostTable = DEFAULT_TABLE) -> None:
    """A job's price cap must reach some region's floor: below every floor no provider may take its units (they
    would wait for ever, the escrow funded). The usual slip: a price in GMT where base units are meant."""
    region = min(table.regions.values(), key=lambda c: (c.floor_per_unit, c.region))
    if max_price < region.floor_per_unit:
        raise GridMintValueError(
            f"max_price {max_price} base units is below every region's price floor (the lowest: {region.region}'s "
            f"{region.floor_per_unit} = {format_tokens(region.floor_per_unit)} per unit): no provider may take "
            f"a unit at that price. Money is in base units: 1 GMT = 10**18")


def check_ask(region: str, price_per_unit: int, table: CostTable = DEFAULT_TABLE) -> None:
    """A provider's ask must be at least its region's floor."""
    floor = table.floor(region)
    if price_per_unit < floor:
        raise GridMintValueError(f"ask {price_per_unit} is below the {region} floor {floor} (base units per unit)")


# ---------------------------------------------------------------- reliability and throughput

@dataclass(frozen=True)
class Reliability:
    """A provider's track record. ``completed`` and ``dropped`` count finished assignments (the
    "completed / assigned" ratio, with in-flight units left out); ``uptime_ppm`` comes from heartbeats."""

    completed: int = 0
    dropped: int = 0
    uptime_ppm: int = PPM

    @property
    def ppm(self) -> int:
        return reliability_ppm(self.completed, self.dropped, self.uptime_ppm)

    def after_dropout(self) -> Reliability:
        return replace(self, dropped=self.dropped + 1)

    def after_completion(self) -> Reliability:
        return replace(self, completed=self.completed + 1)


def reliability_ppm(completed: int, dropped: int, uptime_ppm: int = PPM) -> int:
    """completed/assigned x uptime, in parts per million, in [1, PPM] (1 keeps effective price finite)."""
    if completed < 0 or dropped < 0:
        raise GridMintValueError(f"completed and dropped must be >= 0, got {completed}, {dropped}")
    done = (completed + RELIABILITY_PRIOR) * PPM // (completed + dropped + RELIABILITY_PRIOR)
    return max(1, min(PPM, done * min(max(uptime_ppm, 0), PPM) // PPM))


def observe_throughput(current: int, measured: int, weight_ppm: int = 250_000) -> int:
    """Blend a throughput measured on real work (tokens/s) into the benchmark figure: an integer moving average,
    ``weight_ppm`` of the new measurement. Clamped to [1, MAX_THROUGHPUT]."""
    if not 0 <= weight_ppm <= PPM:
        raise GridMintValueError(f"weight_ppm must be in [0, {PPM}], got {weight_ppm}")
    blended = (current * (PPM - weight_ppm) + measured * weight_ppm) // PPM
    return max(1, min(MAX_THROUGHPUT, blended))


def check_performance(throughput: int, reliability_ppm: int) -> None:
    """Raise unless throughput and reliability are within the bounds that keep ranking exact."""
    if not (isinstance(throughput, int) and 1 <= throughput <= MAX_THROUGHPUT):
        raise GridMintValueError(f"throughput must be an int in [1, {MAX_THROUGHPUT}] tokens/s, got {throughput!r}")
    if not (isinstance(reliability_ppm, int) and 1 <= reliability_ppm <= PPM):
        raise GridMintValueError(f"reliability_ppm must be an int in [1, {PPM}], got {reliability_ppm!r}")


# ---------------------------------------------------------------- effective price

def effective_price(ask: int, throughput: int = REFERENCE_THROUGHPUT, reliability_ppm: int = PPM) -> int:
    """Base units per completed unit at reference speed, rounded down (display and quotes; ranking uses
    ``rank_key``, which is exact)."""
    return ask * REFERENCE_THROUGHPUT * PPM // (throughput * reliability_ppm)


def rank_key(ask: int, throughput: int = REFERENCE_THROUGHPUT, reliability_ppm: int = PPM) -> int:
    """An integer that orders offers exactly as their effective prices (equal iff the fractions are equal),
    given ``check_performance`` bounds."""
    return (ask << _KEY_SHIFT) // (throughput * reliability_ppm)


def required_stake(value_at_risk: int, min_stake: int, ratio_ppm: int = PPM) -> int:
    """Stake a provider needs for work worth ``value_at_risk`` base units: ``ratio_ppm`` of it, rounded up,
    never below ``min_stake`` (at the default ratio, cheating always costs at least what it could earn)."""
    if min(value_at_risk, min_stake, ratio_ppm) < 0:
        raise GridMintValueError(f"value at risk, min stake and ratio must be >= 0, got "
                                 f"{value_at_risk}, {min_stake}, {ratio_ppm}")
    return max(min_stake, -(-value_at_risk * ratio_ppm // PPM))


# ---------------------------------------------------------------- quotes

@dataclass(frozen=True)
class Quote:
    table_version: int
    units: int
    filled: int  # units the current offers could take now
    total: int  # base units the customer would pay for the filled units
    max_unit_price: int  # dearest ask among them (0 if none)
    effective_total: int  # sum of their effective prices


def quote(offers: list[Offer], units: int, vram_mb: int, min_stake: int, max_price: int,
          regions: frozenset[str] | None = None, table: CostTable = DEFAULT_TABLE) -> Quote:
    """What ``units`` units would cost now: the real matcher run dry over ``offers`` (nothing is reserved), so
    a quote and the later assignment rank providers by the same effective price."""
    from marketplace.matching import Demand, match  # matching imports this module: import at call time

    if units < 0:
        raise GridMintValueError(f"units must be >= 0, got {units}")
    demands = [Demand(f"quote-{i}", vram_mb, min_stake, max_price, regions=regions) for i in range(units)]
    by_provider = {o.provider: o for o in offers}
    got = match(offers, demands, table)
    eff = sum(effective_price(a.price, by_provider[a.provider].throughput, by_provider[a.provider].reliability_ppm)
              for a in got)
    return Quote(table.version, units, len(got), sum(a.price for a in got), max((a.price for a in got), default=0), eff)
