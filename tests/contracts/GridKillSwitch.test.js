import { expect } from "chai";
import { network } from "hardhat";

import { buildPayoutTree, deployGridMint, jobIdFor, ROLES } from "./helpers.js";

const { ethers, networkHelpers } = await network.create();

const SUPPLY = ethers.parseEther("1000000");
const JOB = jobIdFor((await ethers.getSigners())[3], "job-1"); // the fixture's customer's

describe("GridKillSwitch", function () {
  // A deployment wired like ledger/deploy.py, plus a separate person holding GUARDIAN_ROLE on the kill switch only,
  // and some state in every contract so that each paused flow has something to do.
  async function deployKillSwitchFixture() {
    const [deployer, treasury, guardian, customer, provider, other] = await ethers.getSigners();
    const c = await deployGridMint(ethers, deployer, treasury.address, { supply: SUPPLY, verifierBond: 1n });
    await c.killSwitch.connect(deployer).grantRole(ROLES.GUARDIAN_ROLE, guardian.address);
    await c.token.transfer(customer.address, 1_000n);
    await c.token.transfer(provider.address, 1_000n);
    await c.token.connect(customer).approve(c.escrow, ethers.MaxUint256);
    await c.token.connect(provider).approve(c.staking, ethers.MaxUint256);
    await c.escrow.connect(customer).fund(JOB, 500n);
    await c.escrow.connect(deployer).releaseToPool(JOB, ethers.id("batch"), 100n);
    await c.escrow.connect(deployer).release(JOB, ethers.id("unit"), provider.address, 50n);
    const tree = buildPayoutTree([[provider.address, 100n]]);
    await c.distributor.connect(deployer).postRoot(1, tree.root, tree.total);
    await c.staking.connect(provider).stake(300n);
    return { ...c, deployer, treasury, guardian, customer, provider, other, tree };
  }

  describe("constructor", function () {
    it("stores the targets and grants DEFAULT_ADMIN_ROLE to admin", async function () {
      const { killSwitch, staking, escrow, distributor, deployer } = await networkHelpers.loadFixture(
        deployKillSwitchFixture,
      );
      expect(await killSwitch.targets()).to.deep.equal([
        await staking.getAddress(),
        await escrow.getAddress(),
        await distributor.getAddress(),
      ]);
      expect(await killSwitch.hasRole(ROLES.DEFAULT_ADMIN_ROLE, deployer.address)).to.equal(true);
    });

    it("reverts with KillSwitchZeroAddress for a zero admin or target", async function () {
      const { staking, deployer } = await networkHelpers.loadFixture(deployKillSwitchFixture);
      const factory = await ethers.getContractFactory("GridKillSwitch");
      await expect(factory.deploy(ethers.ZeroAddress, [staking])).to.be.revertedWithCustomError(
        factory,
        "KillSwitchZeroAddress",
      );
      await expect(factory.deploy(deployer.address, [staking, ethers.ZeroAddress])).to.be.revertedWithCustomError(
        factory,
        "KillSwitchZeroAddress",
      );
    });
  });

  describe("pauseAll", function () {
    it("pauses staking, escrow and distributor in one transaction and emits AllPaused(guardian, 3)", async function () {
      const { killSwitch, staking, escrow, distributor, guardian } = await networkHelpers.loadFixture(
        deployKillSwitchFixture,
      );
      const tx = killSwitch.connect(guardian).pauseAll();
      await expect(tx).to.emit(killSwitch, "AllPaused").withArgs(guardian.address, 3n);
      for (const target of [staking, escrow, distributor]) {
        await expect(tx)
          .to.emit(target, "Paused")
          .withArgs(await killSwitch.getAddress());
        expect(await target.paused()).to.equal(true);
      }
      expect(await killSwitch.allPaused()).to.equal(true);
    });

    it("stops every flow: staking, unbonding, funding, releases, root posting and claims", async function () {
      const { killSwitch, staking, escrow, distributor, deployer, guardian, customer, provider, tree } =
        await networkHelpers.loadFixture(deployKillSwitchFixture);
      await killSwitch.connect(guardian).pauseAll();
      const calls = [
        [staking, () => staking.connect(provider).stake(1n)],
        [staking, () => staking.connect(provider).requestUnbond(1n)],
        [staking, () => staking.connect(deployer).slash(provider.address, 1n, deployer.address, ethers.id("e"))],
        [escrow, () => escrow.connect(customer).fund(JOB, 1n)],
        [escrow, () => escrow.connect(deployer).release(JOB, ethers.id("unit-2"), provider.address, 1n)],
        [escrow, () => escrow.connect(deployer).releaseToPool(JOB, ethers.id("batch-2"), 1n)],
        [escrow, () => escrow.connect(provider).claim()],
        [escrow, () => escrow.connect(deployer).close(JOB)],
        [distributor, () => distributor.connect(deployer).postRoot(2, tree.root, tree.total)],
        [distributor, () => distributor.connect(provider).claim(1, 100n, tree.proof(provider.address))],
      ];
      for (const [target, call] of calls) {
        await expect(call()).to.be.revertedWithCustomError(target, "EnforcedPause");
      }
    });

    it("is idempotent: pauses only what is not paused yet and never reverts for that", async function () {
      const { killSwitch, escrow, deployer, guardian } = await networkHelpers.loadFixture(deployKillSwitchFixture);
      await escrow.connect(deployer).pause(); // the operator already paused the escrow by hand
      await expect(killSwitch.connect(guardian).pauseAll())
        .to.emit(killSwitch, "AllPaused")
        .withArgs(guardian.address, 2n);
      const again = killSwitch.connect(guardian).pauseAll();
      await expect(again).to.emit(killSwitch, "AllPaused").withArgs(guardian.address, 0n);
      await expect(again).to.not.emit(escrow, "Paused");
      expect(await killSwitch.allPaused()).to.equal(true);
    });

    it("reverts as a whole when it lacks GUARDIAN_ROLE on a target (nothing is left half-paused)", async function () {
      const { killSwitch, staking, escrow, deployer, guardian } = await networkHelpers.loadFixture(
        deployKillSwitchFixture,
      );
      await escrow.connect(deployer).revokeRole(ROLES.GUARDIAN_ROLE, killSwitch);
      await expect(killSwitch.connect(guardian).pauseAll())
        .to.be.revertedWithCustomError(escrow, "AccessControlUnauthorizedAccount")
        .withArgs(await killSwitch.getAddress(), ROLES.GUARDIAN_ROLE);
      expect(await staking.paused()).to.equal(false);
    });

    it("reverts with AccessControlUnauthorizedAccount without GUARDIAN_ROLE on the kill switch", async function () {
      const { killSwitch, other, treasury } = await networkHelpers.loadFixture(deployKillSwitchFixture);
      for (const who of [other, treasury]) {
        await expect(killSwitch.connect(who).pauseAll())
          .to.be.revertedWithCustomError(killSwitch, "AccessControlUnauthorizedAccount")
          .withArgs(who.address, ROLES.GUARDIAN_ROLE);
      }
    });

    it("cannot be undone by the kill switch or its guardian: unpausing needs GOVERNOR_ROLE", async function () {
      const { killSwitch, staking, escrow, distributor, timelock, guardian } = await networkHelpers.loadFixture(
        deployKillSwitchFixture,
      );
      await killSwitch.connect(guardian).pauseAll();
      const names = killSwitch.interface.fragments.filter((f) => f.type === "function").map((f) => f.name);
      expect(names.filter((n) => /unpause/i.test(n))).to.deep.equal([]);
      for (const target of [staking, escrow, distributor]) {
        expect(await target.hasRole(ROLES.GOVERNOR_ROLE, killSwitch)).to.equal(false);
        expect(await target.hasRole(ROLES.GOVERNOR_ROLE, timelock)).to.equal(true);
        await expect(target.connect(guardian).unpause())
          .to.be.revertedWithCustomError(target, "AccessControlUnauthorizedAccount")
          .withArgs(guardian.address, ROLES.GOVERNOR_ROLE);
      }
    });
  });

  describe("allPaused", function () {
    it("is true only when every target is paused", async function () {
      const { killSwitch, staking, distributor, deployer } = await networkHelpers.loadFixture(deployKillSwitchFixture);
      expect(await killSwitch.allPaused()).to.equal(false);
      await staking.connect(deployer).pause();
      await distributor.connect(deployer).pause();
      expect(await killSwitch.allPaused()).to.equal(false);
    });
  });
});
