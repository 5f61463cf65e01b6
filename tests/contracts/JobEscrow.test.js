import { expect } from "chai";
import { network } from "hardhat";

import { jobIdFor, signPermit } from "./helpers.js";

const { ethers, networkHelpers } = await network.create();
const { time } = networkHelpers;

const SUPPLY = ethers.parseEther("1000000");
const FUNDING = ethers.parseEther("100");
const GRACE = 3600n; // cancelGrace, seconds
// Job ids start with their customer's address (JobEscrow refuses anyone else's first funding): the fixture's signers
// are, in order, admin, governor, guardian, settler, customer, customer2, provider, provider2, other.
const SIGNERS = await ethers.getSigners();
const JOB = jobIdFor(SIGNERS[4], "job-1"); // customer's
const JOB2 = jobIdFor(SIGNERS[4], "job-2"); // customer's second
const JOB_C2 = jobIdFor(SIGNERS[5], "job-c2"); // customer2's
const OTHER_JOB = jobIdFor(SIGNERS[8], "job-other"); // other's
const UNIT = ethers.id("unit-1");
const UNIT2 = ethers.id("unit-2");
const BATCH = ethers.id("batch-1");
const BATCH2 = ethers.id("batch-2");

/** getJob as a plain array [customer, funded, released, closed, closableAt]. */
async function jobOf(escrow, jobId) {
  return [...(await escrow.getJob(jobId))];
}

