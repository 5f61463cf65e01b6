// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {Pausable} from "@openzeppelin/contracts/utils/Pausable.sol";
import {SafeCast} from "@openzeppelin/contracts/utils/math/SafeCast.sol";

/// @title PauseClock
/// @notice OpenZeppelin's Pausable that also counts the seconds spent paused, so that a deadline can leave them out.
/// The kill switch blocks the calls a deadline protects (a settler's release, a referee's slash), and the unpause
/// waits for the timelock, scheduled in public: a deadline that ran on through a pause would expire while nobody
/// could act on it, and whoever it protected against would move first in the block the pause ends.
/// A contract stores, next to a deadline, `pausedSeconds()` at the moment it set it, and reads the deadline in force
/// with `_deadlineInForce`: pushed back by every second paused since.
abstract contract PauseClock is Pausable {
    // Seconds spent paused before the current pause, and when the current pause began (meaningful only while
    // paused). uint40 seconds last 34,000 years; both pack with Pausable's flag.
    uint40 private _pausedTotal;
    uint40 private _pausedSince;

    /// @notice Seconds this contract has spent paused since it was deployed, the current pause included.
    function pausedSeconds() public view returns (uint256) {
        uint256 total = _pausedTotal;
        if (paused()) total += block.timestamp - _pausedSince;
        return total;
    }

    /// @dev `pausedSeconds()` in the width a deadline stores it in, next to the deadline.
    function _pausedSecondsNow() internal view returns (uint40) {
        return SafeCast.toUint40(pausedSeconds());
    }

    /// @dev The deadline in force for a `nominal` deadline set when `pausedSeconds()` was `pausedAtSet`: pushed back by
    /// every second paused since (while paused, it moves on with the clock). 0 (no deadline) stays 0. A pause that
    /// begins after the deadline passed pushes it back by no more than the pause lasts, so a deadline that had passed
    /// before a pause has passed again the moment the pause ends.
    function _deadlineInForce(uint256 nominal, uint256 pausedAtSet) internal view returns (uint256) {
        if (nominal == 0) return 0;
        // pausedSeconds() never decreases and was pausedAtSet when the deadline was set: no underflow.
        return nominal + pausedSeconds() - pausedAtSet;
    }

    /// @dev A pause starts the clock ...
    function _pause() internal virtual override {
        super._pause();
        _pausedSince = SafeCast.toUint40(block.timestamp);
    }

    /// @dev ... and an unpause adds the pause's length to the total.
    function _unpause() internal virtual override {
        super._unpause();
        _pausedTotal = SafeCast.toUint40(_pausedTotal + (block.timestamp - _pausedSince));
    }
}
