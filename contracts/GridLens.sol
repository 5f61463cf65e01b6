// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {GridStaking} from "./GridStaking.sol";
import {JobEscrow} from "./JobEscrow.sol";
import {PayoutDistributor} from "./PayoutDistributor.sol";

/// @title GridLens
/// @notice Read-only: one `eth_call` returns a dashboard's worth of GridMint state — contract totals, and per account
/// and per job everything the other contracts hold about them. Monitors, the marketplace and the invariant
/// campaign (`ledger/campaign.py`) use it to read consistent state in one round trip. It holds nothing and needs
/// no role; deploy it anywhere, any time.
contract GridLens {
    uint256 public constant SYSTEM_FIELDS = 12;
    uint256 public constant ACCOUNT_FIELDS = 9;
    uint256 public constant JOB_FIELDS = 4;

    /// @notice Everything in one flat array (cheap to build and to decode):
    /// - 12 system fields: totalSupply, token balances of staking / escrow / distributor, totalStaked,
    ///   totalClaimable, totalDeposited, latestEpoch, latestClaimableAt, paused flags of staking / escrow / distributor;
    /// - 9 per account: token balance, staked, locked, bonded, unbonding, unbondingReadyAt (the deadline in force, as
    ///   GridStaking.accountOf says), openDisputes, escrow claimable, payout claimed;
    /// - 4 per job: funded, released, closed (0/1), closableAt (the deadline in force, as JobEscrow.getJob says).
    function read(
        IERC20 token,
        GridStaking staking,
        JobEscrow escrow,
        PayoutDistributor distributor,
        address[] calldata accounts,
        bytes32[] calldata jobIds
    ) external view returns (uint256[] memory out) {
        out = new uint256[](SYSTEM_FIELDS + ACCOUNT_FIELDS * accounts.length + JOB_FIELDS * jobIds.length);
        out[0] = token.totalSupply();
        out[1] = token.balanceOf(address(staking));
        out[2] = token.balanceOf(address(escrow));
        out[3] = token.balanceOf(address(distributor));
        out[4] = staking.totalStaked();
        out[5] = escrow.totalClaimable();
        out[6] = distributor.totalDeposited();
        out[7] = distributor.latestEpoch();
        out[8] = distributor.latestClaimableAt();
        out[9] = staking.paused() ? 1 : 0;
        out[10] = escrow.paused() ? 1 : 0;
        out[11] = distributor.paused() ? 1 : 0;
        uint256 k = SYSTEM_FIELDS;
        for (uint256 i = 0; i < accounts.length; ++i) {
            address a = accounts[i];
            GridStaking.StakeAccount memory s = staking.accountOf(a);
            out[k] = token.balanceOf(a);
            out[k + 1] = s.staked;
            out[k + 2] = s.locked;
            out[k + 3] = s.bonded;
            out[k + 4] = s.unbonding;
            out[k + 5] = s.unbondingReadyAt;
            out[k + 6] = s.openDisputes;
            out[k + 7] = escrow.claimable(a);
            out[k + 8] = distributor.claimed(a);
            k += ACCOUNT_FIELDS;
        }
        for (uint256 i = 0; i < jobIds.length; ++i) {
            (, uint256 funded, uint256 released, bool closed, uint256 closableAt) = escrow.getJob(jobIds[i]);
            out[k] = funded;
            out[k + 1] = released;
            out[k + 2] = closed ? 1 : 0;
            out[k + 3] = closableAt;
            k += JOB_FIELDS;
        }
    }
}
