import { expect } from "chai";
import { network } from "hardhat";

const { ethers, networkHelpers } = await network.create();

const SUPPLY = ethers.parseEther("1000000");
const FUNDING = ethers.parseEther("100");
const JOB = ethers.id("job-1");
const JOB2 = ethers.id("job-2");
const UNIT = ethers.id("unit-1");
const UNIT2 = ethers.id("unit-2");

async function signPermit(token, owner, spender, value, deadline) {
  const { chainId } = await ethers.provider.getNetwork();
  const domain = { name: await token.name(), version: "1", chainId, verifyingContract: await token.getAddress() };
  const types = {
    Permit: [
      { name: "owner", type: "address" },
      { name: "spender", type: "address" },
      { name: "value", type: "uint256" },
      { name: "nonce", type: "uint256" },
      { name: "deadline", type: "uint256" },
    ],
  };
  const nonce = await token.nonces(owner.address);
  return ethers.Signature.from(
    await owner.signTypedData(domain, types, { owner: owner.address, spender, value, nonce, deadline }),
  );
}

describe("JobEscrow", function () {
  async function deployEscrowFixture() {
    const [admin, guardian, settler, customer, customer2, provider, provider2, other] = await ethers.getSigners();
    const token = await ethers.deployContract("GridToken", [admin.address, SUPPLY]);
    const escrow = await ethers.deployContract("JobEscrow", [await token.getAddress(), admin.address]);
    await escrow.grantRole(await escrow.GUARDIAN_ROLE(), guardian.address);
    await escrow.grantRole(await escrow.SETTLER_ROLE(), settler.address);
    for (const c of [customer, customer2]) {
      await token.transfer(c.address, FUNDING * 10n);
      await token.connect(c).approve(await escrow.getAddress(), ethers.MaxUint256);
    }
    return { token, escrow, admin, guardian, settler, customer, customer2, provider, provider2, other };
  }

  async function fundedFixture() {
    const f = await deployEscrowFixture();
    await f.escrow.connect(f.customer).fund(JOB, FUNDING);
    return f;
  }

  async function releasedFixture() {
    const f = await fundedFixture();
    await f.escrow.connect(f.settler).release(JOB, UNIT, f.provider.address, 30n);
    return f;
  }

  describe("constructor", function () {
    it("grants DEFAULT_ADMIN_ROLE to admin", async function () {
      const { escrow, admin, token } = await networkHelpers.loadFixture(deployEscrowFixture);
      expect(await escrow.hasRole(await escrow.DEFAULT_ADMIN_ROLE(), admin.address)).to.equal(true);
      expect(await escrow.token()).to.equal(await token.getAddress());
    });

    it("reverts with EscrowZeroAddress for a zero admin", async function () {
      const { token } = await networkHelpers.loadFixture(deployEscrowFixture);
      const factory = await ethers.getContractFactory("JobEscrow");
      await expect(factory.deploy(await token.getAddress(), ethers.ZeroAddress)).to.be.revertedWithCustomError(
        factory,
        "EscrowZeroAddress",
      );
    });
  });

  describe("fund", function () {
    it("makes the first funder the customer and emits JobFunded", async function () {
      const { token, escrow, customer } = await networkHelpers.loadFixture(deployEscrowFixture);
      await expect(escrow.connect(customer).fund(JOB, FUNDING))
        .to.emit(escrow, "JobFunded")
        .withArgs(JOB, customer.address, FUNDING, FUNDING);
      expect(await escrow.getJob(JOB)).to.deep.equal([customer.address, FUNDING, 0n, false]);
      expect(await token.balanceOf(await escrow.getAddress())).to.equal(FUNDING);
    });

    it("lets the customer top up and reports the running total", async function () {
      const { escrow, customer } = await networkHelpers.loadFixture(fundedFixture);
      await expect(escrow.connect(customer).fund(JOB, 5n))
        .to.emit(escrow, "JobFunded")
        .withArgs(JOB, customer.address, 5n, FUNDING + 5n);
    });

    it("reverts with EscrowNotCustomer when another address funds the job", async function () {
      const { escrow, customer, customer2 } = await networkHelpers.loadFixture(fundedFixture);
      await expect(escrow.connect(customer2).fund(JOB, 1n))
        .to.be.revertedWithCustomError(escrow, "EscrowNotCustomer")
        .withArgs(JOB, customer2.address, customer.address);
    });

    it("reverts with EscrowJobClosed after close", async function () {
      const { escrow, customer } = await networkHelpers.loadFixture(fundedFixture);
      await escrow.connect(customer).close(JOB);
      await expect(escrow.connect(customer).fund(JOB, 1n))
        .to.be.revertedWithCustomError(escrow, "EscrowJobClosed")
        .withArgs(JOB);
    });

    it("reverts with EscrowZeroAmount for 0", async function () {
      const { escrow, customer } = await networkHelpers.loadFixture(deployEscrowFixture);
      await expect(escrow.connect(customer).fund(JOB, 0n)).to.be.revertedWithCustomError(escrow, "EscrowZeroAmount");
    });
  });

  describe("fundWithPermit", function () {
    it("funds without a prior approve", async function () {
      const { token, escrow, admin, other } = await networkHelpers.loadFixture(deployEscrowFixture);
      await token.connect(admin).transfer(other.address, 70n);
      const deadline = (await networkHelpers.time.latest()) + 3600;
      const sig = await signPermit(token, other, await escrow.getAddress(), 70n, deadline);
      await expect(escrow.connect(other).fundWithPermit(JOB2, 70n, deadline, sig.v, sig.r, sig.s))
        .to.emit(escrow, "JobFunded")
        .withArgs(JOB2, other.address, 70n, 70n);
      expect(await token.balanceOf(other.address)).to.equal(0n);
      expect(await token.allowance(other.address, await escrow.getAddress())).to.equal(0n);
    });

    it("still funds when the permit was already used (front-run)", async function () {
      const { token, escrow, admin, other } = await networkHelpers.loadFixture(deployEscrowFixture);
      await token.connect(admin).transfer(other.address, 70n);
      const deadline = (await networkHelpers.time.latest()) + 3600;
      const sig = await signPermit(token, other, await escrow.getAddress(), 70n, deadline);
      await token.connect(admin).permit(other.address, await escrow.getAddress(), 70n, deadline, sig.v, sig.r, sig.s);
      await expect(escrow.connect(other).fundWithPermit(JOB2, 70n, deadline, sig.v, sig.r, sig.s))
        .to.emit(escrow, "JobFunded")
        .withArgs(JOB2, other.address, 70n, 70n);
    });

    it("reverts with ERC20InsufficientAllowance for a bad permit and no allowance", async function () {
      const { token, escrow, admin, other } = await networkHelpers.loadFixture(deployEscrowFixture);
      await token.connect(admin).transfer(other.address, 70n);
      const deadline = (await networkHelpers.time.latest()) + 3600;
      const sig = await signPermit(token, other, await escrow.getAddress(), 69n, deadline); // signed for 69
      await expect(escrow.connect(other).fundWithPermit(JOB2, 70n, deadline, sig.v, sig.r, sig.s))
        .to.be.revertedWithCustomError(token, "ERC20InsufficientAllowance")
        .withArgs(await escrow.getAddress(), 0n, 70n);
    });
  });

  describe("release", function () {
    it("credits the provider and emits UnitReleased", async function () {
      const { escrow, settler, provider, customer } = await networkHelpers.loadFixture(fundedFixture);
      await expect(escrow.connect(settler).release(JOB, UNIT, provider.address, 30n))
        .to.emit(escrow, "UnitReleased")
        .withArgs(JOB, UNIT, provider.address, 30n);
      expect(await escrow.claimable(provider.address)).to.equal(30n);
      expect(await escrow.unitReleased(JOB, UNIT)).to.equal(true);
      expect(await escrow.unitReleased(JOB, UNIT2)).to.equal(false);
      expect(await escrow.getJob(JOB)).to.deep.equal([customer.address, FUNDING, 30n, false]);
    });

    it("reverts with EscrowUnitAlreadyReleased for the same unit twice", async function () {
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

    it("reverts with EscrowJobClosed on a closed job", async function () {
      const { escrow, settler, customer, provider } = await networkHelpers.loadFixture(fundedFixture);
      await escrow.connect(customer).close(JOB);
      await expect(escrow.connect(settler).release(JOB, UNIT, provider.address, 1n))
        .to.be.revertedWithCustomError(escrow, "EscrowJobClosed")
        .withArgs(JOB);
    });

    it("reverts with EscrowZeroAmount and EscrowZeroAddress", async function () {
      const { escrow, settler, provider } = await networkHelpers.loadFixture(fundedFixture);
      await expect(
        escrow.connect(settler).release(JOB, UNIT, provider.address, 0n),
      ).to.be.revertedWithCustomError(escrow, "EscrowZeroAmount");
      await expect(
        escrow.connect(settler).release(JOB, UNIT, ethers.ZeroAddress, 1n),
      ).to.be.revertedWithCustomError(escrow, "EscrowZeroAddress");
    });

    it("reverts with AccessControlUnauthorizedAccount without SETTLER_ROLE", async function () {
      const { escrow, customer, provider } = await networkHelpers.loadFixture(fundedFixture);
      await expect(escrow.connect(customer).release(JOB, UNIT, provider.address, 1n))
        .to.be.revertedWithCustomError(escrow, "AccessControlUnauthorizedAccount")
        .withArgs(customer.address, await escrow.SETTLER_ROLE());
    });
  });

  describe("close", function () {
    it("refunds the unreleased rest to the customer when the customer closes", async function () {
      const { token, escrow, customer } = await networkHelpers.loadFixture(releasedFixture);
      await expect(escrow.connect(customer).close(JOB))
        .to.emit(escrow, "JobClosed")
        .withArgs(JOB, FUNDING - 30n);
      expect(await escrow.getJob(JOB)).to.deep.equal([customer.address, FUNDING, 30n, true]);
      expect(await token.balanceOf(await escrow.getAddress())).to.equal(30n); // still owed to the provider
    });

    it("lets a settler close and refunds the customer, not the settler", async function () {
      const { token, escrow, settler, customer } = await networkHelpers.loadFixture(releasedFixture);
      await expect(escrow.connect(settler).close(JOB)).to.changeTokenBalances(
        ethers,
        token,
        [customer, settler, escrow],
        [FUNDING - 30n, 0n, -(FUNDING - 30n)],
      );
    });

    it("reverts with EscrowNotAuthorized for anyone else", async function () {
      const { escrow, other } = await networkHelpers.loadFixture(fundedFixture);
      await expect(escrow.connect(other).close(JOB))
        .to.be.revertedWithCustomError(escrow, "EscrowNotAuthorized")
        .withArgs(JOB, other.address);
    });

    it("reverts with EscrowJobClosed the second time", async function () {
      const { escrow, customer } = await networkHelpers.loadFixture(fundedFixture);
      await escrow.connect(customer).close(JOB);
      await expect(escrow.connect(customer).close(JOB))
        .to.be.revertedWithCustomError(escrow, "EscrowJobClosed")
        .withArgs(JOB);
    });

    it("reverts with EscrowUnknownJob for a job never funded", async function () {
      const { escrow, settler } = await networkHelpers.loadFixture(deployEscrowFixture);
      await expect(escrow.connect(settler).close(JOB2))
        .to.be.revertedWithCustomError(escrow, "EscrowUnknownJob")
        .withArgs(JOB2);
    });
  });

  describe("claim", function () {
    it("pays the provider everything released to it and emits Claimed", async function () {
      const { token, escrow, settler, provider } = await networkHelpers.loadFixture(releasedFixture);
      await escrow.connect(settler).release(JOB, UNIT2, provider.address, 12n);
      await expect(escrow.connect(provider).claim())
        .to.emit(escrow, "Claimed")
        .withArgs(provider.address, 42n);
      expect(await token.balanceOf(provider.address)).to.equal(42n);
      expect(await escrow.claimable(provider.address)).to.equal(0n);
    });

    it("still pays after the job was closed", async function () {
      const { token, escrow, customer, provider } = await networkHelpers.loadFixture(releasedFixture);
      await escrow.connect(customer).close(JOB);
      await expect(escrow.connect(provider).claim()).to.changeTokenBalances(
        ethers,
        token,
        [provider, escrow],
        [30n, -30n],
      );
    });

    it("reverts with EscrowNothingToClaim when nothing is owed", async function () {
      const { escrow, provider } = await networkHelpers.loadFixture(releasedFixture);
      await escrow.connect(provider).claim();
      await expect(escrow.connect(provider).claim())
        .to.be.revertedWithCustomError(escrow, "EscrowNothingToClaim")
        .withArgs(provider.address);
    });
  });

  describe("pause", function () {
    it("blocks fund, fundWithPermit, release, close and claim with EnforcedPause", async function () {
      const { token, escrow, guardian, settler, customer, provider } = await networkHelpers.loadFixture(releasedFixture);
      await expect(escrow.connect(guardian).pause()).to.emit(escrow, "Paused").withArgs(guardian.address);
      const deadline = (await networkHelpers.time.latest()) + 3600;
      const sig = await signPermit(token, customer, await escrow.getAddress(), 1n, deadline);
      const calls = [
        () => escrow.connect(customer).fund(JOB, 1n),
        () => escrow.connect(customer).fundWithPermit(JOB, 1n, deadline, sig.v, sig.r, sig.s),
        () => escrow.connect(settler).release(JOB, UNIT2, provider.address, 1n),
        () => escrow.connect(customer).close(JOB),
        () => escrow.connect(provider).claim(),
      ];
      for (const call of calls) {
        await expect(call()).to.be.revertedWithCustomError(escrow, "EnforcedPause");
      }
    });

    it("unpause restores every flow", async function () {
      const { escrow, guardian, settler, customer, provider } = await networkHelpers.loadFixture(releasedFixture);
      await escrow.connect(guardian).pause();
      await expect(escrow.connect(guardian).unpause()).to.emit(escrow, "Unpaused").withArgs(guardian.address);
      await escrow.connect(customer).fund(JOB, 1n);
      await escrow.connect(settler).release(JOB, UNIT2, provider.address, 1n);
      await escrow.connect(customer).close(JOB);
      await escrow.connect(provider).claim();
      expect(await escrow.claimable(provider.address)).to.equal(0n);
    });

    it("reverts with AccessControlUnauthorizedAccount without GUARDIAN_ROLE", async function () {
      const { escrow, settler } = await networkHelpers.loadFixture(deployEscrowFixture);
      const role = await escrow.GUARDIAN_ROLE();
      await expect(escrow.connect(settler).pause())
        .to.be.revertedWithCustomError(escrow, "AccessControlUnauthorizedAccount")
        .withArgs(settler.address, role);
      await expect(escrow.connect(settler).unpause())
        .to.be.revertedWithCustomError(escrow, "AccessControlUnauthorizedAccount")
        .withArgs(settler.address, role);
    });
  });
});
