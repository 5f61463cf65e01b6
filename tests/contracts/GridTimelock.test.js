import { expect } from "chai";
import { network } from "hardhat";

import { deployGridMint, ROLES } from "./helpers.js";

const { ethers, networkHelpers } = await network.create();
const { time } = networkHelpers;

const SUPPLY = ethers.parseEther("1000000");
const MIN_DELAY = 2n * 24n * 3600n; // the timelock's minimum delay, seconds
const NO_PREDECESSOR = ethers.ZeroHash;
const PROPOSER_ROLE = ethers.id("PROPOSER_ROLE");
const EXECUTOR_ROLE = ethers.id("EXECUTOR_ROLE");
const CANCELLER_ROLE = ethers.id("CANCELLER_ROLE");
// TimelockController's expected-state bitmap for "Ready" (OperationState.Ready == 2).
const READY = ethers.toBeHex(1n << 2n, 32);

/** A batch of calls ({ target, fn, args }) as the timelock's (targets, values, payloads). */
async function batchOf(calls) {
  return [
    await Promise.all(calls.map((c) => c.target.getAddress())),
    calls.map(() => 0n),
    calls.map((c) => c.target.interface.encodeFunctionData(c.fn, c.args ?? [])),
  ];
}

describe("GridTimelock", function () {
  // Wired like ledger/deploy.py with a nonzero minDelay; the kill switch has paused everything.
  async function governedFixture() {
    const [deployer, treasury, other] = await ethers.getSigners();
    const c = await deployGridMint(ethers, deployer, treasury.address, { supply: SUPPLY, timelockDelay: MIN_DELAY });
    await c.killSwitch.connect(deployer).pauseAll();
    return { ...c, deployer, treasury, other };
  }

  // The three unpause calls scheduled as one batch (salt "unpause-all").
  async function unpauseScheduledFixture() {
    const f = await governedFixture();
    const [targets, values, payloads] = await batchOf(
      [f.staking, f.escrow, f.distributor].map((target) => ({ target, fn: "unpause" })),
    );
    const salt = ethers.id("unpause-all");
    await f.timelock.connect(f.deployer).scheduleBatch(targets, values, payloads, NO_PREDECESSOR, salt, MIN_DELAY);
    const id = await f.timelock.hashOperationBatch(targets, values, payloads, NO_PREDECESSOR, salt);
    return { ...f, batch: [targets, values, payloads], salt, id };
  }

  describe("constructor (as ledger/deploy.py wires it)", function () {
    it("holds GOVERNOR_ROLE on every contract, with the deployer as proposer, executor and canceller", async function () {
      const { timelock, staking, escrow, distributor, killSwitch, deployer } = await networkHelpers.loadFixture(
        governedFixture,
      );
      expect(await timelock.getMinDelay()).to.equal(MIN_DELAY);
      for (const role of [PROPOSER_ROLE, EXECUTOR_ROLE, CANCELLER_ROLE]) {
        expect(await timelock.hasRole(role, deployer.address)).to.equal(true);
      }
      for (const target of [staking, escrow, distributor]) {
        expect(await target.hasRole(ROLES.GOVERNOR_ROLE, timelock)).to.equal(true);
        expect(await target.hasRole(ROLES.GOVERNOR_ROLE, deployer.address)).to.equal(false);
        expect(await target.hasRole(ROLES.GUARDIAN_ROLE, killSwitch)).to.equal(true);
      }
    });
  });

  describe("scheduleBatch / executeBatch: unpause", function () {
    it("schedules the unpause in public view (CallScheduled per call)", async function () {
      const { timelock, deployer, staking, escrow, distributor } = await networkHelpers.loadFixture(governedFixture);
      const [targets, values, payloads] = await batchOf(
        [staking, escrow, distributor].map((target) => ({ target, fn: "unpause" })),
      );
      const salt = ethers.id("unpause-all");
      const id = await timelock.hashOperationBatch(targets, values, payloads, NO_PREDECESSOR, salt);
      const tx = timelock.connect(deployer).scheduleBatch(targets, values, payloads, NO_PREDECESSOR, salt, MIN_DELAY);
      for (let i = 0; i < 3; i++) {
        await expect(tx)
          .to.emit(timelock, "CallScheduled")
          .withArgs(id, BigInt(i), targets[i], 0n, payloads[i], NO_PREDECESSOR, MIN_DELAY);
      }
      expect(await timelock.isOperationPending(id)).to.equal(true);
      expect(await timelock.getTimestamp(id)).to.equal(BigInt(await time.latest()) + MIN_DELAY);
    });

    it("reverts with TimelockUnexpectedOperationState(id, Ready) when executed early", async function () {
      const { timelock, deployer, batch, salt, id, staking } = await networkHelpers.loadFixture(
        unpauseScheduledFixture,
      );
      await time.increase(MIN_DELAY - 100n);
      await expect(timelock.connect(deployer).executeBatch(...batch, NO_PREDECESSOR, salt))
        .to.be.revertedWithCustomError(timelock, "TimelockUnexpectedOperationState")
        .withArgs(id, READY);
      expect(await staking.paused()).to.equal(true);
    });

    it("unpauses every contract once minDelay has passed (Unpaused by the timelock, CallExecuted)", async function () {
      const { token, timelock, killSwitch, deployer, batch, salt, id, staking, escrow, distributor } =
        await networkHelpers.loadFixture(unpauseScheduledFixture);
      await time.increase(MIN_DELAY);
      const tx = timelock.connect(deployer).executeBatch(...batch, NO_PREDECESSOR, salt);
      for (const [i, target] of [staking, escrow, distributor].entries()) {
        await expect(tx)
          .to.emit(target, "Unpaused")
          .withArgs(await timelock.getAddress());
        await expect(tx).to.emit(timelock, "CallExecuted").withArgs(id, BigInt(i), batch[0][i], 0n, batch[2][i]);
        expect(await target.paused()).to.equal(false);
      }
      expect(await killSwitch.allPaused()).to.equal(false);
      expect(await timelock.isOperationDone(id)).to.equal(true);
      await token.connect(deployer).approve(staking, 1n);
      await expect(staking.connect(deployer).stake(1n)).to.emit(staking, "Staked").withArgs(deployer.address, 1n, 1n);
      // Done operations cannot be replayed.
      await expect(timelock.connect(deployer).executeBatch(...batch, NO_PREDECESSOR, salt))
        .to.be.revertedWithCustomError(timelock, "TimelockUnexpectedOperationState")
        .withArgs(id, READY);
    });

    it("reverts with TimelockInsufficientDelay(delay, minDelay) below minDelay", async function () {
      const { timelock, deployer, staking } = await networkHelpers.loadFixture(governedFixture);
      const data = staking.interface.encodeFunctionData("unpause");
      await expect(
        timelock.connect(deployer).schedule(staking, 0n, data, NO_PREDECESSOR, ethers.ZeroHash, MIN_DELAY - 1n),
      )
        .to.be.revertedWithCustomError(timelock, "TimelockInsufficientDelay")
        .withArgs(MIN_DELAY - 1n, MIN_DELAY);
    });

    it("cancel drops a scheduled unpause: it can no longer execute", async function () {
      const { timelock, deployer, batch, salt, id } = await networkHelpers.loadFixture(unpauseScheduledFixture);
      await expect(timelock.connect(deployer).cancel(id)).to.emit(timelock, "Cancelled").withArgs(id);
      await time.increase(MIN_DELAY);
      await expect(timelock.connect(deployer).executeBatch(...batch, NO_PREDECESSOR, salt))
        .to.be.revertedWithCustomError(timelock, "TimelockUnexpectedOperationState")
        .withArgs(id, READY);
    });

    it("only a proposer schedules and only an executor executes", async function () {
      const { timelock, other, batch, salt } = await networkHelpers.loadFixture(unpauseScheduledFixture);
      await expect(timelock.connect(other).scheduleBatch(...batch, NO_PREDECESSOR, ethers.id("x"), MIN_DELAY))
        .to.be.revertedWithCustomError(timelock, "AccessControlUnauthorizedAccount")
        .withArgs(other.address, PROPOSER_ROLE);
      await time.increase(MIN_DELAY);
      await expect(timelock.connect(other).executeBatch(...batch, NO_PREDECESSOR, salt))
        .to.be.revertedWithCustomError(timelock, "AccessControlUnauthorizedAccount")
        .withArgs(other.address, EXECUTOR_ROLE);
    });
  });

  describe("schedule / execute: parameter changes", function () {
    it("changes staking, escrow and distributor parameters only after minDelay", async function () {
      const { timelock, deployer, staking, escrow, distributor } = await networkHelpers.loadFixture(governedFixture);
      const gpu = ethers.encodeBytes32String("H100");
      const calls = [
        { target: staking, fn: "setBountyBps", args: [1234] },
        { target: staking, fn: "setUnbondingDelay", args: [86_400] },
        { target: staking, fn: "setVerifierBond", args: [77n] },
        { target: staking, fn: "setMinStake", args: [gpu, 500n] },
        { target: escrow, fn: "setCancelGrace", args: [600] },
        { target: distributor, fn: "setDisputeWindow", args: [7200] },
      ];
      const batch = await batchOf(calls);
      const salt = ethers.id("params-1");
      const id = await timelock.hashOperationBatch(...batch, NO_PREDECESSOR, salt);
      await timelock.connect(deployer).scheduleBatch(...batch, NO_PREDECESSOR, salt, MIN_DELAY);
      await expect(timelock.connect(deployer).executeBatch(...batch, NO_PREDECESSOR, salt))
        .to.be.revertedWithCustomError(timelock, "TimelockUnexpectedOperationState")
        .withArgs(id, READY);
      expect(await staking.bountyBps()).to.equal(5000n);

      await time.increase(MIN_DELAY);
      const tx = timelock.connect(deployer).executeBatch(...batch, NO_PREDECESSOR, salt);
      await expect(tx).to.emit(staking, "BountyBpsSet").withArgs(1234);
      await expect(tx).to.emit(staking, "UnbondingDelaySet").withArgs(86_400);
      await expect(tx).to.emit(staking, "VerifierBondSet").withArgs(77n);
      await expect(tx).to.emit(staking, "MinStakeSet").withArgs(gpu, 500n);
      await expect(tx).to.emit(escrow, "CancelGraceSet").withArgs(600);
      await expect(tx).to.emit(distributor, "DisputeWindowSet").withArgs(7200);
      expect(await staking.bountyBps()).to.equal(1234n);
      expect(await staking.unbondingDelay()).to.equal(86_400n);
      expect(await staking.verifierBond()).to.equal(77n);
      expect(await staking.minStake(gpu)).to.equal(500n);
      expect(await escrow.cancelGrace()).to.equal(600n);
      expect(await distributor.disputeWindow()).to.equal(7200n);
    });

    it("a single schedule/execute of setBountyBps works the same way", async function () {
      const { timelock, deployer, staking } = await networkHelpers.loadFixture(governedFixture);
      const data = staking.interface.encodeFunctionData("setBountyBps", [42]);
      const salt = ethers.id("bps-42");
      const id = await timelock.hashOperation(staking, 0n, data, NO_PREDECESSOR, salt);
      await expect(timelock.connect(deployer).schedule(staking, 0n, data, NO_PREDECESSOR, salt, MIN_DELAY))
        .to.emit(timelock, "CallScheduled")
        .withArgs(id, 0n, await staking.getAddress(), 0n, data, NO_PREDECESSOR, MIN_DELAY);
      await expect(timelock.connect(deployer).execute(staking, 0n, data, NO_PREDECESSOR, salt))
        .to.be.revertedWithCustomError(timelock, "TimelockUnexpectedOperationState")
        .withArgs(id, READY);
      await time.increase(MIN_DELAY);
      await expect(timelock.connect(deployer).execute(staking, 0n, data, NO_PREDECESSOR, salt))
        .to.emit(staking, "BountyBpsSet")
        .withArgs(42);
    });

    it("bubbles the target's custom error when the call itself fails", async function () {
      const { timelock, deployer, staking } = await networkHelpers.loadFixture(governedFixture);
      const data = staking.interface.encodeFunctionData("setBountyBps", [10_001]);
      await timelock.connect(deployer).schedule(staking, 0n, data, NO_PREDECESSOR, ethers.ZeroHash, MIN_DELAY);
      await time.increase(MIN_DELAY);
      await expect(timelock.connect(deployer).execute(staking, 0n, data, NO_PREDECESSOR, ethers.ZeroHash))
        .to.be.revertedWithCustomError(staking, "StakingInvalidBps")
        .withArgs(10_001);
    });

    // (As DEFAULT_ADMIN_ROLE holder it could still grant itself GOVERNOR_ROLE: ledger/deploy.py says to move the admin
    // role to the timelock on a production chain.)
    it("the deployer (operator) cannot call governor functions directly", async function () {
      const { staking, escrow, distributor, deployer } = await networkHelpers.loadFixture(governedFixture);
      const direct = [
        [staking, () => staking.connect(deployer).setBountyBps(1)],
        [staking, () => staking.connect(deployer).unpause()],
        [escrow, () => escrow.connect(deployer).setCancelGrace(1)],
        [escrow, () => escrow.connect(deployer).unpause()],
        [distributor, () => distributor.connect(deployer).setDisputeWindow(1)],
        [distributor, () => distributor.connect(deployer).unpause()],
      ];
      for (const [target, call] of direct) {
        await expect(call())
          .to.be.revertedWithCustomError(target, "AccessControlUnauthorizedAccount")
          .withArgs(deployer.address, ROLES.GOVERNOR_ROLE);
      }
    });
  });
});
