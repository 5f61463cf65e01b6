"""Regional cost table: each region's price floor per work unit, in GMT base units.

Floors follow each region's running cost (energy + bandwidth), so a provider in a costly region is
compensated more, and the matching engine reaches those regions only once cheaper capacity is taken.
Versioned so a quote can say which table priced it; a later governance flow edits it.
"""
from __future__ import annotations

from dataclasses import dataclass

from protocol.errors import GridMintValueError
from protocol.money import tokens

TABLE_VERSION = 1


@dataclass(frozen=True)
class RegionCost:
    region: str
    energy_usd_per_mwh: int
    floor_per_unit: int  # base units


REGIONS: dict[str, RegionCost] = {
    r.region: r
    for r in (
        RegionCost("eu-north", 45, tokens("0.5")),
        RegionCost("us-east", 80, tokens("0.8")),
        RegionCost("ap-south", 95, tokens("0.9")),
        RegionCost("eu-west", 120, tokens("1.1")),
        RegionCost("ap-east", 140, tokens("1.3")),
    )
}


def region_cost(region: str) -> RegionCost:
    try:
        return REGIONS[region]
    except KeyError:
        raise GridMintValueError(f"unknown region {region!r}; known: {sorted(REGIONS)}") from None


def check_ask(region: str, price_per_unit: int) -> None:
    """A provider's ask must be at least its region's floor."""
    floor = region_cost(region).floor_per_unit
    if price_per_unit < floor:
        raise GridMintValueError(f"ask {price_per_unit} is below the {region} floor {floor} (base units per unit)")
