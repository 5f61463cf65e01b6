"""A node's or a verifier's money outside its run loop: claim what it is owed, unbond its stake, withdraw it.

``node run`` claims while idle, but pay becomes claimable only once its job settled, the next payout root is posted
and that root's dispute window has passed (a day in production): an owner who stopped the agent, or ran it with
``--exit-when-idle``, collects with ``gridmint node claim``. Leaving the market is ``unbond`` (the stake stays
slashable for the unbonding delay: work already done is still checked), then ``withdraw`` once the delay is over.
Each step is idempotent: a claim pays ``cumulative - claimed``, a withdraw only what finished unbonding.
"""
from __future__ import annotations

import datetime as dt
from collections.abc import Callable

from ledger.client import GridMintContracts
from node.agent import claim_owed
from node.client import MarketClient
from ledger.errors import StakeFrozenError
from protocol.errors import GridMintValueError
from protocol.money import format_tokens


def _when(ts: int) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def claim(client: MarketClient, contracts: GridMintContracts, say: Callable[[str], None]) -> int:
    """Collect everything the wallet is owed now (:func:`node.agent.claim_owed`); say what is earned but not yet
    claimable. Returns base units received."""
    got = claim_owed(client, contracts, say)
    p = client.payout()
    waiting = int(p.get("pooled") or 0) - max(int(p.get("cumulative") or 0), int(p.get("claimed") or 0))
    if waiting > 0:
        say(f"{format_tokens(waiting)} more earned: claimable once the next payout root is posted and its dispute "
            f"window has passed (claim again then)")
    if not got:
        say("nothing to claim now")
    return got


def unbond(client: MarketClient, contracts: GridMintContracts, amount: int | None,
           say: Callable[[str], None]) -> int:
    """Start unbonding ``amount`` base units of the wallet's free stake (None: all of it); returns when it can be
    withdrawn (unix s). Refused, sending nothing, beyond the free stake (locked behind work, bonded behind an open
    accusation, or frozen while one is open)."""
    me = client.account.address
    free, st = contracts.free_stake_of(me), contracts.stake_state(me)
    amount = free if amount is None else amount
    if amount <= 0 or amount > free:
        held = (f"staked {format_tokens(st.staked)}, locked {format_tokens(st.locked)}, bonded "
                f"{format_tokens(st.bonded)}, open disputes {st.open_disputes}")
        raise GridMintValueError(f"can unbond at most {format_tokens(free)} now ({held})" if amount > 0
                                 else f"no free stake to unbond ({held})")
    ready = contracts.request_unbond(amount)
    say(f"unbonding {format_tokens(amount)}: `withdraw` from {_when(ready)}; until then it can still be slashed "
        f"for work already done")
    return ready


def withdraw(client: MarketClient, contracts: GridMintContracts, say: Callable[[str], None]) -> int:
    """Withdraw whatever finished unbonding to the wallet; returns base units (0: nothing ready, with when)."""
    st = contracts.stake_state(client.account.address)
    if st.unbonding == 0:
        say("nothing is unbonding (`unbond` first)")
        return 0
    try:
        got = contracts.withdraw()
    except StakeFrozenError as exc:  # still unbonding (the chain's clock decides), or an accusation of it is open
        say(f"{format_tokens(st.unbonding)} unbonding, withdrawable from {_when(st.unbonding_ready_at)}: {exc}")
        return 0
    say(f"withdrew {format_tokens(got)}")
    return got
