import { expect } from "chai";
import { network } from "hardhat";

const { ethers, networkHelpers } = await network.create();

const SUPPLY = ethers.parseEther("1000000");
const STAKE = ethers.parseEther("1000");
const BOUNTY_BPS = 2500n;
const EVIDENCE = ethers.id("evidence-1");

describe("GridStaking", function () {
  async function deployStakingFixture() {
    const [admin, guardian, slasher, provider, provider2, verifier, treasury, other] = await ethers.getSigners();
    const token = await ethers.deployContract("GridToken", [admin.address, SUPPLY]);
    const staking = await ethers.deployContract("GridStaking", [
      await token.getAddress(),
      admin.address,
      treasury.address,
      BOUNTY_BPS,
    ]);
    await staking.grantRole(await staking.GUARDIAN_ROLE(), guardian.address);
    await staking.grantRole(await staking.SLASHER_ROLE(), slasher.address);
    for (const p of [provider, provider2]) {
      await token.transfer(p.address, STAKE * 10n);
      await token.connect(p).approve(await staking.getAddress(), ethers.MaxUint256);
    }
    return { token, staking, admin, guardian, slasher, provider, provider2, verifier, treasury, other };
  }

  async function stakedFixture() {
    const f = await deployStakingFixture();
    await f.staking.connect(f.provider).stake(STAKE);
    return f;
  }

  describe("constructor", function () {
    it("grants DEFAULT_ADMIN_ROLE to admin and stores token, treasury and bounty rate", async function () {
      const { token, staking, admin, treasury } = await networkHelpers.loadFixture(deployStakingFixture);
      expect(await staking.hasRole(await staking.DEFAULT_ADMIN_ROLE(), admin.address)).to.equal(true);
      expect(await staking.token()).to.equal(await token.getAddress());
      expect(await staking.treasury()).to.equal(treasury.address);
      expect(await staking.bountyBps()).to.equal(BOUNTY_BPS);
    });

    it("reverts with StakingInvalidBps above 10000", async function () {
      const { token, admin, treasury } = await networkHelpers.loadFixture(deployStakingFixture);
      const factory = await ethers.getContractFactory("GridStaking");
      await expect(factory.deploy(await token.getAddress(), admin.address, treasury.address, 10_001))
        .to.be.revertedWithCustomError(factory, "StakingInvalidBps")
        .withArgs(10_001);
    });

    it("reverts with StakingZeroAddress for a zero treasury", async function () {
      const { token, admin } = await networkHelpers.loadFixture(deployStakingFixture);
      const factory = await ethers.getContractFactory("GridStaking");
      await expect(
        factory.deploy(await token.getAddress(), admin.address, ethers.ZeroAddress, 0),
      ).to.be.revertedWithCustomError(factory, "StakingZeroAddress");
    });
  });

  describe("stake", function () {
    it("moves tokens in and emits Staked with the new total", async function () {
      const { token, staking, provider } = await networkHelpers.loadFixture(deployStakingFixture);
      await expect(staking.connect(provider).stake(STAKE))
        .to.emit(staking, "Staked")
        .withArgs(provider.address, STAKE, STAKE);
      await expect(staking.connect(provider).stake(5n)).to.changeTokenBalances(
        ethers,
        token,
        [provider, staking],
        [-5n, 5n],
      );
      expect(await staking.stakeOf(provider.address)).to.equal(STAKE + 5n);
    });

    it("tracks totalStaked across providers", async function () {
      const { staking, provider, provider2 } = await networkHelpers.loadFixture(deployStakingFixture);
      await staking.connect(provider).stake(3n);
      await staking.connect(provider2).stake(4n);
      expect(await staking.totalStaked()).to.equal(7n);
    });

    it("reverts with StakingZeroAmount for 0", async function () {
      const { staking, provider } = await networkHelpers.loadFixture(deployStakingFixture);
      await expect(staking.connect(provider).stake(0)).to.be.revertedWithCustomError(staking, "StakingZeroAmount");
    });

    it("reverts with ERC20InsufficientAllowance without approval", async function () {
      const { token, staking, other } = await networkHelpers.loadFixture(deployStakingFixture);
      await expect(staking.connect(other).stake(1n))
        .to.be.revertedWithCustomError(token, "ERC20InsufficientAllowance")
        .withArgs(await staking.getAddress(), 0n, 1n);
    });
  });

  describe("unstake", function () {
    it("returns tokens and emits Unstaked with the remaining stake", async function () {
      const { token, staking, provider } = await networkHelpers.loadFixture(stakedFixture);
      await expect(staking.connect(provider).unstake(400n))
        .to.emit(staking, "Unstaked")
        .withArgs(provider.address, 400n, STAKE - 400n);
      await expect(staking.connect(provider).unstake(100n)).to.changeTokenBalances(
        ethers,
        token,
        [provider, staking],
        [100n, -100n],
      );
      expect(await staking.totalStaked()).to.equal(STAKE - 500n);
    });

    it("reverts with StakingInsufficientStake(provider, have, need)", async function () {
      const { staking, provider } = await networkHelpers.loadFixture(stakedFixture);
      await expect(staking.connect(provider).unstake(STAKE + 1n))
        .to.be.revertedWithCustomError(staking, "StakingInsufficientStake")
        .withArgs(provider.address, STAKE, STAKE + 1n);
    });

    it("reverts with StakingZeroAmount for 0", async function () {
      const { staking, provider } = await networkHelpers.loadFixture(stakedFixture);
      await expect(staking.connect(provider).unstake(0)).to.be.revertedWithCustomError(staking, "StakingZeroAmount");
    });
  });

  describe("slash", function () {
    it("pays bountyBps of the slash to the verifier and the rest to the treasury", async function () {
      const { token, staking, slasher, provider, verifier, treasury } = await networkHelpers.loadFixture(stakedFixture);
      const amount = 1003n;
      const bounty = (amount * BOUNTY_BPS) / 10_000n; // 250, rounded down
      await expect(staking.connect(slasher).slash(provider.address, amount, verifier.address, EVIDENCE))
        .to.emit(staking, "Slashed")
        .withArgs(provider.address, verifier.address, EVIDENCE, amount, bounty);
      expect(await token.balanceOf(verifier.address)).to.equal(bounty);
      expect(await token.balanceOf(treasury.address)).to.equal(amount - bounty);
      expect(await staking.stakeOf(provider.address)).to.equal(STAKE - amount);
      expect(await staking.totalStaked()).to.equal(STAKE - amount);
      expect(await staking.evidenceUsed(EVIDENCE)).to.equal(true);
    });

    it("slashes at most the provider's stake", async function () {
      const { token, staking, slasher, provider, verifier, treasury } = await networkHelpers.loadFixture(stakedFixture);
      await expect(staking.connect(slasher).slash(provider.address, STAKE * 5n, verifier.address, EVIDENCE))
        .to.emit(staking, "Slashed")
        .withArgs(provider.address, verifier.address, EVIDENCE, STAKE, (STAKE * BOUNTY_BPS) / 10_000n);
      expect(await staking.stakeOf(provider.address)).to.equal(0n);
      expect((await token.balanceOf(verifier.address)) + (await token.balanceOf(treasury.address))).to.equal(STAKE);
    });

    it("reverts with StakingEvidenceUsed when the evidence is reused", async function () {
      const { staking, slasher, provider, verifier } = await networkHelpers.loadFixture(stakedFixture);
      await staking.connect(slasher).slash(provider.address, 1n, verifier.address, EVIDENCE);
      await expect(staking.connect(slasher).slash(provider.address, 1n, verifier.address, EVIDENCE))
        .to.be.revertedWithCustomError(staking, "StakingEvidenceUsed")
        .withArgs(EVIDENCE);
    });

    it("reverts with StakingNothingToSlash for a provider without stake", async function () {
      const { staking, slasher, provider2, verifier } = await networkHelpers.loadFixture(stakedFixture);
      await expect(staking.connect(slasher).slash(provider2.address, 1n, verifier.address, EVIDENCE))
        .to.be.revertedWithCustomError(staking, "StakingNothingToSlash")
        .withArgs(provider2.address);
    });

    it("reverts with StakingZeroAmount and StakingZeroAddress", async function () {
      const { staking, slasher, provider, verifier } = await networkHelpers.loadFixture(stakedFixture);
      await expect(
        staking.connect(slasher).slash(provider.address, 0n, verifier.address, EVIDENCE),
      ).to.be.revertedWithCustomError(staking, "StakingZeroAmount");
      await expect(
        staking.connect(slasher).slash(provider.address, 1n, ethers.ZeroAddress, EVIDENCE),
      ).to.be.revertedWithCustomError(staking, "StakingZeroAddress");
    });

    it("reverts with AccessControlUnauthorizedAccount without SLASHER_ROLE", async function () {
      const { staking, admin, provider, verifier } = await networkHelpers.loadFixture(stakedFixture);
      await expect(staking.connect(admin).slash(provider.address, 1n, verifier.address, EVIDENCE))
        .to.be.revertedWithCustomError(staking, "AccessControlUnauthorizedAccount")
        .withArgs(admin.address, await staking.SLASHER_ROLE());
    });
  });

  describe("pause", function () {
    it("blocks stake, unstake and slash with EnforcedPause", async function () {
      const { staking, guardian, slasher, provider, verifier } = await networkHelpers.loadFixture(stakedFixture);
      await expect(staking.connect(guardian).pause()).to.emit(staking, "Paused").withArgs(guardian.address);
      await expect(staking.connect(provider).stake(1n)).to.be.revertedWithCustomError(staking, "EnforcedPause");
      await expect(staking.connect(provider).unstake(1n)).to.be.revertedWithCustomError(staking, "EnforcedPause");
      await expect(
        staking.connect(slasher).slash(provider.address, 1n, verifier.address, EVIDENCE),
      ).to.be.revertedWithCustomError(staking, "EnforcedPause");
    });

    it("unpause restores every flow", async function () {
      const { staking, guardian, slasher, provider, verifier } = await networkHelpers.loadFixture(stakedFixture);
      await staking.connect(guardian).pause();
      await expect(staking.connect(guardian).unpause()).to.emit(staking, "Unpaused").withArgs(guardian.address);
      await staking.connect(provider).stake(1n);
      await staking.connect(provider).unstake(1n);
      await staking.connect(slasher).slash(provider.address, 1n, verifier.address, EVIDENCE);
      expect(await staking.stakeOf(provider.address)).to.equal(STAKE - 1n);
    });

    it("reverts with AccessControlUnauthorizedAccount without GUARDIAN_ROLE", async function () {
      const { staking, admin } = await networkHelpers.loadFixture(stakedFixture);
      const role = await staking.GUARDIAN_ROLE();
      await expect(staking.connect(admin).pause())
        .to.be.revertedWithCustomError(staking, "AccessControlUnauthorizedAccount")
        .withArgs(admin.address, role);
      await expect(staking.connect(admin).unpause())
        .to.be.revertedWithCustomError(staking, "AccessControlUnauthorizedAccount")
        .withArgs(admin.address, role);
    });
  });
});
