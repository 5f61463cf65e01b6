// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";

/// @notice What the kill switch needs from each GridMint contract (OpenZeppelin Pausable + a guardian `pause`).
interface IGuardianPausable {
    function pause() external;
    function paused() external view returns (bool);
}

/// @title GridKillSwitch
/// @notice One transaction pauses every GridMint flow at once: new jobs, releases, claims, staking and unbonding.
/// It holds GUARDIAN_ROLE on each target; people hold GUARDIAN_ROLE here. It cannot unpause: that needs
/// GOVERNOR_ROLE on each target, which only the TimelockController has, so a compromised guardian can stop the
/// system but never move money or restart it.
contract GridKillSwitch is AccessControl {
    bytes32 public constant GUARDIAN_ROLE = keccak256("GUARDIAN_ROLE");

    IGuardianPausable[] private _targets;

    event AllPaused(address indexed guardian, uint256 newlyPaused);

    error KillSwitchZeroAddress();

    constructor(address admin, IGuardianPausable[] memory targets_) {
        if (admin == address(0)) revert KillSwitchZeroAddress();
        for (uint256 i = 0; i < targets_.length; ++i) {
            if (address(targets_[i]) == address(0)) revert KillSwitchZeroAddress();
            _targets.push(targets_[i]);
        }
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
    }

    /// @notice Pause every target that is not paused yet (idempotent).
    function pauseAll() external onlyRole(GUARDIAN_ROLE) {
        uint256 newlyPaused;
        uint256 n = _targets.length;
        for (uint256 i = 0; i < n; ++i) {
            IGuardianPausable target = _targets[i];
            if (!target.paused()) {
                target.pause();
                ++newlyPaused;
            }
        }
        emit AllPaused(msg.sender, newlyPaused);
    }

    /// @notice True only if every target is paused.
    function allPaused() external view returns (bool) {
        uint256 n = _targets.length;
        for (uint256 i = 0; i < n; ++i) {
            if (!_targets[i].paused()) return false;
        }
        return true;
    }

    function targets() external view returns (IGuardianPausable[] memory) {
        return _targets;
    }
}