describe("JobEscrow", function () {
  // The governor is an EOA here (the timelock in production, see GridTimelock.test.js); the distributor is real.
  async function deployEscrowFixture() {
    const [admin, governor, guardian, settler, customer, customer2, provider, provider2, other] =
      await ethers.getSigners();
    const token = await ethers.deployContract("GridToken", [admin.address, SUPPLY]);
    const distributor = await ethers.deployContract("PayoutDistributor", [token, admin.address, governor.address, 0]);
    const escrow = await ethers.deployContract("JobEscrow", [
      token,
      admin.address,
      governor.address,
      distributor,
      GRACE,
    ]);
    await escrow.grantRole(await escrow.GUARDIAN_ROLE(), guardian.address);
    await escrow.grantRole(await escrow.SETTLER_ROLE(), settler.address);
    await escrow.grantRole(await escrow.UNIT_SETTLER_ROLE(), settler.address);
    await distributor.grantRole(await distributor.GUARDIAN_ROLE(), guardian.address);
    for (const c of [customer, customer2]) {
      await token.transfer(c.address, FUNDING * 10n);
      await token.connect(c).approve(escrow, ethers.MaxUint256);
    }
    return {
      token,
      distributor,
      escrow,
      admin,
      governor,
      guardian,
      settler,
      customer,
      customer2,
      provider,
      provider2,
      other,
    };
  }

  // customer funded JOB with FUNDING.
  async function fundedFixture() {
    const f = await deployEscrowFixture();
    await f.escrow.connect(f.customer).fund(JOB, FUNDING);
    return f;
  }

  // ... and 30 wei of it was released to provider for UNIT.
  async function releasedFixture() {
    const f = await fundedFixture();
    await f.escrow.connect(f.settler).release(JOB, UNIT, f.provider.address, 30n);
    return f;
  }

  // customer cancelled JOB; closableAt = the cancel's block + GRACE.
  async function cancelledFixture() {
    const f = await fundedFixture();
    await f.escrow.connect(f.customer).cancel(JOB);
    return { ...f, closableAt: BigInt(await time.latest()) + GRACE };
  }

  describe("constructor", function () {
    it("stores token, distributor and cancelGrace and grants admin and governor roles", async function () {
      const { token, distributor, escrow, admin, governor } = await networkHelpers.loadFixture(deployEscrowFixture);
      expect(await escrow.token()).to.equal(await token.getAddress());
      expect(await escrow.distributor()).to.equal(await distributor.getAddress());
      expect(await escrow.cancelGrace()).to.equal(GRACE);
      expect(await escrow.hasRole(await escrow.DEFAULT_ADMIN_ROLE(), admin.address)).to.equal(true);
      expect(await escrow.hasRole(await escrow.GOVERNOR_ROLE(), governor.address)).to.equal(true);
      expect(await escrow.hasRole(await escrow.GOVERNOR_ROLE(), admin.address)).to.equal(false);
    });

    it("reverts with EscrowZeroAddress for a zero token, admin, governor or distributor", async function () {
      const { token, distributor, admin, governor } = await networkHelpers.loadFixture(deployEscrowFixture);
      const factory = await ethers.getContractFactory("JobEscrow");
      const good = [await token.getAddress(), admin.address, governor.address, await distributor.getAddress()];
      for (let i = 0; i < good.length; i++) {
        const addrs = good.map((a, j) => (j === i ? ethers.ZeroAddress : a));
        await expect(factory.deploy(...addrs, GRACE)).to.be.revertedWithCustomError(factory, "EscrowZeroAddress");
      }
    });
  });

  describe("fund", function () {
    it("makes the address the id starts with its customer and emits JobFunded", async function () {
      const { token, escrow, customer } = await networkHelpers.loadFixture(deployEscrowFixture);
      const tx = escrow.connect(customer).fund(JOB, FUNDING);
      await expect(tx).to.emit(escrow, "JobFunded").withArgs(JOB, customer.address, FUNDING, FUNDING);
      await expect(tx).to.changeTokenBalances(ethers, token, [customer, escrow], [-FUNDING, FUNDING]);
      expect(await jobOf(escrow, JOB)).to.deep.equal([customer.address, FUNDING, 0n, false, 0n]);
    });

    it("lets the customer top up and reports the running total", async function () {
      const { escrow, customer } = await networkHelpers.loadFixture(fundedFixture);
      await expect(escrow.connect(customer).fund(JOB, 5n))
        .to.emit(escrow, "JobFunded")
        .withArgs(JOB, customer.address, 5n, FUNDING + 5n);
    });

    it("reverts with EscrowJobIdNotYours(jobId, caller) when another address funds a new job first", async function () {
      // review R3: the id was the first funder's to take, so anyone who saw it could squat it
      const { token, escrow, customer, customer2 } = await networkHelpers.loadFixture(deployEscrowFixture);
      await expect(escrow.connect(customer2).fund(JOB, 1n))
        .to.be.revertedWithCustomError(escrow, "EscrowJobIdNotYours")
        .withArgs(JOB, customer2.address);
      expect(await jobOf(escrow, JOB)).to.deep.equal([ethers.ZeroAddress, 0n, 0n, false, 0n]);
      await expect(escrow.connect(customer).fund(JOB, FUNDING)).to.changeTokenBalances(
        ethers, token, [customer, escrow], [-FUNDING, FUNDING]);
    });

    it("reverts with EscrowNotCustomer(jobId, caller, customer) when another address funds the job", async function () {
      const { escrow, customer, customer2 } = await networkHelpers.loadFixture(fundedFixture);
      await expect(escrow.connect(customer2).fund(JOB, 1n))
        .to.be.revertedWithCustomError(escrow, "EscrowNotCustomer")
        .withArgs(JOB, customer2.address, customer.address);
    });

    it("reverts with EscrowJobCancelled(jobId, closableAt) after cancel", async function () {
      const { escrow, customer, closableAt } = await networkHelpers.loadFixture(cancelledFixture);
      await expect(escrow.connect(customer).fund(JOB, 1n))
        .to.be.revertedWithCustomError(escrow, "EscrowJobCancelled")
        .withArgs(JOB, closableAt);
    });

    it("reverts with EscrowJobClosed(jobId) after close", async function () {
      const { escrow, settler, customer } = await networkHelpers.loadFixture(fundedFixture);
      await escrow.connect(settler).close(JOB);
      await expect(escrow.connect(customer).fund(JOB, 1n))
        .to.be.revertedWithCustomError(escrow, "EscrowJobClosed")
        .withArgs(JOB);
    });

    it("reverts with EscrowZeroAmount for 0", async function () {
      const { escrow, customer } = await networkHelpers.loadFixture(deployEscrowFixture);
      await expect(escrow.connect(customer).fund(JOB, 0n)).to.be.revertedWithCustomError(escrow, "EscrowZeroAmount");
    });

    it("reverts with ERC20InsufficientAllowance without approval", async function () {
      const { token, escrow, admin, other } = await networkHelpers.loadFixture(deployEscrowFixture);
      await token.connect(admin).transfer(other.address, 5n);
      await expect(escrow.connect(other).fund(OTHER_JOB, 5n))
        .to.be.revertedWithCustomError(token, "ERC20InsufficientAllowance")
        .withArgs(await escrow.getAddress(), 0n, 5n);
    });
  });

  describe("fundWithPermit", function () {
    it("funds without a prior approve", async function () {
      const { token, escrow, admin, other } = await networkHelpers.loadFixture(deployEscrowFixture);
      await token.connect(admin).transfer(other.address, 70n);
      const deadline = (await time.latest()) + 3600;
      const sig = await signPermit(token, other, await escrow.getAddress(), 70n, deadline);
      await expect(escrow.connect(other).fundWithPermit(OTHER_JOB, 70n, deadline, sig.v, sig.r, sig.s))
        .to.emit(escrow, "JobFunded")
        .withArgs(OTHER_JOB, other.address, 70n, 70n);
      expect(await token.balanceOf(other.address)).to.equal(0n);
      expect(await token.allowance(other.address, escrow)).to.equal(0n);
      expect(await token.nonces(other.address)).to.equal(1n);
    });

    it("still funds when the permit was already used (front-run)", async function () {
      const { token, escrow, admin, other } = await networkHelpers.loadFixture(deployEscrowFixture);
      await token.connect(admin).transfer(other.address, 70n);
      const deadline = (await time.latest()) + 3600;
      const sig = await signPermit(token, other, await escrow.getAddress(), 70n, deadline);
      await token.connect(admin).permit(other.address, escrow, 70n, deadline, sig.v, sig.r, sig.s);
      await expect(escrow.connect(other).fundWithPermit(OTHER_JOB, 70n, deadline, sig.v, sig.r, sig.s))
        .to.emit(escrow, "JobFunded")
        .withArgs(OTHER_JOB, other.address, 70n, 70n);
    });

    it("reverts with ERC20InsufficientAllowance for a bad permit and no allowance", async function () {
      const { token, escrow, admin, other } = await networkHelpers.loadFixture(deployEscrowFixture);
      await token.connect(admin).transfer(other.address, 70n);
      const deadline = (await time.latest()) + 3600;
      const sig = await signPermit(token, other, await escrow.getAddress(), 69n, deadline); // signed for 69
      await expect(escrow.connect(other).fundWithPermit(OTHER_JOB, 70n, deadline, sig.v, sig.r, sig.s))
        .to.be.revertedWithCustomError(token, "ERC20InsufficientAllowance")
        .withArgs(await escrow.getAddress(), 0n, 70n);
    });

    it("funds the customer's job although a front-runner copied its id from the pending transaction", async function () {
      // review R3: an attacker who funded the id first used to become its customer; the customer's call reverted
      const { token, escrow, admin, customer2: attacker, other } = await networkHelpers.loadFixture(deployEscrowFixture);
      await token.connect(admin).transfer(other.address, 70n);
      const deadline = (await time.latest()) + 3600;
      const sig = await signPermit(token, other, await escrow.getAddress(), 70n, deadline);
      await expect(escrow.connect(attacker).fund(OTHER_JOB, 1n))
        .to.be.revertedWithCustomError(escrow, "EscrowJobIdNotYours")
        .withArgs(OTHER_JOB, attacker.address);
      const own = await signPermit(token, attacker, await escrow.getAddress(), 1n, deadline);
      await expect(escrow.connect(attacker).fundWithPermit(OTHER_JOB, 1n, deadline, own.v, own.r, own.s))
        .to.be.revertedWithCustomError(escrow, "EscrowJobIdNotYours")
        .withArgs(OTHER_JOB, attacker.address);
      await expect(escrow.connect(other).fundWithPermit(OTHER_JOB, 70n, deadline, sig.v, sig.r, sig.s))
        .to.emit(escrow, "JobFunded")
        .withArgs(OTHER_JOB, other.address, 70n, 70n);
      expect(await jobOf(escrow, OTHER_JOB)).to.deep.equal([other.address, 70n, 0n, false, 0n]);
    });

    it("applies fund's checks: EscrowNotCustomer(jobId, caller, customer)", async function () {
      const { token, escrow, customer, customer2 } = await networkHelpers.loadFixture(fundedFixture);
      const deadline = (await time.latest()) + 3600;
      const sig = await signPermit(token, customer2, await escrow.getAddress(), 1n, deadline);
      await expect(escrow.connect(customer2).fundWithPermit(JOB, 1n, deadline, sig.v, sig.r, sig.s))
        .to.be.revertedWithCustomError(escrow, "EscrowNotCustomer")
        .withArgs(JOB, customer2.address, customer.address);
    });
  });

  describe("cancel", function () {
    it("starts the grace period and emits JobCancelled(jobId, now + cancelGrace)", async function () {
      const { escrow, customer } = await networkHelpers.loadFixture(fundedFixture);
      const tx = await escrow.connect(customer).cancel(JOB);
      const closableAt = BigInt(await time.latest()) + GRACE;
      await expect(tx).to.emit(escrow, "JobCancelled").withArgs(JOB, closableAt);
      expect(await jobOf(escrow, JOB)).to.deep.equal([customer.address, FUNDING, 0n, false, closableAt]);
    });

    it("still lets the settler pay units verified during the grace period, up to its last second", async function () {
      const { escrow, settler, provider, closableAt } = await networkHelpers.loadFixture(cancelledFixture);
      await time.increase(GRACE / 2n);
      await expect(escrow.connect(settler).release(JOB, UNIT, provider.address, 10n))
        .to.emit(escrow, "UnitReleased")
        .withArgs(JOB, UNIT, provider.address, 10n);
      await expect(escrow.connect(settler).releaseToPool(JOB, BATCH, 5n))
        .to.emit(escrow, "BatchReleased")
        .withArgs(JOB, BATCH, 5n);
      // An explicit gas limit skips estimation, so the call runs in a block at exactly the timestamp set.
      await time.setNextBlockTimestamp(closableAt - 1n);
      await expect(escrow.connect(settler).release(JOB, UNIT2, provider.address, 1n, { gasLimit: 300_000 })).to.emit(
        escrow,
        "UnitReleased",
      );
    });

    it("ends every release at closableAt: the customer's close then refunds the whole rest", async function () {
      // A reviewer's repro of the drain this closes: fund 1,000, cancel with a 120 s grace, wait 10,000 s; the
      // settler's release 900 + releaseToPool 100 used to succeed before the customer's close, which refunded 0.
      const { token, escrow, governor, settler, customer, provider } = await networkHelpers.loadFixture(
        deployEscrowFixture,
      );
      await escrow.connect(governor).setCancelGrace(120);
      await escrow.connect(customer).fund(JOB2, 1_000n);
      await escrow.connect(customer).cancel(JOB2);
      const closableAt = BigInt(await time.latest()) + 120n;
      await time.increase(10_000);
      await expect(escrow.connect(settler).release(JOB2, UNIT, provider.address, 900n))
        .to.be.revertedWithCustomError(escrow, "EscrowJobCancelled")
        .withArgs(JOB2, closableAt);
      await expect(escrow.connect(settler).releaseToPool(JOB2, BATCH, 100n))
        .to.be.revertedWithCustomError(escrow, "EscrowJobCancelled")
        .withArgs(JOB2, closableAt);
      const tx = escrow.connect(customer).close(JOB2);
      await expect(tx).to.emit(escrow, "JobClosed").withArgs(JOB2, 1_000n);
      await expect(tx).to.changeTokenBalances(ethers, token, [customer, escrow], [1_000n, -1_000n]);
    });

    it("reverts with EscrowJobCancelled(jobId, closableAt) the second time", async function () {
      const { escrow, customer, closableAt } = await networkHelpers.loadFixture(cancelledFixture);
      await expect(escrow.connect(customer).cancel(JOB))
        .to.be.revertedWithCustomError(escrow, "EscrowJobCancelled")
        .withArgs(JOB, closableAt);
    });

    it("reverts with EscrowNotCustomer(jobId, caller, customer) for anyone but the customer", async function () {
      const { escrow, settler, customer } = await networkHelpers.loadFixture(fundedFixture);
      await expect(escrow.connect(settler).cancel(JOB))
        .to.be.revertedWithCustomError(escrow, "EscrowNotCustomer")
        .withArgs(JOB, settler.address, customer.address);
    });

    it("reverts with EscrowJobClosed(jobId) on a closed job", async function () {
      const { escrow, settler, customer } = await networkHelpers.loadFixture(fundedFixture);
      await escrow.connect(settler).close(JOB);
      await expect(escrow.connect(customer).cancel(JOB))
        .to.be.revertedWithCustomError(escrow, "EscrowJobClosed")
        .withArgs(JOB);
    });

    it("reverts with EscrowUnknownJob(jobId) for a job never funded", async function () {
      const { escrow, customer } = await networkHelpers.loadFixture(deployEscrowFixture);
      await expect(escrow.connect(customer).cancel(JOB2))
        .to.be.revertedWithCustomError(escrow, "EscrowUnknownJob")
        .withArgs(JOB2);
    });
  });

  describe("close", function () {
    it("lets the customer close after cancel + cancelGrace and refunds the unreleased rest", async function () {
      const { token, escrow, settler, customer, provider, closableAt } = await networkHelpers.loadFixture(
        cancelledFixture,
      );
      await escrow.connect(settler).release(JOB, UNIT, provider.address, 30n);
      await time.increaseTo(closableAt);
      const tx = escrow.connect(customer).close(JOB);
      await expect(tx)
        .to.emit(escrow, "JobClosed")
        .withArgs(JOB, FUNDING - 30n);
      await expect(tx).to.changeTokenBalances(ethers, token, [customer, escrow], [FUNDING - 30n, -(FUNDING - 30n)]);
      expect(await jobOf(escrow, JOB)).to.deep.equal([customer.address, FUNDING, 30n, true, closableAt]);
      expect(await token.balanceOf(escrow)).to.equal(30n); // still owed to the provider
    });

    it("reverts with EscrowCancelPending(jobId, closableAt) for the customer inside the grace period", async function () {
      const { escrow, customer, closableAt } = await networkHelpers.loadFixture(cancelledFixture);
      await time.increase(GRACE - 100n);
      await expect(escrow.connect(customer).close(JOB))
        .to.be.revertedWithCustomError(escrow, "EscrowCancelPending")
        .withArgs(JOB, closableAt);
    });

    it("reverts with EscrowCancelPending(jobId, 0) for a customer who did not cancel", async function () {
      const { escrow, customer } = await networkHelpers.loadFixture(fundedFixture);
      await expect(escrow.connect(customer).close(JOB))
        .to.be.revertedWithCustomError(escrow, "EscrowCancelPending")
        .withArgs(JOB, 0n);
    });

    it("lets a settler close at any time and refunds the customer, not the settler", async function () {
      const { token, escrow, settler, customer } = await networkHelpers.loadFixture(releasedFixture);
      const tx = escrow.connect(settler).close(JOB);
      await expect(tx)
        .to.emit(escrow, "JobClosed")
        .withArgs(JOB, FUNDING - 30n);
      await expect(tx).to.changeTokenBalances(
        ethers,
        token,
        [customer, settler, escrow],
        [FUNDING - 30n, 0n, -(FUNDING - 30n)],
      );
    });

    it("moves no token when everything was released", async function () {
      const { token, escrow, settler } = await networkHelpers.loadFixture(fundedFixture);
      await escrow.connect(settler).releaseToPool(JOB, BATCH, FUNDING);
      const tx = escrow.connect(settler).close(JOB);
      await expect(tx).to.emit(escrow, "JobClosed").withArgs(JOB, 0n);
      await expect(tx).to.not.emit(token, "Transfer");
    });

    it("reverts with EscrowNotAuthorized(jobId, caller) for anyone else", async function () {
      const { escrow, other } = await networkHelpers.loadFixture(cancelledFixture);
      await time.increase(GRACE);
      await expect(escrow.connect(other).close(JOB))
        .to.be.revertedWithCustomError(escrow, "EscrowNotAuthorized")
        .withArgs(JOB, other.address);
    });

    it("reverts with EscrowJobClosed(jobId) the second time", async function () {
      const { escrow, settler, customer } = await networkHelpers.loadFixture(fundedFixture);
      await escrow.connect(settler).close(JOB);
      for (const who of [settler, customer]) {
        await expect(escrow.connect(who).close(JOB))
          .to.be.revertedWithCustomError(escrow, "EscrowJobClosed")
          .withArgs(JOB);
      }
    });

    it("reverts with EscrowUnknownJob(jobId) for a job never funded", async function () {
      const { escrow, settler } = await networkHelpers.loadFixture(deployEscrowFixture);
      await expect(escrow.connect(settler).close(JOB2))
        .to.be.revertedWithCustomError(escrow, "EscrowUnknownJob")
        .withArgs(JOB2);
    });
  });

  describe("release", function () {
    it("credits the provider and emits UnitReleased", async function () {
      const { token, escrow, settler, provider, customer } = await networkHelpers.loadFixture(fundedFixture);
      const tx = escrow.connect(settler).release(JOB, UNIT, provider.address, 30n);
      await expect(tx).to.emit(escrow, "UnitReleased").withArgs(JOB, UNIT, provider.address, 30n);
      await expect(tx).to.changeTokenBalances(ethers, token, [escrow, provider], [0n, 0n]); // pull payment
      expect(await escrow.claimable(provider.address)).to.equal(30n);
      expect(await escrow.totalClaimable()).to.equal(30n);
      expect(await escrow.unitReleased(JOB, UNIT)).to.equal(true);
      expect(await escrow.unitReleased(JOB, UNIT2)).to.equal(false);
      expect(await jobOf(escrow, JOB)).to.deep.equal([customer.address, FUNDING, 30n, false, 0n]);
    });

    it("reverts with EscrowUnitAlreadyReleased(jobId, unitId) for the same unit twice", async function () {
      const { escrow, settler, provider } = await networkHelpers.loadFixture(releasedFixture);
      await expect(escrow.connect(settler).release(JOB, UNIT, provider.address, 30n))
        .to.be.revertedWithCustomError(escrow, "EscrowUnitAlreadyReleased")
        .withArgs(JOB, UNIT);
    });

    it("reverts with EscrowInsufficientFunds(jobId, available, need) past the funding", async function () {
      const { escrow, settler, provider } = await networkHelpers.loadFixture(releasedFixture);
      await expect(escrow.connect(settler).release(JOB, UNIT2, provider.address, FUNDING))
        .to.be.revertedWithCustomError(escrow, "EscrowInsufficientFunds")
        .withArgs(JOB, FUNDING - 30n, FUNDING);
    });

    it("reverts with EscrowInsufficientFunds for an unfunded job", async function () {
      const { escrow, settler, provider } = await networkHelpers.loadFixture(deployEscrowFixture);
      await expect(escrow.connect(settler).release(JOB2, UNIT, provider.address, 1n))
        .to.be.revertedWithCustomError(escrow, "EscrowInsufficientFunds")
        .withArgs(JOB2, 0n, 1n);
    });

    it("reverts with EscrowJobClosed(jobId) on a closed job", async function () {
      const { escrow, settler, provider } = await networkHelpers.loadFixture(fundedFixture);
      await escrow.connect(settler).close(JOB);
      await expect(escrow.connect(settler).release(JOB, UNIT, provider.address, 1n))
        .to.be.revertedWithCustomError(escrow, "EscrowJobClosed")
        .withArgs(JOB);
    });

    it("reverts with EscrowJobCancelled(jobId, closableAt) from the end of a cancel's grace on", async function () {
      const { escrow, settler, provider, closableAt } = await networkHelpers.loadFixture(cancelledFixture);
      await time.setNextBlockTimestamp(closableAt);
      await expect(escrow.connect(settler).release(JOB, UNIT, provider.address, 1n, { gasLimit: 300_000 }))
        .to.be.revertedWithCustomError(escrow, "EscrowJobCancelled")
        .withArgs(JOB, closableAt);
      expect(await escrow.unitReleased(JOB, UNIT)).to.equal(false);
    });

    it("reverts with EscrowZeroAmount and EscrowZeroAddress", async function () {
      const { escrow, settler, provider } = await networkHelpers.loadFixture(fundedFixture);
      await expect(escrow.connect(settler).release(JOB, UNIT, provider.address, 0n)).to.be.revertedWithCustomError(
        escrow,
        "EscrowZeroAmount",
      );
      await expect(escrow.connect(settler).release(JOB, UNIT, ethers.ZeroAddress, 1n)).to.be.revertedWithCustomError(
        escrow,
        "EscrowZeroAddress",
      );
    });

    it("pays a cancelled job's verified work into the pool while the distributor alone is paused", async function () {
      // the grace counts only the escrow's own paused time: a releaseToPool the distributor's pause refused could
      // run out the grace, and the providers' pay would go back to the customer
      const { escrow, distributor, guardian, settler, customer, closableAt } = await networkHelpers.loadFixture(
        cancelledFixture,
      );
      await distributor.connect(guardian).pause();
      await expect(escrow.connect(settler).releaseToPool(JOB, BATCH, 40n))
        .to.emit(escrow, "BatchReleased")
        .withArgs(JOB, BATCH, 40n);
      expect(await distributor.totalDeposited()).to.equal(40n);
      await time.increaseTo(closableAt);
      await escrow.connect(customer).close(JOB);
      const [, funded, released, closed] = await escrow.getJob(JOB);
      expect([released, closed]).to.deep.equal([40n, true]);
      expect(funded).to.be.greaterThan(40n);
    });

    it("reverts with AccessControlUnauthorizedAccount without UNIT_SETTLER_ROLE", async function () {
      const { escrow, customer, provider } = await networkHelpers.loadFixture(fundedFixture);
      await expect(escrow.connect(customer).release(JOB, UNIT, provider.address, 1n))
        .to.be.revertedWithCustomError(escrow, "AccessControlUnauthorizedAccount")
        .withArgs(customer.address, await escrow.UNIT_SETTLER_ROLE());
    });

    it("is not the pool settler's: SETTLER_ROLE alone (a production operator key) cannot pay an address at once",
      async function () {
        const { escrow, admin, customer, provider } = await networkHelpers.loadFixture(fundedFixture);
        await escrow.connect(admin).grantRole(await escrow.SETTLER_ROLE(), customer.address);
        await expect(escrow.connect(customer).release(JOB, UNIT, provider.address, 1n))
          .to.be.revertedWithCustomError(escrow, "AccessControlUnauthorizedAccount")
          .withArgs(customer.address, await escrow.UNIT_SETTLER_ROLE());
      });
  });

  describe("releaseToPool", function () {
    it("moves the batch's pay into the distributor and emits BatchReleased and Deposited", async function () {
      const { token, distributor, escrow, settler, customer } = await networkHelpers.loadFixture(fundedFixture);
      const tx = escrow.connect(settler).releaseToPool(JOB, BATCH, 40n);
      await expect(tx).to.emit(escrow, "BatchReleased").withArgs(JOB, BATCH, 40n);
      await expect(tx)
        .to.emit(distributor, "Deposited")
        .withArgs(await escrow.getAddress(), 40n, 40n);
      await expect(tx).to.changeTokenBalances(ethers, token, [escrow, distributor], [-40n, 40n]);
      expect(await distributor.totalDeposited()).to.equal(40n);
      expect(await escrow.batchReleased(JOB, BATCH)).to.equal(true);
      expect(await escrow.batchReleased(JOB, BATCH2)).to.equal(false);
      expect(await escrow.unitReleased(JOB, BATCH)).to.equal(false); // batches and units are separate
      expect(await jobOf(escrow, JOB)).to.deep.equal([customer.address, FUNDING, 40n, false, 0n]);
      expect(await token.allowance(escrow, distributor)).to.equal(0n); // the approval was spent exactly
    });

    it("reverts with EscrowUnitAlreadyReleased(jobId, batchId) for the same batch twice", async function () {
      const { escrow, settler } = await networkHelpers.loadFixture(fundedFixture);
      await escrow.connect(settler).releaseToPool(JOB, BATCH, 1n);
      await expect(escrow.connect(settler).releaseToPool(JOB, BATCH, 1n))
        .to.be.revertedWithCustomError(escrow, "EscrowUnitAlreadyReleased")
        .withArgs(JOB, BATCH);
    });

    it("reverts with EscrowInsufficientFunds(jobId, available, need) past the funding", async function () {
      const { escrow, settler } = await networkHelpers.loadFixture(releasedFixture);
      await expect(escrow.connect(settler).releaseToPool(JOB, BATCH, FUNDING - 29n))
        .to.be.revertedWithCustomError(escrow, "EscrowInsufficientFunds")
        .withArgs(JOB, FUNDING - 30n, FUNDING - 29n);
    });

    it("reverts with EscrowJobClosed(jobId) and EscrowZeroAmount", async function () {
      const { escrow, settler } = await networkHelpers.loadFixture(fundedFixture);
      await expect(escrow.connect(settler).releaseToPool(JOB, BATCH, 0n)).to.be.revertedWithCustomError(
        escrow,
        "EscrowZeroAmount",
      );
      await escrow.connect(settler).close(JOB);
      await expect(escrow.connect(settler).releaseToPool(JOB, BATCH, 1n))
        .to.be.revertedWithCustomError(escrow, "EscrowJobClosed")
        .withArgs(JOB);
    });

    it("reverts with EscrowJobCancelled(jobId, closableAt) from the end of a cancel's grace on", async function () {
      const { distributor, escrow, settler, closableAt } = await networkHelpers.loadFixture(cancelledFixture);
      await time.setNextBlockTimestamp(closableAt);
      await expect(escrow.connect(settler).releaseToPool(JOB, BATCH, 1n, { gasLimit: 300_000 }))
        .to.be.revertedWithCustomError(escrow, "EscrowJobCancelled")
        .withArgs(JOB, closableAt);
      expect(await distributor.totalDeposited()).to.equal(0n);
    });

    it("reverts with AccessControlUnauthorizedAccount without SETTLER_ROLE", async function () {
      const { escrow, customer } = await networkHelpers.loadFixture(fundedFixture);
      await expect(escrow.connect(customer).releaseToPool(JOB, BATCH, 1n))
        .to.be.revertedWithCustomError(escrow, "AccessControlUnauthorizedAccount")
        .withArgs(customer.address, await escrow.SETTLER_ROLE());
    });
  });

  describe("claim", function () {
    it("pays the provider everything released to it and emits Claimed", async function () {
      const { token, escrow, settler, provider } = await networkHelpers.loadFixture(releasedFixture);
      await escrow.connect(settler).release(JOB, UNIT2, provider.address, 12n);
      expect(await escrow.connect(provider).claim.staticCall()).to.equal(42n);
      const tx = escrow.connect(provider).claim();
      await expect(tx).to.emit(escrow, "Claimed").withArgs(provider.address, 42n);
      await expect(tx).to.changeTokenBalances(ethers, token, [provider, escrow], [42n, -42n]);
      expect(await escrow.claimable(provider.address)).to.equal(0n);
      expect(await escrow.totalClaimable()).to.equal(0n);
    });

    it("still pays after the job was closed", async function () {
      const { token, escrow, settler, provider } = await networkHelpers.loadFixture(releasedFixture);
      await escrow.connect(settler).close(JOB);
      await expect(escrow.connect(provider).claim()).to.changeTokenBalances(
        ethers,
        token,
        [provider, escrow],
        [30n, -30n],
      );
    });

    it("reverts with EscrowNothingToClaim(account) when nothing is owed", async function () {
      const { escrow, provider } = await networkHelpers.loadFixture(releasedFixture);
      await escrow.connect(provider).claim();
      await expect(escrow.connect(provider).claim())
        .to.be.revertedWithCustomError(escrow, "EscrowNothingToClaim")
        .withArgs(provider.address);
    });
  });

  describe("pause", function () {
    it("blocks fund, fundWithPermit, cancel, close, release, releaseToPool and claim with EnforcedPause", async function () {
      const { token, escrow, guardian, settler, customer, provider } = await networkHelpers.loadFixture(
        releasedFixture,
      );
      await expect(escrow.connect(guardian).pause()).to.emit(escrow, "Paused").withArgs(guardian.address);
      const deadline = (await time.latest()) + 3600;
      const sig = await signPermit(token, customer, await escrow.getAddress(), 1n, deadline);
      const calls = [
        () => escrow.connect(customer).fund(JOB, 1n),
        () => escrow.connect(customer).fundWithPermit(JOB, 1n, deadline, sig.v, sig.r, sig.s),
        () => escrow.connect(customer).cancel(JOB),
        () => escrow.connect(settler).close(JOB),
        () => escrow.connect(settler).release(JOB, UNIT2, provider.address, 1n),
        () => escrow.connect(settler).releaseToPool(JOB, BATCH, 1n),
        () => escrow.connect(provider).claim(),
      ];
      for (const call of calls) {
        await expect(call()).to.be.revertedWithCustomError(escrow, "EnforcedPause");
      }
    });

    it("reverts with AccessControlUnauthorizedAccount without GUARDIAN_ROLE", async function () {
      const { escrow, settler, governor } = await networkHelpers.loadFixture(deployEscrowFixture);
      for (const who of [settler, governor]) {
        await expect(escrow.connect(who).pause())
          .to.be.revertedWithCustomError(escrow, "AccessControlUnauthorizedAccount")
          .withArgs(who.address, await escrow.GUARDIAN_ROLE());
      }
    });
  });

  describe("unpause", function () {
    it("lets the governor restore every flow and emits Unpaused", async function () {
      const { escrow, guardian, governor, settler, customer, provider } = await networkHelpers.loadFixture(
        releasedFixture,
      );
      await escrow.connect(guardian).pause();
      await expect(escrow.connect(governor).unpause()).to.emit(escrow, "Unpaused").withArgs(governor.address);
      await escrow.connect(customer).fund(JOB, 1n);
      await escrow.connect(settler).release(JOB, UNIT2, provider.address, 1n);
      await escrow.connect(settler).releaseToPool(JOB, BATCH, 1n);
      await escrow.connect(customer).cancel(JOB);
      await escrow.connect(settler).close(JOB);
      await escrow.connect(provider).claim();
      expect(await escrow.claimable(provider.address)).to.equal(0n);
    });

    it("reverts with AccessControlUnauthorizedAccount for the guardian and the admin", async function () {
      const { escrow, admin, guardian } = await networkHelpers.loadFixture(deployEscrowFixture);
      await escrow.connect(guardian).pause();
      for (const who of [guardian, admin]) {
        await expect(escrow.connect(who).unpause())
          .to.be.revertedWithCustomError(escrow, "AccessControlUnauthorizedAccount")
          .withArgs(who.address, await escrow.GOVERNOR_ROLE());
      }
    });

    it("reverts with ExpectedPause when not paused", async function () {
      const { escrow, governor } = await networkHelpers.loadFixture(deployEscrowFixture);
      await expect(escrow.connect(governor).unpause()).to.be.revertedWithCustomError(escrow, "ExpectedPause");
    });
  });

  describe("pausedSeconds and a pause during a cancel's grace", function () {
    // The guardian pauses 600 s into JOB's grace; the timelocked unpause lands 1,000 s after the nominal closableAt.
    // The escrow was paused for PAUSED seconds, so the grace ends PAUSED seconds later: at `extended`.
    async function pausedInGraceFixture() {
      const f = await cancelledFixture();
      const cancelledAt = f.closableAt - GRACE;
      await time.setNextBlockTimestamp(cancelledAt + 600n);
      await f.escrow.connect(f.guardian).pause();
      await time.setNextBlockTimestamp(f.closableAt + 1_000n);
      await f.escrow.connect(f.governor).unpause();
      const paused = f.closableAt + 1_000n - (cancelledAt + 600n);
      return { ...f, paused, extended: f.closableAt + paused };
    }

    it("counts the seconds paused, the current pause included", async function () {
      const { escrow, guardian, governor } = await networkHelpers.loadFixture(deployEscrowFixture);
      expect(await escrow.pausedSeconds()).to.equal(0n);
      await escrow.connect(guardian).pause();
      const pausedAt = BigInt(await time.latest());
      await time.increase(500);
      expect(await escrow.pausedSeconds()).to.equal(BigInt(await time.latest()) - pausedAt);
      await time.setNextBlockTimestamp(pausedAt + 1_000n);
      await escrow.connect(governor).unpause();
      await time.increase(5_000);
      expect(await escrow.pausedSeconds()).to.equal(1_000n); // stands still once unpaused
    });

    it("reports the deadline in force from getJob, moving with the clock while paused", async function () {
      const { escrow, guardian, customer, closableAt } = await networkHelpers.loadFixture(cancelledFixture);
      await escrow.connect(guardian).pause();
      const pausedAt = BigInt(await time.latest());
      await time.increase(GRACE * 2n);
      const pausedFor = BigInt(await time.latest()) - pausedAt;
      expect(await jobOf(escrow, JOB)).to.deep.equal([customer.address, FUNDING, 0n, false, closableAt + pausedFor]);
    });

    it("still lets the settler pay units after the nominal closableAt, up to the extended deadline's last second", async function () {
      const { escrow, settler, customer, provider, closableAt, paused, extended } = await networkHelpers.loadFixture(
        pausedInGraceFixture,
      );
      expect(await escrow.pausedSeconds()).to.equal(paused);
      expect(await jobOf(escrow, JOB)).to.deep.equal([customer.address, FUNDING, 0n, false, extended]);
      expect(BigInt(await time.latest())).to.be.greaterThan(closableAt); // past the nominal grace
      await expect(escrow.connect(settler).release(JOB, UNIT, provider.address, 10n))
        .to.emit(escrow, "UnitReleased")
        .withArgs(JOB, UNIT, provider.address, 10n);
      await expect(escrow.connect(settler).releaseToPool(JOB, BATCH, 5n))
        .to.emit(escrow, "BatchReleased")
        .withArgs(JOB, BATCH, 5n);
      await time.setNextBlockTimestamp(extended - 1n);
      await expect(escrow.connect(settler).release(JOB, UNIT2, provider.address, 1n, { gasLimit: 300_000 })).to.emit(
        escrow,
        "UnitReleased",
      );
    });

    it("refuses the customer's close until the extended deadline (EscrowCancelPending with it), then refunds the rest", async function () {
      const { token, escrow, settler, customer, provider, extended } = await networkHelpers.loadFixture(
        pausedInGraceFixture,
      );
      await escrow.connect(settler).release(JOB, UNIT, provider.address, 30n);
      await time.setNextBlockTimestamp(extended - 1n);
      await expect(escrow.connect(customer).close(JOB, { gasLimit: 300_000 }))
        .to.be.revertedWithCustomError(escrow, "EscrowCancelPending")
        .withArgs(JOB, extended);
      const tx = escrow.connect(customer).close(JOB);
      await expect(tx).to.emit(escrow, "JobClosed").withArgs(JOB, FUNDING - 30n);
      await expect(tx).to.changeTokenBalances(ethers, token, [customer, escrow], [FUNDING - 30n, -(FUNDING - 30n)]);
      expect(await jobOf(escrow, JOB)).to.deep.equal([customer.address, FUNDING, 30n, true, extended]);
    });

    it("reverts release and releaseToPool with EscrowJobCancelled(jobId, extended deadline) from then on", async function () {
      const { distributor, escrow, settler, provider, extended } = await networkHelpers.loadFixture(
        pausedInGraceFixture,
      );
      await time.setNextBlockTimestamp(extended);
      await expect(escrow.connect(settler).release(JOB, UNIT, provider.address, 1n, { gasLimit: 300_000 }))
        .to.be.revertedWithCustomError(escrow, "EscrowJobCancelled")
        .withArgs(JOB, extended);
      await expect(escrow.connect(settler).releaseToPool(JOB, BATCH, 1n))
        .to.be.revertedWithCustomError(escrow, "EscrowJobCancelled")
        .withArgs(JOB, extended);
      expect(await distributor.totalDeposited()).to.equal(0n);
    });

    it("does not move the deadline of a cancel made after the pause", async function () {
      const { escrow, guardian, governor, customer } = await networkHelpers.loadFixture(fundedFixture);
      await escrow.connect(guardian).pause();
      await time.increase(10_000);
      await escrow.connect(governor).unpause();
      await escrow.connect(customer).cancel(JOB);
      const closableAt = BigInt(await time.latest()) + GRACE;
      expect((await jobOf(escrow, JOB))[4]).to.equal(closableAt);
      await time.increaseTo(closableAt);
      await expect(escrow.connect(customer).close(JOB)).to.emit(escrow, "JobClosed").withArgs(JOB, FUNDING);
    });

    it("does not reopen releases for a job whose grace had already ended when the pause began", async function () {
      const { escrow, guardian, governor, settler, customer, provider, closableAt } = await networkHelpers.loadFixture(
        cancelledFixture,
      );
      await time.increaseTo(closableAt + 10n);
      await escrow.connect(guardian).pause();
      await time.increase(GRACE * 3n);
      await escrow.connect(governor).unpause();
      const deadline = (await jobOf(escrow, JOB))[4];
      expect(deadline).to.be.lessThan(BigInt(await time.latest()));
      await expect(escrow.connect(settler).release(JOB, UNIT, provider.address, 1n))
        .to.be.revertedWithCustomError(escrow, "EscrowJobCancelled")
        .withArgs(JOB, deadline);
      await expect(escrow.connect(customer).close(JOB)).to.emit(escrow, "JobClosed").withArgs(JOB, FUNDING);
    });
  });

  describe("setCancelGrace", function () {
    it("applies to the next cancel and emits CancelGraceSet", async function () {
      const { escrow, governor, customer } = await networkHelpers.loadFixture(fundedFixture);
      await expect(escrow.connect(governor).setCancelGrace(0)).to.emit(escrow, "CancelGraceSet").withArgs(0);
      expect(await escrow.cancelGrace()).to.equal(0n);
      const tx = await escrow.connect(customer).cancel(JOB);
      await expect(tx)
        .to.emit(escrow, "JobCancelled")
        .withArgs(JOB, BigInt(await time.latest()));
      await expect(escrow.connect(customer).close(JOB)).to.emit(escrow, "JobClosed").withArgs(JOB, FUNDING);
    });

    it("reverts with AccessControlUnauthorizedAccount without GOVERNOR_ROLE", async function () {
      const { escrow, admin } = await networkHelpers.loadFixture(deployEscrowFixture);
      await expect(escrow.connect(admin).setCancelGrace(1))
        .to.be.revertedWithCustomError(escrow, "AccessControlUnauthorizedAccount")
        .withArgs(admin.address, await escrow.GOVERNOR_ROLE());
    });
  });

  describe("views", function () {
    it("balance == sum over open jobs of (funded - released) + totalClaimable", async function () {
      const { token, escrow, settler, customer, customer2, provider, provider2 } = await networkHelpers.loadFixture(
        releasedFixture,
      );
      await escrow.connect(customer2).fund(JOB_C2, 50n);
      await escrow.connect(settler).release(JOB_C2, UNIT, provider2.address, 7n);
      await escrow.connect(settler).releaseToPool(JOB_C2, BATCH, 8n);
      await escrow.connect(settler).close(JOB);
      await escrow.connect(provider).claim();
      const open = await jobOf(escrow, JOB_C2);
      expect(open[3]).to.equal(false);
      expect(await token.balanceOf(escrow)).to.equal(open[1] - open[2] + (await escrow.totalClaimable()));
      expect(await escrow.totalClaimable()).to.equal(7n);
      expect((await jobOf(escrow, JOB))[0]).to.equal(customer.address);
    });
  });
});
