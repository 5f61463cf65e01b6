"""Money is integer base units (like wei) everywhere. Never float.

GMT has 18 decimals: ``tokens("1.5") == 1_500_000_000_000_000_000``.
"""
from __future__ import annotations

from decimal import Decimal, localcontext

from protocol.errors import GridMintValueError

DECIMALS = 18
ONE_TOKEN = 10**DECIMALS
#: The largest amount there can be: a uint256, what the chain holds (and the Money column's 78 digits).
MAX_AMOUNT = 2**256 - 1


def tokens(amount: int | str | Decimal) -> int:
    """Whole or decimal-string token amount -> base units. Floats are refused (they cannot hold money exactly)."""
    if isinstance(amount, bool) or isinstance(amount, float):
        raise GridMintValueError(f"money must be int, str or Decimal, not {type(amount).__name__}: {amount!r}")
    try:
        exact = Decimal(amount)
        with localcontext() as ctx:  # the default 28 digits would round a 29-digit product (and say nothing)
            ctx.prec = len(exact.as_tuple().digits) + DECIMALS + 1
            value = exact * ONE_TOKEN
    except (ArithmeticError, TypeError, ValueError) as exc:  # decimal's InvalidOperation, Overflow are ArithmeticError
        raise GridMintValueError(f"not a token amount: {amount!r}") from exc
    if value != value.to_integral_value():
        raise GridMintValueError(f"{amount!r} has more than {DECIMALS} decimals")
    if value < 0:
        raise GridMintValueError(f"negative token amount: {amount!r}")
    if value > MAX_AMOUNT:  # compared as a Decimal: int() of 1e1000000 would take a while
        raise GridMintValueError(f"token amount {amount!r} is over the uint256 cap (2**256 - 1 base units)")
    return int(value)


def base_units(value: object) -> int:
    """Validate a base-unit amount coming from the wire (int, or a string of ASCII digits) up to :data:`MAX_AMOUNT`."""
    if isinstance(value, bool) or isinstance(value, float):
        raise GridMintValueError(f"base units must be an integer, got {value!r}")
    if isinstance(value, str) and value.isascii() and value.isdigit():  # isdigit alone takes '١٢٣' and '²'
        digits = value.lstrip("0") or "0"
        if len(digits) > len(str(MAX_AMOUNT)):  # before int(), which refuses over 4,300 digits
            raise GridMintValueError(f"a {len(digits)}-digit amount is over the uint256 cap (2**256 - 1 base units)")
        value = int(digits)
    if not isinstance(value, int) or value < 0:
        raise GridMintValueError(f"base units must be a non-negative int or a string of ASCII digits, got {value!r}")
    return check_amount(value)


def check_amount(value: int, what: str = "amount") -> int:
    """``value`` if it is at most :data:`MAX_AMOUNT` base units (a uint256), else a GridMintValueError naming it."""
    if value > MAX_AMOUNT:
        raise GridMintValueError(f"{what} {value} is over the uint256 cap (2**256 - 1 base units)")
    return value


def format_tokens(base: int, places: int = 4) -> str:
    """Base units -> human string with ``places`` decimals, truncated toward zero (a negative amount, a shortfall,
    is its magnitude's string with a minus: -1 base unit was "-1.9999 GMT")."""
    sign = "-" if base < 0 else ""
    whole, frac = divmod(abs(base), ONE_TOKEN)
    frac_str = f"{frac:0{DECIMALS}d}"[:places]
    return f"{sign}{whole:,}.{frac_str} GMT" if places else f"{sign}{whole:,} GMT"
