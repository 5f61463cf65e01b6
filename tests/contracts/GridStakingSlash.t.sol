// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {GridToken} from "../../contracts/GridToken.sol";
import {GridStaking} from "../../contracts/GridStaking.sol";

/// Hardhat 3 runs this with its built-in Solidity test runner; functions with parameters are fuzzed.
/// No forge-std (it would need a download): assertions are plain `require`s.
contract GridStakingSlashFuzzTest {
    uint256 internal constant SUPPLY = 1e27;
    address internal constant TREASURY = address(0x7EA5);
    address internal constant VERIFIER = address(0xBEEF);

    /// For any stake, unbonding part, requested amount and bounty rate: the verifier's bounty plus the treasury's
    /// share equal the slashed amount, the slash never exceeds staked + unbonding, it takes from the bonded stake
    /// first, and no token is created or lost.
    function testFuzz_SlashSplitsExactly(uint256 staked, uint256 unbond, uint256 amount, uint16 bps) public {
        staked = (staked % SUPPLY) + 1;
        unbond = unbond % (staked + 1);
        if (amount == 0) amount = 1;
        bps = uint16(uint256(bps) % 10_001);

        GridToken token = new GridToken(address(this), SUPPLY);
        GridStaking staking = new GridStaking(token, address(this), address(this), TREASURY, bps, 3600, 0);
        staking.grantRole(staking.SLASHER_ROLE(), address(this));
        token.approve(address(staking), staked);
        staking.stake(staked);
        if (unbond > 0) staking.requestUnbond(unbond);

        staking.slash(address(this), amount, VERIFIER, keccak256(abi.encode(staked, unbond, amount, bps)));

        uint256 expected = amount < staked ? amount : staked;
        uint256 bounty = token.balanceOf(VERIFIER);
        uint256 toTreasury = token.balanceOf(TREASURY);
        require(bounty + toTreasury == expected, "bounty + treasury != slashed");
        require(bounty == (expected * bps) / 10_000, "bounty rate");
        GridStaking.StakeAccount memory a = staking.accountOf(address(this));
        uint256 fromBonded = expected < staked - unbond ? expected : staked - unbond;
        require(a.staked == staked - unbond - fromBonded, "bonded stake after slash");
        require(a.unbonding == unbond - (expected - fromBonded), "unbonding after slash");
        require(staking.totalStaked() == staked - expected, "totalStaked after slash");
        require(
            token.balanceOf(address(this)) + token.balanceOf(address(staking)) + bounty + toTreasury == SUPPLY,
            "tokens not conserved"
        );
        require(token.balanceOf(address(staking)) == staking.totalStaked(), "staking balance != totalStaked");
    }

    /// Locked stake can never be unbonded, whatever the amounts.
    function testFuzz_LockedStakeCannotUnbond(uint256 staked, uint256 locked, uint256 amount) public {
        staked = (staked % SUPPLY) + 1;
        locked = (locked % staked) + 1;
        amount = (amount % staked) + 1;

        GridToken token = new GridToken(address(this), SUPPLY);
        GridStaking staking = new GridStaking(token, address(this), address(this), TREASURY, 0, 0, 0);
        staking.grantRole(staking.LOCKER_ROLE(), address(this));
        token.approve(address(staking), staked);
        staking.stake(staked);
        staking.lock(address(this), locked);

        try staking.requestUnbond(amount) {
            require(amount <= staked - locked, "unbonded locked stake");
        } catch {
            require(amount > staked - locked, "refused a free unbond");
        }
        require(staking.stakeOf(address(this)) >= locked, "locked stake left the bond");
    }
}
