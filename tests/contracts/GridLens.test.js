import { expect } from "chai";
import { network } from "hardhat";

import { buildPayoutTree, deployGridMint, jobIdFor, signAccusation } from "./helpers.js";

const { ethers, networkHelpers } = await network.create();

const SUPPLY = 10n ** 9n;
const JOB = jobIdFor((await ethers.getSigners())[2], "job-lens"); // the fixture's customer's
const JOB_UNKNOWN = ethers.id("job-never-funded");

describe("GridLens", function () {
  // A deployment wired like ledger/deploy.py with state in every field the lens reads.
  async function lensFixture() {
    const [operator, treasury, customer, provider, verifier] = await ethers.getSigners();
    const c = await deployGridMint(ethers, operator, treasury.address, {
      supply: SUPPLY,
      verifierBond: 10n,
      unbondingDelay: 100,
      disputeWindow: 50,
    });
    const lens = await ethers.deployContract("GridLens");
    for (const s of [customer, provider, verifier]) {
      await c.token.transfer(s.address, 10_000n);
      await c.token.connect(s).approve(c.escrow, ethers.MaxUint256);
      await c.token.connect(s).approve(c.staking, ethers.MaxUint256);
    }
    await c.staking.connect(provider).stake(1_000n);
    await c.staking.connect(verifier).stake(500n);
    await c.staking.connect(operator).lock(provider.address, 300n);
    await c.staking.connect(provider).requestUnbond(200n);
    const sig = await signAccusation(verifier, c.staking, provider.address, ethers.id("ev"), 99n);
    await c.staking.accuse(provider.address, ethers.id("ev"), 99n, sig);
    await c.escrow.connect(customer).fund(JOB, 2_000n);
    await c.escrow.connect(operator).release(JOB, ethers.id("u"), provider.address, 70n);
    await c.escrow.connect(operator).releaseToPool(JOB, ethers.id("b"), 400n);
    await c.escrow.connect(customer).cancel(JOB);
    const tree = buildPayoutTree([[provider.address, 400n]]);
    await c.distributor.connect(operator).postRoot(1, tree.root, tree.total);
    await networkHelpers.time.increase(50);
    await c.distributor.connect(provider).claim(1, 400n, tree.proof(provider.address));
    await c.escrow.connect(operator).pause();
    return { ...c, lens, operator, treasury, customer, provider, verifier };
  }

  describe("read", function () {
    it("returns system, per-account and per-job fields exactly as the contracts report them", async function () {
      const { lens, token, staking, escrow, distributor, customer, provider, verifier } =
        await networkHelpers.loadFixture(lensFixture);
      const accounts = [provider.address, verifier.address, customer.address];
      const out = await lens.read(token, staking, escrow, distributor, accounts, [JOB, JOB_UNKNOWN]);
      expect(await lens.SYSTEM_FIELDS()).to.equal(12n);
      expect(await lens.ACCOUNT_FIELDS()).to.equal(9n);
      expect(await lens.JOB_FIELDS()).to.equal(4n);
      expect(out.length).to.equal(12 + 9 * accounts.length + 4 * 2);

      const b = (x) => (x ? 1n : 0n);
      const system = [
        await token.totalSupply(),
        await token.balanceOf(staking),
        await token.balanceOf(escrow),
        await token.balanceOf(distributor),
        await staking.totalStaked(),
        await escrow.totalClaimable(),
        await distributor.totalDeposited(),
        await distributor.latestEpoch(),
        await distributor.latestClaimableAt(),
        b(await staking.paused()),
        b(await escrow.paused()),
        b(await distributor.paused()),
      ];
      const perAccount = [];
      for (const a of accounts) {
        const s = await staking.accountOf(a);
        perAccount.push(
          await token.balanceOf(a),
          s.staked,
          s.locked,
          s.bonded,
          s.unbonding,
          s.unbondingReadyAt,
          s.openDisputes,
          await escrow.claimable(a),
          await distributor.claimed(a),
        );
      }
      const perJob = [];
      for (const j of [JOB, JOB_UNKNOWN]) {
        const [, funded, released, closed, closableAt] = await escrow.getJob(j);
        perJob.push(funded, released, b(closed), closableAt);
      }
      expect([...out]).to.deep.equal([...system, ...perAccount, ...perJob]);
      // Spot-check a few values against what the fixture did, so a lens that copied wrong getters fails too.
      expect(out.slice(0, 12)).to.deep.equal([
        SUPPLY,
        1_500n,
        2_000n - 400n,
        0n,
        1_500n,
        70n,
        400n,
        1n,
        system[8],
        0n,
        1n,
        0n,
      ]);
      expect(out.slice(12, 21)).to.deep.equal([
        10_000n - 1_000n + 400n,
        800n,
        300n,
        0n,
        200n,
        perAccount[5],
        1n,
        70n,
        400n,
      ]);
      expect(out.slice(21, 30)).to.deep.equal([10_000n - 500n, 500n, 0n, 10n, 0n, 0n, 1n, 0n, 0n]);
      expect(out.slice(39)).to.deep.equal([2_000n, 470n, 0n, perJob[3], 0n, 0n, 0n, 0n]);
      expect(perJob[3]).to.be.greaterThan(0n);
    });

    it("returns only the system fields for no accounts and no jobs", async function () {
      const { lens, token, staking, escrow, distributor } = await networkHelpers.loadFixture(lensFixture);
      expect((await lens.read(token, staking, escrow, distributor, [], [])).length).to.equal(12);
    });
  });
});
