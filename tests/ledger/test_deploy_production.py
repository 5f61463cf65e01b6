"""The production deployment (``deploy(..., governance=...)``, what ``gridmint marketplace deploy`` runs), on both
backends: the operator's hot key keeps only the roles serve and worker send, and everything else goes through the
timelock (review R2: the key was admin everywhere and the timelock's admin, so it granted itself GOVERNOR_ROLE and
unpaused, or set the unbonding delay to 0, at once).

Who holds what is read from the contracts' RoleGranted / RoleRevoked events, so a stray grant anywhere fails the
test, not only a missing one."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from eth_account import Account
from eth_utils import keccak

from ledger.errors import GovernanceError, PausedError, UnauthorizedError
from ledger.evm import Chain, Deployment, Governance, GridMintContracts, deploy, role_id
from ledger.payout_tree import build_payout_tree
from protocol.errors import ChainError, GridMintValueError
from protocol.jobs import RANDOM_BYTES, job_id_bytes
from protocol.money import tokens

DAY = 24 * 3600
PARAMS = {
    "timelock_delay_s": 2 * DAY,
    "dispute_window_s": DAY,
    "slash_delay_s": DAY,
    "unbonding_delay_s": 7 * DAY,
    "cancel_grace_s": 3600,
    "verifier_bond": 100,
}
BATCH = keccak(text="production-batch")
EVIDENCE = keccak(text="production-evidence")
EVIDENCE_2 = keccak(text="production-evidence-2")
ROLE_NAMES = ("DEFAULT_ADMIN_ROLE", "GOVERNOR_ROLE", "GUARDIAN_ROLE", "SLASHER_ROLE", "LOCKER_ROLE", "REFEREE_ROLE",
              "SETTLER_ROLE", "UNIT_SETTLER_ROLE", "POSTER_ROLE", "PROPOSER_ROLE", "EXECUTOR_ROLE", "CANCELLER_ROLE")
ADMIN = role_id("DEFAULT_ADMIN_ROLE")


@dataclass(frozen=True)
class Production:
    """A production deployment and one client per participant: ``operator`` deployed it (the marketplace's key)."""

    chain: Chain
    deployment: Deployment
    operator: GridMintContracts
    governor: GridMintContracts
    guardian: GridMintContracts
    customer: GridMintContracts
    provider: GridMintContracts
    provider2: GridMintContracts
    verifier: GridMintContracts
    treasury: GridMintContracts  # holds the whole supply from the deploy on

    def job(self, label: str) -> bytes:
        """A job id of ``customer``'s (JobEscrow lets only the address it starts with fund it first)."""
        return job_id_bytes(self.customer.address, keccak(text=label)[:RANDOM_BYTES])


@pytest.fixture(scope="module")
def deployed(chain: Chain) -> Production:
    operator, governor, guardian, customer, provider, provider2, verifier, treasury = chain.dev_accounts(8)
    deployment = deploy(chain, operator, supply=tokens(1_000_000), treasury=treasury.address,
                        governance=Governance(governor=governor.address, guardian=guardian.address), **PARAMS)
    ops = GridMintContracts(chain, deployment, operator)
    funder = ops.as_account(treasury)  # the supply is the treasury's: the operator key holds none
    for account in (customer, provider, provider2, verifier):
        funder.transfer(account.address, tokens(10_000))
    clients = [ops.as_account(a) for a in (governor, guardian, customer, provider, provider2, verifier)]
    return Production(chain, deployment, ops, *clients, funder)


@pytest.fixture
def prod(chain: Chain, deployed: Production) -> Iterator[Production]:
    snapshot = chain.snapshot()
    yield deployed
    chain.revert(snapshot)


def role_holders(p: Production) -> dict[str, dict[str, set[str]]]:
    """contract key -> role name -> addresses holding it now, replayed from every RoleGranted/RoleRevoked."""
    names = {role_id(n): n for n in ROLE_NAMES}
    out: dict[str, dict[str, set[str]]] = {}
    for key in ("staking", "escrow", "distributor", "kill_switch", "timelock"):
        contract = p.operator._contract(key)  # noqa: SLF001 - the bound contract, to read its events
        events = [(log["blockNumber"], log["logIndex"], True, log["args"])
                  for log in contract.events.RoleGranted.get_logs(from_block=0)]
        events += [(log["blockNumber"], log["logIndex"], False, log["args"])
                   for log in contract.events.RoleRevoked.get_logs(from_block=0)]
        holders: dict[str, set[str]] = {}
        for _, _, granted, args in sorted(events, key=lambda e: (e[0], e[1])):
            members = holders.setdefault(names[bytes(args["role"])], set())
            (members.add if granted else members.discard)(args["account"])
        out[key] = {role: members for role, members in holders.items() if members}
    return out


def unauthorized(exc_info: pytest.ExceptionInfo[UnauthorizedError], account: str, role: str) -> None:
    assert (exc_info.value.error_name, exc_info.value.error_args) == (
        "AccessControlUnauthorizedAccount", (account, role_id(role))), str(exc_info.value)


def test_roles_end_with_the_timelock_governor_and_guardian_not_the_operator(prod: Production) -> None:
    d = prod.deployment
    op, governor, guardian = prod.operator.address, prod.governor.address, prod.guardian.address
    timelock, kill_switch = d.timelock, d.kill_switch
    money = {"DEFAULT_ADMIN_ROLE": {timelock}, "GOVERNOR_ROLE": {timelock}, "GUARDIAN_ROLE": {kill_switch, guardian}}
    assert role_holders(prod) == {
        "staking": {**money, "SLASHER_ROLE": {op}, "REFEREE_ROLE": {op}},
        "escrow": {**money, "SETTLER_ROLE": {op}},
        "distributor": {**money, "POSTER_ROLE": {op}},
        "kill_switch": {"DEFAULT_ADMIN_ROLE": {timelock}, "GUARDIAN_ROLE": {guardian}},
        # no EOA administers the timelock: only the timelock itself (a proposal) can change who proposes
        "timelock": {"DEFAULT_ADMIN_ROLE": {timelock}, "PROPOSER_ROLE": {governor}, "EXECUTOR_ROLE": {governor},
                     "CANCELLER_ROLE": {governor, guardian}},
    }
    assert prod.operator.min_delay() == PARAMS["timelock_delay_s"]
    assert prod.operator.dispute_window() == PARAMS["dispute_window_s"]


def test_the_supply_is_minted_to_the_treasury_and_the_operator_key_holds_none(prod: Production) -> None:
    """The deploy minted the whole supply to the operator key, the hot key every serve and worker machine holds: one
    leak and every GMT not yet moved off it was gone, whatever the timelock guards. Now it goes to the treasury."""
    ops, treasury = prod.operator, prod.treasury.address
    assert prod.deployment.treasury == treasury
    assert ops.total_supply() == tokens(1_000_000)
    assert ops.balance_of(ops.address) == 0
    assert ops.balance_of(treasury) == tokens(1_000_000) - 4 * tokens(10_000)  # less what the fixture handed out


def test_the_operator_key_cannot_skip_the_timelock(prod: Production) -> None:
    """Review R2's bypass, sent with the operator key: every step reverts, and nothing it governs changes."""
    ops, op = prod.operator, prod.operator.address
    prod.guardian.pause_all()

    with pytest.raises(UnauthorizedError) as grant_info:  # the repro's first step
        ops.grant_role("GOVERNOR_ROLE", op)
    unauthorized(grant_info, op, "DEFAULT_ADMIN_ROLE")
    governor_role = role_id("GOVERNOR_ROLE")
    for name in ("staking", "escrow", "distributor"):
        with pytest.raises(UnauthorizedError) as unpause_info:
            ops._send(ops._contract(name), "unpause")  # noqa: SLF001 - the raw call a thief would send
        unauthorized(unpause_info, op, "GOVERNOR_ROLE")
        with pytest.raises(UnauthorizedError) as revoke_info:  # nor take the timelock's role away
            ops._send(ops._contract(name), "revokeRole", governor_role, prod.deployment.timelock)  # noqa: SLF001
        unauthorized(revoke_info, op, "DEFAULT_ADMIN_ROLE")
    with pytest.raises(UnauthorizedError) as param_info:
        ops._send(ops.staking, "setUnbondingDelay", 0)  # noqa: SLF001
    unauthorized(param_info, op, "GOVERNOR_ROLE")
    with pytest.raises(UnauthorizedError) as propose_info:  # nor propose it through the timelock
        ops.set_unbonding_delay(PARAMS["unbonding_delay_s"] * 2)
    unauthorized(propose_info, op, "PROPOSER_ROLE")
    with pytest.raises(UnauthorizedError) as timelock_info:  # nor make itself a proposer
        ops.grant_role_on("timelock", "PROPOSER_ROLE", op)
    unauthorized(timelock_info, op, "DEFAULT_ADMIN_ROLE")
    with pytest.raises(UnauthorizedError) as kill_info:  # nor a guardian
        ops.grant_role_on("kill_switch", "GUARDIAN_ROLE", op)
    unauthorized(kill_info, op, "DEFAULT_ADMIN_ROLE")
    with pytest.raises(UnauthorizedError) as lock_info:  # nor lock a provider's stake (LOCKER is not the operator's)
        ops.lock_stake(prod.provider.address, 1)
    unauthorized(lock_info, op, "LOCKER_ROLE")
    with pytest.raises(UnauthorizedError) as release_info:  # nor pay itself from an escrow on the per-unit path
        ops.release(keccak(text="any-open-job"), keccak(text="any-unit"), op, 1)  # (claimable the next block)
    unauthorized(release_info, op, "UNIT_SETTLER_ROLE")
    with pytest.raises(UnauthorizedError) as guardian_info:  # nor a guardian (pause, void a root, cancel a proposal)
        ops._send(ops._contract("kill_switch"), "pauseAll")  # noqa: SLF001
    unauthorized(guardian_info, op, "GUARDIAN_ROLE")

    assert ops.paused() == {"staking": True, "escrow": True, "distributor": True}
    assert ops.unbonding_delay() == PARAMS["unbonding_delay_s"]
    assert not ops.has_role("GOVERNOR_ROLE", op) and not ops.has_role("DEFAULT_ADMIN_ROLE", op)


def test_the_operator_key_still_does_what_serve_and_worker_send(prod: Production) -> None:
    """Settle a job into the pool, post its root, slash a cheat through the referee path and a governance slash,
    close the job: all with the operator key. The guardian can still void a root inside its (non-zero) window."""
    job = prod.job("production-job")
    ops, p, p2, v, c = prod.operator, prod.provider, prod.provider2, prod.verifier, prod.customer
    p.stake(1_000)
    p2.stake(400)
    v.stake(500)
    c.fund_job(job, 1_000)

    assert ops.release_to_pool(job, BATCH, 300) is True  # SETTLER
    bad = build_payout_tree({ops.address: 300})  # a root naming the operator: the guardian vetoes it
    ops.post_tree(1, bad)  # POSTER
    prod.guardian.void_root(1)
    tree = build_payout_tree({p.address: 300})
    ops.post_tree(1, tree)
    prod.chain.advance_time(PARAMS["dispute_window_s"])
    assert p.claim_from_tree(1, tree) == 300

    signature = v.sign_accusation(p.address, EVIDENCE, 300)
    ops.accuse(p.address, EVIDENCE, 300, signature)  # REFEREE relays the verifier's accusation...
    assert ops.resolve_dispute(EVIDENCE, fraud=True) == 1_000  # ...and convicts: the whole stake
    assert ops.slash(p2.address, 400, v.address, EVIDENCE_2) is True  # SLASHER (a canary-approving verifier's path)
    assert ops.stake_of(p.address) == ops.stake_of(p2.address) == 0
    assert ops.close_job(job) == 700  # SETTLER closes, the customer gets the rest


def test_a_slash_waits_out_its_delay_and_one_sent_with_a_stolen_operator_key_is_voided(prod: Production) -> None:
    """A production slash takes the stake at once and pays nobody for ``slash_delay_s``: a thief holding the operator
    key who slashes an honest provider, bounty to itself, gets nothing once the guardian voids it; a real conviction
    is paid to its verifier after the delay, by whoever sends it."""
    ops, p, p2, v = prod.operator, prod.provider, prod.provider2, prod.verifier
    thief = Account.create().address
    p.stake(1_000)
    p2.stake(400)
    v.stake(500)
    treasury = prod.treasury.balance_of(prod.treasury.address)
    assert ops.slash(p.address, 1_000, thief, EVIDENCE) is True  # the stolen key's SLASHER_ROLE
    signature = v.sign_accusation(p2.address, EVIDENCE_2, 400)
    ops.accuse(p2.address, EVIDENCE_2, 400, signature)
    assert ops.resolve_dispute(EVIDENCE_2, fraud=True) == 400  # a real conviction
    assert ops.stake_of(p.address) == ops.stake_of(p2.address) == 0  # neither can unbond or withdraw it now
    assert ops.balance_of(thief) == 0 and ops.total_pending_slashes() == 1_400
    pending = ops.slash_of(EVIDENCE)
    assert (pending.account, pending.verifier, pending.amount, pending.bounty) == (p.address, thief, 1_000, 500)
    with pytest.raises(ChainError) as exc_info:
        ops.finalize_slash(EVIDENCE)  # not before its time
    assert exc_info.value.error_name == "StakingSlashNotReady"
    with pytest.raises(UnauthorizedError) as unauth:
        ops.void_slash(EVIDENCE)  # the operator key cannot undo (or redo) anything
    unauthorized(unauth, ops.address, "GUARDIAN_ROLE")
    assert prod.guardian.void_slash(EVIDENCE) is True
    assert ops.stake_of(p.address) == 1_000
    prod.chain.advance_time(PARAMS["slash_delay_s"])
    assert v.finalize_slash(EVIDENCE) is False  # voided: nothing to pay
    assert v.finalize_slash(EVIDENCE_2) is True  # anyone may send it: here the verifier waiting for its bounty
    assert ops.balance_of(thief) == 0 and ops.total_pending_slashes() == 0
    assert v.balance_of(v.address) == tokens(10_000) - 500 + 200  # the bounty: half of 400
    assert prod.treasury.balance_of(prod.treasury.address) - treasury == 200
    assert prod.guardian.void_slash(EVIDENCE_2) is False and v.finalize_slash(EVIDENCE_2) is False  # paid, once


def test_a_timelocked_proposal_runs_after_the_delay_and_the_guardian_can_cancel_one(prod: Production) -> None:
    gov, ops, delay = prod.governor, prod.operator, PARAMS["timelock_delay_s"]
    prod.guardian.pause_all()
    op = gov.unpause_all()
    assert op is not None and op.ready_at == prod.chain.timestamp() + delay
    with pytest.raises(GovernanceError) as early_info:
        gov.execute(op)
    assert early_info.value.error_name == "TimelockUnexpectedOperationState"
    with pytest.raises(UnauthorizedError) as executor_info:  # the operator key does not execute either
        ops.execute(op)
    unauthorized(executor_info, ops.address, "EXECUTOR_ROLE")

    # say the governor's key leaked (a thief need not use GridMint's checks): the guardian cancels in the delay
    bad = gov.govern([("staking", "setUnbondingDelay", (0,))])
    prod.guardian.cancel(bad)
    prod.chain.advance_time(delay)
    gov.execute(op)
    assert ops.paused() == {"staking": False, "escrow": False, "distributor": False}
    with pytest.raises(GovernanceError) as cancelled_info:
        gov.execute(bad)
    assert cancelled_info.value.error_name == "TimelockUnexpectedOperationState"
    assert ops.unbonding_delay() == PARAMS["unbonding_delay_s"]

    # Rotating the operator key is a proposal too: the timelock, the only admin, grants and revokes.
    new_key = Account.create().address
    rotate = gov.schedule([(name, fn, (role_id(role), who)) for name, role in (
        ("escrow", "SETTLER_ROLE"), ("distributor", "POSTER_ROLE"), ("staking", "SLASHER_ROLE"),
        ("staking", "REFEREE_ROLE")) for fn, who in (("grantRole", new_key), ("revokeRole", ops.address))],
        "rotate the operator key")
    prod.chain.advance_time(delay)
    gov.execute(rotate)
    for role in ("SETTLER_ROLE", "POSTER_ROLE", "SLASHER_ROLE", "REFEREE_ROLE"):
        assert ops.has_role(role, new_key) and not ops.has_role(role, ops.address), role


def test_the_governor_is_refused_delays_that_let_a_cheat_unbond_before_its_redo(prod: Production) -> None:
    """The rule the production deploy checks (unbonding delay >= slash delay + 1 h) holds for the governor's
    proposals too: each delay against the other's value, or both in one operation."""
    gov, delay = prod.governor, PARAMS["timelock_delay_s"]
    too_short = PARAMS["slash_delay_s"] + 3599
    with pytest.raises(GridMintValueError, match=f"unbonding delay of {too_short} s beside a slash delay of {DAY} s"):
        gov.set_unbonding_delay(too_short)
    with pytest.raises(GridMintValueError, match="at least the slash delay"):
        gov.set_slash_delay(PARAMS["unbonding_delay_s"])
    with pytest.raises(GridMintValueError, match="needs unbonding_delay_s, slash_delay_s or both"):
        gov.set_delays()
    lower = gov.set_unbonding_delay(DAY + 3600)  # exactly the margin: allowed
    both = gov.set_delays(unbonding_delay_s=14 * DAY, slash_delay_s=7 * DAY)  # raised together: allowed
    prod.chain.advance_time(delay)
    gov.execute(lower)
    assert gov.unbonding_delay() == DAY + 3600
    gov.execute(both)
    assert (gov.unbonding_delay(), gov.slash_delay()) == (14 * DAY, 7 * DAY)
    assert gov.set_slash_delay(0).description == "set slash delay"  # no slash delay, no redo to wait for: allowed


def test_unsafe_production_settings_are_refused_before_anything_is_sent(chain: Chain) -> None:
    operator, governor = chain.dev_accounts(2)
    nonce = chain.w3.eth.get_transaction_count(operator.address)
    treasury = Account.create().address
    for params, governance, says in (
        ({**PARAMS, "timelock_delay_s": 0}, Governance(governor.address, governor.address), "zero timelock_delay_s"),
        ({**PARAMS, "dispute_window_s": 0}, Governance(governor.address, governor.address), "zero dispute_window_s"),
        ({**PARAMS, "unbonding_delay_s": 0}, Governance(governor.address, governor.address), "zero unbonding_delay_s"),
        ({**PARAMS, "slash_delay_s": 0}, Governance(governor.address, governor.address), "zero slash_delay_s"),
        ({**PARAMS, "unbonding_delay_s": DAY + 3599}, Governance(governor.address, governor.address),
         f"unbonding_delay_s ({DAY + 3599}) of at least slash_delay_s ({DAY}) + 3600"),
        (PARAMS, Governance(operator.address, governor.address), f"the governor {operator.address} is the operator"),
        (PARAMS, Governance(governor.address, operator.address), f"the guardian {operator.address} is the operator"),
        (PARAMS, Governance("0x1234", governor.address), "0x1234"),
    ):
        with pytest.raises(GridMintValueError) as exc_info:
            deploy(chain, operator, supply=1, treasury=treasury, governance=governance, **params)
        assert says in str(exc_info.value) and not isinstance(exc_info.value, ChainError), str(exc_info.value)
    with pytest.raises(GridMintValueError, match=f"the treasury {operator.address} is the operator key"):
        deploy(chain, operator, supply=1, treasury=operator.address,
               governance=Governance(governor.address, governor.address), **PARAMS)
    assert chain.w3.eth.get_transaction_count(operator.address) == nonce


def test_paused_contracts_stop_the_operator_key_too(prod: Production) -> None:
    """What the guardian buys while a leaked operator key is rotated out: nothing it holds moves money."""
    job = prod.job("production-job")
    ops = prod.operator
    prod.customer.fund_job(job, 100)
    prod.guardian.pause_all()
    tree = build_payout_tree({ops.address: 1})
    for flow in (lambda: ops.release_to_pool(job, BATCH, 1), lambda: ops.post_tree(1, tree), lambda: ops.close_job(job)):
        with pytest.raises(PausedError):
            flow()
