// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {GridToken} from "../../contracts/GridToken.sol";
import {GridStaking} from "../../contracts/GridStaking.sol";

/// The cheatcodes these tests use, served by Hardhat's Solidity test runner at the usual address (no forge-std: it
/// would need a download).
interface Vm {
    function addr(uint256 privateKey) external returns (address);
    function sign(uint256 privateKey, bytes32 digest) external returns (uint8 v, bytes32 r, bytes32 s);
    function prank(address sender) external;
    function warp(uint256 timestamp) external;
}

/// Hardhat 3 runs this with its built-in Solidity test runner; functions with parameters are fuzzed.
/// Assertions are plain `require`s.
contract GridStakingSlashFuzzTest {
    Vm internal constant vm = Vm(address(uint160(uint256(keccak256("hevm cheat code")))));
    uint256 internal constant SUPPLY = 1e27;
    address internal constant TREASURY = address(0x7EA5);
    address internal constant VERIFIER = address(0xBEEF);
    uint256 internal constant VERIFIER_KEY = 0xA11CE;

    /// For any stake, unbonding part, requested amount and bounty rate: the verifier's bounty plus the treasury's
    /// share equal the slashed amount, the slash never exceeds staked + unbonding, it takes from the bonded stake
    /// first, and no token is created or lost.
    function testFuzz_SlashSplitsExactly(uint256 staked, uint256 unbond, uint256 amount, uint16 bps) public {
        staked = (staked % SUPPLY) + 1;
        unbond = unbond % (staked + 1);
        if (amount == 0) amount = 1;
        bps = uint16(uint256(bps) % 10_001);

        GridToken token = new GridToken(address(this), SUPPLY);
        GridStaking staking = new GridStaking(token, address(this), address(this), TREASURY, bps, 3600, 0, 0);
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
        GridStaking staking = new GridStaking(token, address(this), address(this), TREASURY, 0, 0, 0, 0);
        staking.grantRole(staking.LOCKER_ROLE(), address(this));
        token.approve(address(staking), staked);
        staking.stake(staked);
        staking.lock(address(this), locked);

        try staking.requestUnbond(amount) {
            require(amount <= staked - locked, "unbonded locked stake");
        } catch (bytes memory reason) {
            require(bytes4(reason) == GridStaking.StakingInsufficientStake.selector, "wrong error");
            require(amount > staked - locked, "refused a free unbond");
        }
        require(staking.stakeOf(address(this)) >= locked, "locked stake left the bond");
    }

    /// Unbonded stake comes out exactly when `unbondingDelay` has passed, never earlier, and all of it.
    function testFuzz_WithdrawWaitsForTheDelay(uint256 staked, uint256 unbond, uint32 delay, uint32 waited) public {
        staked = (staked % SUPPLY) + 1;
        unbond = (unbond % staked) + 1;

        GridToken token = new GridToken(address(this), SUPPLY);
        GridStaking staking = new GridStaking(token, address(this), address(this), TREASURY, 0, delay, 0, 0);
        token.approve(address(staking), staked);
        staking.stake(staked);
        staking.requestUnbond(unbond);
        uint256 readyAt = block.timestamp + delay;
        vm.warp(block.timestamp + waited);

        uint256 before = token.balanceOf(address(this));
        try staking.withdraw() returns (uint256 paid) {
            require(waited >= delay, "withdrew before the delay");
            require(paid == unbond && token.balanceOf(address(this)) == before + unbond, "paid the unbonded amount");
            require(staking.totalStaked() == staked - unbond, "totalStaked after withdraw");
        } catch (bytes memory reason) {
            require(waited < delay, "refused a due withdrawal");
            require(
                keccak256(reason)
                    == keccak256(abi.encodeWithSelector(GridStaking.StakingStillUnbonding.selector, address(this), readyAt)),
                "wrong error"
            );
        }
        require(token.balanceOf(address(staking)) == staking.totalStaked(), "staking balance != totalStaked");
    }

    struct Accusation {
        uint256 providerStake;
        uint256 providerUnbonding;
        uint256 verifierStake;
        uint256 bond;
        uint256 amount;
        uint16 bps;
        bool fraud;
        address verifier;
        bytes32 evidence;
    }

    /// The fraud-proof path with a real EIP-712 signature: whatever the stakes, the provider's unbonding part, bond,
    /// accused amount, rate and verdict, a fraud verdict slashes the provider's WHOLE stake (staked + unbonding; the
    /// accused amount, however small, does not cap it) and splits it exactly (bounty to the verifier); a false
    /// accusation costs the verifier exactly its bond, to the treasury; the evidence is spent; no token is lost.
    function testFuzz_ResolveSplitsExactly(
        uint256 providerStake,
        uint256 verifierStake,
        uint256 bond,
        uint256 amount,
        uint16 bps,
        bool fraud
    ) public {
        Accusation memory c;
        c.providerStake = (providerStake % (SUPPLY / 2)) + 1;
        c.verifierStake = (verifierStake % (SUPPLY / 2)) + 1;
        c.bond = (bond % c.verifierStake) + 1;
        c.amount = (amount % SUPPLY) + 1;
        c.providerUnbonding = amount % (c.providerStake + 1); // 0..all of it, independent of the verdict
        c.bps = uint16(uint256(bps) % 10_001);
        c.fraud = fraud;
        c.verifier = vm.addr(VERIFIER_KEY);
        c.evidence = keccak256(abi.encode(c.providerStake, c.verifierStake, c.bond, c.amount, c.bps, fraud));

        (GridToken token, GridStaking staking) = _accuse(c);
        staking.resolve(c.evidence, fraud);
        _checkResolved(c, token, staking);
    }

    /// A bond is never taken twice: whatever the verifier's stake, bond, the governance slash that cut into it and the
    /// stake it added afterwards, a false verdict takes only the part of the bond the slash left (the stake left, up
    /// to the bond), and the stake added later stays whole and free.
    function testFuzz_FalseVerdictTakesOnlyTheBondLeftAfterASlash(
        uint256 verifierStake,
        uint256 bond,
        uint256 cut,
        uint256 restake
    ) public {
        Accusation memory c;
        c.providerStake = 1;
        c.verifierStake = (verifierStake % (SUPPLY / 4)) + 1;
        c.bond = (bond % c.verifierStake) + 1;
        c.amount = 1;
        c.verifier = vm.addr(VERIFIER_KEY);
        c.evidence = keccak256(abi.encode("bond", c.verifierStake, c.bond, cut, restake));
        cut = (cut % c.verifierStake) + 1;
        restake = restake % (SUPPLY / 4);

        (GridToken token, GridStaking staking) = _accuse(c);
        staking.grantRole(staking.SLASHER_ROLE(), address(this));
        staking.slash(c.verifier, cut, TREASURY, keccak256(abi.encode(c.evidence)));
        uint256 left = c.verifierStake - cut;
        uint256 bondLeft = c.bond < left ? c.bond : left;
        require(staking.accountOf(c.verifier).bonded == bondLeft, "bonded cut to the stake left");
        if (restake > 0) {
            require(token.transfer(c.verifier, restake), "fund verifier");
            vm.prank(c.verifier);
            token.approve(address(staking), restake);
            vm.prank(c.verifier);
            staking.stake(restake);
        }
        uint256 treasuryBefore = token.balanceOf(TREASURY);

        staking.resolve(c.evidence, false);

        GridStaking.StakeAccount memory ver = staking.accountOf(c.verifier);
        require(token.balanceOf(TREASURY) - treasuryBefore == bondLeft, "false verdict takes the bond left");
        require(ver.staked == left - bondLeft + restake && ver.bonded == 0, "later stake untouched");
        require(staking.freeStakeOf(c.verifier) == ver.staked, "later stake free");
        require(token.balanceOf(address(staking)) == staking.totalStaked(), "staking balance != totalStaked");
    }

    /// Deploys, stakes both sides and opens the dispute with the verifier's signature (this contract is the provider).
    function _accuse(Accusation memory c) internal returns (GridToken token, GridStaking staking) {
        token = new GridToken(address(this), SUPPLY);
        staking = new GridStaking(token, address(this), address(this), TREASURY, c.bps, 0, c.bond, 0);
        staking.grantRole(staking.REFEREE_ROLE(), address(this));
        token.approve(address(staking), c.providerStake);
        staking.stake(c.providerStake);
        if (c.providerUnbonding > 0) staking.requestUnbond(c.providerUnbonding);
        require(token.transfer(c.verifier, c.verifierStake), "fund verifier");
        vm.prank(c.verifier);
        token.approve(address(staking), c.verifierStake);
        vm.prank(c.verifier);
        staking.stake(c.verifierStake);

        bytes32 structHash = keccak256(abi.encode(staking.ACCUSATION_TYPEHASH(), address(this), c.evidence, c.amount));
        bytes32 digest = keccak256(abi.encodePacked("\x19\x01", staking.domainSeparator(), structHash));
        (uint8 v, bytes32 r, bytes32 s) = vm.sign(VERIFIER_KEY, digest);
        staking.accuse(address(this), c.evidence, c.amount, abi.encodePacked(r, s, v));
        require(staking.accountOf(c.verifier).bonded == c.bond, "bond held");
    }

    function _checkResolved(Accusation memory c, GridToken token, GridStaking staking) internal view {
        GridStaking.StakeAccount memory p = staking.accountOf(address(this));
        GridStaking.StakeAccount memory ver = staking.accountOf(c.verifier);
        require(p.openDisputes == 0 && ver.openDisputes == 0 && ver.bonded == 0, "dispute closed");
        require(staking.evidenceUsed(c.evidence), "evidence spent");
        uint256 toTreasury = token.balanceOf(TREASURY);
        if (c.fraud) {
            uint256 slashed = c.providerStake;
            uint256 bounty = (slashed * c.bps) / 10_000;
            require(p.staked == 0 && p.unbonding == 0, "provider slashed entirely");
            require(ver.staked == c.verifierStake, "verifier keeps its stake");
            require(token.balanceOf(c.verifier) == bounty, "bounty");
            require(toTreasury == slashed - bounty, "treasury share");
        } else {
            require(
                p.staked == c.providerStake - c.providerUnbonding && p.unbonding == c.providerUnbonding,
                "provider keeps its stake"
            );
            require(ver.staked == c.verifierStake - c.bond, "verifier loses its bond");
            require(token.balanceOf(c.verifier) == 0 && toTreasury == c.bond, "bond to the treasury");
        }
        require(
            token.balanceOf(address(this)) + token.balanceOf(c.verifier) + token.balanceOf(address(staking)) + toTreasury
                == SUPPLY,
            "tokens not conserved"
        );
        require(token.balanceOf(address(staking)) == staking.totalStaked(), "staking balance != totalStaked");
    }
}
