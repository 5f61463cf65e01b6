// Hardhat 3 config. Compiles offline with the npm `solc` (wasm) build instead of downloading a compiler.
import { createRequire } from "node:module";

import hardhatToolboxMochaEthers from "@nomicfoundation/hardhat-toolbox-mocha-ethers";
import { defineConfig } from "hardhat/config";

const require = createRequire(import.meta.url);

export default defineConfig({
  plugins: [hardhatToolboxMochaEthers],
  solidity: {
    version: "0.8.37",
    path: require.resolve("solc/soljson.js"),
    settings: {
      // solc 0.8.37 defaults to osaka, which py-evm (the in-process Python chain) does not run.
      evmVersion: "cancun",
      optimizer: { enabled: true, runs: 200 },
    },
  },
  paths: {
    // tests/ is otherwise the Python test folder.
    tests: { mocha: "tests/contracts", solidity: "tests/contracts" },
  },
});
