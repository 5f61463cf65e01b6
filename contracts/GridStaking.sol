// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";
import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {ReentrancyGuardTransient} from "@openzeppelin/contracts/utils/ReentrancyGuardTransient.sol";

import {PauseClock} from "./PauseClock.sol";

/// @title GridStaking
/// @notice Providers and verifiers bond GMT. Leaving is two steps: `requestUnbond` (the amount stops backing work
/// but stays slashable) and `withdraw` after `unbondingDelay`. Time spent paused does not count toward that delay:
/// the pause blocks every slashing path, so a delay that ran on through it would let a cheat whose unbonding matured
/// meanwhile withdraw in the block the (publicly scheduled) unpause lands, before the referee could slash it.
/// A LOCKER (escrow / marketplace) locks the stake that backs work in flight; an account in an open dispute cannot
/// unbond or withdraw at all.
/// Slashing happens only (a) through a fraud proof: a staked verifier signs an accusation that a committed hash does
/// not replay, bonding `verifierBond`; a REFEREE resolves it, slashing the provider's whole slashable stake (bounty
/// to the verifier) or the verifier's bond for a false accusation (or `dismiss`ing it, bond released, when the
/// accusation was made in good faith); or (b) by the governance SLASHER. Each evidence
/// hash is used once, so slashing is exactly-once even when the off-chain side retries. A slash pays `bountyBps` to
/// the verifier and the rest to the treasury. Parameters and unpause belong to GOVERNOR_ROLE (the TimelockController).
/// With a `slashDelay` (a production deployment has one), neither is paid at once: the stake leaves the account at
/// the verdict (it can no longer be unbonded or withdrawn) and waits `slashDelay` seconds, not counting time paused,
/// before anyone may `finalizeSlash` it; until then the GUARDIAN may `voidSlash` it, returning it to the account. The
/// stake a slash or verdict sent with a stolen referee / slasher key took is then given back, not paid to whoever the
/// thief named (what else such a verdict did stays done: a dispute it closed is closed, its evidence spent). A slash
/// that finds an account's stake held by its own pending slashes takes what is left; `pendingSlashesOf` says how much
/// is held, so that the slasher can slash again what a void gives back.
contract GridStaking is AccessControl, PauseClock, ReentrancyGuardTransient, EIP712 {
    using SafeERC20 for IERC20;

    bytes32 public constant GUARDIAN_ROLE = keccak256("GUARDIAN_ROLE");
    bytes32 public constant GOVERNOR_ROLE = keccak256("GOVERNOR_ROLE");
    bytes32 public constant SLASHER_ROLE = keccak256("SLASHER_ROLE");
    bytes32 public constant LOCKER_ROLE = keccak256("LOCKER_ROLE");
    bytes32 public constant REFEREE_ROLE = keccak256("REFEREE_ROLE");
    bytes32 public constant ACCUSATION_TYPEHASH =
        keccak256("Accusation(address provider,bytes32 evidence,uint256 amount)");
    uint16 public constant MAX_BPS = 10_000;

    /// @notice One account's stake, as `accountOf` reports it. `staked` backs work and is what `stakeOf` reports;
    /// `locked` (LOCKER) and `bonded` (verifier bonds of open accusations) are parts of it that cannot be unbonded.
    /// `unbonding` left `staked` but is still slashable; it can be withdrawn from `unbondingReadyAt`, the deadline in
    /// force: the request's time + the delay then + every second paused since (while paused, it moves on with the
    /// clock).
    struct StakeAccount {
        uint256 staked;
        uint256 locked;
        uint256 bonded;
        uint256 unbonding;
        uint64 unbondingReadyAt;
        uint32 openDisputes;
    }

    /// @dev What storage holds for an account: StakeAccount's fields with `unbondingReadyAt` nominal (the request's
    /// time + the delay then), plus `pausedAtRequest` (pausedSeconds() at the request; `_readyAt` adds the seconds
    /// paused since), and `bondsOpen`, the sum of the bonds of its open accusations as bonded (`bonded` is at most
    /// that: a slash may have cut it, and a voided slash gives back what it cut, up to it). The three small fields
    /// share one slot.
    struct StakeRecord {
        uint256 staked;
        uint256 locked;
        uint256 bonded;
        uint256 unbonding;
        uint64 unbondingReadyAt;
        uint32 openDisputes;
        uint40 pausedAtRequest;
        uint256 bondsOpen;
    }

    /// @notice A slash waiting out `slashDelay` (`slashOf`): `amount` taken from `account`, `bounty` of it for
    /// `verifier`, the rest for the treasury, payable from `readyAt` (the deadline in force, as in StakeAccount).
    struct PendingSlash {
        address account;
        address verifier;
        uint256 amount;
        uint256 bounty;
        uint64 readyAt;
    }

    /// @dev What storage holds: PendingSlash with `readyAt` nominal, plus pausedSeconds() when it was set, and
    /// `bondCut`, what the slash cut from the account's open bonds (`_takeStake`): a void backs them again.
    struct SlashRecord {
        address account;
        address verifier;
        uint256 amount;
        uint256 bounty;
        uint64 readyAt;
        uint40 pausedAtSet;
        uint256 bondCut;
    }

    /// @dev `amount` is the verifier's claimed unearned pay, as signed; it does not cap the slash (see `resolve`).
    /// `bond` is what `accuse` bonded; a slash of the verifier's stake may since have taken part of it (`_takeStake`).
    struct Dispute {
        address provider;
        address verifier;
        uint256 amount;
        uint256 bond;
    }

    IERC20 public immutable token;
    address public immutable treasury;
    uint16 public bountyBps;
    uint32 public unbondingDelay;
    uint256 public verifierBond;
    /// @notice Seconds a slash waits (not counting time paused) before it is paid out, voidable by the guardian
    /// meanwhile; 0: paid at once (a development deployment).
    uint32 public slashDelay;

    mapping(address account => StakeRecord) private _accounts;
    mapping(bytes32 gpuClass => uint256) private _minStake;
    mapping(bytes32 evidence => bool) private _evidenceUsed;
    mapping(bytes32 evidence => Dispute) private _disputes;
    uint256 private _totalStaked;
    mapping(bytes32 evidence => SlashRecord) private _pendingSlashes;
    uint256 private _totalPendingSlashes;
    mapping(address account => uint256) private _pendingOf;

    event Staked(address indexed provider, uint256 amount, uint256 newTotal);
    event UnbondRequested(address indexed provider, uint256 amount, uint256 totalUnbonding, uint256 readyAt);
    event Withdrawn(address indexed provider, uint256 amount);
    event StakeLocked(address indexed provider, uint256 amount, uint256 totalLocked);
    event StakeUnlocked(address indexed provider, uint256 amount, uint256 totalLocked);
    event Accused(
        address indexed provider, address indexed verifier, bytes32 indexed evidence, uint256 amount, uint256 bond
    );
    event DisputeResolved(bytes32 indexed evidence, bool fraud, uint256 slashed);
    event DisputeDismissed(bytes32 indexed evidence, address indexed provider, address indexed verifier);
    event Slashed(
        address indexed provider, address indexed verifier, bytes32 indexed evidence, uint256 slashed, uint256 bounty
    );
    event MinStakeSet(bytes32 indexed gpuClass, uint256 amount);
    event BountyBpsSet(uint16 bps);
    event UnbondingDelaySet(uint32 delay);
    event VerifierBondSet(uint256 bond);
    event SlashDelaySet(uint32 delay);
    event SlashPending(bytes32 indexed evidence, address indexed account, uint256 amount, uint256 readyAt);
    event SlashFinalized(bytes32 indexed evidence, address indexed account, address indexed verifier, uint256 amount);
    event SlashVoided(bytes32 indexed evidence, address indexed account, uint256 amount);

    error StakingZeroAmount();
    error StakingZeroAddress();
    error StakingInvalidBps(uint16 bps);
    error StakingInsufficientStake(address account, uint256 have, uint256 need);
    error StakingInsufficientLocked(address account, uint256 locked, uint256 need);
    error StakingNothingToSlash(address provider);
    error StakingNothingToWithdraw(address account);
    error StakingStillUnbonding(address account, uint256 readyAt);
    error StakingUnderDispute(address account, uint256 openDisputes);
    error StakingEvidenceUsed(bytes32 evidence);
    error StakingUnknownDispute(bytes32 evidence);
    error StakingSelfAccusation(address account);
    error StakingUnknownSlash(bytes32 evidence);
    error StakingSlashNotReady(bytes32 evidence, uint256 readyAt);
    error StakingSlashFinal(bytes32 evidence, uint256 readyAt);

    constructor(
        IERC20 token_,
        address admin,
        address governor,
        address treasury_,
        uint16 bountyBps_,
        uint32 unbondingDelay_,
        uint256 verifierBond_,
        uint32 slashDelay_
    ) EIP712("GridStaking", "1") {
        if (address(token_) == address(0) || admin == address(0) || governor == address(0) || treasury_ == address(0))
        {
            revert StakingZeroAddress();
        }
        if (bountyBps_ > MAX_BPS) revert StakingInvalidBps(bountyBps_);
        token = token_;
        treasury = treasury_;
        bountyBps = bountyBps_;
        unbondingDelay = unbondingDelay_;
        verifierBond = verifierBond_;
        slashDelay = slashDelay_;
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
        _grantRole(GOVERNOR_ROLE, governor);
    }

    // ---------------------------------------------------------------- bonding

    /// @notice Bond `amount` GMT from the caller (needs a prior `approve`).
    function stake(uint256 amount) external whenNotPaused nonReentrant {
        if (amount == 0) revert StakingZeroAmount();
        StakeRecord storage a = _accounts[msg.sender];
        uint256 newTotal = a.staked + amount;
        a.staked = newTotal;
        _totalStaked += amount;
        emit Staked(msg.sender, amount, newTotal);
        token.safeTransferFrom(msg.sender, address(this), amount);
    }

    /// @notice Start unbonding `amount` of the caller's free stake (not locked, not bonded, no open dispute).
    /// It stays slashable until `withdraw`; a new request adds to the pending one and restarts the delay. The event's
    /// `readyAt` is the deadline as of now: any pause before it pushes it back (`accountOf` reports the one in force).
    function requestUnbond(uint256 amount) external whenNotPaused {
        if (amount == 0) revert StakingZeroAmount();
        StakeRecord storage a = _accounts[msg.sender];
        if (a.openDisputes != 0) revert StakingUnderDispute(msg.sender, a.openDisputes);
        uint256 free = _free(a);
        if (amount > free) revert StakingInsufficientStake(msg.sender, free, amount);
        // unchecked: amount <= free <= staked.
        unchecked {
            a.staked -= amount;
        }
        uint256 unbonding = a.unbonding + amount;
        uint256 readyAt = block.timestamp + unbondingDelay;
        a.unbonding = unbonding;
        a.unbondingReadyAt = uint64(readyAt);
        a.pausedAtRequest = _pausedSecondsNow();
        emit UnbondRequested(msg.sender, amount, unbonding, readyAt);
    }

    /// @notice Withdraw everything that finished unbonding: `unbondingDelay` seconds since the request, not counting
    /// the seconds paused (StakingStillUnbonding names the deadline in force).
    function withdraw() external whenNotPaused nonReentrant returns (uint256 amount) {
        StakeRecord storage a = _accounts[msg.sender];
        amount = a.unbonding;
        if (amount == 0) revert StakingNothingToWithdraw(msg.sender);
        if (a.openDisputes != 0) revert StakingUnderDispute(msg.sender, a.openDisputes);
        uint256 readyAt = _readyAt(a);
        if (block.timestamp < readyAt) revert StakingStillUnbonding(msg.sender, readyAt);
        a.unbonding = 0;
        // unchecked: _totalStaked is the sum of every staked + unbonding, so it is >= amount.
        unchecked {
            _totalStaked -= amount;
        }
        emit Withdrawn(msg.sender, amount);
        token.safeTransfer(msg.sender, amount);
    }

    /// @notice Lock `amount` of `provider`'s free stake behind work in flight (LOCKER: escrow / marketplace).
    function lock(address provider, uint256 amount) external onlyRole(LOCKER_ROLE) {
        if (amount == 0) revert StakingZeroAmount();
        StakeRecord storage a = _accounts[provider];
        uint256 free = _free(a);
        if (amount > free) revert StakingInsufficientStake(provider, free, amount);
        uint256 locked = a.locked + amount;
        a.locked = locked;
        emit StakeLocked(provider, amount, locked);
    }

    /// @notice Release `amount` of `provider`'s locked stake once the work it backed is settled.
    function unlock(address provider, uint256 amount) external onlyRole(LOCKER_ROLE) {
        if (amount == 0) revert StakingZeroAmount();
        StakeRecord storage a = _accounts[provider];
        uint256 locked = a.locked;
        if (amount > locked) revert StakingInsufficientLocked(provider, locked, amount);
        // unchecked: amount <= locked was checked above.
        unchecked {
            locked -= amount;
        }
        a.locked = locked;
        emit StakeUnlocked(provider, amount, locked);
    }

    // ---------------------------------------------------------------- slashing (a): fraud proof

    /// @notice Open a dispute: `verifier`'s EIP-712 signature over Accusation(provider, evidence, amount) claims that
    /// `provider`'s committed hash `evidence` does not replay. Only the referee submits it (the marketplace relays the
    /// accusations its verifiers hand in): the referee alone resolves disputes, and a dispute opened behind its back
    /// would freeze an honest provider's stake for as long as nobody resolved it, at the price of a bond.
    /// Bonds `verifierBond` of the verifier's free stake and freezes both accounts' unbonding until resolved.
    /// @param amount the pay the verifier claims the provider did not earn; it is recorded (Accused, disputeOf) for
    /// the referee but does NOT cap the slash: a fraud verdict takes the provider's whole stake (see `resolve`).
    function accuse(address provider, bytes32 evidence, uint256 amount, bytes calldata signature)
        external
        onlyRole(REFEREE_ROLE)
        whenNotPaused
    {
        if (amount == 0) revert StakingZeroAmount();
        if (_evidenceUsed[evidence] || _disputes[evidence].provider != address(0)) revert StakingEvidenceUsed(evidence);
        bytes32 digest = _hashTypedDataV4(keccak256(abi.encode(ACCUSATION_TYPEHASH, provider, evidence, amount)));
        address verifier = ECDSA.recover(digest, signature);
        if (verifier == provider) revert StakingSelfAccusation(provider);
        StakeRecord storage p = _accounts[provider];
        if (p.staked + p.unbonding == 0) revert StakingNothingToSlash(provider);
        StakeRecord storage v = _accounts[verifier];
        uint256 bond = verifierBond;
        uint256 free = _free(v);
        if (bond == 0 || bond > free) revert StakingInsufficientStake(verifier, free, bond == 0 ? 1 : bond);

        v.bonded += bond;
        v.bondsOpen += bond;
        v.openDisputes += 1;
        p.openDisputes += 1;
        _disputes[evidence] = Dispute(provider, verifier, amount, bond);
        emit Accused(provider, verifier, evidence, amount, bond);
    }

    /// @notice Referee verdict on the dispute for `evidence`. `fraud`: slash the provider's WHOLE slashable stake
    /// (staked + unbonding, whatever is locked or bonded in it), bounty to the verifier. Otherwise the accusation was
    /// false: the verifier's bond goes to the treasury, or what is left of it where a slash of the verifier's stake
    /// since took part of it (`_takeStake`); stake the verifier added later never pays for it.
    /// @dev Why not the accused `amount`: the accuser chooses it and each evidence hash is used once, so a cheating
    /// provider could have a second staked key of its own accuse it first for 1 wei, and the fraud verdict on that
    /// accusation would cap its penalty at 1 wei and spend the evidence before an honest verifier could use it.
    /// A proven fraud therefore costs everything; `amount` stays in the signed struct as the verifier's claim of
    /// unearned pay (reported in Accused and disputeOf).
    function resolve(bytes32 evidence, bool fraud) external onlyRole(REFEREE_ROLE) whenNotPaused nonReentrant {
        (Dispute memory d, uint256 bondLeft) = _closeDispute(evidence);
        if (fraud) {
            StakeRecord storage p = _accounts[d.provider];
            (uint256 slashed, uint256 cut) = _takeStake(d.provider, p.staked + p.unbonding);
            emit DisputeResolved(evidence, true, slashed);
            _payOut(d.provider, d.verifier, evidence, slashed, cut);
        } else {
            (uint256 penalty, uint256 cut) = _takeStake(d.verifier, bondLeft);
            emit DisputeResolved(evidence, false, penalty);
            _payOut(d.verifier, address(0), evidence, penalty, cut);
        }
    }

    /// @notice Referee verdict that the provider is innocent AND the accusation was made in good faith: the referee
    /// reproduced the verifier's signed replay bit for bit on the verifier's own execution plan, and it disagrees with
    /// the provider's claim past the tolerance the protocol gives that plan. Honest training drifts apart across
    /// hardware without bound in chaotic stretches (an honest segment has been seen ~50x past a calibrated
    /// tolerance), so an honest verifier's accusation can be wrong; it loses nothing. The dispute closes, both
    /// accounts unfreeze, the bond is released, no token moves and the evidence is spent.
    function dismiss(bytes32 evidence) external onlyRole(REFEREE_ROLE) whenNotPaused nonReentrant {
        (Dispute memory d,) = _closeDispute(evidence);
        emit DisputeDismissed(evidence, d.provider, d.verifier);
    }

    /// @dev Close the open dispute for `evidence` (spending the evidence): both accounts leave it, the bond is
    /// released. Returns the dispute and `bondLeft`, the part of its bond still backed by the verifier's stake: all of
    /// it unless a slash took stake from under the verifier's bonds (`_takeStake` then cut `bonded` to what is left;
    /// that remainder backs the open bonds in the order they close). Reverts StakingUnknownDispute if none is open.
    function _closeDispute(bytes32 evidence) private returns (Dispute memory d, uint256 bondLeft) {
        d = _disputes[evidence];
        if (d.provider == address(0)) revert StakingUnknownDispute(evidence);
        delete _disputes[evidence];
        _evidenceUsed[evidence] = true;
        StakeRecord storage p = _accounts[d.provider];
        StakeRecord storage v = _accounts[d.verifier];
        uint256 bonded = v.bonded;
        bondLeft = d.bond < bonded ? d.bond : bonded;
        // unchecked: each open dispute added exactly these counts in `accuse`; bondLeft <= bonded.
        unchecked {
            p.openDisputes -= 1;
            v.openDisputes -= 1;
            v.bonded = bonded - bondLeft;
            v.bondsOpen -= d.bond;
        }
    }

    // ---------------------------------------------------------------- slashing (b): governance

    /// @notice Slash up to `amount` of `provider`'s stake (staked, then unbonding) for `evidence` (used at most once).
    /// @dev bounty = slashed * bountyBps / 10_000 (rounded down) goes to `verifier`, the rest to the treasury, so
    /// bounty + treasury share == slashed exactly.
    function slash(address provider, uint256 amount, address verifier, bytes32 evidence)
        external
        onlyRole(SLASHER_ROLE)
        whenNotPaused
        nonReentrant
    {
        if (amount == 0) revert StakingZeroAmount();
        if (verifier == address(0)) revert StakingZeroAddress();
        if (_evidenceUsed[evidence] || _disputes[evidence].provider != address(0)) revert StakingEvidenceUsed(evidence);
        StakeRecord storage a = _accounts[provider];
        if (a.staked + a.unbonding == 0) revert StakingNothingToSlash(provider);
        _evidenceUsed[evidence] = true;
        (uint256 slashed, uint256 cut) = _takeStake(provider, amount);
        _payOut(provider, verifier, evidence, slashed, cut);
    }

    // ---------------------------------------------------------------- slashing: the delay

    /// @notice Pay out the slash for `evidence` once its delay has passed (`slashOf(evidence).readyAt`): `bounty` to
    /// its verifier, the rest to the treasury. Anyone may send it; each slash is paid once.
    function finalizeSlash(bytes32 evidence) external whenNotPaused nonReentrant {
        SlashRecord memory r = _pendingSlashes[evidence];
        if (r.amount == 0) revert StakingUnknownSlash(evidence);
        uint256 readyAt = _deadlineInForce(r.readyAt, r.pausedAtSet);
        if (block.timestamp < readyAt) revert StakingSlashNotReady(evidence, readyAt);
        delete _pendingSlashes[evidence];
        // unchecked: every pending slash added its amount to both totals.
        unchecked {
            _totalPendingSlashes -= r.amount;
            _pendingOf[r.account] -= r.amount;
        }
        emit SlashFinalized(evidence, r.account, r.verifier, r.amount);
        _transferSlash(r.verifier, r.amount, r.bounty);
    }

    /// @notice Guardian: undo the slash for `evidence` before its delay has passed; its amount goes back to the
    /// account's stake (`staked`, free to unbond again), and what it cut from the account's open bonds backs them
    /// again (as far as they are still open). Works while paused: the guardian pauses first, then voids. The
    /// evidence stays spent. The slash's redo (`redoEvidenceOf(evidence)`), if pending and not yet final, is voided
    /// with it: a conviction overturned is overturned whole, also one that took nothing itself (its account's stake
    /// all held by other slashes) or was paid at once, whose redo alone is pending.
    function voidSlash(bytes32 evidence) external onlyRole(GUARDIAN_ROLE) nonReentrant {
        SlashRecord memory r = _pendingSlashes[evidence];
        bytes32 redo = redoEvidenceOf(evidence);
        SlashRecord memory rr;
        if (_pendingSlashes[redo].amount != 0) {
            rr = _pendingSlashes[redo];
            if (block.timestamp >= _deadlineInForce(rr.readyAt, rr.pausedAtSet)) rr.amount = 0; // final: it stands
        }
        if (r.amount != 0) {
            uint256 readyAt = _deadlineInForce(r.readyAt, r.pausedAtSet);
            if (block.timestamp >= readyAt) revert StakingSlashFinal(evidence, readyAt);
            _void(evidence, r);
        } else if (rr.amount == 0) {
            revert StakingUnknownSlash(evidence);
        }
        if (rr.amount != 0) _void(redo, rr);
    }

    /// @notice The evidence of the redo of the slash for `evidence`: a slash that found the account's stake held by
    /// its own pending slashes (a thief's, sent with a stolen SLASHER key) takes what is left, and the marketplace
    /// slashes again, under this evidence, what the guardian's voids of those gave back.
    function redoEvidenceOf(bytes32 evidence) public pure returns (bytes32) {
        return keccak256(abi.encodePacked("GridMint/slash-redo/v1", evidence));
    }

    function _void(bytes32 evidence, SlashRecord memory r) private {
        delete _pendingSlashes[evidence];
        // unchecked: every pending slash added its amount to both totals.
        unchecked {
            _totalPendingSlashes -= r.amount;
            _pendingOf[r.account] -= r.amount;
        }
        StakeRecord storage a = _accounts[r.account];
        uint256 staked = a.staked + r.amount;
        a.staked = staked;
        _totalStaked += r.amount;
        if (r.bondCut > 0) {
            uint256 bonded = a.bonded + r.bondCut;
            uint256 cap = a.bondsOpen < staked + a.unbonding ? a.bondsOpen : staked + a.unbonding;
            a.bonded = bonded < cap ? bonded : cap;
        }
        emit SlashVoided(evidence, r.account, r.amount);
    }

    // ---------------------------------------------------------------- governance

    /// @notice Kill switch: blocks stake, unbonding, withdrawal, accusations and slashes. Unpause goes through the timelock.
    /// The time paused does not count toward any unbonding delay (see `pausedSeconds`).
    function pause() external onlyRole(GUARDIAN_ROLE) {
        _pause();
    }

    function unpause() external onlyRole(GOVERNOR_ROLE) {
        _unpause();
    }

    function setMinStake(bytes32 gpuClass, uint256 amount) external onlyRole(GOVERNOR_ROLE) {
        _minStake[gpuClass] = amount;
        emit MinStakeSet(gpuClass, amount);
    }

    function setBountyBps(uint16 bps) external onlyRole(GOVERNOR_ROLE) {
        if (bps > MAX_BPS) revert StakingInvalidBps(bps);
        bountyBps = bps;
        emit BountyBpsSet(bps);
    }

    function setUnbondingDelay(uint32 delay) external onlyRole(GOVERNOR_ROLE) {
        unbondingDelay = delay;
        emit UnbondingDelaySet(delay);
    }

    function setVerifierBond(uint256 bond) external onlyRole(GOVERNOR_ROLE) {
        verifierBond = bond;
        emit VerifierBondSet(bond);
    }

    /// @notice Applies to slashes made from now on; those pending keep their deadline.
    function setSlashDelay(uint32 delay) external onlyRole(GOVERNOR_ROLE) {
        slashDelay = delay;
        emit SlashDelaySet(delay);
    }

    // ---------------------------------------------------------------- views

    /// @notice Bonded stake backing work (excludes what is unbonding).
    function stakeOf(address account) external view returns (uint256) {
        return _accounts[account].staked;
    }

    /// @notice Stake that may be unbonded now (or bonded for an accusation): staked - locked - bonded, floored at 0.
    function freeStakeOf(address account) external view returns (uint256) {
        StakeRecord storage a = _accounts[account];
        return a.openDisputes != 0 ? 0 : _free(a);
    }

    /// @notice `account`'s stake; `unbondingReadyAt` is the deadline in force (see StakeAccount).
    function accountOf(address account) external view returns (StakeAccount memory) {
        StakeRecord storage a = _accounts[account];
        // the cast cannot truncate: a timestamp + a uint32 delay + a uint40 count of seconds paused fit in 64 bits.
        return StakeAccount(a.staked, a.locked, a.bonded, a.unbonding, uint64(_readyAt(a)), a.openDisputes);
    }

    function minStake(bytes32 gpuClass) external view returns (uint256) {
        return _minStake[gpuClass];
    }

    /// @notice True if `provider`'s bonded stake reaches the minimum for `gpuClass` and no dispute is open against it.
    function meetsMinStake(address provider, bytes32 gpuClass) external view returns (bool) {
        StakeRecord storage a = _accounts[provider];
        return a.openDisputes == 0 && a.staked >= _minStake[gpuClass];
    }

    /// @notice Every token this contract holds for stakers: the sum of staked + unbonding over all accounts.
    function totalStaked() external view returns (uint256) {
        return _totalStaked;
    }

    /// @notice Tokens this contract holds for slashes waiting out their delay (not part of `totalStaked`).
    function totalPendingSlashes() external view returns (uint256) {
        return _totalPendingSlashes;
    }

    /// @notice What `account`'s slashes waiting out their delay hold of its former stake: a void gives it back.
    function pendingSlashesOf(address account) external view returns (uint256) {
        return _pendingOf[account];
    }

    /// @notice The slash for `evidence` waiting out its delay (amount 0: none; paid, voided, or never delayed);
    /// `readyAt` is the deadline in force.
    function slashOf(bytes32 evidence) external view returns (PendingSlash memory) {
        SlashRecord storage r = _pendingSlashes[evidence];
        // the cast cannot truncate: a timestamp + a uint32 delay + a uint40 count of seconds paused fit in 64 bits.
        return PendingSlash(r.account, r.verifier, r.amount, r.bounty,
                            uint64(_deadlineInForce(r.readyAt, r.pausedAtSet)));
    }

    function evidenceUsed(bytes32 evidence) external view returns (bool) {
        return _evidenceUsed[evidence];
    }

    function disputeOf(bytes32 evidence) external view returns (Dispute memory) {
        return _disputes[evidence];
    }

    /// @notice The EIP-712 domain separator accusations are signed under.
    function domainSeparator() external view returns (bytes32) {
        return _domainSeparatorV4();
    }

    // ---------------------------------------------------------------- internals

    /// @dev The unbonding's deadline in force: the nominal one plus the seconds paused since the request (PauseClock).
    function _readyAt(StakeRecord storage a) private view returns (uint256) {
        return _deadlineInForce(a.unbondingReadyAt, a.pausedAtRequest);
    }

    function _free(StakeRecord storage a) private view returns (uint256) {
        uint256 held = a.locked + a.bonded;
        return a.staked > held ? a.staked - held : 0;
    }

    /// @dev Removes up to `amount` from `account`: staked first, then unbonding. Returns what was taken (maybe 0:
    /// a dispute must still resolve when governance already slashed the account).
    /// The verifier bonds of `account`'s open accusations are part of that stake, so what a slash takes from under
    /// them it takes from the bonds: `bonded` is cut to the stake left (staked + unbonding, which a false verdict
    /// draws on), so that stake added later is free and a false verdict takes only what is still backed (review R4:
    /// the canary path slashes a verifier's whole stake; its bond used to be taken again from its next stake).
    /// `locked` is not cut: nothing is ever paid out of a lock, and the LOCKER releases exactly what it locked.
    /// Returns `bondCut` too: how much that cut `bonded` (a voided slash gives it back).
    function _takeStake(address account, uint256 amount) private returns (uint256 taken, uint256 bondCut) {
        StakeRecord storage a = _accounts[account];
        uint256 staked = a.staked;
        uint256 unbonding = a.unbonding;
        uint256 fromStaked = amount < staked ? amount : staked;
        uint256 rest = amount - fromStaked;
        uint256 fromUnbonding = rest < unbonding ? rest : unbonding;
        // unchecked: fromStaked <= staked, fromUnbonding <= unbonding, and _totalStaked >= staked + unbonding.
        unchecked {
            staked -= fromStaked;
            unbonding -= fromUnbonding;
            taken = fromStaked + fromUnbonding;
            _totalStaked -= taken;
        }
        a.staked = staked;
        a.unbonding = unbonding;
        uint256 bonded = a.bonded;
        if (bonded > staked + unbonding) {
            // unchecked: bonded > staked + unbonding.
            unchecked {
                bondCut = bonded - (staked + unbonding);
            }
            a.bonded = staked + unbonding;
        }
    }

    /// @dev Splits `slashed`: bountyBps to `verifier` (none if it is address(0)), the rest to the treasury; paid at
    /// once without a `slashDelay`, else held for `finalizeSlash` (or `voidSlash`). The split is fixed now.
    function _payOut(address provider, address verifier, bytes32 evidence, uint256 slashed, uint256 bondCut)
        private
    {
        uint256 bounty = verifier == address(0) ? 0 : (slashed * bountyBps) / MAX_BPS;
        emit Slashed(provider, verifier, evidence, slashed, bounty);
        uint32 delay = slashDelay;
        if (delay == 0 || slashed == 0) {
            _transferSlash(verifier, slashed, bounty);
            return;
        }
        uint256 readyAt = block.timestamp + delay;
        _pendingSlashes[evidence] =
            SlashRecord(provider, verifier, slashed, bounty, uint64(readyAt), _pausedSecondsNow(), bondCut);
        _totalPendingSlashes += slashed;
        _pendingOf[provider] += slashed;
        emit SlashPending(evidence, provider, slashed, readyAt);
    }

    function _transferSlash(address verifier, uint256 slashed, uint256 bounty) private {
        if (bounty > 0) token.safeTransfer(verifier, bounty);
        // unchecked: bounty <= slashed because bountyBps <= MAX_BPS.
        unchecked {
            if (slashed - bounty > 0) token.safeTransfer(treasury, slashed - bounty);
        }
    }
}
