// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";
import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {IERC20Permit} from "@openzeppelin/contracts/token/ERC20/extensions/IERC20Permit.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {Pausable} from "@openzeppelin/contracts/utils/Pausable.sol";
import {ReentrancyGuard} from "@openzeppelin/contracts/utils/ReentrancyGuard.sol";

/// @title JobEscrow
/// @notice Holds a customer's GMT for a training job and releases it per verified work unit.
/// Each (jobId, unitId) pays out at most once, so the settler can retry a release safely. Released funds are
/// credited to the provider and withdrawn with `claim` (pull payment). Closing a job refunds what was not released.
/// @dev Invariant: token.balanceOf(this) == sum over open jobs of (funded - released) + sum of claimable.
contract JobEscrow is AccessControl, Pausable, ReentrancyGuard {
    using SafeERC20 for IERC20;

    bytes32 public constant GUARDIAN_ROLE = keccak256("GUARDIAN_ROLE");
    bytes32 public constant SETTLER_ROLE = keccak256("SETTLER_ROLE");

    struct Job {
        address customer;
        uint256 funded;
        uint256 released;
        bool closed;
    }

    IERC20 public immutable token;

    mapping(bytes32 jobId => Job) private _jobs;
    mapping(bytes32 jobId => mapping(bytes32 unitId => bool)) private _unitReleased;
    mapping(address account => uint256) private _claimable;

    event JobFunded(bytes32 indexed jobId, address indexed customer, uint256 amount, uint256 totalFunded);
    event UnitReleased(bytes32 indexed jobId, bytes32 indexed unitId, address indexed provider, uint256 amount);
    event JobClosed(bytes32 indexed jobId, uint256 refund);
    event Claimed(address indexed account, uint256 amount);

    error EscrowZeroAmount();
    error EscrowZeroAddress();
    error EscrowUnknownJob(bytes32 jobId);
    error EscrowNotCustomer(bytes32 jobId, address caller, address customer);
    error EscrowJobClosed(bytes32 jobId);
    error EscrowUnitAlreadyReleased(bytes32 jobId, bytes32 unitId);
    error EscrowInsufficientFunds(bytes32 jobId, uint256 available, uint256 need);
    error EscrowNotAuthorized(bytes32 jobId, address caller);
    error EscrowNothingToClaim(address account);

    constructor(IERC20 token_, address admin) {
        if (address(token_) == address(0) || admin == address(0)) revert EscrowZeroAddress();
        token = token_;
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
    }

    /// @notice Add `amount` GMT to `jobId` (needs a prior `approve`). The first funder becomes the job's customer.
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

    /// @notice Pay `amount` from `jobId` to `provider` for verified unit `unitId`; each unit pays at most once.
    function release(bytes32 jobId, bytes32 unitId, address provider, uint256 amount)
        external
        onlyRole(SETTLER_ROLE)
        whenNotPaused
    {
        if (amount == 0) revert EscrowZeroAmount();
        if (provider == address(0)) revert EscrowZeroAddress();
        if (_unitReleased[jobId][unitId]) revert EscrowUnitAlreadyReleased(jobId, unitId);
        Job storage job = _jobs[jobId];
        if (job.closed) revert EscrowJobClosed(jobId);
        uint256 available = job.funded - job.released;
        if (amount > available) revert EscrowInsufficientFunds(jobId, available, amount);

        _unitReleased[jobId][unitId] = true;
        job.released += amount;
        _claimable[provider] += amount;
        emit UnitReleased(jobId, unitId, provider, amount);
    }

    /// @notice Close `jobId` and refund what was not released to its customer. Callable by the customer or a settler.
    function close(bytes32 jobId) external whenNotPaused nonReentrant {
        Job storage job = _jobs[jobId];
        address customer = job.customer;
        if (msg.sender != customer && !hasRole(SETTLER_ROLE, msg.sender)) revert EscrowNotAuthorized(jobId, msg.sender);
        if (customer == address(0)) revert EscrowUnknownJob(jobId);
        if (job.closed) revert EscrowJobClosed(jobId);

        uint256 refund = job.funded - job.released;
        job.closed = true;
        emit JobClosed(jobId, refund);
        if (refund > 0) token.safeTransfer(customer, refund);
    }

    /// @notice Withdraw everything released to the caller.
    function claim() external whenNotPaused nonReentrant returns (uint256 amount) {
        amount = _claimable[msg.sender];
        if (amount == 0) revert EscrowNothingToClaim(msg.sender);
        _claimable[msg.sender] = 0;
        emit Claimed(msg.sender, amount);
        token.safeTransfer(msg.sender, amount);
    }

    /// @notice Guardian kill switch: blocks fund, release, close and claim.
    function pause() external onlyRole(GUARDIAN_ROLE) {
        _pause();
    }

    function unpause() external onlyRole(GUARDIAN_ROLE) {
        _unpause();
    }

    function getJob(bytes32 jobId)
        external
        view
        returns (address customer, uint256 funded, uint256 released, bool closed)
    {
        Job storage job = _jobs[jobId];
        return (job.customer, job.funded, job.released, job.closed);
    }

    function claimable(address account) external view returns (uint256) {
        return _claimable[account];
    }

    function unitReleased(bytes32 jobId, bytes32 unitId) external view returns (bool) {
        return _unitReleased[jobId][unitId];
    }

    function _fund(bytes32 jobId, address funder, uint256 amount) private {
        if (amount == 0) revert EscrowZeroAmount();
        Job storage job = _jobs[jobId];
        if (job.closed) revert EscrowJobClosed(jobId);
        address customer = job.customer;
        if (customer == address(0)) {
            job.customer = funder;
        } else if (customer != funder) {
            revert EscrowNotCustomer(jobId, funder, customer);
        }
        uint256 total = job.funded + amount;
        job.funded = total;
        emit JobFunded(jobId, funder, amount, total);
        token.safeTransferFrom(funder, address(this), amount);
    }
}
