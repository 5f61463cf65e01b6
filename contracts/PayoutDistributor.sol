// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";
import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {MerkleProof} from "@openzeppelin/contracts/utils/cryptography/MerkleProof.sol";
import {SafeCast} from "@openzeppelin/contracts/utils/math/SafeCast.sol";
import {Pausable} from "@openzeppelin/contracts/utils/Pausable.sol";
import {ReentrancyGuardTransient} from "@openzeppelin/contracts/utils/ReentrancyGuardTransient.sol";

/// @title PayoutDistributor
/// @notice Epoch settlement. Once per epoch the ledger posts ONE Merkle root over every account's *cumulative*
/// earnings; an account claims with a proof and is paid `cumulative - claimedSoFar`. Because leaves are cumulative,
/// one claim pays everything owed up to that root: a provider who waits ten epochs pays claim gas once.
/// A root becomes claimable `disputeWindow` seconds after it is posted; inside the window a guardian can void it.
/// The time it becomes claimable is fixed when it is posted: a later `setDisputeWindow` applies to later roots only.
/// Funds come in through `deposit` (JobEscrow.releaseToPool); a root may not promise more than was deposited.
/// Payouts are pulled (`claim`, `claimFor`) or pushed by an operator for many accounts at once (`claimMany`).
/// @dev Leaf = keccak256(abi.encodePacked(account, cumulative)): 52 bytes, so a leaf preimage can never be read as an
/// inner node (64 bytes). Inner nodes hash the sorted pair (OpenZeppelin MerkleProof); `ledger/payout_tree.py` builds
/// the same tree. Storage is laid out for a cheap claim: the epoch bookkeeping below packs into Pausable's slot, so a
/// claim reads the pause flag, latest epoch and its claimable time with one cold SLOAD, plus the root and the
/// account's claimed-so-far.
contract PayoutDistributor is AccessControl, Pausable, ReentrancyGuardTransient {
    using SafeERC20 for IERC20;

    bytes32 public constant GUARDIAN_ROLE = keccak256("GUARDIAN_ROLE");
    bytes32 public constant GOVERNOR_ROLE = keccak256("GOVERNOR_ROLE");
    bytes32 public constant POSTER_ROLE = keccak256("POSTER_ROLE");

    // Declared first so the compiler packs them after Pausable's `bool _paused` in the same slot (see @dev).
    uint32 private _latestEpoch;
    /// @dev When the latest root becomes claimable (post time + the window at post time); 0 before the first root
    /// and after a void (the previous root was already claimable).
    uint40 private _latestClaimableAt;
    uint32 private _disputeWindow;

    IERC20 public immutable token;

    mapping(uint256 epoch => bytes32 root) private _roots;
    mapping(address account => uint256 cumulative) private _claimed;
    uint256 private _totalDeposited;

    event Deposited(address indexed from, uint256 amount, uint256 totalDeposited);
    event RootPosted(uint256 indexed epoch, bytes32 root, uint256 total, uint256 claimableAt);
    event RootVoided(uint256 indexed epoch, bytes32 root, address indexed guardian);
    event Claimed(address indexed account, uint256 indexed epoch, uint256 amount, uint256 cumulative);
    event DisputeWindowSet(uint256 window);

    error SettlementZeroAddress();
    error SettlementZeroAmount();
    error SettlementZeroRoot();
    error SettlementWrongEpoch(uint256 epoch, uint256 expected);
    error SettlementUnknownEpoch(uint256 epoch, uint256 latest);
    error SettlementRootInDispute(uint256 epoch, uint256 claimableAt);
    error SettlementNotVoidable(uint256 epoch, uint256 latest, uint256 claimableAt);
    error SettlementUnderfunded(uint256 epoch, uint256 total, uint256 deposited);
    error SettlementInvalidProof(address account, uint256 epoch, uint256 cumulative);
    error SettlementNothingToClaim(address account, uint256 cumulative, uint256 claimed);
    error SettlementLengthMismatch(uint256 accounts, uint256 cumulatives, uint256 proofs);

    /// @param disputeWindow_ seconds between posting a root and it becoming claimable
    constructor(IERC20 token_, address admin, address governor, uint32 disputeWindow_) {
        if (address(token_) == address(0) || admin == address(0) || governor == address(0)) {
            revert SettlementZeroAddress();
        }
        token = token_;
        _disputeWindow = disputeWindow_;
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
        _grantRole(GOVERNOR_ROLE, governor);
    }

    // ---------------------------------------------------------------- money in

    /// @notice Add `amount` GMT (needs a prior `approve`) to the pool that roots pay out of.
    /// @dev Open while paused: a pause stops money *out* (roots, claims). Deposits only add to the pool, and
    /// JobEscrow.releaseToPool pays verified work through here: blocked, a cancelled job's grace (which counts only
    /// the escrow's own paused time) could run out while the distributor alone was paused, and the providers' pay
    /// would go back to the customer.
    function deposit(uint256 amount) external nonReentrant {
        if (amount == 0) revert SettlementZeroAmount();
        uint256 total = _totalDeposited + amount;
        _totalDeposited = total;
        emit Deposited(msg.sender, amount, total);
        token.safeTransferFrom(msg.sender, address(this), amount);
    }

    // ---------------------------------------------------------------- roots

    /// @notice Post the root of epoch `epoch` (exactly latest + 1) over cumulative earnings summing to `total`.
    /// @dev Needs the previous root out of its dispute window, so at most one root is ever voidable, and
    /// `total <= totalDeposited` (a root can never promise more than the pool received).
    function postRoot(uint256 epoch, bytes32 root, uint256 total) external onlyRole(POSTER_ROLE) whenNotPaused {
        uint256 latest = _latestEpoch;
        if (epoch != latest + 1) revert SettlementWrongEpoch(epoch, latest + 1);
        uint256 previousClaimableAt = _latestClaimableAt;
        if (block.timestamp < previousClaimableAt) revert SettlementRootInDispute(latest, previousClaimableAt);
        if (root == bytes32(0)) revert SettlementZeroRoot();
        uint256 deposited = _totalDeposited;
        if (total > deposited) revert SettlementUnderfunded(epoch, total, deposited);

        uint256 claimableAt = block.timestamp + _disputeWindow;
        _roots[epoch] = root;
        _latestEpoch = SafeCast.toUint32(epoch);
        // Plain cast: block.timestamp + a uint32 window stays below 2^40 until the year 36,000 or so (SafeCast here
        // measured +342 gas on every post).
        _latestClaimableAt = uint40(claimableAt);
        emit RootPosted(epoch, root, total, claimableAt);
    }

    /// @notice Guardian veto: void the latest root while it is still inside its dispute window.
    /// The previous root (already past its window) becomes the latest again; the poster re-posts `epoch` corrected.
    function voidRoot(uint256 epoch) external onlyRole(GUARDIAN_ROLE) {
        uint256 latest = _latestEpoch;
        uint256 claimableAt = _latestClaimableAt;
        if (epoch != latest || epoch == 0 || block.timestamp >= claimableAt) {
            revert SettlementNotVoidable(epoch, latest, claimableAt);
        }
        bytes32 root = _roots[epoch];
        delete _roots[epoch];
        // unchecked: epoch == latest >= 1 was checked above.
        unchecked {
            _latestEpoch = uint32(epoch - 1);
        }
        // The previous root was past its window when this one was posted; 0 keeps it claimable.
        _latestClaimableAt = 0;
        emit RootVoided(epoch, root, msg.sender);
    }

    // ---------------------------------------------------------------- money out

    /// @notice Claim everything owed to the caller up to `epoch`'s root: pays `cumulative - claimed(caller)`.
    /// @param cumulative the caller's cumulative earnings in that root's leaf
    /// @param proof sibling hashes from the leaf to the root
    function claim(uint256 epoch, uint256 cumulative, bytes32[] calldata proof)
        external
        whenNotPaused
        nonReentrant
        returns (uint256)
    {
        return _claim(msg.sender, epoch, cumulative, proof);
    }

    /// @notice `claim` on behalf of `account` (the money still goes to `account`), e.g. an operator batching claims.
    function claimFor(address account, uint256 epoch, uint256 cumulative, bytes32[] calldata proof)
        external
        whenNotPaused
        nonReentrant
        returns (uint256)
    {
        return _claim(account, epoch, cumulative, proof);
    }

    /// @notice Push payouts: pay each `accounts[i]` (to itself, as `claimFor`) everything owed up to `epoch`'s root,
    /// whose leaf for it says `cumulatives[i]` with sibling hashes `proofs[i]`. Anyone may call it: this is how an
    /// operator pays every provider each epoch, one transaction per batch.
    /// An entry with nothing new (`cumulatives[i] <= claimed(accounts[i])`: the account claimed meanwhile, or is
    /// listed twice) is skipped, not reverted, so one stale entry cannot sink a batch; its proof is not checked, as
    /// it could pay nothing. An invalid proof for an entry that would pay reverts the whole batch.
    /// @return total the sum paid (one Claimed event per account paid)
    function claimMany(
        uint256 epoch,
        address[] calldata accounts,
        uint256[] calldata cumulatives,
        bytes32[][] calldata proofs
    ) external whenNotPaused nonReentrant returns (uint256 total) {
        uint256 n = accounts.length;
        if (cumulatives.length != n || proofs.length != n) {
            revert SettlementLengthMismatch(n, cumulatives.length, proofs.length);
        }
        bytes32 root = _claimableRoot(epoch);
        for (uint256 i = 0; i < n; ++i) {
            address account = accounts[i];
            uint256 cumulative = cumulatives[i];
            uint256 prior = _claimed[account];
            if (cumulative <= prior) continue;
            if (!MerkleProof.verifyCalldata(proofs[i], root, keccak256(abi.encodePacked(account, cumulative)))) {
                revert SettlementInvalidProof(account, epoch, cumulative);
            }
            uint256 amount;
            // unchecked: cumulative > prior was checked above.
            unchecked {
                amount = cumulative - prior;
            }
            total += amount;
            _claimed[account] = cumulative;
            emit Claimed(account, epoch, amount, cumulative);
            token.safeTransfer(account, amount);
        }
    }

    // ---------------------------------------------------------------- governance

    /// @notice Kill switch: blocks deposit, postRoot and claims (claim, claimFor, claimMany). Unpause goes through
    /// the timelock.
    function pause() external onlyRole(GUARDIAN_ROLE) {
        _pause();
    }

    function unpause() external onlyRole(GOVERNOR_ROLE) {
        _unpause();
    }

    /// @notice The dispute window of roots posted from now on. A root already posted keeps the claimable time it
    /// was posted with: raising the window cannot make a claimable (maybe claimed) root voidable again, and
    /// lowering it cannot cut short the dispute of the root in its window.
    function setDisputeWindow(uint32 window) external onlyRole(GOVERNOR_ROLE) {
        _disputeWindow = window;
        emit DisputeWindowSet(window);
    }

    // ---------------------------------------------------------------- views

    function latestEpoch() external view returns (uint256) {
        return _latestEpoch;
    }

    function rootOf(uint256 epoch) external view returns (bytes32) {
        return _roots[epoch];
    }

    /// @notice When the latest root becomes (or became) claimable, as fixed when it was posted; 0 before the first
    /// root, and 0 after a void (the root that is latest again was already claimable).
    function latestClaimableAt() external view returns (uint256) {
        return _latestClaimableAt;
    }

    function disputeWindow() external view returns (uint256) {
        return _disputeWindow;
    }

    function claimed(address account) external view returns (uint256) {
        return _claimed[account];
    }

    function totalDeposited() external view returns (uint256) {
        return _totalDeposited;
    }

    // ---------------------------------------------------------------- internals

    /// @dev `epoch`'s root, checking that it exists and is past its dispute window (only the latest can be inside it).
    function _claimableRoot(uint256 epoch) private view returns (bytes32) {
        uint256 latest = _latestEpoch;
        if (epoch == 0 || epoch > latest) revert SettlementUnknownEpoch(epoch, latest);
        if (epoch == latest) {
            uint256 claimableAt = _latestClaimableAt;
            if (block.timestamp < claimableAt) revert SettlementRootInDispute(epoch, claimableAt);
        }
        return _roots[epoch];
    }

    function _claim(address account, uint256 epoch, uint256 cumulative, bytes32[] calldata proof)
        private
        returns (uint256 amount)
    {
        bytes32 root = _claimableRoot(epoch);
        bytes32 leaf = keccak256(abi.encodePacked(account, cumulative));
        if (!MerkleProof.verifyCalldata(proof, root, leaf)) {
            revert SettlementInvalidProof(account, epoch, cumulative);
        }
        uint256 prior = _claimed[account];
        if (cumulative <= prior) revert SettlementNothingToClaim(account, cumulative, prior);
        // unchecked: cumulative > prior was checked above.
        unchecked {
            amount = cumulative - prior;
        }
        _claimed[account] = cumulative;
        emit Claimed(account, epoch, amount, cumulative);
        token.safeTransfer(account, amount);
    }
}
