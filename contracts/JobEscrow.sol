// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";
import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {IERC20Permit} from "@openzeppelin/contracts/token/ERC20/extensions/IERC20Permit.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {SafeCast} from "@openzeppelin/contracts/utils/math/SafeCast.sol";
import {ReentrancyGuardTransient} from "@openzeppelin/contracts/utils/ReentrancyGuardTransient.sol";

import {PauseClock} from "./PauseClock.sol";

/// @notice What JobEscrow needs from the epoch settlement pool (PayoutDistributor).
interface IPayoutPool {
    function deposit(uint256 amount) external;
}

/// @title JobEscrow
/// @notice Holds a customer's GMT for a training job and releases it per verified work unit, on one of two paths:
/// - `release` (per unit): credits the provider here; the provider withdraws with `claim` (pull payment).
/// - `releaseToPool` (per batch of units): moves the batch's pay to the PayoutDistributor, whose epoch Merkle root
///   says who earned it. This is the path that scales: one transfer per job per epoch, not one per unit.
/// Each (jobId, unitId) and each (jobId, batchId) pays out at most once, so the settler can retry safely.
/// The settler closes a finished job; a customer can `cancel` and close it itself after `cancelGrace` seconds (units
/// verified in the meantime are still paid). Once that grace is over (`closableAt`), nothing more can be released
/// from the job: what is left then is the customer's refund, whenever it closes. Closing refunds what was not
/// released. A job id starts with its customer's address (its first 20 bytes; the other 12 are the customer's to
/// choose): only that address can fund it, so no one who sees the id in a pending transaction can take it first. Time the escrow spends paused (the guardian's kill switch; unpausing waits for the timelock) does not
/// count against a grace: `closableAt` moves back by every second paused since the cancel, so a pause cannot wipe
/// out the pay of units verified before it, nor let the customer close early.
/// @dev Invariant: token.balanceOf(this) == sum over open jobs of (funded - released) + totalClaimable.
contract JobEscrow is AccessControl, PauseClock, ReentrancyGuardTransient {
    using SafeERC20 for IERC20;

    bytes32 public constant GUARDIAN_ROLE = keccak256("GUARDIAN_ROLE");
    bytes32 public constant GOVERNOR_ROLE = keccak256("GOVERNOR_ROLE");
    bytes32 public constant SETTLER_ROLE = keccak256("SETTLER_ROLE");
    /// @dev The per-unit path (`release`) pays an address at once, claimable in the next block: no dispute window,
    /// no guardian veto. A role of its own, which a production operator key does not hold (ledger/deploy.py): one
    /// stolen from a marketplace machine could otherwise empty every open escrow before anyone could pause.
    bytes32 public constant UNIT_SETTLER_ROLE = keccak256("UNIT_SETTLER_ROLE");

    /// @dev customer, closableAt, pausedAtCancel and closed share one slot (uint40 seconds last 34,000 years).
    struct Job {
        address customer;
        uint40 closableAt; // 0 until the customer cancels; then the cancel's time + cancelGrace (before any pause)
        uint40 pausedAtCancel; // pausedSeconds() at the cancel: later paused time pushes closableAt back
        bool closed;
        uint256 funded;
        uint256 released;
    }

    IERC20 public immutable token;
    IPayoutPool public immutable distributor;
    uint32 public cancelGrace;

    mapping(bytes32 jobId => Job) private _jobs;
    mapping(bytes32 jobId => mapping(bytes32 unitId => bool)) private _unitReleased;
    mapping(bytes32 jobId => mapping(bytes32 batchId => bool)) private _batchReleased;
    mapping(address account => uint256) private _claimable;
    uint256 private _totalClaimable;

    event JobFunded(bytes32 indexed jobId, address indexed customer, uint256 amount, uint256 totalFunded);
    event UnitReleased(bytes32 indexed jobId, bytes32 indexed unitId, address indexed provider, uint256 amount);
    event BatchReleased(bytes32 indexed jobId, bytes32 indexed batchId, uint256 amount);
    event JobCancelled(bytes32 indexed jobId, uint256 closableAt);
    event JobClosed(bytes32 indexed jobId, uint256 refund);
    event Claimed(address indexed account, uint256 amount);
    event CancelGraceSet(uint32 grace);

    error EscrowZeroAmount();
    error EscrowZeroAddress();
    error EscrowUnknownJob(bytes32 jobId);
    error EscrowNotCustomer(bytes32 jobId, address caller, address customer);
    error EscrowJobIdNotYours(bytes32 jobId, address caller);
    error EscrowJobClosed(bytes32 jobId);
    error EscrowJobCancelled(bytes32 jobId, uint256 closableAt);
    error EscrowUnitAlreadyReleased(bytes32 jobId, bytes32 unitId);
    error EscrowInsufficientFunds(bytes32 jobId, uint256 available, uint256 need);
    error EscrowNotAuthorized(bytes32 jobId, address caller);
    error EscrowCancelPending(bytes32 jobId, uint256 closableAt);
    error EscrowNothingToClaim(address account);

    constructor(IERC20 token_, address admin, address governor, IPayoutPool distributor_, uint32 cancelGrace_) {
        if (
            address(token_) == address(0) || admin == address(0) || governor == address(0)
                || address(distributor_) == address(0)
        ) revert EscrowZeroAddress();
        token = token_;
        distributor = distributor_;
        cancelGrace = cancelGrace_;
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
        _grantRole(GOVERNOR_ROLE, governor);
    }

    // ---------------------------------------------------------------- customers

    /// @notice Add `amount` GMT to `jobId` (needs a prior `approve`). The caller must be the job's customer: the
    /// address in the id's first 20 bytes (EscrowJobIdNotYours for a new job, EscrowNotCustomer for a funded one).
    function fund(bytes32 jobId, uint256 amount) external whenNotPaused nonReentrant {
        _fund(jobId, msg.sender, amount);
    }

    /// @notice `fund` with an EIP-2612 permit instead of a separate `approve` transaction.
    /// @dev The permit is tried and its failure ignored: anyone can front-run a permit seen in the mempool, which would
    /// otherwise make this call revert although the allowance is in place. `safeTransferFrom` still enforces the allowance.
    function fundWithPermit(bytes32 jobId, uint256 amount, uint256 deadline, uint8 v, bytes32 r, bytes32 s)
        external
        whenNotPaused
        nonReentrant
    {
        try IERC20Permit(address(token)).permit(msg.sender, address(this), amount, deadline, v, r, s) {} catch {}
        _fund(jobId, msg.sender, amount);
    }

    /// @notice Customer: stop the job. Units verified within `cancelGrace` seconds are still paid (release and
    /// releaseToPool work until `closableAt`); from `closableAt` on they revert with EscrowJobCancelled, and the
    /// customer may `close` and take the refund. Seconds the escrow spends paused from now on push `closableAt`
    /// back (`getJob` reports the deadline in force).
    function cancel(bytes32 jobId) external whenNotPaused {
        Job storage job = _jobs[jobId];
        address customer = job.customer;
        if (customer == address(0)) revert EscrowUnknownJob(jobId);
        if (msg.sender != customer) revert EscrowNotCustomer(jobId, msg.sender, customer);
        if (job.closed) revert EscrowJobClosed(jobId);
        if (job.closableAt != 0) revert EscrowJobCancelled(jobId, _closableAt(job));
        uint256 closableAt = block.timestamp + cancelGrace;
        job.closableAt = SafeCast.toUint40(closableAt);
        job.pausedAtCancel = _pausedSecondsNow();
        emit JobCancelled(jobId, closableAt);
    }

    /// @notice Close `jobId` and refund what was not released to its customer. A settler may close at any time
    /// (the job ended); the customer only after `cancel` plus `cancelGrace` (plus any time paused since the cancel).
    function close(bytes32 jobId) external whenNotPaused nonReentrant {
        Job storage job = _jobs[jobId];
        address customer = job.customer;
        bool settler = hasRole(SETTLER_ROLE, msg.sender);
        if (msg.sender != customer && !settler) revert EscrowNotAuthorized(jobId, msg.sender);
        if (customer == address(0)) revert EscrowUnknownJob(jobId);
        if (job.closed) revert EscrowJobClosed(jobId);
        if (!settler) {
            uint256 closableAt = _closableAt(job);
            if (closableAt == 0 || block.timestamp < closableAt) revert EscrowCancelPending(jobId, closableAt);
        }

        uint256 refund = job.funded - job.released;
        job.closed = true;
        emit JobClosed(jobId, refund);
        if (refund > 0) token.safeTransfer(customer, refund);
    }

    // ---------------------------------------------------------------- settler

    /// @notice Pay `amount` from `jobId` to `provider` for verified unit `unitId`; each unit pays at most once.
    /// Refused once a cancelled job's grace is over (EscrowJobCancelled(jobId, closableAt)).
    function release(bytes32 jobId, bytes32 unitId, address provider, uint256 amount)
        external
        onlyRole(UNIT_SETTLER_ROLE)
        whenNotPaused
    {
        if (provider == address(0)) revert EscrowZeroAddress();
        if (_unitReleased[jobId][unitId]) revert EscrowUnitAlreadyReleased(jobId, unitId);
        _debit(jobId, amount);
        _unitReleased[jobId][unitId] = true;
        _claimable[provider] += amount;
        _totalClaimable += amount;
        emit UnitReleased(jobId, unitId, provider, amount);
    }

    /// @notice Move `amount` of `jobId`'s escrow, the pay of the verified units in batch `batchId`, to the epoch
    /// settlement pool; each batch moves at most once. The ledger's next root credits the providers.
    /// Refused once a cancelled job's grace is over (EscrowJobCancelled(jobId, closableAt)).
    function releaseToPool(bytes32 jobId, bytes32 batchId, uint256 amount)
        external
        onlyRole(SETTLER_ROLE)
        whenNotPaused
        nonReentrant
    {
        if (_batchReleased[jobId][batchId]) revert EscrowUnitAlreadyReleased(jobId, batchId);
        _debit(jobId, amount);
        _batchReleased[jobId][batchId] = true;
        emit BatchReleased(jobId, batchId, amount);
        token.forceApprove(address(distributor), amount);
        distributor.deposit(amount);
    }

    // ---------------------------------------------------------------- providers

    /// @notice Withdraw everything released to the caller on the per-unit path.
    function claim() external whenNotPaused nonReentrant returns (uint256 amount) {
        amount = _claimable[msg.sender];
        if (amount == 0) revert EscrowNothingToClaim(msg.sender);
        _claimable[msg.sender] = 0;
        // unchecked: _totalClaimable is the sum of every _claimable.
        unchecked {
            _totalClaimable -= amount;
        }
        emit Claimed(msg.sender, amount);
        token.safeTransfer(msg.sender, amount);
    }

    // ---------------------------------------------------------------- governance

    /// @notice Kill switch: blocks fund, cancel, release, close and claim. Unpause goes through the timelock.
    /// The time paused does not count against any cancel's grace (see `pausedSeconds`).
    function pause() external onlyRole(GUARDIAN_ROLE) {
        _pause();
    }

    function unpause() external onlyRole(GOVERNOR_ROLE) {
        _unpause();
    }

    function setCancelGrace(uint32 grace) external onlyRole(GOVERNOR_ROLE) {
        cancelGrace = grace;
        emit CancelGraceSet(grace);
    }

    // ---------------------------------------------------------------- views

    /// @notice `closableAt` is the deadline in force: 0 if not cancelled, else the cancel's time + the grace then +
    /// every second the escrow has been paused since the cancel (while paused, it moves on with the clock).
    function getJob(bytes32 jobId)
        external
        view
        returns (address customer, uint256 funded, uint256 released, bool closed, uint256 closableAt)
    {
        Job storage job = _jobs[jobId];
        return (job.customer, job.funded, job.released, job.closed, _closableAt(job));
    }

    function claimable(address account) external view returns (uint256) {
        return _claimable[account];
    }

    function totalClaimable() external view returns (uint256) {
        return _totalClaimable;
    }

    function unitReleased(bytes32 jobId, bytes32 unitId) external view returns (bool) {
        return _unitReleased[jobId][unitId];
    }

    function batchReleased(bytes32 jobId, bytes32 batchId) external view returns (bool) {
        return _batchReleased[jobId][batchId];
    }

    // ---------------------------------------------------------------- internals

    function _fund(bytes32 jobId, address funder, uint256 amount) private {
        if (amount == 0) revert EscrowZeroAmount();
        Job storage job = _jobs[jobId];
        if (job.closed) revert EscrowJobClosed(jobId);
        if (job.closableAt != 0) revert EscrowJobCancelled(jobId, _closableAt(job));
        address customer = job.customer;
        if (customer == address(0)) {
            // The id names its customer, so copying it from a pending fundWithPermit and funding first squats nothing.
            if (address(bytes20(jobId)) != funder) revert EscrowJobIdNotYours(jobId, funder);
            job.customer = funder;
        } else if (customer != funder) {
            revert EscrowNotCustomer(jobId, funder, customer);
        }
        uint256 total = job.funded + amount;
        job.funded = total;
        emit JobFunded(jobId, funder, amount, total);
        token.safeTransferFrom(funder, address(this), amount);
    }

    /// @dev A cancelled job's deadline in force (0 if not cancelled): its nominal `closableAt` plus the seconds paused
    /// since the cancel (PauseClock). Pauses after the deadline passed push it back by no more than they last, so a
    /// job past its deadline stays past it.
    function _closableAt(Job storage job) private view returns (uint256) {
        return _deadlineInForce(job.closableAt, job.pausedAtCancel);
    }

    /// @dev Checks that `jobId` is open, not past a cancel's grace, and holds `amount`; records it as released.
    /// The grace check keeps the settler from draining a cancelled job between `closableAt` and the customer's
    /// `close`: from `closableAt` on, the rest belongs to the customer.
    function _debit(bytes32 jobId, uint256 amount) private {
        if (amount == 0) revert EscrowZeroAmount();
        Job storage job = _jobs[jobId];
        if (job.closed) revert EscrowJobClosed(jobId);
        uint256 closableAt = _closableAt(job);
        if (closableAt != 0 && block.timestamp >= closableAt) revert EscrowJobCancelled(jobId, closableAt);
        uint256 released = job.released;
        uint256 available = job.funded - released;
        if (amount > available) revert EscrowInsufficientFunds(jobId, available, amount);
        job.released = released + amount;
    }
}
