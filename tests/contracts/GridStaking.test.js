import { expect } from "chai";
import { network } from "hardhat";

import { accusationSigner, signAccusation, stakingDomain } from "./helpers.js";

const { ethers, networkHelpers } = await network.create();
const { time } = networkHelpers;

const SUPPLY = ethers.parseEther("1000000");
const STAKE = ethers.parseEther("1000");
const BOND = ethers.parseEther("100");
const ACCUSED = ethers.parseEther("400");
const BOUNTY_BPS = 2500n;
const DELAY = 7n * 24n * 3600n; // unbonding delay, seconds
const EVIDENCE = ethers.id("evidence-1");
const EVIDENCE2 = ethers.id("evidence-2");
const GPU = ethers.encodeBytes32String("A100-80GB");

/** accountOf as a plain object (ethers returns a Result). */
async function accountOf(staking, who) {
  return (await staking.accountOf(who)).toObject();
}

describe("GridStaking", function () {
  // The governor is an EOA here (the timelock in production, see GridTimelock.test.js).
  async function deployStakingFixture() {
    const [admin, governor, guardian, slasher, locker, referee, provider, provider2, verifier, treasury, other] =
      await ethers.getSigners();
    const token = await ethers.deployContract("GridToken", [admin.address, SUPPLY]);
    const staking = await ethers.deployContract("GridStaking", [
      token,
      admin.address,
      governor.address,
      treasury.address,
      BOUNTY_BPS,
      DELAY,
      BOND,
      0,
    ]);
    await staking.grantRole(await staking.GUARDIAN_ROLE(), guardian.address);
    await staking.grantRole(await staking.SLASHER_ROLE(), slasher.address);
    await staking.grantRole(await staking.LOCKER_ROLE(), locker.address);
    await staking.grantRole(await staking.REFEREE_ROLE(), referee.address);
    for (const p of [provider, provider2, verifier]) {
      await token.transfer(p.address, STAKE * 10n);
      await token.connect(p).approve(staking, ethers.MaxUint256);
    }
    return {
      token,
      staking,
      admin,
      governor,
      guardian,
      slasher,
      locker,
      referee,
      provider,
      provider2,
      verifier,
      treasury,
      other,
    };
  }

  // provider and verifier each bonded STAKE.
  async function stakedFixture() {
    const f = await deployStakingFixture();
    await f.staking.connect(f.provider).stake(STAKE);
    await f.staking.connect(f.verifier).stake(STAKE);
    return f;
  }

  // provider asked to unbond 300 of its STAKE; readyAt = that block's time + DELAY.
  async function unbondingFixture() {
    const f = await stakedFixture();
    await f.staking.connect(f.provider).requestUnbond(ethers.parseEther("300"));
    const readyAt = BigInt(await time.latest()) + DELAY;
    return { ...f, unbonded: ethers.parseEther("300"), readyAt };
  }

  // verifier accused provider of ACCUSED on EVIDENCE (relayed by the referee), bonding BOND.
  async function accusedFixture() {
    const f = await stakedFixture();
    const sig = await signAccusation(f.verifier, f.staking, f.provider.address, EVIDENCE, ACCUSED);
    await f.staking.connect(f.referee).accuse(f.provider.address, EVIDENCE, ACCUSED, sig);
    return f;
  }

  describe("constructor", function () {
    it("stores token, treasury and parameters and grants admin and governor roles", async function () {
      const { token, staking, admin, governor, treasury } = await networkHelpers.loadFixture(deployStakingFixture);
      expect(await staking.token()).to.equal(await token.getAddress());
      expect(await staking.treasury()).to.equal(treasury.address);
      expect(await staking.bountyBps()).to.equal(BOUNTY_BPS);
      expect(await staking.unbondingDelay()).to.equal(DELAY);
      expect(await staking.verifierBond()).to.equal(BOND);
      expect(await staking.hasRole(await staking.DEFAULT_ADMIN_ROLE(), admin.address)).to.equal(true);
      expect(await staking.hasRole(await staking.GOVERNOR_ROLE(), governor.address)).to.equal(true);
      expect(await staking.hasRole(await staking.GOVERNOR_ROLE(), admin.address)).to.equal(false);
    });

    it("reverts with StakingInvalidBps(bps) above 10000", async function () {
      const { token, admin, governor, treasury } = await networkHelpers.loadFixture(deployStakingFixture);
      const factory = await ethers.getContractFactory("GridStaking");
      await expect(factory.deploy(token, admin.address, governor.address, treasury.address, 10_001, DELAY, BOND, 0))
        .to.be.revertedWithCustomError(factory, "StakingInvalidBps")
        .withArgs(10_001);
    });

    it("reverts with StakingZeroAddress for a zero token, admin, governor or treasury", async function () {
      const { token, admin, governor, treasury } = await networkHelpers.loadFixture(deployStakingFixture);
      const factory = await ethers.getContractFactory("GridStaking");
      const good = [await token.getAddress(), admin.address, governor.address, treasury.address];
      for (let i = 0; i < good.length; i++) {
        const addrs = good.map((a, j) => (j === i ? ethers.ZeroAddress : a));
        await expect(factory.deploy(...addrs, BOUNTY_BPS, DELAY, BOND, 0)).to.be.revertedWithCustomError(
          factory,
          "StakingZeroAddress",
        );
      }
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
      expect(await staking.freeStakeOf(provider.address)).to.equal(STAKE + 5n);
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

  describe("requestUnbond", function () {
    it("moves the amount from staked to unbonding and emits UnbondRequested with readyAt = now + delay", async function () {
      const { token, staking, provider } = await networkHelpers.loadFixture(stakedFixture);
      const amount = ethers.parseEther("300");
      const tx = await staking.connect(provider).requestUnbond(amount);
      await expect(tx).to.changeTokenBalances(ethers, token, [provider, staking], [0n, 0n]);
      const readyAt = BigInt(await time.latest()) + DELAY;
      await expect(tx).to.emit(staking, "UnbondRequested").withArgs(provider.address, amount, amount, readyAt);
      const a = await accountOf(staking, provider.address);
      expect([a.staked, a.unbonding, a.unbondingReadyAt]).to.deep.equal([STAKE - amount, amount, readyAt]);
      expect(await staking.stakeOf(provider.address)).to.equal(STAKE - amount);
      // Still held by the contract (and slashable) until withdrawn.
      expect(await staking.totalStaked()).to.equal(STAKE * 2n);
    });

    it("adds to a pending request and restarts the delay", async function () {
      const { staking, provider, unbonded } = await networkHelpers.loadFixture(unbondingFixture);
      await time.increase(DELAY / 2n);
      const tx = await staking.connect(provider).requestUnbond(1n);
      const readyAt = BigInt(await time.latest()) + DELAY; // the request's block + the full delay
      await expect(tx)
        .to.emit(staking, "UnbondRequested")
        .withArgs(provider.address, 1n, unbonded + 1n, readyAt);
      expect((await accountOf(staking, provider.address)).unbondingReadyAt).to.equal(readyAt);
    });

    it("cannot unbond locked stake: StakingInsufficientStake(account, free, need)", async function () {
      const { staking, locker, provider } = await networkHelpers.loadFixture(stakedFixture);
      const locked = ethers.parseEther("700");
      await staking.connect(locker).lock(provider.address, locked);
      await expect(staking.connect(provider).requestUnbond(STAKE - locked + 1n))
        .to.be.revertedWithCustomError(staking, "StakingInsufficientStake")
        .withArgs(provider.address, STAKE - locked, STAKE - locked + 1n);
      const tx = await staking.connect(provider).requestUnbond(STAKE - locked);
      await expect(tx)
        .to.emit(staking, "UnbondRequested")
        .withArgs(provider.address, STAKE - locked, STAKE - locked, BigInt(await time.latest()) + DELAY);
      expect(await staking.stakeOf(provider.address)).to.equal(locked);
    });

    it("reverts with StakingInsufficientStake(account, have, need) past the stake", async function () {
      const { staking, provider } = await networkHelpers.loadFixture(stakedFixture);
      await expect(staking.connect(provider).requestUnbond(STAKE + 1n))
        .to.be.revertedWithCustomError(staking, "StakingInsufficientStake")
        .withArgs(provider.address, STAKE, STAKE + 1n);
    });

    it("reverts with StakingUnderDispute(account, openDisputes) for the accused and the accuser", async function () {
      const { staking, provider, verifier } = await networkHelpers.loadFixture(accusedFixture);
      for (const who of [provider, verifier]) {
        await expect(staking.connect(who).requestUnbond(1n))
          .to.be.revertedWithCustomError(staking, "StakingUnderDispute")
          .withArgs(who.address, 1n);
      }
    });

    it("reverts with StakingZeroAmount for 0", async function () {
      const { staking, provider } = await networkHelpers.loadFixture(stakedFixture);
      await expect(staking.connect(provider).requestUnbond(0n)).to.be.revertedWithCustomError(
        staking,
        "StakingZeroAmount",
      );
    });
  });

  describe("withdraw", function () {
    it("reverts with StakingStillUnbonding(account, readyAt) before the delay has passed", async function () {
      const { staking, provider, readyAt } = await networkHelpers.loadFixture(unbondingFixture);
      await time.increase(DELAY - 100n); // the withdraw lands well before readyAt
      await expect(staking.connect(provider).withdraw())
        .to.be.revertedWithCustomError(staking, "StakingStillUnbonding")
        .withArgs(provider.address, readyAt);
    });

    it("pays out everything unbonded once the delay has passed and emits Withdrawn", async function () {
      const { token, staking, provider, unbonded, readyAt } = await networkHelpers.loadFixture(unbondingFixture);
      await time.increaseTo(readyAt);
      expect(await staking.connect(provider).withdraw.staticCall()).to.equal(unbonded);
      const tx = staking.connect(provider).withdraw();
      await expect(tx).to.emit(staking, "Withdrawn").withArgs(provider.address, unbonded);
      await expect(tx).to.changeTokenBalances(ethers, token, [provider, staking], [unbonded, -unbonded]);
      expect((await accountOf(staking, provider.address)).unbonding).to.equal(0n);
      expect(await staking.totalStaked()).to.equal(STAKE * 2n - unbonded);
      expect(await token.balanceOf(staking)).to.equal(await staking.totalStaked());
    });

    it("is blocked while the account is under dispute and works once the dispute is resolved", async function () {
      const { staking, provider, verifier, referee, other, readyAt } = await networkHelpers.loadFixture(
        unbondingFixture,
      );
      const sig = await signAccusation(verifier, staking, provider.address, EVIDENCE, ACCUSED);
      await staking.connect(referee).accuse(provider.address, EVIDENCE, ACCUSED, sig);
      await time.increaseTo(readyAt + 1n);
      await expect(staking.connect(provider).withdraw())
        .to.be.revertedWithCustomError(staking, "StakingUnderDispute")
        .withArgs(provider.address, 1n);
      await staking.connect(referee).resolve(EVIDENCE, false);
      await expect(staking.connect(provider).withdraw())
        .to.emit(staking, "Withdrawn")
        .withArgs(provider.address, ethers.parseEther("300"));
    });

    it("reverts with StakingNothingToWithdraw(account) without a request, and after withdrawing", async function () {
      const { staking, provider, verifier, readyAt } = await networkHelpers.loadFixture(unbondingFixture);
      await expect(staking.connect(verifier).withdraw())
        .to.be.revertedWithCustomError(staking, "StakingNothingToWithdraw")
        .withArgs(verifier.address);
      await time.increaseTo(readyAt);
      await staking.connect(provider).withdraw();
      await expect(staking.connect(provider).withdraw())
        .to.be.revertedWithCustomError(staking, "StakingNothingToWithdraw")
        .withArgs(provider.address);
    });
  });

  describe("lock", function () {
    it("locks free stake and emits StakeLocked with the running total", async function () {
      const { staking, locker, provider } = await networkHelpers.loadFixture(stakedFixture);
      await expect(staking.connect(locker).lock(provider.address, 100n))
        .to.emit(staking, "StakeLocked")
        .withArgs(provider.address, 100n, 100n);
      await expect(staking.connect(locker).lock(provider.address, 50n))
        .to.emit(staking, "StakeLocked")
        .withArgs(provider.address, 50n, 150n);
      expect((await accountOf(staking, provider.address)).locked).to.equal(150n);
      expect(await staking.freeStakeOf(provider.address)).to.equal(STAKE - 150n);
      expect(await staking.stakeOf(provider.address)).to.equal(STAKE); // locked stake still backs work
    });

    it("reverts with StakingInsufficientStake(provider, free, need) past the free stake", async function () {
      const { staking, locker, provider } = await networkHelpers.loadFixture(stakedFixture);
      await staking.connect(locker).lock(provider.address, STAKE - 10n);
      await expect(staking.connect(locker).lock(provider.address, 11n))
        .to.be.revertedWithCustomError(staking, "StakingInsufficientStake")
        .withArgs(provider.address, 10n, 11n);
    });

    it("cannot lock the verifier's bonded stake", async function () {
      const { staking, locker, verifier } = await networkHelpers.loadFixture(accusedFixture);
      await expect(staking.connect(locker).lock(verifier.address, STAKE - BOND + 1n))
        .to.be.revertedWithCustomError(staking, "StakingInsufficientStake")
        .withArgs(verifier.address, STAKE - BOND, STAKE - BOND + 1n);
    });

    it("reverts with StakingZeroAmount for 0", async function () {
      const { staking, locker, provider } = await networkHelpers.loadFixture(stakedFixture);
      await expect(staking.connect(locker).lock(provider.address, 0n)).to.be.revertedWithCustomError(
        staking,
        "StakingZeroAmount",
      );
    });

    it("reverts with AccessControlUnauthorizedAccount without LOCKER_ROLE", async function () {
      const { staking, provider } = await networkHelpers.loadFixture(stakedFixture);
      await expect(staking.connect(provider).lock(provider.address, 1n))
        .to.be.revertedWithCustomError(staking, "AccessControlUnauthorizedAccount")
        .withArgs(provider.address, await staking.LOCKER_ROLE());
    });
  });

  describe("unlock", function () {
    it("releases locked stake, emits StakeUnlocked, and the stake can then be unbonded", async function () {
      const { staking, locker, provider } = await networkHelpers.loadFixture(stakedFixture);
      await staking.connect(locker).lock(provider.address, STAKE);
      await expect(staking.connect(locker).unlock(provider.address, 400n))
        .to.emit(staking, "StakeUnlocked")
        .withArgs(provider.address, 400n, STAKE - 400n);
      expect(await staking.freeStakeOf(provider.address)).to.equal(400n);
      await expect(staking.connect(provider).requestUnbond(400n)).to.emit(staking, "UnbondRequested");
    });

    it("reverts with StakingInsufficientLocked(provider, locked, need) past the locked stake", async function () {
      const { staking, locker, provider } = await networkHelpers.loadFixture(stakedFixture);
      await staking.connect(locker).lock(provider.address, 5n);
      await expect(staking.connect(locker).unlock(provider.address, 6n))
        .to.be.revertedWithCustomError(staking, "StakingInsufficientLocked")
        .withArgs(provider.address, 5n, 6n);
    });

    it("reverts with StakingZeroAmount for 0", async function () {
      const { staking, locker, provider } = await networkHelpers.loadFixture(stakedFixture);
      await expect(staking.connect(locker).unlock(provider.address, 0n)).to.be.revertedWithCustomError(
        staking,
        "StakingZeroAmount",
      );
    });

    it("reverts with AccessControlUnauthorizedAccount without LOCKER_ROLE", async function () {
      const { staking, provider } = await networkHelpers.loadFixture(stakedFixture);
      await expect(staking.connect(provider).unlock(provider.address, 1n))
        .to.be.revertedWithCustomError(staking, "AccessControlUnauthorizedAccount")
        .withArgs(provider.address, await staking.LOCKER_ROLE());
    });
  });

  describe("accuse", function () {
    it("refuses a relay by anyone but the referee (a dispute it never saw would freeze the provider)", async function () {
      const { staking, provider, verifier, other } = await networkHelpers.loadFixture(stakedFixture);
      const sig = await signAccusation(verifier, staking, provider.address, EVIDENCE, ACCUSED);
      for (const who of [other, verifier]) {
        await expect(staking.connect(who).accuse(provider.address, EVIDENCE, ACCUSED, sig))
          .to.be.revertedWithCustomError(staking, "AccessControlUnauthorizedAccount")
          .withArgs(who.address, await staking.REFEREE_ROLE());
      }
      expect((await accountOf(staking, provider.address)).openDisputes).to.equal(0n);
    });

    it("opens a dispute from a staked verifier's EIP-712 signature, relayed by the referee", async function () {
      const { staking, provider, verifier, other, referee } = await networkHelpers.loadFixture(stakedFixture);
      const sig = await signAccusation(verifier, staking, provider.address, EVIDENCE, ACCUSED);
      await expect(staking.connect(referee).accuse(provider.address, EVIDENCE, ACCUSED, sig))
        .to.emit(staking, "Accused")
        .withArgs(provider.address, verifier.address, EVIDENCE, ACCUSED, BOND);
      expect((await staking.disputeOf(EVIDENCE)).toObject()).to.deep.equal({
        provider: provider.address,
        verifier: verifier.address,
        amount: ACCUSED,
        bond: BOND,
      });
      const v = await accountOf(staking, verifier.address);
      expect([v.bonded, v.openDisputes]).to.deep.equal([BOND, 1n]);
      expect((await accountOf(staking, provider.address)).openDisputes).to.equal(1n);
      expect(await staking.freeStakeOf(provider.address)).to.equal(0n);
      expect(await staking.freeStakeOf(verifier.address)).to.equal(0n);
      expect(await staking.evidenceUsed(EVIDENCE)).to.equal(false); // used only once resolved
      // No token moves until the referee resolves.
      expect(await staking.stakeOf(provider.address)).to.equal(STAKE);
      expect(await staking.stakeOf(verifier.address)).to.equal(STAKE);
    });

    it("reaches a provider whose whole stake is unbonding", async function () {
      const { staking, provider, verifier, referee } = await networkHelpers.loadFixture(stakedFixture);
      await staking.connect(provider).requestUnbond(STAKE);
      const sig = await signAccusation(verifier, staking, provider.address, EVIDENCE, ACCUSED);
      await expect(staking.connect(referee).accuse(provider.address, EVIDENCE, ACCUSED, sig))
        .to.emit(staking, "Accused")
        .withArgs(provider.address, verifier.address, EVIDENCE, ACCUSED, BOND);
    });

    it("names the signer of a forged accusation (unstaked) in StakingInsufficientStake", async function () {
      const { staking, provider, other, referee } = await networkHelpers.loadFixture(stakedFixture);
      const sig = await signAccusation(other, staking, provider.address, EVIDENCE, ACCUSED);
      await expect(staking.connect(referee).accuse(provider.address, EVIDENCE, ACCUSED, sig))
        .to.be.revertedWithCustomError(staking, "StakingInsufficientStake")
        .withArgs(other.address, 0n, BOND);
    });

    it("rejects a verifier's signature replayed with another amount (it recovers to a stranger)", async function () {
      const { staking, provider, verifier, referee } = await networkHelpers.loadFixture(stakedFixture);
      const sig = await signAccusation(verifier, staking, provider.address, EVIDENCE, ACCUSED);
      const stranger = await accusationSigner(staking, provider.address, EVIDENCE, STAKE, sig);
      expect(stranger).to.not.equal(verifier.address);
      await expect(staking.connect(referee).accuse(provider.address, EVIDENCE, STAKE, sig))
        .to.be.revertedWithCustomError(staking, "StakingInsufficientStake")
        .withArgs(stranger, 0n, BOND);
    });

    it("rejects a signature made for another chain or contract", async function () {
      const { staking, provider, verifier, referee } = await networkHelpers.loadFixture(stakedFixture);
      const domain = await stakingDomain(staking);
      for (const forged of [
        { ...domain, chainId: domain.chainId + 1n },
        { ...domain, verifyingContract: verifier.address },
        { ...domain, name: "GridStakingV2" },
      ]) {
        const sig = await signAccusation(verifier, staking, provider.address, EVIDENCE, ACCUSED, forged);
        const stranger = await accusationSigner(staking, provider.address, EVIDENCE, ACCUSED, sig);
        await expect(staking.connect(referee).accuse(provider.address, EVIDENCE, ACCUSED, sig))
          .to.be.revertedWithCustomError(staking, "StakingInsufficientStake")
          .withArgs(stranger, 0n, BOND);
      }
    });

    it("reverts with ECDSA errors for a malformed signature", async function () {
      const { staking, provider, referee } = await networkHelpers.loadFixture(stakedFixture);
      await expect(staking.connect(referee).accuse(provider.address, EVIDENCE, ACCUSED, ethers.ZeroHash))
        .to.be.revertedWithCustomError(staking, "ECDSAInvalidSignatureLength")
        .withArgs(32n);
      await expect(
        staking.connect(referee).accuse(provider.address, EVIDENCE, ACCUSED, ethers.concat([ethers.ZeroHash, ethers.ZeroHash, "0x1b"])),
      ).to.be.revertedWithCustomError(staking, "ECDSAInvalidSignature");
    });

    it("reverts with StakingSelfAccusation(account) when the provider signs against itself", async function () {
      const { staking, provider, referee } = await networkHelpers.loadFixture(stakedFixture);
      const sig = await signAccusation(provider, staking, provider.address, EVIDENCE, ACCUSED);
      await expect(staking.connect(referee).accuse(provider.address, EVIDENCE, ACCUSED, sig))
        .to.be.revertedWithCustomError(staking, "StakingSelfAccusation")
        .withArgs(provider.address);
    });

    it("reverts with StakingEvidenceUsed(evidence) while the evidence is in dispute and once resolved", async function () {
      const { staking, referee, provider, provider2, verifier } = await networkHelpers.loadFixture(accusedFixture);
      await staking.connect(provider2).stake(STAKE);
      // Same evidence, even against another provider or by another verifier.
      const again = await signAccusation(provider2, staking, provider.address, EVIDENCE, 1n);
      await expect(staking.connect(referee).accuse(provider.address, EVIDENCE, 1n, again))
        .to.be.revertedWithCustomError(staking, "StakingEvidenceUsed")
        .withArgs(EVIDENCE);
      await staking.connect(referee).resolve(EVIDENCE, true);
      const replay = await signAccusation(verifier, staking, provider.address, EVIDENCE, ACCUSED);
      await expect(staking.connect(referee).accuse(provider.address, EVIDENCE, ACCUSED, replay))
        .to.be.revertedWithCustomError(staking, "StakingEvidenceUsed")
        .withArgs(EVIDENCE);
    });

    it("reverts with StakingEvidenceUsed for evidence a governance slash already used", async function () {
      const { staking, slasher, provider, verifier, referee } = await networkHelpers.loadFixture(stakedFixture);
      await staking.connect(slasher).slash(provider.address, 1n, verifier.address, EVIDENCE);
      const sig = await signAccusation(verifier, staking, provider.address, EVIDENCE, ACCUSED);
      await expect(staking.connect(referee).accuse(provider.address, EVIDENCE, ACCUSED, sig))
        .to.be.revertedWithCustomError(staking, "StakingEvidenceUsed")
        .withArgs(EVIDENCE);
    });

    it("reverts with StakingNothingToSlash(provider) for a provider without stake", async function () {
      const { staking, provider2, verifier, referee } = await networkHelpers.loadFixture(stakedFixture);
      const sig = await signAccusation(verifier, staking, provider2.address, EVIDENCE, ACCUSED);
      await expect(staking.connect(referee).accuse(provider2.address, EVIDENCE, ACCUSED, sig))
        .to.be.revertedWithCustomError(staking, "StakingNothingToSlash")
        .withArgs(provider2.address);
    });

    it("reverts with StakingInsufficientStake(verifier, free, bond) when the verifier cannot bond", async function () {
      const { staking, locker, provider, verifier, referee } = await networkHelpers.loadFixture(stakedFixture);
      await staking.connect(locker).lock(verifier.address, STAKE - BOND + 1n);
      const sig = await signAccusation(verifier, staking, provider.address, EVIDENCE, ACCUSED);
      await expect(staking.connect(referee).accuse(provider.address, EVIDENCE, ACCUSED, sig))
        .to.be.revertedWithCustomError(staking, "StakingInsufficientStake")
        .withArgs(verifier.address, BOND - 1n, BOND);
    });

    it("bonds once per accusation: a second one needs another free bond", async function () {
      const { staking, provider, provider2, verifier, referee } = await networkHelpers.loadFixture(accusedFixture);
      await staking.connect(provider2).stake(STAKE);
      const sig = await signAccusation(verifier, staking, provider2.address, EVIDENCE2, 1n);
      await expect(staking.connect(referee).accuse(provider2.address, EVIDENCE2, 1n, sig))
        .to.emit(staking, "Accused")
        .withArgs(provider2.address, verifier.address, EVIDENCE2, 1n, BOND);
      const v = await accountOf(staking, verifier.address);
      expect([v.bonded, v.openDisputes]).to.deep.equal([BOND * 2n, 2n]);
      expect((await accountOf(staking, provider.address)).openDisputes).to.equal(1n);
    });

    it("is disabled while verifierBond is 0: StakingInsufficientStake(verifier, free, 1)", async function () {
      const { staking, governor, provider, verifier, referee } = await networkHelpers.loadFixture(stakedFixture);
      await staking.connect(governor).setVerifierBond(0n);
      const sig = await signAccusation(verifier, staking, provider.address, EVIDENCE, ACCUSED);
      await expect(staking.connect(referee).accuse(provider.address, EVIDENCE, ACCUSED, sig))
        .to.be.revertedWithCustomError(staking, "StakingInsufficientStake")
        .withArgs(verifier.address, STAKE, 1n);
    });

    it("reverts with StakingZeroAmount for 0", async function () {
      const { staking, provider, verifier, referee } = await networkHelpers.loadFixture(stakedFixture);
      const sig = await signAccusation(verifier, staking, provider.address, EVIDENCE, 0n);
      await expect(staking.connect(referee).accuse(provider.address, EVIDENCE, 0n, sig)).to.be.revertedWithCustomError(
        staking,
        "StakingZeroAmount",
      );
    });
  });

  describe("resolve", function () {
    it("fraud: slashes the provider's whole stake (not the accused amount), bountyBps to the verifier, rest to the treasury", async function () {
      const { token, staking, referee, provider, verifier, treasury } = await networkHelpers.loadFixture(
        accusedFixture,
      );
      expect(ACCUSED).to.be.lessThan(STAKE);
      const bounty = (STAKE * BOUNTY_BPS) / 10_000n;
      const tx = staking.connect(referee).resolve(EVIDENCE, true);
      await expect(tx).to.emit(staking, "DisputeResolved").withArgs(EVIDENCE, true, STAKE);
      await expect(tx).to.emit(staking, "Slashed").withArgs(provider.address, verifier.address, EVIDENCE, STAKE, bounty);
      await expect(tx).to.changeTokenBalances(
        ethers,
        token,
        [staking, verifier, treasury, provider],
        [-STAKE, bounty, STAKE - bounty, 0n],
      );
      const p = await accountOf(staking, provider.address);
      const v = await accountOf(staking, verifier.address);
      expect([p.staked, p.unbonding, p.openDisputes]).to.deep.equal([0n, 0n, 0n]);
      expect([v.staked, v.bonded, v.openDisputes]).to.deep.equal([STAKE, 0n, 0n]); // bond released
      expect(await staking.totalStaked()).to.equal(STAKE);
      expect(await staking.evidenceUsed(EVIDENCE)).to.equal(true);
      expect((await staking.disputeOf(EVIDENCE)).provider).to.equal(ethers.ZeroAddress);
    });

    it("fraud: takes unbonding and locked stake too, whatever the accused amount", async function () {
      const { staking, locker, referee, provider, verifier, other } = await networkHelpers.loadFixture(stakedFixture);
      await staking.connect(provider).requestUnbond(STAKE - 100n); // staked 100, unbonding STAKE - 100
      await staking.connect(locker).lock(provider.address, 60n); // work in flight does not shield stake either
      for (const [amount, evidence] of [
        [5n, EVIDENCE],
        [STAKE * 3n, EVIDENCE2],
      ]) {
        await staking.connect(provider).stake(STAKE);
        const before = await accountOf(staking, provider.address);
        const held = before.staked + before.unbonding;
        const sig = await signAccusation(verifier, staking, provider.address, evidence, amount);
        await staking.connect(referee).accuse(provider.address, evidence, amount, sig);
        await expect(staking.connect(referee).resolve(evidence, true))
          .to.emit(staking, "Slashed")
          .withArgs(provider.address, verifier.address, evidence, held, (held * BOUNTY_BPS) / 10_000n);
        const p = await accountOf(staking, provider.address);
        expect([p.staked, p.unbonding]).to.deep.equal([0n, 0n]);
      }
    });

    it("fraud: a provider's own second key accusing it first for 1 wei does not cap its penalty", async function () {
      // The attack this rule closes: evidence is single-use and the accuser picks `amount`, so a cheat who knows
      // it will be caught has a second staked key of its own (provider2) accuse it for 1 wei before an honest
      // verifier does. The fraud verdict still takes everything the provider has at stake.
      const { token, staking, referee, provider, provider2, verifier, treasury, other } =
        await networkHelpers.loadFixture(stakedFixture);
      await staking.connect(provider).requestUnbond(STAKE / 4n); // leaving does not help either
      await staking.connect(provider2).stake(BOND);
      const selfAccusation = await signAccusation(provider2, staking, provider.address, EVIDENCE, 1n);
      await expect(staking.connect(referee).accuse(provider.address, EVIDENCE, 1n, selfAccusation))
        .to.emit(staking, "Accused")
        .withArgs(provider.address, provider2.address, EVIDENCE, 1n, BOND);
      // The honest verifier comes second: the evidence is taken.
      const honest = await signAccusation(verifier, staking, provider.address, EVIDENCE, ACCUSED);
      await expect(staking.connect(referee).accuse(provider.address, EVIDENCE, ACCUSED, honest))
        .to.be.revertedWithCustomError(staking, "StakingEvidenceUsed")
        .withArgs(EVIDENCE);

      const bounty = (STAKE * BOUNTY_BPS) / 10_000n;
      const tx = staking.connect(referee).resolve(EVIDENCE, true);
      await expect(tx).to.emit(staking, "DisputeResolved").withArgs(EVIDENCE, true, STAKE);
      await expect(tx)
        .to.emit(staking, "Slashed")
        .withArgs(provider.address, provider2.address, EVIDENCE, STAKE, bounty);
      await expect(tx).to.changeTokenBalances(
        ethers,
        token,
        [staking, provider2, treasury, provider],
        [-STAKE, bounty, STAKE - bounty, 0n],
      );
      const p = await accountOf(staking, provider.address);
      expect([p.staked, p.unbonding, p.openDisputes]).to.deep.equal([0n, 0n, 0n]);
      // Even counting the bounty its own second key collects, the cheat loses STAKE - bounty, not 1 wei.
      expect(STAKE - bounty).to.be.greaterThan(1n);
      expect((await staking.disputeOf(EVIDENCE)).provider).to.equal(ethers.ZeroAddress);
    });

    it("false accusation: the verifier's bond goes to the treasury, the provider keeps its stake", async function () {
      const { token, staking, referee, provider, verifier, treasury } = await networkHelpers.loadFixture(
        accusedFixture,
      );
      const tx = staking.connect(referee).resolve(EVIDENCE, false);
      await expect(tx).to.emit(staking, "DisputeResolved").withArgs(EVIDENCE, false, BOND);
      await expect(tx).to.emit(staking, "Slashed").withArgs(verifier.address, ethers.ZeroAddress, EVIDENCE, BOND, 0n);
      await expect(tx).to.changeTokenBalances(
        ethers,
        token,
        [staking, verifier, treasury, provider],
        [-BOND, 0n, BOND, 0n],
      );
      const p = await accountOf(staking, provider.address);
      const v = await accountOf(staking, verifier.address);
      expect([p.staked, p.openDisputes]).to.deep.equal([STAKE, 0n]);
      expect([v.staked, v.bonded, v.openDisputes]).to.deep.equal([STAKE - BOND, 0n, 0n]);
      expect(await staking.evidenceUsed(EVIDENCE)).to.equal(true);
    });

    it("false accusation: takes the bond recorded at accuse time, not the current verifierBond", async function () {
      const { staking, governor, referee, verifier } = await networkHelpers.loadFixture(accusedFixture);
      await staking.connect(governor).setVerifierBond(BOND * 5n);
      await expect(staking.connect(referee).resolve(EVIDENCE, false))
        .to.emit(staking, "DisputeResolved")
        .withArgs(EVIDENCE, false, BOND);
      expect(await staking.stakeOf(verifier.address)).to.equal(STAKE - BOND);
    });

    it("false accusation after a slash took the verifier's whole stake: no bond from stake added later (review R4)", async function () {
      // The canary path slashes a lazy verifier's whole stake, its open bond included; it then stakes again.
      const { token, staking, slasher, referee, verifier, treasury } = await networkHelpers.loadFixture(accusedFixture);
      await staking.connect(slasher).slash(verifier.address, STAKE, treasury.address, EVIDENCE2);
      expect((await accountOf(staking, verifier.address)).bonded).to.equal(0n); // nothing backs the bond any more
      const again = STAKE / 10n;
      await staking.connect(verifier).stake(again);
      const tx = staking.connect(referee).resolve(EVIDENCE, false);
      await expect(tx).to.emit(staking, "DisputeResolved").withArgs(EVIDENCE, false, 0n);
      await expect(tx).to.changeTokenBalances(ethers, token, [staking, verifier, treasury], [0n, 0n, 0n]);
      const v = await accountOf(staking, verifier.address);
      expect([v.staked, v.bonded, v.openDisputes]).to.deep.equal([again, 0n, 0n]);
      expect(await staking.freeStakeOf(verifier.address)).to.equal(again);
    });

    it("false accusation after a partial slash: takes only the part of the bond still backed", async function () {
      const { staking, slasher, referee, verifier, treasury } = await networkHelpers.loadFixture(accusedFixture);
      const left = BOND / 4n;
      await staking.connect(slasher).slash(verifier.address, STAKE - left, treasury.address, EVIDENCE2);
      expect((await accountOf(staking, verifier.address)).bonded).to.equal(left);
      await staking.connect(verifier).stake(STAKE);
      await expect(staking.connect(referee).resolve(EVIDENCE, false))
        .to.emit(staking, "DisputeResolved")
        .withArgs(EVIDENCE, false, left);
      expect(await staking.stakeOf(verifier.address)).to.equal(STAKE); // left + STAKE - left
    });

    it("across several open bonds, takes no more than what backed them after the slash", async function () {
      const { staking, slasher, referee, provider, provider2, verifier, treasury } = await networkHelpers.loadFixture(
        accusedFixture,
      );
      await staking.connect(provider2).stake(STAKE);
      const EVIDENCE3 = ethers.id("evidence-3");
      await staking
        .connect(referee)
        .accuse(provider2.address, EVIDENCE3, 1n, await signAccusation(verifier, staking, provider2.address, EVIDENCE3, 1n));
      expect((await accountOf(staking, verifier.address)).bonded).to.equal(BOND * 2n);
      const left = BOND + BOND / 2n; // backs one bond and half of the other
      await staking.connect(slasher).slash(verifier.address, STAKE - left, treasury.address, EVIDENCE2);
      await staking.connect(verifier).stake(STAKE);
      await expect(staking.connect(referee).resolve(EVIDENCE, false))
        .to.emit(staking, "DisputeResolved")
        .withArgs(EVIDENCE, false, BOND);
      await expect(staking.connect(referee).resolve(EVIDENCE3, false))
        .to.emit(staking, "DisputeResolved")
        .withArgs(EVIDENCE3, false, left - BOND);
      const v = await accountOf(staking, verifier.address);
      expect([v.staked, v.bonded, v.openDisputes]).to.deep.equal([STAKE, 0n, 0n]);
      expect((await accountOf(staking, provider.address)).openDisputes).to.equal(0n);
    });

    it("fraud after governance already slashed everything: resolves with 0 slashed and moves no token", async function () {
      const { token, staking, slasher, referee, provider, verifier } = await networkHelpers.loadFixture(accusedFixture);
      await staking.connect(slasher).slash(provider.address, STAKE, verifier.address, EVIDENCE2);
      const tx = staking.connect(referee).resolve(EVIDENCE, true);
      await expect(tx).to.emit(staking, "DisputeResolved").withArgs(EVIDENCE, true, 0n);
      await expect(tx).to.emit(staking, "Slashed").withArgs(provider.address, verifier.address, EVIDENCE, 0n, 0n);
      await expect(tx).to.changeTokenBalances(ethers, token, [staking, verifier], [0n, 0n]);
      expect((await accountOf(staking, verifier.address)).openDisputes).to.equal(0n);
    });

    it("reverts with StakingUnknownDispute(evidence) for unknown or already resolved evidence", async function () {
      const { staking, referee } = await networkHelpers.loadFixture(accusedFixture);
      await expect(staking.connect(referee).resolve(EVIDENCE2, true))
        .to.be.revertedWithCustomError(staking, "StakingUnknownDispute")
        .withArgs(EVIDENCE2);
      await staking.connect(referee).resolve(EVIDENCE, true);
      await expect(staking.connect(referee).resolve(EVIDENCE, true))
        .to.be.revertedWithCustomError(staking, "StakingUnknownDispute")
        .withArgs(EVIDENCE);
    });

    it("reverts with AccessControlUnauthorizedAccount without REFEREE_ROLE", async function () {
      const { staking, verifier } = await networkHelpers.loadFixture(accusedFixture);
      await expect(staking.connect(verifier).resolve(EVIDENCE, true))
        .to.be.revertedWithCustomError(staking, "AccessControlUnauthorizedAccount")
        .withArgs(verifier.address, await staking.REFEREE_ROLE());
    });
  });

  describe("dismiss", function () {
    it("closes a good-faith dispute: the bond is released, both accounts unfreeze, no token moves", async function () {
      const { token, staking, referee, provider, verifier, treasury } = await networkHelpers.loadFixture(
        accusedFixture,
      );
      expect((await accountOf(staking, verifier.address)).bonded).to.equal(BOND);
      const tx = staking.connect(referee).dismiss(EVIDENCE);
      await expect(tx).to.emit(staking, "DisputeDismissed").withArgs(EVIDENCE, provider.address, verifier.address);
      await expect(tx).to.not.emit(staking, "Slashed");
      await expect(tx).to.changeTokenBalances(ethers, token, [staking, verifier, treasury, provider], [0n, 0n, 0n, 0n]);
      const p = await accountOf(staking, provider.address);
      const v = await accountOf(staking, verifier.address);
      expect([p.staked, p.openDisputes]).to.deep.equal([STAKE, 0n]);
      expect([v.staked, v.bonded, v.openDisputes]).to.deep.equal([STAKE, 0n, 0n]);
      expect(await staking.totalStaked()).to.equal(STAKE * 2n);
      expect(await staking.evidenceUsed(EVIDENCE)).to.equal(true);
      expect((await staking.disputeOf(EVIDENCE)).provider).to.equal(ethers.ZeroAddress);
      // both may leave again, and the spent evidence cannot be raised twice
      await expect(staking.connect(provider).requestUnbond(1n)).to.emit(staking, "UnbondRequested");
      await expect(staking.connect(verifier).requestUnbond(STAKE)).to.emit(staking, "UnbondRequested");
      const sig = await signAccusation(verifier, staking, provider.address, EVIDENCE, ACCUSED);
      await expect(staking.connect(referee).accuse(provider.address, EVIDENCE, ACCUSED, sig))
        .to.be.revertedWithCustomError(staking, "StakingEvidenceUsed")
        .withArgs(EVIDENCE);
    });

    it("releases a bond a slash already took from: stake added later is free again", async function () {
      const { staking, slasher, referee, verifier, treasury } = await networkHelpers.loadFixture(accusedFixture);
      await staking.connect(slasher).slash(verifier.address, STAKE - BOND / 2n, treasury.address, EVIDENCE2);
      await staking.connect(verifier).stake(STAKE);
      await staking.connect(referee).dismiss(EVIDENCE);
      const v = await accountOf(staking, verifier.address);
      expect([v.staked, v.bonded, v.openDisputes]).to.deep.equal([STAKE + BOND / 2n, 0n, 0n]);
      expect(await staking.freeStakeOf(verifier.address)).to.equal(STAKE + BOND / 2n);
    });

    it("reverts with StakingUnknownDispute(evidence) for unknown, resolved or dismissed evidence", async function () {
      const { staking, referee } = await networkHelpers.loadFixture(accusedFixture);
      await expect(staking.connect(referee).dismiss(EVIDENCE2))
        .to.be.revertedWithCustomError(staking, "StakingUnknownDispute")
        .withArgs(EVIDENCE2);
      await staking.connect(referee).dismiss(EVIDENCE);
      for (const call of [() => staking.connect(referee).dismiss(EVIDENCE), () => staking.connect(referee).resolve(EVIDENCE, false)]) {
        await expect(call()).to.be.revertedWithCustomError(staking, "StakingUnknownDispute").withArgs(EVIDENCE);
      }
    });

    it("reverts with AccessControlUnauthorizedAccount without REFEREE_ROLE (the verifier itself included)", async function () {
      const { staking, verifier, provider } = await networkHelpers.loadFixture(accusedFixture);
      for (const who of [verifier, provider]) {
        await expect(staking.connect(who).dismiss(EVIDENCE))
          .to.be.revertedWithCustomError(staking, "AccessControlUnauthorizedAccount")
          .withArgs(who.address, await staking.REFEREE_ROLE());
      }
      expect((await accountOf(staking, verifier.address)).bonded).to.equal(BOND);
    });
  });

  describe("slash", function () {
    it("pays bountyBps of the slash to the verifier and the rest to the treasury", async function () {
      const { token, staking, slasher, provider, verifier, treasury } = await networkHelpers.loadFixture(stakedFixture);
      const amount = 1003n;
      const bounty = (amount * BOUNTY_BPS) / 10_000n; // 250, rounded down
      const tx = staking.connect(slasher).slash(provider.address, amount, verifier.address, EVIDENCE);
      await expect(tx)
        .to.emit(staking, "Slashed")
        .withArgs(provider.address, verifier.address, EVIDENCE, amount, bounty);
      await expect(tx).to.changeTokenBalances(
        ethers,
        token,
        [staking, verifier, treasury],
        [-amount, bounty, amount - bounty],
      );
      expect(await staking.stakeOf(provider.address)).to.equal(STAKE - amount);
      expect(await staking.totalStaked()).to.equal(STAKE * 2n - amount);
      expect(await staking.evidenceUsed(EVIDENCE)).to.equal(true);
    });

    it("takes unbonding stake once the bonded stake is gone", async function () {
      const { token, staking, slasher, provider, verifier, readyAt } = await networkHelpers.loadFixture(
        unbondingFixture,
      );
      const staked = STAKE - ethers.parseEther("300");
      const amount = staked + ethers.parseEther("100");
      await expect(staking.connect(slasher).slash(provider.address, amount, verifier.address, EVIDENCE))
        .to.emit(staking, "Slashed")
        .withArgs(provider.address, verifier.address, EVIDENCE, amount, (amount * BOUNTY_BPS) / 10_000n);
      const p = await accountOf(staking, provider.address);
      expect([p.staked, p.unbonding]).to.deep.equal([0n, ethers.parseEther("200")]);
      await time.increaseTo(readyAt);
      await expect(staking.connect(provider).withdraw()).to.changeTokenBalances(
        ethers,
        token,
        [provider],
        [ethers.parseEther("200")],
      );
    });

    it("slashes at most staked + unbonding", async function () {
      const { token, staking, slasher, provider, verifier, treasury } = await networkHelpers.loadFixture(
        unbondingFixture,
      );
      await expect(staking.connect(slasher).slash(provider.address, STAKE * 5n, verifier.address, EVIDENCE))
        .to.emit(staking, "Slashed")
        .withArgs(provider.address, verifier.address, EVIDENCE, STAKE, (STAKE * BOUNTY_BPS) / 10_000n);
      const p = await accountOf(staking, provider.address);
      expect([p.staked, p.unbonding]).to.deep.equal([0n, 0n]);
      expect((await token.balanceOf(verifier.address)) + (await token.balanceOf(treasury.address))).to.equal(
        STAKE * 9n + STAKE, // the verifier's unstaked 9 * STAKE plus everything slashed
      );
    });

    it("reverts with StakingEvidenceUsed(evidence) when the evidence is reused or in an open dispute", async function () {
      const { staking, slasher, provider, verifier } = await networkHelpers.loadFixture(accusedFixture);
      await expect(staking.connect(slasher).slash(provider.address, 1n, verifier.address, EVIDENCE))
        .to.be.revertedWithCustomError(staking, "StakingEvidenceUsed")
        .withArgs(EVIDENCE);
      await staking.connect(slasher).slash(provider.address, 1n, verifier.address, EVIDENCE2);
      await expect(staking.connect(slasher).slash(provider.address, 1n, verifier.address, EVIDENCE2))
        .to.be.revertedWithCustomError(staking, "StakingEvidenceUsed")
        .withArgs(EVIDENCE2);
    });

    it("reverts with StakingNothingToSlash(provider) for a provider without stake", async function () {
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
    it("blocks stake, requestUnbond, withdraw, accuse, resolve, dismiss and slash with EnforcedPause", async function () {
      const { staking, guardian, slasher, referee, provider, verifier, readyAt } = await networkHelpers.loadFixture(
        unbondingFixture,
      );
      const sig = await signAccusation(verifier, staking, provider.address, EVIDENCE2, 1n);
      await staking.connect(referee).accuse(provider.address, EVIDENCE2, 1n, sig);
      await time.increaseTo(readyAt);
      await expect(staking.connect(guardian).pause()).to.emit(staking, "Paused").withArgs(guardian.address);
      const sig2 = await signAccusation(verifier, staking, provider.address, EVIDENCE, 1n);
      const calls = [
        () => staking.connect(provider).stake(1n),
        () => staking.connect(provider).requestUnbond(1n),
        () => staking.connect(provider).withdraw(),
        () => staking.connect(referee).accuse(provider.address, EVIDENCE, 1n, sig2),
        () => staking.connect(referee).resolve(EVIDENCE2, false),
        () => staking.connect(referee).dismiss(EVIDENCE2),
        () => staking.connect(slasher).slash(provider.address, 1n, verifier.address, EVIDENCE),
      ];
      for (const call of calls) {
        await expect(call()).to.be.revertedWithCustomError(staking, "EnforcedPause");
      }
    });

    it("leaves lock and unlock open (they move no token; every exit is paused)", async function () {
      const { staking, guardian, locker, provider } = await networkHelpers.loadFixture(stakedFixture);
      await staking.connect(guardian).pause();
      await expect(staking.connect(locker).lock(provider.address, 1n)).to.emit(staking, "StakeLocked");
      await expect(staking.connect(locker).unlock(provider.address, 1n)).to.emit(staking, "StakeUnlocked");
    });

    it("reverts with EnforcedPause when already paused", async function () {
      const { staking, guardian } = await networkHelpers.loadFixture(stakedFixture);
      await staking.connect(guardian).pause();
      await expect(staking.connect(guardian).pause()).to.be.revertedWithCustomError(staking, "EnforcedPause");
    });

    it("reverts with AccessControlUnauthorizedAccount without GUARDIAN_ROLE (governor and admin included)", async function () {
      const { staking, admin, governor } = await networkHelpers.loadFixture(stakedFixture);
      for (const who of [admin, governor]) {
        await expect(staking.connect(who).pause())
          .to.be.revertedWithCustomError(staking, "AccessControlUnauthorizedAccount")
          .withArgs(who.address, await staking.GUARDIAN_ROLE());
      }
    });
  });

  describe("unpause", function () {
    it("lets the governor restore every flow and emits Unpaused", async function () {
      const { staking, guardian, governor, slasher, referee, provider, verifier } = await networkHelpers.loadFixture(
        stakedFixture,
      );
      await staking.connect(guardian).pause();
      await expect(staking.connect(governor).unpause()).to.emit(staking, "Unpaused").withArgs(governor.address);
      await staking.connect(provider).stake(1n);
      await staking.connect(provider).requestUnbond(1n);
      const sig = await signAccusation(verifier, staking, provider.address, EVIDENCE, 1n);
      await staking.connect(referee).accuse(provider.address, EVIDENCE, 1n, sig);
      await staking.connect(referee).resolve(EVIDENCE, false); // a fraud verdict would take everything (see resolve)
      await staking.connect(slasher).slash(provider.address, 1n, verifier.address, EVIDENCE2);
      await time.increase(DELAY);
      await expect(staking.connect(provider).withdraw()).to.emit(staking, "Withdrawn").withArgs(provider.address, 1n);
    });

    it("reverts with AccessControlUnauthorizedAccount for the guardian and the admin", async function () {
      const { staking, admin, guardian } = await networkHelpers.loadFixture(stakedFixture);
      await staking.connect(guardian).pause();
      for (const who of [guardian, admin]) {
        await expect(staking.connect(who).unpause())
          .to.be.revertedWithCustomError(staking, "AccessControlUnauthorizedAccount")
          .withArgs(who.address, await staking.GOVERNOR_ROLE());
      }
    });

    it("reverts with ExpectedPause when not paused", async function () {
      const { staking, governor } = await networkHelpers.loadFixture(stakedFixture);
      await expect(staking.connect(governor).unpause()).to.be.revertedWithCustomError(staking, "ExpectedPause");
    });
  });

  describe("pausedSeconds and a pause during unbonding", function () {
    // The provider's request (unbondingFixture) would mature at readyAt. An hour after it the guardian pauses; the
    // timelocked unpause lands 1,000 s after readyAt. Staking was paused for PAUSED seconds, during which nobody
    // could accuse, resolve or slash, so the unbonding matures PAUSED seconds later: at `extended`.
    async function pausedInUnbondingFixture() {
      const f = await unbondingFixture();
      const requestedAt = f.readyAt - DELAY;
      await time.setNextBlockTimestamp(requestedAt + 3_600n);
      await f.staking.connect(f.guardian).pause();
      await time.setNextBlockTimestamp(f.readyAt + 1_000n);
      await f.staking.connect(f.governor).unpause();
      const paused = f.readyAt + 1_000n - (requestedAt + 3_600n);
      return { ...f, paused, extended: f.readyAt + paused };
    }

    it("counts the seconds paused, the current pause included", async function () {
      const { staking, guardian, governor } = await networkHelpers.loadFixture(deployStakingFixture);
      expect(await staking.pausedSeconds()).to.equal(0n);
      await staking.connect(guardian).pause();
      const pausedAt = BigInt(await time.latest());
      await time.increase(500);
      expect(await staking.pausedSeconds()).to.equal(BigInt(await time.latest()) - pausedAt);
      await time.setNextBlockTimestamp(pausedAt + 1_000n);
      await staking.connect(governor).unpause();
      await time.increase(5_000);
      expect(await staking.pausedSeconds()).to.equal(1_000n); // stands still once unpaused
    });

    it("reports the deadline in force from accountOf, moving with the clock while paused", async function () {
      const { staking, guardian, provider, readyAt } = await networkHelpers.loadFixture(unbondingFixture);
      await staking.connect(guardian).pause();
      const pausedAt = BigInt(await time.latest());
      await time.increase(DELAY * 2n);
      const pausedFor = BigInt(await time.latest()) - pausedAt;
      expect((await accountOf(staking, provider.address)).unbondingReadyAt).to.equal(readyAt + pausedFor);
    });

    it("keeps stake whose unbonding would have matured during the pause slashable after it (review R1)", async function () {
      // The cheat requested its unbond at once, the pause blocked every slashing path, and the unpause was scheduled
      // in public: its withdraw in the next block must fail, and the referee's fraud verdict must still find the stake.
      const { token, staking, referee, provider, verifier, treasury, readyAt, extended } =
        await networkHelpers.loadFixture(pausedInUnbondingFixture);
      expect(BigInt(await time.latest())).to.be.greaterThan(readyAt); // past the nominal delay
      await expect(staking.connect(provider).withdraw())
        .to.be.revertedWithCustomError(staking, "StakingStillUnbonding")
        .withArgs(provider.address, extended);
      const sig = await signAccusation(verifier, staking, provider.address, EVIDENCE, ACCUSED);
      await staking.connect(referee).accuse(provider.address, EVIDENCE, ACCUSED, sig);
      const tx = staking.connect(referee).resolve(EVIDENCE, true);
      const bounty = (STAKE * BOUNTY_BPS) / 10_000n;
      await expect(tx).to.emit(staking, "DisputeResolved").withArgs(EVIDENCE, true, STAKE);
      await expect(tx).to.changeTokenBalances(
        ethers,
        token,
        [staking, verifier, treasury, provider],
        [-STAKE, bounty, STAKE - bounty, 0n],
      );
    });

    it("lets the withdraw through at the extended deadline, not a second before", async function () {
      const { token, staking, provider, unbonded, paused, extended } = await networkHelpers.loadFixture(
        pausedInUnbondingFixture,
      );
      expect(await staking.pausedSeconds()).to.equal(paused);
      expect((await accountOf(staking, provider.address)).unbondingReadyAt).to.equal(extended);
      await time.setNextBlockTimestamp(extended - 1n);
      await expect(staking.connect(provider).withdraw({ gasLimit: 300_000 }))
        .to.be.revertedWithCustomError(staking, "StakingStillUnbonding")
        .withArgs(provider.address, extended);
      const tx = staking.connect(provider).withdraw();
      await expect(tx).to.emit(staking, "Withdrawn").withArgs(provider.address, unbonded);
      await expect(tx).to.changeTokenBalances(ethers, token, [staking, provider], [-unbonded, unbonded]);
    });

    it("does not move the deadline of a request made after the pause", async function () {
      const { staking, guardian, governor, provider } = await networkHelpers.loadFixture(stakedFixture);
      await staking.connect(guardian).pause();
      await time.increase(10_000);
      await staking.connect(governor).unpause();
      await staking.connect(provider).requestUnbond(1n);
      const readyAt = BigInt(await time.latest()) + DELAY;
      expect((await accountOf(staking, provider.address)).unbondingReadyAt).to.equal(readyAt);
      await time.increaseTo(readyAt);
      await expect(staking.connect(provider).withdraw()).to.emit(staking, "Withdrawn").withArgs(provider.address, 1n);
    });

    it("leaves an unbonding that had matured before the pause withdrawable as soon as it ends", async function () {
      const { staking, guardian, governor, provider, unbonded, readyAt } = await networkHelpers.loadFixture(
        unbondingFixture,
      );
      await time.increaseTo(readyAt + 10n);
      await staking.connect(guardian).pause();
      await time.increase(DELAY * 3n);
      await staking.connect(governor).unpause();
      expect((await accountOf(staking, provider.address)).unbondingReadyAt).to.be.lessThan(
        BigInt(await time.latest()),
      );
      await expect(staking.connect(provider).withdraw())
        .to.emit(staking, "Withdrawn")
        .withArgs(provider.address, unbonded);
    });
  });

  describe("slash delay", function () {
    // With a slashDelay every slash leaves the account at once but waits SLASH_DELAY seconds (not counting time
    // paused) in the contract before anyone may finalizeSlash it; until then the guardian may voidSlash it.
    const SLASH_DELAY = 2n * 24n * 3600n;
    const EVIDENCE3 = ethers.id("evidence-3");
    const NO_SLASH = { account: ethers.ZeroAddress, verifier: ethers.ZeroAddress, amount: 0n, bounty: 0n, readyAt: 0n };

    async function slashOf(staking, evidence) {
      return (await staking.slashOf(evidence)).toObject();
    }

    /** The contract holds exactly the stakes plus the slashes waiting out their delay. */
    async function expectHeldCovered(token, staking) {
      const held = (await staking.totalStaked()) + (await staking.totalPendingSlashes());
      expect(await token.balanceOf(staking)).to.equal(held);
    }

    // stakedFixture with the governor's slash delay in force.
    async function delayedFixture() {
      const f = await stakedFixture();
      await f.staking.connect(f.governor).setSlashDelay(SLASH_DELAY);
      return f;
    }

    // delayedFixture with verifier's accusation of provider on EVIDENCE open (BOND bonded).
    async function delayedAccusedFixture() {
      const f = await delayedFixture();
      const sig = await signAccusation(f.verifier, f.staking, f.provider.address, EVIDENCE, ACCUSED);
      await f.staking.connect(f.referee).accuse(f.provider.address, EVIDENCE, ACCUSED, sig);
      return f;
    }

    // The fraud verdict on EVIDENCE took provider's whole STAKE; it is payable from readyAt (verdict + SLASH_DELAY).
    async function pendingFixture() {
      const f = await delayedAccusedFixture();
      await f.staking.connect(f.referee).resolve(EVIDENCE, true);
      const readyAt = BigInt(await time.latest()) + SLASH_DELAY;
      return { ...f, readyAt, bounty: (STAKE * BOUNTY_BPS) / 10_000n };
    }

    it("takes the slashDelay from the constructor (0 in deployStakingFixture)", async function () {
      const { token, staking, admin, governor, treasury } = await networkHelpers.loadFixture(deployStakingFixture);
      expect(await staking.slashDelay()).to.equal(0n);
      const delayed = await ethers.deployContract("GridStaking", [
        token,
        admin.address,
        governor.address,
        treasury.address,
        BOUNTY_BPS,
        DELAY,
        BOND,
        SLASH_DELAY,
      ]);
      expect(await delayed.slashDelay()).to.equal(SLASH_DELAY);
      expect(await delayed.totalPendingSlashes()).to.equal(0n);
    });

    it("pendingSlashesOf: what an account's pending slashes hold, till each is paid out or voided", async function () {
      const { staking, guardian, slasher, provider, verifier, other, readyAt } =
        await networkHelpers.loadFixture(pendingFixture);
      expect(await staking.pendingSlashesOf(provider.address)).to.equal(STAKE);
      expect(await staking.pendingSlashesOf(verifier.address)).to.equal(0n);
      await staking.connect(slasher).slash(verifier.address, 30n, other.address, EVIDENCE2);
      expect(await staking.pendingSlashesOf(verifier.address)).to.equal(30n);
      // a slash that finds the stake held by a pending one takes nothing more: the holder says what could come back
      await expect(staking.connect(slasher).slash(provider.address, 1n, other.address, ethers.id("evidence-3")))
        .to.be.revertedWithCustomError(staking, "StakingNothingToSlash")
        .withArgs(provider.address);
      await staking.connect(guardian).voidSlash(EVIDENCE2);
      expect(await staking.pendingSlashesOf(verifier.address)).to.equal(0n);
      await time.increaseTo(readyAt);
      await staking.connect(other).finalizeSlash(EVIDENCE);
      expect(await staking.pendingSlashesOf(provider.address)).to.equal(0n);
    });

    it("fraud verdict: the stake leaves at once, no token moves, the slash is recorded", async function () {
      const { token, staking, referee, provider, verifier, treasury } = await networkHelpers.loadFixture(
        delayedAccusedFixture,
      );
      const bounty = (STAKE * BOUNTY_BPS) / 10_000n;
      const at = BigInt(await time.latest()) + 100n;
      await time.setNextBlockTimestamp(at);
      const tx = staking.connect(referee).resolve(EVIDENCE, true);
      await expect(tx).to.emit(staking, "DisputeResolved").withArgs(EVIDENCE, true, STAKE);
      await expect(tx)
        .to.emit(staking, "Slashed")
        .withArgs(provider.address, verifier.address, EVIDENCE, STAKE, bounty);
      await expect(tx)
        .to.emit(staking, "SlashPending")
        .withArgs(EVIDENCE, provider.address, STAKE, at + SLASH_DELAY);
      await expect(tx).to.not.emit(staking, "SlashFinalized");
      await expect(tx).to.changeTokenBalances(
        ethers,
        token,
        [staking, verifier, treasury, provider],
        [0n, 0n, 0n, 0n],
      );
      expect(await slashOf(staking, EVIDENCE)).to.deep.equal({
        account: provider.address,
        verifier: verifier.address,
        amount: STAKE,
        bounty,
        readyAt: at + SLASH_DELAY,
      });
      const p = await accountOf(staking, provider.address);
      expect([p.staked, p.unbonding, p.openDisputes]).to.deep.equal([0n, 0n, 0n]);
      expect(await staking.totalStaked()).to.equal(STAKE); // the verifier's
      expect(await staking.totalPendingSlashes()).to.equal(STAKE);
      expect(await token.balanceOf(staking)).to.equal(STAKE * 2n);
      await expectHeldCovered(token, staking);
      expect(await staking.evidenceUsed(EVIDENCE)).to.equal(true);
      // The slashed stake can no longer be unbonded or withdrawn.
      await expect(staking.connect(provider).requestUnbond(1n))
        .to.be.revertedWithCustomError(staking, "StakingInsufficientStake")
        .withArgs(provider.address, 0n, 1n);
      await expect(staking.connect(provider).withdraw())
        .to.be.revertedWithCustomError(staking, "StakingNothingToWithdraw")
        .withArgs(provider.address);
    });

    it("fraud verdict: takes unbonding stake too and holds it the same way", async function () {
      const { token, staking, referee, provider, verifier } = await networkHelpers.loadFixture(delayedFixture);
      await staking.connect(provider).requestUnbond(STAKE / 4n);
      const sig = await signAccusation(verifier, staking, provider.address, EVIDENCE, ACCUSED);
      await staking.connect(referee).accuse(provider.address, EVIDENCE, ACCUSED, sig);
      const tx = await staking.connect(referee).resolve(EVIDENCE, true);
      const readyAt = BigInt(await time.latest()) + SLASH_DELAY;
      await expect(tx).to.emit(staking, "SlashPending").withArgs(EVIDENCE, provider.address, STAKE, readyAt);
      const p = await accountOf(staking, provider.address);
      expect([p.staked, p.unbonding]).to.deep.equal([0n, 0n]);
      await time.increase(DELAY);
      await expect(staking.connect(provider).withdraw())
        .to.be.revertedWithCustomError(staking, "StakingNothingToWithdraw")
        .withArgs(provider.address);
      await expectHeldCovered(token, staking);
    });

    it("finalizeSlash before readyAt reverts with StakingSlashNotReady(evidence, readyAt)", async function () {
      const { staking, other, readyAt } = await networkHelpers.loadFixture(pendingFixture);
      await expect(staking.connect(other).finalizeSlash(EVIDENCE))
        .to.be.revertedWithCustomError(staking, "StakingSlashNotReady")
        .withArgs(EVIDENCE, readyAt);
      await time.setNextBlockTimestamp(readyAt - 1n);
      await expect(staking.connect(other).finalizeSlash(EVIDENCE, { gasLimit: 300_000 }))
        .to.be.revertedWithCustomError(staking, "StakingSlashNotReady")
        .withArgs(EVIDENCE, readyAt);
      expect((await slashOf(staking, EVIDENCE)).amount).to.equal(STAKE);
    });

    it("finalizeSlash from readyAt on (anyone) pays the bounty and the treasury share, once", async function () {
      const { token, staking, guardian, provider, verifier, treasury, other, readyAt, bounty } =
        await networkHelpers.loadFixture(pendingFixture);
      await time.setNextBlockTimestamp(readyAt);
      const tx = staking.connect(other).finalizeSlash(EVIDENCE);
      await expect(tx)
        .to.emit(staking, "SlashFinalized")
        .withArgs(EVIDENCE, provider.address, verifier.address, STAKE);
      await expect(tx).to.changeTokenBalances(
        ethers,
        token,
        [staking, verifier, treasury, provider, other],
        [-STAKE, bounty, STAKE - bounty, 0n, 0n],
      );
      expect(await staking.totalPendingSlashes()).to.equal(0n);
      expect(await staking.totalStaked()).to.equal(STAKE);
      await expectHeldCovered(token, staking);
      expect(await slashOf(staking, EVIDENCE)).to.deep.equal(NO_SLASH);
      await expect(staking.connect(other).finalizeSlash(EVIDENCE))
        .to.be.revertedWithCustomError(staking, "StakingUnknownSlash")
        .withArgs(EVIDENCE);
      await expect(staking.connect(guardian).voidSlash(EVIDENCE))
        .to.be.revertedWithCustomError(staking, "StakingUnknownSlash")
        .withArgs(EVIDENCE);
    });

    it("finalizeSlash and voidSlash revert with StakingUnknownSlash(evidence) for no slash", async function () {
      const { staking, guardian, other } = await networkHelpers.loadFixture(pendingFixture);
      await expect(staking.connect(other).finalizeSlash(EVIDENCE2))
        .to.be.revertedWithCustomError(staking, "StakingUnknownSlash")
        .withArgs(EVIDENCE2);
      await expect(staking.connect(guardian).voidSlash(EVIDENCE2))
        .to.be.revertedWithCustomError(staking, "StakingUnknownSlash")
        .withArgs(EVIDENCE2);
      expect(await slashOf(staking, EVIDENCE2)).to.deep.equal(NO_SLASH);
    });

    it("voidSlash within the window returns the stake to the account, which may then unbond it", async function () {
      const { token, staking, guardian, referee, provider, verifier, treasury, other, readyAt } =
        await networkHelpers.loadFixture(pendingFixture);
      await time.setNextBlockTimestamp(readyAt - 1n);
      const tx = staking.connect(guardian).voidSlash(EVIDENCE);
      await expect(tx).to.emit(staking, "SlashVoided").withArgs(EVIDENCE, provider.address, STAKE);
      await expect(tx).to.not.emit(staking, "SlashFinalized");
      await expect(tx).to.changeTokenBalances(
        ethers,
        token,
        [staking, verifier, treasury, provider],
        [0n, 0n, 0n, 0n],
      );
      expect((await accountOf(staking, provider.address)).staked).to.equal(STAKE);
      expect(await staking.freeStakeOf(provider.address)).to.equal(STAKE);
      expect(await staking.totalStaked()).to.equal(STAKE * 2n);
      expect(await staking.totalPendingSlashes()).to.equal(0n);
      await expectHeldCovered(token, staking);
      expect(await slashOf(staking, EVIDENCE)).to.deep.equal(NO_SLASH);
      // Voided for good: nobody can pay it out, nor void it twice, nor raise the spent evidence again.
      await time.increaseTo(readyAt + 1n);
      for (const call of [
        () => staking.connect(other).finalizeSlash(EVIDENCE),
        () => staking.connect(guardian).voidSlash(EVIDENCE),
      ]) {
        await expect(call()).to.be.revertedWithCustomError(staking, "StakingUnknownSlash").withArgs(EVIDENCE);
      }
      expect(await staking.evidenceUsed(EVIDENCE)).to.equal(true);
      const sig = await signAccusation(verifier, staking, provider.address, EVIDENCE, ACCUSED);
      await expect(staking.connect(referee).accuse(provider.address, EVIDENCE, ACCUSED, sig))
        .to.be.revertedWithCustomError(staking, "StakingEvidenceUsed")
        .withArgs(EVIDENCE);
      // The stake is the provider's again: unbond and withdraw it.
      await staking.connect(provider).requestUnbond(STAKE);
      await time.increase(DELAY);
      await expect(staking.connect(provider).withdraw()).to.changeTokenBalances(
        ethers,
        token,
        [staking, provider],
        [-STAKE, STAKE],
      );
      await expectHeldCovered(token, staking);
    });

    it("voidSlash returns stake a verdict took from unbonding to staked", async function () {
      const { staking, guardian, referee, provider, verifier } = await networkHelpers.loadFixture(delayedFixture);
      await staking.connect(provider).requestUnbond(STAKE / 4n);
      const sig = await signAccusation(verifier, staking, provider.address, EVIDENCE, ACCUSED);
      await staking.connect(referee).accuse(provider.address, EVIDENCE, ACCUSED, sig);
      await staking.connect(referee).resolve(EVIDENCE, true);
      await expect(staking.connect(guardian).voidSlash(EVIDENCE))
        .to.emit(staking, "SlashVoided")
        .withArgs(EVIDENCE, provider.address, STAKE);
      const p = await accountOf(staking, provider.address);
      expect([p.staked, p.unbonding]).to.deep.equal([STAKE, 0n]);
      expect(await staking.freeStakeOf(provider.address)).to.equal(STAKE);
    });

    it("voidSlash voids the slash's redo (redoEvidenceOf) with it, or alone; not one already final", async function () {
      const { token, staking, governor, guardian, slasher, provider, verifier, other } =
        await networkHelpers.loadFixture(delayedFixture);
      const redo = await staking.redoEvidenceOf(EVIDENCE2);
      expect(redo).to.equal(
        ethers.solidityPackedKeccak256(["string", "bytes32"], ["GridMint/slash-redo/v1", EVIDENCE2]),
      );
      await staking.connect(slasher).slash(provider.address, 300n, other.address, EVIDENCE2);
      await staking.connect(slasher).slash(provider.address, 200n, other.address, redo);
      await staking.connect(slasher).slash(verifier.address, 100n, other.address, EVIDENCE3);
      const tx = staking.connect(guardian).voidSlash(EVIDENCE2);
      await expect(tx).to.emit(staking, "SlashVoided").withArgs(EVIDENCE2, provider.address, 300n);
      await expect(tx).to.emit(staking, "SlashVoided").withArgs(redo, provider.address, 200n);
      expect(await staking.stakeOf(provider.address)).to.equal(STAKE);
      expect(await staking.pendingSlashesOf(provider.address)).to.equal(0n);
      expect((await slashOf(staking, redo)).amount).to.equal(0n);
      expect((await slashOf(staking, EVIDENCE3)).amount).to.equal(100n); // another's slash: untouched
      expect(await staking.evidenceUsed(redo)).to.equal(true);
      await expectHeldCovered(token, staking);
      // A slash with nothing pending of its own (it took nothing: the stake all held by others' slashes; or it was
      // paid at once): voiding it voids its redo alone; then there is nothing left to void.
      const none = ethers.id("evidence-4");
      const redo4 = await staking.redoEvidenceOf(none);
      await staking.connect(slasher).slash(provider.address, 50n, other.address, redo4);
      await expect(staking.connect(guardian).voidSlash(none))
        .to.emit(staking, "SlashVoided")
        .withArgs(redo4, provider.address, 50n);
      expect(await staking.stakeOf(provider.address)).to.equal(STAKE);
      await expect(staking.connect(guardian).voidSlash(none))
        .to.be.revertedWithCustomError(staking, "StakingUnknownSlash")
        .withArgs(none);
      // A redo sent under a shorter delay is final before the slash it redoes: the void leaves it to be paid.
      const redo1 = await staking.redoEvidenceOf(EVIDENCE);
      await staking.connect(slasher).slash(provider.address, 300n, other.address, EVIDENCE);
      await staking.connect(governor).setSlashDelay(10);
      await staking.connect(slasher).slash(provider.address, 200n, other.address, redo1);
      await time.increase(20);
      const receipt = await (await staking.connect(guardian).voidSlash(EVIDENCE)).wait();
      const voided = receipt.logs.map((l) => staking.interface.parseLog(l)).filter((e) => e?.name === "SlashVoided");
      expect(voided.map((e) => [e.args.evidence, e.args.amount])).to.deep.equal([[EVIDENCE, 300n]]);
      expect((await slashOf(staking, redo1)).amount).to.equal(200n);
      await expect(staking.connect(other).finalizeSlash(redo1)).to.emit(staking, "SlashFinalized");
      expect(await staking.stakeOf(provider.address)).to.equal(STAKE - 200n);
      await expectHeldCovered(token, staking);
    });

    it("voidSlash at or after readyAt reverts with StakingSlashFinal(evidence, readyAt)", async function () {
      const { token, staking, guardian, other, readyAt } = await networkHelpers.loadFixture(pendingFixture);
      await time.setNextBlockTimestamp(readyAt);
      await expect(staking.connect(guardian).voidSlash(EVIDENCE, { gasLimit: 300_000 }))
        .to.be.revertedWithCustomError(staking, "StakingSlashFinal")
        .withArgs(EVIDENCE, readyAt);
      await time.increase(3600);
      await expect(staking.connect(guardian).voidSlash(EVIDENCE))
        .to.be.revertedWithCustomError(staking, "StakingSlashFinal")
        .withArgs(EVIDENCE, readyAt);
      await expect(staking.connect(other).finalizeSlash(EVIDENCE)).to.changeTokenBalances(
        ethers,
        token,
        [staking],
        [-STAKE],
      );
    });

    it("voidSlash reverts with AccessControlUnauthorizedAccount without GUARDIAN_ROLE", async function () {
      const { staking, admin, governor, slasher, referee, provider, verifier } = await networkHelpers.loadFixture(
        pendingFixture,
      );
      for (const who of [referee, slasher, governor, admin, provider, verifier]) {
        await expect(staking.connect(who).voidSlash(EVIDENCE))
          .to.be.revertedWithCustomError(staking, "AccessControlUnauthorizedAccount")
          .withArgs(who.address, await staking.GUARDIAN_ROLE());
      }
      expect((await slashOf(staking, EVIDENCE)).amount).to.equal(STAKE);
      expect(await staking.stakeOf(provider.address)).to.equal(0n);
    });

    it("a pause pushes readyAt back by its length; finalizeSlash reverts with EnforcedPause", async function () {
      const { token, staking, guardian, governor, verifier, treasury, other, readyAt, bounty } =
        await networkHelpers.loadFixture(pendingFixture);
      const pausedAt = readyAt - SLASH_DELAY + 1_000n;
      await time.setNextBlockTimestamp(pausedAt);
      await staking.connect(guardian).pause();
      await time.increaseTo(readyAt + 10n); // past the nominal deadline, still paused
      expect((await slashOf(staking, EVIDENCE)).readyAt).to.equal(readyAt + (readyAt + 10n - pausedAt));
      await expect(staking.connect(other).finalizeSlash(EVIDENCE)).to.be.revertedWithCustomError(
        staking,
        "EnforcedPause",
      );
      await time.setNextBlockTimestamp(readyAt + 500n);
      await staking.connect(governor).unpause();
      const paused = readyAt + 500n - pausedAt;
      const extended = readyAt + paused;
      expect(await staking.pausedSeconds()).to.equal(paused);
      expect((await slashOf(staking, EVIDENCE)).readyAt).to.equal(extended);
      await time.setNextBlockTimestamp(extended - 1n);
      await expect(staking.connect(other).finalizeSlash(EVIDENCE, { gasLimit: 300_000 }))
        .to.be.revertedWithCustomError(staking, "StakingSlashNotReady")
        .withArgs(EVIDENCE, extended);
      await expect(staking.connect(other).finalizeSlash(EVIDENCE)).to.changeTokenBalances(
        ethers,
        token,
        [staking, verifier, treasury],
        [-STAKE, bounty, STAKE - bounty],
      );
    });

    it("voidSlash works while paused, even past the nominal readyAt", async function () {
      const { token, staking, guardian, governor, provider, readyAt } = await networkHelpers.loadFixture(
        pendingFixture,
      );
      await staking.connect(guardian).pause();
      await time.increaseTo(readyAt + 3_600n);
      await expect(staking.connect(guardian).voidSlash(EVIDENCE))
        .to.emit(staking, "SlashVoided")
        .withArgs(EVIDENCE, provider.address, STAKE);
      expect(await staking.stakeOf(provider.address)).to.equal(STAKE);
      await expectHeldCovered(token, staking);
      await staking.connect(governor).unpause();
      await expect(staking.connect(provider).requestUnbond(STAKE)).to.emit(staking, "UnbondRequested");
    });

    it("a slash final before a pause stays final: voidSlash reverts with StakingSlashFinal", async function () {
      const { token, staking, guardian, governor, other, readyAt } = await networkHelpers.loadFixture(pendingFixture);
      await time.setNextBlockTimestamp(readyAt + 10n);
      await staking.connect(guardian).pause();
      await time.setNextBlockTimestamp(readyAt + 5_010n);
      // Pushed back by the 5,000 s paused so far: still 10 s behind the clock.
      await expect(staking.connect(guardian).voidSlash(EVIDENCE, { gasLimit: 300_000 }))
        .to.be.revertedWithCustomError(staking, "StakingSlashFinal")
        .withArgs(EVIDENCE, readyAt + 5_000n);
      await staking.connect(governor).unpause();
      await expect(staking.connect(other).finalizeSlash(EVIDENCE)).to.changeTokenBalances(
        ethers,
        token,
        [staking],
        [-STAKE],
      );
    });

    it("does not move the deadline of a slash made after a pause ended", async function () {
      const { staking, guardian, governor, slasher, provider, verifier } = await networkHelpers.loadFixture(
        delayedFixture,
      );
      await staking.connect(guardian).pause();
      await time.increase(10_000);
      await staking.connect(governor).unpause();
      await staking.connect(slasher).slash(provider.address, 1n, verifier.address, EVIDENCE);
      const readyAt = BigInt(await time.latest()) + SLASH_DELAY;
      expect((await slashOf(staking, EVIDENCE)).readyAt).to.equal(readyAt);
      await time.increaseTo(readyAt);
      await expect(staking.finalizeSlash(EVIDENCE)).to.emit(staking, "SlashFinalized");
    });

    it("governance slash: delayed the same way; bounty + treasury share == amount when finalized", async function () {
      const { token, staking, slasher, provider, verifier, treasury } = await networkHelpers.loadFixture(
        delayedFixture,
      );
      const amount = 1003n;
      const bounty = (amount * BOUNTY_BPS) / 10_000n; // 250, rounded down
      const tx = staking.connect(slasher).slash(provider.address, amount, verifier.address, EVIDENCE2);
      await expect(tx)
        .to.emit(staking, "Slashed")
        .withArgs(provider.address, verifier.address, EVIDENCE2, amount, bounty);
      await expect(tx).to.changeTokenBalances(ethers, token, [staking, verifier, treasury], [0n, 0n, 0n]);
      const readyAt = BigInt(await time.latest()) + SLASH_DELAY;
      await expect(tx).to.emit(staking, "SlashPending").withArgs(EVIDENCE2, provider.address, amount, readyAt);
      expect(await slashOf(staking, EVIDENCE2)).to.deep.equal({
        account: provider.address,
        verifier: verifier.address,
        amount,
        bounty,
        readyAt,
      });
      expect(await staking.stakeOf(provider.address)).to.equal(STAKE - amount);
      expect(await staking.totalPendingSlashes()).to.equal(amount);
      await expectHeldCovered(token, staking);
      await time.increaseTo(readyAt);
      await expect(staking.finalizeSlash(EVIDENCE2)).to.changeTokenBalances(
        ethers,
        token,
        [staking, verifier, treasury, provider],
        [-amount, bounty, amount - bounty, 0n],
      );
      await expectHeldCovered(token, staking);
    });

    it("governance slash with a stolen slasher key: voided, the thief's address gets nothing", async function () {
      const { token, staking, guardian, slasher, provider, other } = await networkHelpers.loadFixture(delayedFixture);
      await staking.connect(slasher).slash(provider.address, STAKE, other.address, EVIDENCE2);
      const readyAt = (await slashOf(staking, EVIDENCE2)).readyAt;
      await staking.connect(guardian).voidSlash(EVIDENCE2);
      await time.increaseTo(readyAt + 1n);
      await expect(staking.connect(other).finalizeSlash(EVIDENCE2))
        .to.be.revertedWithCustomError(staking, "StakingUnknownSlash")
        .withArgs(EVIDENCE2);
      expect(await token.balanceOf(other.address)).to.equal(0n);
      expect(await staking.stakeOf(provider.address)).to.equal(STAKE);
    });

    it("false accusation: the verifier's bond is delayed too, then paid to the treasury alone", async function () {
      const { token, staking, referee, provider, verifier, treasury } = await networkHelpers.loadFixture(
        delayedAccusedFixture,
      );
      const tx = staking.connect(referee).resolve(EVIDENCE, false);
      await expect(tx).to.emit(staking, "DisputeResolved").withArgs(EVIDENCE, false, BOND);
      await expect(tx).to.emit(staking, "Slashed").withArgs(verifier.address, ethers.ZeroAddress, EVIDENCE, BOND, 0n);
      await expect(tx).to.changeTokenBalances(ethers, token, [staking, verifier, treasury], [0n, 0n, 0n]);
      const readyAt = BigInt(await time.latest()) + SLASH_DELAY;
      await expect(tx).to.emit(staking, "SlashPending").withArgs(EVIDENCE, verifier.address, BOND, readyAt);
      expect(await slashOf(staking, EVIDENCE)).to.deep.equal({
        account: verifier.address,
        verifier: ethers.ZeroAddress,
        amount: BOND,
        bounty: 0n,
        readyAt,
      });
      const v = await accountOf(staking, verifier.address);
      expect([v.staked, v.bonded, v.openDisputes]).to.deep.equal([STAKE - BOND, 0n, 0n]);
      expect(await staking.stakeOf(provider.address)).to.equal(STAKE);
      await expectHeldCovered(token, staking);
      await time.setNextBlockTimestamp(readyAt - 1n);
      await expect(staking.finalizeSlash(EVIDENCE, { gasLimit: 300_000 }))
        .to.be.revertedWithCustomError(staking, "StakingSlashNotReady")
        .withArgs(EVIDENCE, readyAt);
      const fin = staking.finalizeSlash(EVIDENCE);
      await expect(fin)
        .to.emit(staking, "SlashFinalized")
        .withArgs(EVIDENCE, verifier.address, ethers.ZeroAddress, BOND);
      await expect(fin).to.changeTokenBalances(
        ethers,
        token,
        [staking, verifier, treasury, provider],
        [-BOND, 0n, BOND, 0n],
      );
      await expectHeldCovered(token, staking);
    });

    it("a slash of 0 (nothing left) records nothing: no SlashPending, nothing to finalize", async function () {
      const { token, staking, guardian, slasher, referee, provider, verifier } = await networkHelpers.loadFixture(
        delayedAccusedFixture,
      );
      await staking.connect(slasher).slash(provider.address, STAKE, verifier.address, EVIDENCE2);
      const tx = staking.connect(referee).resolve(EVIDENCE, true);
      await expect(tx).to.emit(staking, "DisputeResolved").withArgs(EVIDENCE, true, 0n);
      await expect(tx).to.emit(staking, "Slashed").withArgs(provider.address, verifier.address, EVIDENCE, 0n, 0n);
      await expect(tx).to.not.emit(staking, "SlashPending");
      await expect(tx).to.changeTokenBalances(ethers, token, [staking, verifier], [0n, 0n]);
      expect(await slashOf(staking, EVIDENCE)).to.deep.equal(NO_SLASH);
      expect(await staking.totalPendingSlashes()).to.equal(STAKE); // the governance slash alone
      await expectHeldCovered(token, staking);
      await time.increase(SLASH_DELAY);
      await expect(staking.finalizeSlash(EVIDENCE))
        .to.be.revertedWithCustomError(staking, "StakingUnknownSlash")
        .withArgs(EVIDENCE);
      await expect(staking.connect(guardian).voidSlash(EVIDENCE))
        .to.be.revertedWithCustomError(staking, "StakingUnknownSlash")
        .withArgs(EVIDENCE);
    });

    it("a false verdict on a bond a slash already took whole records nothing either", async function () {
      const { staking, slasher, referee, verifier, treasury } = await networkHelpers.loadFixture(delayedAccusedFixture);
      await staking.connect(slasher).slash(verifier.address, STAKE, treasury.address, EVIDENCE2);
      const tx = staking.connect(referee).resolve(EVIDENCE, false);
      await expect(tx).to.emit(staking, "DisputeResolved").withArgs(EVIDENCE, false, 0n);
      await expect(tx).to.not.emit(staking, "SlashPending");
      expect(await slashOf(staking, EVIDENCE)).to.deep.equal(NO_SLASH);
      expect(await staking.totalPendingSlashes()).to.equal(STAKE);
    });

    it("voiding a slash that cut an open bond backs it again: the false verdict takes it", async function () {
      // A slash takes the verifier bonds of the account's open accusations with its stake (_takeStake cuts
      // `bonded`). Voided, the slash is undone: the stake is back, so the bond it cut must be backed again, or a
      // verifier whose accusation is false escapes its penalty because of a slash that never happened.
      const { staking, guardian, slasher, referee, verifier, other } = await networkHelpers.loadFixture(
        delayedAccusedFixture,
      );
      await staking.connect(slasher).slash(verifier.address, STAKE, other.address, EVIDENCE2);
      expect((await accountOf(staking, verifier.address)).bonded).to.equal(0n);
      await staking.connect(guardian).voidSlash(EVIDENCE2);
      const v = await accountOf(staking, verifier.address);
      expect([v.staked, v.bonded, v.openDisputes]).to.deep.equal([STAKE, BOND, 1n]);
      await expect(staking.connect(referee).resolve(EVIDENCE, false))
        .to.emit(staking, "DisputeResolved")
        .withArgs(EVIDENCE, false, BOND);
    });

    it("keeps balance == totalStaked + totalPendingSlashes as slashes finalize and void", async function () {
      const { token, staking, guardian, slasher, referee, provider, provider2, verifier } =
        await networkHelpers.loadFixture(delayedAccusedFixture);
      await staking.connect(provider2).stake(STAKE);
      await expectHeldCovered(token, staking);
      await staking.connect(referee).resolve(EVIDENCE, true); // provider's STAKE
      await staking.connect(slasher).slash(provider2.address, 777n, verifier.address, EVIDENCE2);
      await staking.connect(slasher).slash(verifier.address, 55n, provider2.address, EVIDENCE3);
      expect(await staking.totalPendingSlashes()).to.equal(STAKE + 777n + 55n);
      expect(await staking.totalStaked()).to.equal(STAKE * 2n - 777n - 55n);
      await expectHeldCovered(token, staking);
      await staking.connect(guardian).voidSlash(EVIDENCE2);
      expect(await staking.totalPendingSlashes()).to.equal(STAKE + 55n);
      expect(await staking.stakeOf(provider2.address)).to.equal(STAKE);
      await expectHeldCovered(token, staking);
      await time.increase(SLASH_DELAY);
      await staking.finalizeSlash(EVIDENCE3);
      await expectHeldCovered(token, staking);
      await staking.finalizeSlash(EVIDENCE);
      expect(await staking.totalPendingSlashes()).to.equal(0n);
      expect(await token.balanceOf(staking)).to.equal(await staking.totalStaked());
      expect(await staking.stakeOf(provider.address)).to.equal(0n);
    });

    describe("setSlashDelay", function () {
      it("applies to later slashes, pending ones keep their deadline; emits SlashDelaySet", async function () {
        const { token, staking, governor, slasher, verifier, treasury, other, readyAt } =
          await networkHelpers.loadFixture(pendingFixture);
        await expect(staking.connect(governor).setSlashDelay(60)).to.emit(staking, "SlashDelaySet").withArgs(60);
        expect(await staking.slashDelay()).to.equal(60n);
        expect((await slashOf(staking, EVIDENCE)).readyAt).to.equal(readyAt);
        await staking.connect(slasher).slash(verifier.address, 10n, treasury.address, EVIDENCE2);
        const readyAt2 = BigInt(await time.latest()) + 60n;
        expect((await slashOf(staking, EVIDENCE2)).readyAt).to.equal(readyAt2);
        // Without a delay the next slash is paid at once; the pending ones still wait.
        await expect(staking.connect(governor).setSlashDelay(0)).to.emit(staking, "SlashDelaySet").withArgs(0);
        const now = staking.connect(slasher).slash(verifier.address, 20n, other.address, EVIDENCE3);
        await expect(now).to.not.emit(staking, "SlashPending");
        await expect(now).to.changeTokenBalances(ethers, token, [staking, other, treasury], [-20n, 5n, 15n]);
        expect(await slashOf(staking, EVIDENCE3)).to.deep.equal(NO_SLASH);
        expect((await slashOf(staking, EVIDENCE)).readyAt).to.equal(readyAt);
        await expect(staking.connect(other).finalizeSlash(EVIDENCE))
          .to.be.revertedWithCustomError(staking, "StakingSlashNotReady")
          .withArgs(EVIDENCE, readyAt);
        await time.increaseTo(readyAt2);
        await expect(staking.connect(other).finalizeSlash(EVIDENCE2)).to.emit(staking, "SlashFinalized");
        expect(await staking.totalPendingSlashes()).to.equal(STAKE);
        await expectHeldCovered(token, staking);
      });

      it("reverts with AccessControlUnauthorizedAccount without GOVERNOR_ROLE", async function () {
        const { staking, admin, guardian, slasher } = await networkHelpers.loadFixture(delayedFixture);
        for (const who of [admin, guardian, slasher]) {
          await expect(staking.connect(who).setSlashDelay(0))
            .to.be.revertedWithCustomError(staking, "AccessControlUnauthorizedAccount")
            .withArgs(who.address, await staking.GOVERNOR_ROLE());
        }
        expect(await staking.slashDelay()).to.equal(SLASH_DELAY);
      });
    });
  });

  describe("setMinStake / minStake / meetsMinStake", function () {
    it("sets a per-GPU-class minimum, emits MinStakeSet, and meetsMinStake compares bonded stake", async function () {
      const { staking, governor, provider } = await networkHelpers.loadFixture(stakedFixture);
      await expect(staking.connect(governor).setMinStake(GPU, STAKE))
        .to.emit(staking, "MinStakeSet")
        .withArgs(GPU, STAKE);
      expect(await staking.minStake(GPU)).to.equal(STAKE);
      expect(await staking.meetsMinStake(provider.address, GPU)).to.equal(true);
      await staking.connect(provider).requestUnbond(1n); // unbonding stake no longer backs work
      expect(await staking.meetsMinStake(provider.address, GPU)).to.equal(false);
    });

    it("meetsMinStake is false while a dispute against the provider is open", async function () {
      const { staking, referee, provider } = await networkHelpers.loadFixture(accusedFixture);
      expect(await staking.meetsMinStake(provider.address, GPU)).to.equal(false); // min 0, but accused
      await staking.connect(referee).resolve(EVIDENCE, false);
      expect(await staking.meetsMinStake(provider.address, GPU)).to.equal(true);
    });

    it("reverts with AccessControlUnauthorizedAccount without GOVERNOR_ROLE", async function () {
      const { staking, admin } = await networkHelpers.loadFixture(stakedFixture);
      await expect(staking.connect(admin).setMinStake(GPU, 1n))
        .to.be.revertedWithCustomError(staking, "AccessControlUnauthorizedAccount")
        .withArgs(admin.address, await staking.GOVERNOR_ROLE());
    });
  });

  describe("setBountyBps", function () {
    it("changes the split of the next slash and emits BountyBpsSet", async function () {
      const { token, staking, governor, slasher, provider, verifier } = await networkHelpers.loadFixture(stakedFixture);
      await expect(staking.connect(governor).setBountyBps(10_000)).to.emit(staking, "BountyBpsSet").withArgs(10_000);
      expect(await staking.bountyBps()).to.equal(10_000n);
      await expect(
        staking.connect(slasher).slash(provider.address, 77n, verifier.address, EVIDENCE),
      ).to.changeTokenBalances(ethers, token, [verifier], [77n]);
    });

    it("reverts with StakingInvalidBps(bps) above 10000", async function () {
      const { staking, governor } = await networkHelpers.loadFixture(stakedFixture);
      await expect(staking.connect(governor).setBountyBps(10_001))
        .to.be.revertedWithCustomError(staking, "StakingInvalidBps")
        .withArgs(10_001);
    });

    it("reverts with AccessControlUnauthorizedAccount without GOVERNOR_ROLE", async function () {
      const { staking, admin } = await networkHelpers.loadFixture(stakedFixture);
      await expect(staking.connect(admin).setBountyBps(1))
        .to.be.revertedWithCustomError(staking, "AccessControlUnauthorizedAccount")
        .withArgs(admin.address, await staking.GOVERNOR_ROLE());
    });
  });

  describe("setUnbondingDelay", function () {
    it("applies to the next request, not to a pending one, and emits UnbondingDelaySet", async function () {
      const { staking, governor, provider, readyAt } = await networkHelpers.loadFixture(unbondingFixture);
      await expect(staking.connect(governor).setUnbondingDelay(60)).to.emit(staking, "UnbondingDelaySet").withArgs(60);
      expect(await staking.unbondingDelay()).to.equal(60n);
      expect((await accountOf(staking, provider.address)).unbondingReadyAt).to.equal(readyAt);
      await staking.connect(provider).requestUnbond(1n);
      expect((await accountOf(staking, provider.address)).unbondingReadyAt).to.equal(BigInt(await time.latest()) + 60n);
    });

    it("reverts with AccessControlUnauthorizedAccount without GOVERNOR_ROLE", async function () {
      const { staking, admin } = await networkHelpers.loadFixture(stakedFixture);
      await expect(staking.connect(admin).setUnbondingDelay(0))
        .to.be.revertedWithCustomError(staking, "AccessControlUnauthorizedAccount")
        .withArgs(admin.address, await staking.GOVERNOR_ROLE());
    });
  });

  describe("setVerifierBond", function () {
    it("applies to the next accusation and emits VerifierBondSet", async function () {
      const { staking, governor, provider, verifier, referee } = await networkHelpers.loadFixture(stakedFixture);
      await expect(staking.connect(governor).setVerifierBond(7n)).to.emit(staking, "VerifierBondSet").withArgs(7n);
      expect(await staking.verifierBond()).to.equal(7n);
      const sig = await signAccusation(verifier, staking, provider.address, EVIDENCE, 1n);
      await expect(staking.connect(referee).accuse(provider.address, EVIDENCE, 1n, sig))
        .to.emit(staking, "Accused")
        .withArgs(provider.address, verifier.address, EVIDENCE, 1n, 7n);
    });

    it("reverts with AccessControlUnauthorizedAccount without GOVERNOR_ROLE", async function () {
      const { staking, admin } = await networkHelpers.loadFixture(stakedFixture);
      await expect(staking.connect(admin).setVerifierBond(1n))
        .to.be.revertedWithCustomError(staking, "AccessControlUnauthorizedAccount")
        .withArgs(admin.address, await staking.GOVERNOR_ROLE());
    });
  });

  describe("views", function () {
    it("domainSeparator is the EIP-712 domain {GridStaking, 1, chainId, staking}", async function () {
      const { staking } = await networkHelpers.loadFixture(deployStakingFixture);
      expect(await staking.domainSeparator()).to.equal(
        ethers.TypedDataEncoder.hashDomain(await stakingDomain(staking)),
      );
      expect(await staking.ACCUSATION_TYPEHASH()).to.equal(
        ethers.id("Accusation(address provider,bytes32 evidence,uint256 amount)"),
      );
    });

    it("freeStakeOf floors at 0 when a slash left less stake than is locked", async function () {
      const { staking, locker, slasher, provider, verifier } = await networkHelpers.loadFixture(stakedFixture);
      await staking.connect(locker).lock(provider.address, STAKE);
      await staking.connect(slasher).slash(provider.address, 1n, verifier.address, EVIDENCE);
      expect(await staking.freeStakeOf(provider.address)).to.equal(0n);
      await expect(staking.connect(provider).requestUnbond(1n))
        .to.be.revertedWithCustomError(staking, "StakingInsufficientStake")
        .withArgs(provider.address, 0n, 1n);
    });

    it("totalStaked always equals the contract's token balance", async function () {
      const { token, staking, referee, slasher, provider, verifier } = await networkHelpers.loadFixture(accusedFixture);
      await staking.connect(referee).resolve(EVIDENCE, true);
      await staking.connect(slasher).slash(verifier.address, 5n, provider.address, EVIDENCE2);
      expect(await staking.totalStaked()).to.equal(await token.balanceOf(staking));
    });
  });
});
