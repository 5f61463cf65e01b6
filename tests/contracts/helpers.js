// Shared by the contract test suites: the payout tree (mirroring the contract and ledger/payout_tree.py), EIP-712
// signatures (accusations, permits) and a full deployment wired the way ledger/deploy.py wires it.
// Pure functions take what they need as arguments; nothing here touches a network at import time.
import { ethers } from "ethers";

// ---------------------------------------------------------------- job ids

/**
 * A job id JobEscrow lets `customer` create: its address in the first 20 bytes, then 12 bytes of keccak(label)
 * (protocol/jobs.py's new_job_id draws them at random). A signer object or an address string.
 */
export function jobIdFor(customer, label) {
  const address = typeof customer === "string" ? customer : customer.address;
  return ethers.hexlify(ethers.concat([ethers.getAddress(address), ethers.dataSlice(ethers.id(label), 0, 12)]));
}

// ---------------------------------------------------------------- payout tree

/** PayoutDistributor's leaf: keccak256(abi.encodePacked(account, cumulative)), 52 bytes of preimage. */
export function leafHash(account, cumulative) {
  return ethers.keccak256(ethers.solidityPacked(["address", "uint256"], [account, cumulative]));
}

/** OpenZeppelin's commutative node hash: keccak256 of the sorted pair. */
export function nodeHash(a, b) {
  // Lowercase 0x-hex strings of equal length compare like the bytes they encode.
  return a < b ? ethers.keccak256(ethers.concat([a, b])) : ethers.keccak256(ethers.concat([b, a]));
}

/**
 * The tree over `entries` ([[account, cumulative], ...]) exactly as ledger/payout_tree.py builds it: leaves sorted
 * by hash, neighbours paired level by level, an odd last node moved up unchanged.
 * Returns { root, total, depth, levels, proof(account), cumulative(account) }.
 */
export function buildPayoutTree(entries) {
  const amounts = new Map();
  for (const [account, cumulative] of entries) {
    const address = ethers.getAddress(account);
    if (amounts.has(address)) throw new Error(`${address} is listed twice`);
    amounts.set(address, BigInt(cumulative));
  }
  const hashed = [...amounts].map(([a, v]) => [leafHash(a, v), a]).sort(([x], [y]) => (x < y ? -1 : x > y ? 1 : 0));
  const position = new Map(hashed.map(([, a], i) => [a, i]));
  let level = hashed.map(([h]) => h);
  const levels = [level];
  while (level.length > 1) {
    const next = [];
    for (let i = 0; i < level.length; i += 2)
      next.push(i + 1 < level.length ? nodeHash(level[i], level[i + 1]) : level[i]);
    level = next;
    levels.push(level);
  }
  return {
    root: level[0],
    total: [...amounts.values()].reduce((s, v) => s + v, 0n),
    depth: levels.length - 1,
    levels,
    cumulative: (account) => amounts.get(ethers.getAddress(account)) ?? 0n,
    proof(account) {
      let index = position.get(ethers.getAddress(account));
      if (index === undefined) throw new Error(`${account} has no leaf`);
      const proof = [];
      for (const lvl of levels.slice(0, -1)) {
        const sibling = index ^ 1;
        if (sibling < lvl.length) proof.push(lvl[sibling]);
        index = Math.floor(index / 2);
      }
      return proof;
    },
  };
}

/** What the contract computes from a leaf and a proof (MerkleProof.processProof). */
export function processProof(leaf, proof) {
  return proof.reduce((node, sibling) => nodeHash(node, sibling), leaf);
}

/** A deterministic address that no test signer holds (for filling trees). */
export function fillerAddress(label) {
  return ethers.getAddress(ethers.dataSlice(ethers.id(label), 12));
}

// ---------------------------------------------------------------- EIP-712

export const ACCUSATION_TYPES = {
  Accusation: [
    { name: "provider", type: "address" },
    { name: "evidence", type: "bytes32" },
    { name: "amount", type: "uint256" },
  ],
};

/** The domain GridStaking verifies accusations under. */
export async function stakingDomain(staking) {
  const { chainId } = await staking.runner.provider.getNetwork();
  return { name: "GridStaking", version: "1", chainId, verifyingContract: await staking.getAddress() };
}

/** `signer` (the verifier) signs Accusation(provider, evidence, amount) for `staking`; `domain` overrides forge one. */
export async function signAccusation(signer, staking, provider, evidence, amount, domain = undefined) {
  const d = domain ?? (await stakingDomain(staking));
  return signer.signTypedData(d, ACCUSATION_TYPES, { provider, evidence, amount });
}

/** Who GridStaking's ECDSA.recover will name as the verifier for this signature. */
export async function accusationSigner(staking, provider, evidence, amount, signature) {
  return ethers.verifyTypedData(
    await stakingDomain(staking),
    ACCUSATION_TYPES,
    { provider, evidence, amount },
    signature,
  );
}

