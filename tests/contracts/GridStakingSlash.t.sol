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

    /// For any stake, requested amount and bounty rate: the verifier's bounty plus the treasury's share equal the
    /// slashed amount, the slash never exceeds the stake, and no token is created or lost.
    function testFuzz_SlashSplitsExactly(uint256 staked, uint256 amount, uint16 bps) public {
        staked = (staked % SUPPLY) + 1;
        if (amount == 0) amount = 1;
        bps = uint16(uint256(bps) % 10_001);

        GridToken token = new GridToken(address(this), SUPPLY);
        GridStaking staking = new GridStaking(token, address(this), TREASURY, bps);
        staking.grantRole(staking.SLASHER_ROLE(), address(this));
        token.approve(address(staking), staked);
        staking.stake(staked);

        staking.slash(address(this), amount, VERIFIER, keccak256(abi.encode(staked, amount, bps)));

        uint256 expected = amount < staked ? amount : staked;
        uint256 bounty = token.balanceOf(VERIFIER);
        uint256 toTreasury = token.balanceOf(TREASURY);
        require(bounty + toTreasury == expected, "bounty + treasury != slashed");
        require(bounty == (expected * bps) / 10_000, "bounty rate");
        require(staking.stakeOf(address(this)) == staked - expected, "stake after slash");
        require(staking.totalStaked() == staked - expected, "totalStaked after slash");
        require(
            token.balanceOf(address(this)) + token.balanceOf(address(staking)) + bounty + toTreasury == SUPPLY,
            "tokens not conserved"
        );
    }
}
