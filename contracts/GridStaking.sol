// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";
import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {Pausable} from "@openzeppelin/contracts/utils/Pausable.sol";
import {ReentrancyGuard} from "@openzeppelin/contracts/utils/ReentrancyGuard.sol";

/// @title GridStaking
/// @notice Providers bond GMT as collateral; a SLASHER (the verifier pipeline) slashes it on proven misbehaviour.
/// Each piece of evidence can be used once, which makes slashing exactly-once even when the off-chain side retries.
/// A slash pays `bountyBps` of the slashed amount to the verifier that found the fault and the rest to the treasury.
/// @dev Unstaking is immediate for now; an unbonding period is a planned follow-up.
contract GridStaking is AccessControl, Pausable, ReentrancyGuard {
    using SafeERC20 for IERC20;

    bytes32 public constant GUARDIAN_ROLE = keccak256("GUARDIAN_ROLE");
    bytes32 public constant SLASHER_ROLE = keccak256("SLASHER_ROLE");
    uint16 public constant MAX_BPS = 10_000;

    IERC20 public immutable token;
    address public immutable treasury;
    uint16 public immutable bountyBps;

    mapping(address provider => uint256) private _stakes;
    mapping(bytes32 evidence => bool) private _evidenceUsed;
    uint256 private _totalStaked;

    event Staked(address indexed provider, uint256 amount, uint256 newTotal);
    event Unstaked(address indexed provider, uint256 amount, uint256 newTotal);
    event Slashed(
        address indexed provider, address indexed verifier, bytes32 indexed evidence, uint256 slashed, uint256 bounty
    );

    error StakingZeroAmount();
    error StakingZeroAddress();
    error StakingInvalidBps(uint16 bps);
    error StakingInsufficientStake(address provider, uint256 have, uint256 need);
    error StakingNothingToSlash(address provider);
    error StakingEvidenceUsed(bytes32 evidence);

    constructor(IERC20 token_, address admin, address treasury_, uint16 bountyBps_) {
        if (address(token_) == address(0) || admin == address(0) || treasury_ == address(0)) {
            revert StakingZeroAddress();
        }
        if (bountyBps_ > MAX_BPS) revert StakingInvalidBps(bountyBps_);
        token = token_;
        treasury = treasury_;
        bountyBps = bountyBps_;
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
    }

    /// @notice Bond `amount` GMT from the caller (needs a prior `approve`).
    function stake(uint256 amount) external whenNotPaused nonReentrant {
        if (amount == 0) revert StakingZeroAmount();
        uint256 newTotal = _stakes[msg.sender] + amount;
        _stakes[msg.sender] = newTotal;
        _totalStaked += amount;
        emit Staked(msg.sender, amount, newTotal);
        token.safeTransferFrom(msg.sender, address(this), amount);
    }

    /// @notice Withdraw `amount` of the caller's own stake.
    function unstake(uint256 amount) external whenNotPaused nonReentrant {
        if (amount == 0) revert StakingZeroAmount();
        uint256 have = _stakes[msg.sender];
        if (amount > have) revert StakingInsufficientStake(msg.sender, have, amount);
        uint256 newTotal;
        // unchecked: amount <= have was checked above, and _totalStaked >= have (it is the sum of all stakes).
        unchecked {
            newTotal = have - amount;
            _totalStaked -= amount;
        }
        _stakes[msg.sender] = newTotal;
        emit Unstaked(msg.sender, amount, newTotal);
        token.safeTransfer(msg.sender, amount);
    }

    /// @notice Slash up to `amount` of `provider`'s stake for `evidence` (used at most once).
    /// @dev Slashes min(amount, stake). bounty = slashed * bountyBps / 10_000 (rounded down) goes to `verifier`,
    /// the remainder to the treasury, so bounty + treasury share == slashed exactly.
    function slash(address provider, uint256 amount, address verifier, bytes32 evidence)
        external
        onlyRole(SLASHER_ROLE)
        whenNotPaused
        nonReentrant
    {
        if (amount == 0) revert StakingZeroAmount();
        if (verifier == address(0)) revert StakingZeroAddress();
        if (_evidenceUsed[evidence]) revert StakingEvidenceUsed(evidence);
        uint256 have = _stakes[provider];
        if (have == 0) revert StakingNothingToSlash(provider);

        uint256 slashed = amount < have ? amount : have;
        uint256 bounty = (slashed * bountyBps) / MAX_BPS;
        _evidenceUsed[evidence] = true;
        // unchecked: slashed <= have <= _totalStaked, and bounty <= slashed because bountyBps <= MAX_BPS.
        unchecked {
            _stakes[provider] = have - slashed;
            _totalStaked -= slashed;
        }
        emit Slashed(provider, verifier, evidence, slashed, bounty);

        if (bounty > 0) token.safeTransfer(verifier, bounty);
        unchecked {
            if (slashed - bounty > 0) token.safeTransfer(treasury, slashed - bounty);
        }
    }

    /// @notice Guardian kill switch: blocks stake, unstake and slash.
    function pause() external onlyRole(GUARDIAN_ROLE) {
        _pause();
    }

    function unpause() external onlyRole(GUARDIAN_ROLE) {
        _unpause();
    }

    function stakeOf(address provider) external view returns (uint256) {
        return _stakes[provider];
    }

    function totalStaked() external view returns (uint256) {
        return _totalStaked;
    }

    function evidenceUsed(bytes32 evidence) external view returns (bool) {
        return _evidenceUsed[evidence];
    }
}
