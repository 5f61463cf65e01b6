"""Deploying the GridMint contracts and describing where they live (``Deployment``, JSON-serialisable)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from eth_account.signers.local import LocalAccount

from ledger.chain import Chain
from ledger.values import to_address, to_uint
from protocol.errors import GridMintValueError


@dataclass(frozen=True)
class Deployment:
    """Where the GridMint contracts live on one chain. Addresses are checksummed.

    ``distributor``, ``kill_switch`` and ``timelock`` are optional so that a deployment written before they existed
    (or built from a marketplace's ``/config``, which lists only token, staking, escrow and treasury) still loads:
    the client then reads the distributor's address from the escrow.
    """

    chain_id: int
    token: str
    staking: str
    escrow: str
    treasury: str
    distributor: str | None = None
    kill_switch: str | None = None
    timelock: str | None = None
    lens: str | None = None  # GridLens (read-only): many jobs' escrow state in one call
    #: the chain's latest block before the contracts were deployed: the client reads their events from there on,
    #: never from genesis (0: a deployment written before this was kept, or built from a marketplace's ``/config``)
    from_block: int = 0

    def to_json(self, path: str | Path | None = None) -> str:
        """JSON text of this deployment; also written to ``path`` if given."""
        text = json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, path: str | Path) -> Deployment:
        """Read a deployment written by ``to_json(path)``."""
        try:
            data = json.loads(Path(path).read_text())
            optional = {k: to_address(data[k]) for k in ("distributor", "kill_switch", "timelock", "lens")
                        if data.get(k)}
            return cls(
                chain_id=int(data["chain_id"]),
                token=to_address(data["token"]),
                staking=to_address(data["staking"]),
                escrow=to_address(data["escrow"]),
                treasury=to_address(data["treasury"]),
                from_block=int(data.get("from_block", 0)),
                **optional,
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise GridMintValueError(f"not a GridMint deployment file: {path} ({exc})") from exc


#: Roles the operator key keeps in a production deployment (``deploy(..., governance=...)``): only what the
#: marketplace's serve and worker processes send. That key sits on every one of their machines.
#: - staking: SLASHER (``marketplace.checking`` slashes a verifier that passed a canary), REFEREE (the referee relays
#:   accusations and resolves or dismisses them). Not LOCKER: nothing in the marketplace locks stake, and a leaked key
#:   that could would freeze any provider's stake.
#: - escrow: SETTLER (``marketplace.settlement``: ``releaseToPool`` a settled job's pay, ``close`` it). Not
#:   UNIT_SETTLER: the per-unit ``release`` pays an address at once (no dispute window, no guardian veto), and the
#:   marketplace never sends it; a leaked key that could would empty every open escrow within a block.
#: - distributor: POSTER (``marketplace.settlement.post_epoch``: each epoch's payout root).
OPERATOR_ROLES: dict[str, tuple[str, ...]] = {
    "staking": ("SLASHER_ROLE", "REFEREE_ROLE"),
    "escrow": ("SETTLER_ROLE",),
    "distributor": ("POSTER_ROLE",),
}

#: Roles the deployer receives in a development deployment (no ``governance``): every operational role and the
#: guardian's, besides DEFAULT_ADMIN_ROLE everywhere and the timelock's proposer, executor and admin roles.
DEV_DEPLOYER_ROLES: dict[str, tuple[str, ...]] = {
    "staking": ("GUARDIAN_ROLE", "SLASHER_ROLE", "LOCKER_ROLE", "REFEREE_ROLE"),
    "escrow": ("GUARDIAN_ROLE", "SETTLER_ROLE", "UNIT_SETTLER_ROLE"),
    "distributor": ("GUARDIAN_ROLE", "POSTER_ROLE"),
    "kill_switch": ("GUARDIAN_ROLE",),
}

#: Contracts the timelock is the only admin of in a production deployment (and of itself).
ADMINISTERED = ("staking", "escrow", "distributor", "kill_switch")


#: Default seconds between ``request_unbond`` and ``withdraw``: a week.
UNBONDING_DELAY_S = 7 * 24 * 3600
#: A production deployment's unbonding delay outlasts its slash delay by at least this much, for the reason below.
REDO_MARGIN_S = 3600
UNBONDING_OVER_SLASH_DELAY = (
    "a cheat convicted while a thief's pending slashes held its stake could withdraw what the guardian's void of one "
    "gives back before the marketplace's sweep slashes it again (the redo waits till none of those slashes can be "
    "voided: up to the slash delay; the margin covers a sweep held up meanwhile)")


def unbonding_outlasts_slash_delay(unbonding_delay_s: int, slash_delay_s: int) -> bool:
    """Whether a production deployment's unbonding delay is long enough beside its slash delay
    (:data:`UNBONDING_OVER_SLASH_DELAY`): the deploy and the CLI's flags check this one rule."""
    return unbonding_delay_s >= slash_delay_s + REDO_MARGIN_S


@dataclass(frozen=True)
class Governance:
    """Who holds the powers a production deployment keeps off the operator's hot key.

    - ``governor``: PROPOSER, EXECUTOR and CANCELLER on GridTimelock. Every unpause, parameter change and role change
      (the timelock is the only admin of every contract) is a proposal of the governor that waits the timelock's
      delay in public before it can run. A cold key or a multisig.
    - ``guardian``: GUARDIAN_ROLE on the kill switch and on staking, escrow and distributor (pause at once, void a
      payout root inside its dispute window, void a slash inside its delay: its stake goes back to its account) and
      CANCELLER on GridTimelock (veto a pending proposal). It can stop or undo things, never move money anywhere else
      or restart them. May be the governor.

    Neither may be the operator key: as proposer, whoever stole it would only wait the delay, and as canceller (the
    guardian's, and every proposer's) it could cancel the very proposal that revokes it, leaving the system paused
    for good.
    """

    governor: str
    guardian: str


def deploy(
    chain: Chain,
    deployer: LocalAccount,
    *,
    supply: int,
    treasury: str,
    bounty_bps: int = 5000,
    unbonding_delay_s: int = UNBONDING_DELAY_S,
    verifier_bond: int = 0,
    dispute_window_s: int = 0,
    cancel_grace_s: int = 3600,
    timelock_delay_s: int = 0,
    slash_delay_s: int = 0,
    governance: Governance | None = None,
) -> Deployment:
    """Deploy GridToken (the whole ``supply`` to ``treasury`` in production, to ``deployer`` in development),
    GridTimelock, GridStaking, PayoutDistributor, JobEscrow and GridKillSwitch, and wire their roles.

    - ``treasury``: receives the rest of each slash and, in production, the whole supply.
    - ``bounty_bps``: the verifier's share of each slash in basis points (the rest goes to ``treasury``).
    - ``unbonding_delay_s``: seconds between ``request_unbond`` and ``withdraw``. Unbonding stake stays slashable, so
      this must outlast the time from a unit's submission to its verification (a week by default): with 0, a cheat
      could unbond and withdraw its whole stake the moment it has submitted, before any verifier replays it.
    - ``verifier_bond``: stake a verifier bonds per accusation (0 disables the fraud-proof path until governance
      sets one).
    - ``dispute_window_s``: seconds before a posted payout root becomes claimable (the guardian can void it inside;
      with 0 it never can).
    - ``cancel_grace_s``: seconds after a customer's cancel during which verified units are still paid (seconds the
      escrow spends paused do not count). The marketplace pays what was verified as soon as it sees the cancel (its
      sweep runs every minute): keep the grace well above that.
    - ``timelock_delay_s``: the TimelockController's minimum delay for parameter changes, role changes and unpausing.
    - ``slash_delay_s``: seconds (not counting time paused) a slash's stake waits before it is paid out to the
      verifier and the treasury (``finalize_slash``); the guardian can void it meanwhile, giving it back. With 0 a
      slash pays at once: a slash sent with a stolen operator key could not be undone.
    - ``governance``: who governs a production deployment (``Governance``); None for a development one.

    Either way the TimelockController holds GOVERNOR_ROLE everywhere and the kill switch GUARDIAN_ROLE on staking,
    escrow and distributor.

    Production (``governance`` given): ``deployer`` (the marketplace's operator key) ends with ``OPERATOR_ROLES`` only
    and no GMT: the supply is minted to ``treasury``, whose key no serve or worker machine holds. The timelock is the
    only DEFAULT_ADMIN_ROLE of staking, escrow, distributor and kill switch, and of itself; the governor proposes,
    executes and cancels; the guardian pauses, voids roots and cancels. Zero delays (timelock, dispute window,
    unbonding, slash), an unbonding delay short of the slash delay + :data:`REDO_MARGIN_S`, and a governor, guardian
    or treasury that is ``deployer`` are refused (GridMintValueError) before anything is sent.

    Development (no ``governance``; the demo, the tests): ``deployer`` holds the whole supply (it funds the first
    accounts), keeps DEFAULT_ADMIN_ROLE everywhere, is the timelock's admin, proposer and executor, and holds
    ``DEV_DEPLOYER_ROLES``, so it can grant itself GOVERNOR_ROLE and skip the timelock. Never for a chain with anyone
    else's money on it.
    """
    treasury = to_address(treasury)
    me = deployer.address
    if governance is not None:
        governance = _production_governance(me, governance, treasury=treasury, timelock_delay_s=timelock_delay_s,
                                            dispute_window_s=dispute_window_s, unbonding_delay_s=unbonding_delay_s,
                                            slash_delay_s=slash_delay_s)
    governor = me if governance is None else governance.governor
    # production: the supply never touches the hot key (a leak would hand over every token it had not moved on)
    holder = me if governance is None else treasury
    from_block = int(chain.w3.eth.block_number)
    token = chain.deploy_contract(deployer, "GridToken", holder, to_uint(supply, "supply"))
    # ``me`` is the timelock's admin until the roles are wired (the guardian's CANCELLER_ROLE), then renounces it.
    timelock = chain.deploy_contract(
        deployer, "GridTimelock", to_uint(timelock_delay_s, "timelock_delay_s"), [governor], [governor], me
    )
    staking = chain.deploy_contract(
        deployer, "GridStaking", token.address, me, timelock.address, treasury, to_uint(bounty_bps, "bounty_bps", 16),
        to_uint(unbonding_delay_s, "unbonding_delay_s", 32), to_uint(verifier_bond, "verifier_bond"),
        to_uint(slash_delay_s, "slash_delay_s", 32),
    )
    distributor = chain.deploy_contract(
        deployer, "PayoutDistributor", token.address, me, timelock.address, to_uint(dispute_window_s, "dispute_window_s", 32)
    )
    escrow = chain.deploy_contract(
        deployer, "JobEscrow", token.address, me, timelock.address, distributor.address,
        to_uint(cancel_grace_s, "cancel_grace_s", 32),
    )
    kill_switch = chain.deploy_contract(deployer, "GridKillSwitch", me, [staking.address, escrow.address, distributor.address])
    lens = chain.deploy_contract(deployer, "GridLens")
    deployment = Deployment(
        chain.chain_id, token.address, staking.address, escrow.address, treasury,
        distributor=distributor.address, kill_switch=kill_switch.address, timelock=timelock.address,
        lens=lens.address, from_block=from_block,
    )
    from ledger.client import GridMintContracts  # the client imports this module

    client = GridMintContracts(chain, deployment, deployer)
    for name in ("staking", "escrow", "distributor"):
        client.grant_role_on(name, "GUARDIAN_ROLE", kill_switch.address)
    if governance is None:
        for name, roles in DEV_DEPLOYER_ROLES.items():
            for role in roles:
                client.grant_role_on(name, role, me)
        return deployment

    for name in ("staking", "escrow", "distributor", "kill_switch"):
        client.grant_role_on(name, "GUARDIAN_ROLE", governance.guardian)
    client.grant_role_on("timelock", "CANCELLER_ROLE", governance.guardian)
    for name, roles in OPERATOR_ROLES.items():
        for role in roles:
            client.grant_role_on(name, role, me)
    # Hand the admin role to the timelock, then give up ours: from here on, every role change is a proposal.
    for name in ADMINISTERED:
        client.grant_role_on(name, "DEFAULT_ADMIN_ROLE", timelock.address)
        client.renounce_role_on(name, "DEFAULT_ADMIN_ROLE")
    client.renounce_role_on("timelock", "DEFAULT_ADMIN_ROLE")  # the timelock administers itself (OpenZeppelin)
    return deployment


def _production_governance(
    operator: str, governance: Governance, *, treasury: str, timelock_delay_s: int, dispute_window_s: int,
    unbonding_delay_s: int, slash_delay_s: int,
) -> Governance:
    """``governance`` with checksummed addresses, or GridMintValueError naming what makes it unsafe."""
    governor = to_address(governance.governor)
    guardian = to_address(governance.guardian)
    if treasury == operator:
        raise GridMintValueError(
            f"the treasury {treasury} is the operator key that deploys and runs the marketplace: a production "
            f"treasury receives the whole supply and must be another key (a cold key or a multisig), or whoever steals "
            f"the operator key takes every token"
        )
    for what, address in (("governor", governor), ("guardian", guardian)):
        if address == operator:
            raise GridMintValueError(
                f"the {what} {address} is the operator key that deploys and runs the marketplace: a production "
                f"{what} must be another key (a cold key or a multisig), or whoever steals the operator key could "
                f"cancel the very timelock proposal that revokes it"
            )
    zero = [f"{name} ({why})" for name, value, why in (
        ("timelock_delay_s", timelock_delay_s, "governance would skip its public delay"),
        ("dispute_window_s", dispute_window_s, "the guardian could never void a bad payout root"),
        ("unbonding_delay_s", unbonding_delay_s, "a cheat could withdraw its stake before it is verified"),
        ("slash_delay_s", slash_delay_s, "the guardian could never undo a slash sent with a stolen operator key"),
    ) if value == 0]
    if zero:
        raise GridMintValueError(f"a production deployment refuses a zero {'; a zero '.join(zero)}")
    if not unbonding_outlasts_slash_delay(unbonding_delay_s, slash_delay_s):
        raise GridMintValueError(
            f"a production deployment needs unbonding_delay_s ({unbonding_delay_s}) of at least slash_delay_s "
            f"({slash_delay_s}) + {REDO_MARGIN_S}: {UNBONDING_OVER_SLASH_DELAY}")
    return Governance(governor=governor, guardian=guardian)
