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
                **optional,
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise GridMintValueError(f"not a GridMint deployment file: {path} ({exc})") from exc


#: Roles the deployer receives on each contract in a development deployment (it acts as the marketplace operator).
OPERATOR_ROLES: dict[str, tuple[str, ...]] = {
    "staking": ("GUARDIAN_ROLE", "SLASHER_ROLE", "LOCKER_ROLE", "REFEREE_ROLE"),
    "escrow": ("GUARDIAN_ROLE", "SETTLER_ROLE"),
    "distributor": ("GUARDIAN_ROLE", "POSTER_ROLE"),
    "kill_switch": ("GUARDIAN_ROLE",),
}


#: Default seconds between ``request_unbond`` and ``withdraw``: a week.
UNBONDING_DELAY_S = 7 * 24 * 3600


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
) -> Deployment:
    """Deploy GridToken (whole ``supply`` to ``deployer``), GridTimelock, GridStaking, PayoutDistributor, JobEscrow
    and GridKillSwitch, and wire their roles.

    - ``bounty_bps``: the verifier's share of each slash in basis points (the rest goes to ``treasury``).
    - ``unbonding_delay_s``: seconds between ``request_unbond`` and ``withdraw``. Unbonding stake stays slashable, so
      this must outlast the time from a unit's submission to its verification (a week by default): with 0, a cheat
      could unbond and withdraw its whole stake the moment it has submitted, before any verifier replays it.
    - ``verifier_bond``: stake a verifier bonds per accusation (0 disables the fraud-proof path until governance
      sets one).
    - ``dispute_window_s``: seconds before a posted payout root becomes claimable (the guardian can void it inside).
    - ``cancel_grace_s``: seconds after a customer's cancel during which verified units are still paid (seconds the
      escrow spends paused do not count). The marketplace pays what was verified as soon as it sees the cancel (its
      sweep runs every minute): keep the grace well above that.
    - ``timelock_delay_s``: the TimelockController's minimum delay for parameter changes and unpausing.

    The TimelockController gets GOVERNOR_ROLE everywhere (``deployer`` is its proposer and executor); the kill switch
    gets GUARDIAN_ROLE on staking, escrow and distributor. ``deployer`` keeps DEFAULT_ADMIN_ROLE and the operator
    roles (``OPERATOR_ROLES``): on a production chain, move the admin role to the timelock and the operator roles to
    the marketplace's key. The defaults suit a development chain; production delays are days, not zero.
    """
    treasury = to_address(treasury)
    me = deployer.address
    token = chain.deploy_contract(deployer, "GridToken", me, to_uint(supply, "supply"))
    timelock = chain.deploy_contract(deployer, "GridTimelock", to_uint(timelock_delay_s, "timelock_delay_s"), [me], [me], me)
    staking = chain.deploy_contract(
        deployer, "GridStaking", token.address, me, timelock.address, treasury, to_uint(bounty_bps, "bounty_bps", 16),
        to_uint(unbonding_delay_s, "unbonding_delay_s", 32), to_uint(verifier_bond, "verifier_bond"),
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
        lens=lens.address,
    )
    from ledger.client import GridMintContracts  # the client imports this module

    client = GridMintContracts(chain, deployment, deployer)
    for name in ("staking", "escrow", "distributor"):
        client.grant_role_on(name, "GUARDIAN_ROLE", kill_switch.address)
    for name, roles in OPERATOR_ROLES.items():
        for role in roles:
            client.grant_role_on(name, role, me)
    return deployment