export const PERMIT_TYPES = {
  Permit: [
    { name: "owner", type: "address" },
    { name: "spender", type: "address" },
    { name: "value", type: "uint256" },
    { name: "nonce", type: "uint256" },
    { name: "deadline", type: "uint256" },
  ],
};

/** An EIP-2612 permit for `owner`; `signer` defaults to the owner (pass another to forge one). */
export async function signPermit(token, owner, spender, value, deadline, signer = owner) {
  const { chainId } = await token.runner.provider.getNetwork();
  const domain = { name: await token.name(), version: "1", chainId, verifyingContract: await token.getAddress() };
  const nonce = await token.nonces(owner.address);
  const message = { owner: owner.address, spender, value, nonce, deadline };
  return ethers.Signature.from(await signer.signTypedData(domain, PERMIT_TYPES, message));
}

// ---------------------------------------------------------------- deployment

export const ROLES = {
  DEFAULT_ADMIN_ROLE: ethers.ZeroHash,
  GUARDIAN_ROLE: ethers.id("GUARDIAN_ROLE"),
  GOVERNOR_ROLE: ethers.id("GOVERNOR_ROLE"),
  SLASHER_ROLE: ethers.id("SLASHER_ROLE"),
  LOCKER_ROLE: ethers.id("LOCKER_ROLE"),
  REFEREE_ROLE: ethers.id("REFEREE_ROLE"),
  SETTLER_ROLE: ethers.id("SETTLER_ROLE"),
  UNIT_SETTLER_ROLE: ethers.id("UNIT_SETTLER_ROLE"),
  POSTER_ROLE: ethers.id("POSTER_ROLE"),
};

// ledger/deploy.py's DEV_DEPLOYER_ROLES: what the deployer receives on each contract in a development deployment.
const OPERATOR_ROLES = {
  staking: ["GUARDIAN_ROLE", "SLASHER_ROLE", "LOCKER_ROLE", "REFEREE_ROLE"],
  escrow: ["GUARDIAN_ROLE", "SETTLER_ROLE", "UNIT_SETTLER_ROLE"],
  distributor: ["GUARDIAN_ROLE", "POSTER_ROLE"],
  killSwitch: ["GUARDIAN_ROLE"],
};

/**
 * Deploys GridToken (whole `supply` to `deployer`), GridTimelock, GridStaking, PayoutDistributor, JobEscrow and
 * GridKillSwitch and wires them as ledger/deploy.py does: the timelock holds GOVERNOR_ROLE everywhere (deployer is
 * its proposer, executor and admin), the kill switch holds GUARDIAN_ROLE on staking, escrow and distributor, and the
 * deployer keeps DEFAULT_ADMIN_ROLE and the operator roles.
 */
export async function deployGridMint(hreEthers, deployer, treasury, p) {
  const me = deployer.address;
  const opts = {
    bountyBps: 5000,
    unbondingDelay: 0,
    verifierBond: 0,
    slashDelay: 0,
    disputeWindow: 0,
    cancelGrace: 3600,
    timelockDelay: 0,
    ...p,
  };
  const token = await hreEthers.deployContract("GridToken", [me, opts.supply], deployer);
  const timelock = await hreEthers.deployContract("GridTimelock", [opts.timelockDelay, [me], [me], me], deployer);
  const staking = await hreEthers.deployContract(
    "GridStaking",
    [token, me, timelock, treasury, opts.bountyBps, opts.unbondingDelay, opts.verifierBond, opts.slashDelay],
    deployer,
  );
  const distributor = await hreEthers.deployContract(
    "PayoutDistributor",
    [token, me, timelock, opts.disputeWindow],
    deployer,
  );
  const escrow = await hreEthers.deployContract(
    "JobEscrow",
    [token, me, timelock, distributor, opts.cancelGrace],
    deployer,
  );
  const killSwitch = await hreEthers.deployContract("GridKillSwitch", [me, [staking, escrow, distributor]], deployer);
  const contracts = { token, timelock, staking, distributor, escrow, killSwitch };
  for (const c of [staking, escrow, distributor]) await c.connect(deployer).grantRole(ROLES.GUARDIAN_ROLE, killSwitch);
  for (const [name, roles] of Object.entries(OPERATOR_ROLES)) {
    for (const role of roles) await contracts[name].connect(deployer).grantRole(ROLES[role], me);
  }
  return contracts;
}

/** Sum of `token` balances over `holders` (signers or contracts). */
export async function sumBalances(token, holders) {
  let sum = 0n;
  for (const h of holders) sum += await token.balanceOf(await h.getAddress());
  return sum;
}
