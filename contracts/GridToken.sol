// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";
import {ERC20Permit} from "@openzeppelin/contracts/token/ERC20/extensions/ERC20Permit.sol";

/// @title GridMint Token (GMT)
/// @notice Fixed-supply ERC-20 with EIP-2612 permits. The whole supply is minted once, to `holder`, at deployment;
/// there is no other mint or burn path, so `totalSupply()` is constant and token conservation checks are exact.
contract GridToken is ERC20, ERC20Permit {
    /// @param holder receives the entire supply
    /// @param supply total supply in base units (18 decimals)
    constructor(address holder, uint256 supply) ERC20("GridMint Token", "GMT") ERC20Permit("GridMint Token") {
        _mint(holder, supply);
    }
}
