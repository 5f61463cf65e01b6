// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {TimelockController} from "@openzeppelin/contracts/governance/TimelockController.sol";

/// @title GridTimelock
/// @notice OpenZeppelin's TimelockController, unchanged; it holds GOVERNOR_ROLE on every GridMint contract, so
/// parameter changes and unpausing wait `getMinDelay()` seconds in public view. (This file only gives Hardhat an
/// artifact to deploy.)
contract GridTimelock is TimelockController {
    constructor(uint256 minDelay, address[] memory proposers, address[] memory executors, address admin)
        TimelockController(minDelay, proposers, executors, admin)
    {}
}
