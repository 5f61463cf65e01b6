"""One chain per test process and deployment kind, reverted for each test to just after it was deployed: deploying
the contracts on the in-process EVM costs ~0.8 s a test."""
from __future__ import annotations

from collections.abc import Callable, Hashable

from ledger.evm import Chain, Deployment

_MADE: dict[Hashable, tuple[Chain, Deployment, str]] = {}


def reverted(key: Hashable, make: Callable[[], tuple[Chain, Deployment]]) -> tuple[Chain, Deployment]:
    """``make()``'s chain and deployment, made on this process's first call for ``key``, reverted on every call to
    the state ``make`` left it in (nothing an earlier test sent is on it)."""
    if key not in _MADE:
        chain, deployment = make()
        _MADE[key] = (chain, deployment, chain.snapshot())
    chain, deployment, snap = _MADE[key]
    chain.revert(snap)
    _MADE[key] = (chain, deployment, chain.snapshot())  # (a snapshot is taken anew after each revert)
    return chain, deployment
