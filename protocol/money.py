"""Money is integer base units (like wei) everywhere. Never float.

GMT has 18 decimals: ``tokens("1.5") == 1_500_000_000_000_000_000``.
"""
from __future__ import annotations

from decimal import Decimal, InvalidOperation

from protocol.errors import GridMintValueError

DECIMALS = 18
ONE_TOKEN = 10**DECIMALS


def tokens(amount: int | str | Decimal) -> int:
    """Whole or decimal-string token amount -> base units. Floats are refused (they cannot hold money exactly)."""
    if isinstance(amount, bool) or isinstance(amount, float):
        raise GridMintValueError(f"money must be int, str or Decimal, not {type(amount).__name__}: {amount!r}")
    try:
        value = Decimal(amount) * ONE_TOKEN
    except (InvalidOperation, TypeError) as exc:
        raise GridMintValueError(f"not a token amount: {amount!r}") from exc
    if value != value.to_integral_value():
        raise GridMintValueError(f"{amount!r} has more than {DECIMALS} decimals")
    if value < 0:
        raise GridMintValueError(f"negative token amount: {amount!r}")
    return int(value)


def base_units(value: object) -> int:
    """Validate a base-unit amount coming from the wire (int, or a decimal string of an int)."""
    if isinstance(value, bool) or isinstance(value, float):
        raise GridMintValueError(f"base units must be an integer, got {value!r}")
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if not isinstance(value, int) or value < 0:
        raise GridMintValueError(f"base units must be a non-negative integer, got {value!r}")
    return value


def format_tokens(base: int, places: int = 4) -> str:
    """Base units -> human string with ``places`` decimals, exact (rounded down)."""
    whole, frac = divmod(base, ONE_TOKEN)
    frac_str = f"{frac:0{DECIMALS}d}"[:places]
    return f"{whole:,}.{frac_str} GMT" if places else f"{whole:,} GMT"
