// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {GridToken} from "../../contracts/GridToken.sol";
import {PayoutDistributor} from "../../contracts/PayoutDistributor.sol";

/// Claims against a two-leaf tree over fuzzed cumulative amounts (Hardhat's Solidity test runner fuzzes the params).
contract PayoutDistributorClaimFuzzTest {
    /// The fuzzed amounts are uint128s and a deposit needs c1 + 1 + extra + other of them, up to 3 * 2**128: a supply of
    /// 2**200 covers every input, so no run is cut short by the test's own funding (GridToken takes any uint256 supply).
    uint256 internal constant SUPPLY = 2 ** 200;
    address internal constant OTHER = address(0xCAFE);

    function _leaf(address account, uint256 cumulative) internal pure returns (bytes32) {
        return keccak256(abi.encodePacked(account, cumulative));
    }

    function _root(bytes32 a, bytes32 b) internal pure returns (bytes32) {
        return a < b ? keccak256(abi.encodePacked(a, b)) : keccak256(abi.encodePacked(b, a));
    }

    /// Two roots, cumulative c1 <= c2 for this account: claiming after each pays c1 then c2 - c1; claiming only at
    /// the end pays c2 once; a replayed claim pays nothing; the pool never pays more than the leaves promise.
    function testFuzz_CumulativeClaimsPayExactlyTheEntitlement(uint128 c1, uint128 extra, uint128 other, bool early)
        public
    {
        uint256 cum1 = uint256(c1) + 1;
        uint256 cum2 = cum1 + extra;
        uint256 total = cum2 + other;
        GridToken token = new GridToken(address(this), SUPPLY);
        PayoutDistributor pool = new PayoutDistributor(token, address(this), address(this), 0);
        pool.grantRole(pool.POSTER_ROLE(), address(this));
        token.approve(address(pool), total);
        pool.deposit(total);
        uint256 start = token.balanceOf(address(this));

        bytes32 otherLeaf = _leaf(OTHER, other);
        bytes32[] memory proof = new bytes32[](1);
        proof[0] = otherLeaf;
        pool.postRoot(1, _root(_leaf(address(this), cum1), otherLeaf), cum1 + other);
        if (early) {
            require(pool.claim(1, cum1, proof) == cum1, "first claim");
        }
        pool.postRoot(2, _root(_leaf(address(this), cum2), otherLeaf), total);
        if (early && extra == 0) {
            // Nothing new was earned: the contract refuses the claim rather than pay 0.
            _expectNothingToClaim(pool, cum2, proof);
        } else {
            uint256 paid = pool.claim(2, cum2, proof);
            require(paid == (early ? cum2 - cum1 : cum2), "second claim pays the difference");
        }
        require(token.balanceOf(address(this)) == start + cum2, "paid exactly the cumulative entitlement");
        require(pool.claimed(address(this)) == cum2, "claimed so far");
        _expectNothingToClaim(pool, cum2, proof); // a replayed claim pays nothing
        require(token.balanceOf(address(pool)) == total - cum2, "pool keeps the others' share");
    }

    function _expectNothingToClaim(PayoutDistributor pool, uint256 cumulative, bytes32[] memory proof) internal {
        try pool.claim(2, cumulative, proof) {
            revert("a claim with nothing owed paid");
        } catch (bytes memory reason) {
            require(
                keccak256(reason)
                    == keccak256(
                        abi.encodeWithSelector(
                            PayoutDistributor.SettlementNothingToClaim.selector, address(this), cumulative, cumulative
                        )
                    ),
                "expected SettlementNothingToClaim(this, cumulative, cumulative)"
            );
        }
    }
}
