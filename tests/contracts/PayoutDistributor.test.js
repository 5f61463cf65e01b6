import { expect } from "chai";
import { network } from "hardhat";

import { buildPayoutTree, fillerAddress, leafHash, processProof } from "./helpers.js";

const { ethers, networkHelpers } = await network.create();
const { time } = networkHelpers;

const SUPPLY = ethers.parseEther("1000000");
const POOL = ethers.parseEther("10000"); // deposited before the first root
const WINDOW = 24n * 3600n; // dispute window, seconds
const E = (n) => ethers.parseEther(String(n));

// Gas pinned as product figures (Hardhat 3.17 in-process EDR, solc 0.8.37, optimizer 200 runs, cancun target).
// Each bound is the figure measured when this test was written plus under 1% headroom; a rise above it is a
// regression to look at, a fall is welcome (then lower the bound). Inputs are deterministic, so the figures are too.
// - A provider's first claim in a 1,024-leaf tree (10-hash proof; the provider held no GMT before, so the claim
//   creates both its claimed-so-far slot and its token balance): measured 92,657 gas, the most of 8 claimants
//   (92,749 before the epoch bookkeeping stored claimableAt instead of postedAt + window).
const CLAIM_1024_GAS_BOUND = 93_300n;
// - The first postRoot (a new root slot plus the packed epoch bookkeeping, now storing claimableAt): measured
//   56,872 gas (56,883 before).
const POST_ROOT_GAS_BOUND = 57_400n;
// - claimMany paying 200 leaves of the 1,024-leaf tree in one transaction, every one a first claim by a new holder
//   (both storage slots created for each): measured 11,904,236 gas, 59,521 per account against 92,657 for a lone
//   first claim. Steady-state pushes (slots already non-zero) cost far less: see `gridmint bench settlement`.
const CLAIM_MANY_200_GAS_BOUND = 11_990_000n;

// A vector computed by ledger/payout_tree.py (build_payout_tree over these five entries), so the JS mirror, the
// Python builder and the contract are checked against one another. Five leaves: the odd last node moves up.
const PY_VECTOR = {
  entries: [0, 1, 2, 3, 4].map((i) => [fillerAddress(`payout-vector-${i}`), BigInt(i + 1) * 10n ** 18n + BigInt(i)]),
  root: "0x9a35d867541bb013f1a023e640fc755e466669de6f8c2c3acd9ea80f1480c034",
  total: 15000000000000000010n,
  // the proof of entry 2 (0xF7ADB20b46274a601B3e75439CFE1330CCA97130)
  proof2: [
    "0x8489f7c0deadccd9e5beac1a69d532fe16446e0a9da535771d2e3715020ae519",
    "0xd15d72a875216f61e88c5458fc5adeca8bfa4da18df7650c740a212941db9193",
    "0xaedfb653cb989bf841895dd672a228a415932ba7218c21decdc1088de54e830f",
  ],
};

describe("PayoutDistributor", function () {
  // The governor is an EOA here (the timelock in production, see GridTimelock.test.js).
  async function deployDistributorFixture() {
    const [admin, governor, guardian, poster, funder, alice, bob, carol, other] = await ethers.getSigners();
    const token = await ethers.deployContract("GridToken", [admin.address, SUPPLY]);
    const distributor = await ethers.deployContract("PayoutDistributor", [
      token,
      admin.address,
      governor.address,
      WINDOW,
    ]);
    await distributor.grantRole(await distributor.POSTER_ROLE(), poster.address);
    await distributor.grantRole(await distributor.GUARDIAN_ROLE(), guardian.address);
    await token.transfer(funder.address, SUPPLY / 2n);
    await token.connect(funder).approve(distributor, ethers.MaxUint256);
    return { token, distributor, admin, governor, guardian, poster, funder, alice, bob, carol, other };
  }

  // POOL deposited; epoch 1's root posted over alice 100, bob 200, carol 300 and still in its dispute window.
  async function postedFixture() {
    const f = await deployDistributorFixture();
    await f.distributor.connect(f.funder).deposit(POOL);
    const tree1 = buildPayoutTree([
      [f.alice.address, E(100)],
      [f.bob.address, E(200)],
      [f.carol.address, E(300)],
    ]);
    await f.distributor.connect(f.poster).postRoot(1, tree1.root, tree1.total);
    return { ...f, tree1, claimableAt: BigInt(await time.latest()) + WINDOW };
  }

  // ... and its dispute window is over.
  async function claimableFixture() {
    const f = await postedFixture();
    await time.increaseTo(f.claimableAt);
    return f;
  }

  // ... alice claimed epoch 1; epoch 2's root (alice 250, bob 200, carol 300, other 50) posted and past its window.
  async function secondEpochFixture() {
    const f = await claimableFixture();
    await f.distributor.connect(f.alice).claim(1, E(100), f.tree1.proof(f.alice.address));
    const tree2 = buildPayoutTree([
      [f.alice.address, E(250)],
      [f.bob.address, E(200)],
      [f.carol.address, E(300)],
      [f.other.address, E(50)],
    ]);
    await f.distributor.connect(f.poster).postRoot(2, tree2.root, tree2.total);
    const claimableAt2 = BigInt(await time.latest()) + WINDOW;
    await time.increaseTo(claimableAt2);
    return { ...f, tree2, claimableAt2 };
  }

  // A 1,024-leaf root (epoch 1) past its window. The first 8 leaves belong to test signers (so they can claim
  // themselves); the rest are fixed filler addresses. Amounts are distinct and deterministic.
  async function bigTreeFixture() {
    const f = await deployDistributorFixture();
    const signers = (await ethers.getSigners()).slice(10, 18); // hold no GMT: a claim is their first credit
    const accounts = [...signers.map((s) => s.address)];
    for (let i = accounts.length; i < 1024; i++) accounts.push(fillerAddress(`payout-filler-${i}`));
    const tree = buildPayoutTree(accounts.map((a, i) => [a, E(1) + BigInt(i) * 1_000_003n]));
    await f.distributor.connect(f.funder).deposit(tree.total);
    const postTx = await f.distributor.connect(f.poster).postRoot(1, tree.root, tree.total);
    await time.increase(WINDOW);
    return { ...f, signers, accounts, tree, postTx };
  }

  describe("constructor", function () {
    it("stores token and dispute window, grants admin and governor roles, starts at epoch 0", async function () {
      const { token, distributor, admin, governor } = await networkHelpers.loadFixture(deployDistributorFixture);
      expect(await distributor.token()).to.equal(await token.getAddress());
      expect(await distributor.disputeWindow()).to.equal(WINDOW);
      expect(await distributor.latestEpoch()).to.equal(0n);
      expect(await distributor.latestClaimableAt()).to.equal(0n);
      expect(await distributor.totalDeposited()).to.equal(0n);
      expect(await distributor.hasRole(await distributor.DEFAULT_ADMIN_ROLE(), admin.address)).to.equal(true);
      expect(await distributor.hasRole(await distributor.GOVERNOR_ROLE(), governor.address)).to.equal(true);
      expect(await distributor.hasRole(await distributor.GOVERNOR_ROLE(), admin.address)).to.equal(false);
    });

    it("reverts with SettlementZeroAddress for a zero token, admin or governor", async function () {
      const { token, admin, governor } = await networkHelpers.loadFixture(deployDistributorFixture);
      const factory = await ethers.getContractFactory("PayoutDistributor");
      const good = [await token.getAddress(), admin.address, governor.address];
      for (let i = 0; i < good.length; i++) {
        const addrs = good.map((a, j) => (j === i ? ethers.ZeroAddress : a));
        await expect(factory.deploy(...addrs, WINDOW)).to.be.revertedWithCustomError(factory, "SettlementZeroAddress");
      }
    });
  });

  describe("deposit", function () {
    it("pulls tokens in and emits Deposited with the running total", async function () {
      const { token, distributor, funder } = await networkHelpers.loadFixture(deployDistributorFixture);
      const tx = distributor.connect(funder).deposit(E(3));
      await expect(tx).to.emit(distributor, "Deposited").withArgs(funder.address, E(3), E(3));
      await expect(tx).to.changeTokenBalances(ethers, token, [funder, distributor], [-E(3), E(3)]);
      await expect(distributor.connect(funder).deposit(E(4)))
        .to.emit(distributor, "Deposited")
        .withArgs(funder.address, E(4), E(7));
      expect(await distributor.totalDeposited()).to.equal(E(7));
    });

    it("reverts with SettlementZeroAmount for 0", async function () {
      const { distributor, funder } = await networkHelpers.loadFixture(deployDistributorFixture);
      await expect(distributor.connect(funder).deposit(0n)).to.be.revertedWithCustomError(
        distributor,
        "SettlementZeroAmount",
      );
    });

    it("reverts with ERC20InsufficientAllowance without approval", async function () {
      const { token, distributor, admin } = await networkHelpers.loadFixture(deployDistributorFixture);
      await expect(distributor.connect(admin).deposit(1n))
        .to.be.revertedWithCustomError(token, "ERC20InsufficientAllowance")
        .withArgs(await distributor.getAddress(), 0n, 1n);
    });
  });

  describe("postRoot", function () {
    it("stores the root and emits RootPosted(epoch, root, total, postedAt + window)", async function () {
      const { distributor, poster, funder } = await networkHelpers.loadFixture(deployDistributorFixture);
      await distributor.connect(funder).deposit(E(10));
      const root = ethers.id("root-1");
      const tx = await distributor.connect(poster).postRoot(1, root, E(10));
      const claimableAt = BigInt(await time.latest()) + WINDOW;
      await expect(tx).to.emit(distributor, "RootPosted").withArgs(1n, root, E(10), claimableAt);
      expect(await distributor.rootOf(1)).to.equal(root);
      expect(await distributor.latestEpoch()).to.equal(1n);
      expect(await distributor.latestClaimableAt()).to.equal(claimableAt);
    });

    it("posts the next epoch once the previous root is out of its window", async function () {
      const { distributor, poster, tree1 } = await networkHelpers.loadFixture(claimableFixture);
      const tx = await distributor.connect(poster).postRoot(2, tree1.root, tree1.total);
      await expect(tx)
        .to.emit(distributor, "RootPosted")
        .withArgs(2n, tree1.root, tree1.total, BigInt(await time.latest()) + WINDOW);
      expect(await distributor.latestEpoch()).to.equal(2n);
    });

    it("reverts with SettlementWrongEpoch(epoch, expected) unless epoch == latest + 1", async function () {
      const { distributor, poster, tree1 } = await networkHelpers.loadFixture(claimableFixture);
      for (const epoch of [0n, 1n, 3n]) {
        await expect(distributor.connect(poster).postRoot(epoch, tree1.root, 1n))
          .to.be.revertedWithCustomError(distributor, "SettlementWrongEpoch")
          .withArgs(epoch, 2n);
      }
    });

    it("reverts with SettlementRootInDispute(latest, claimableAt) while the previous root is in its window", async function () {
      const { distributor, poster, tree1, claimableAt } = await networkHelpers.loadFixture(postedFixture);
      await time.increase(WINDOW - 100n);
      await expect(distributor.connect(poster).postRoot(2, tree1.root, tree1.total))
        .to.be.revertedWithCustomError(distributor, "SettlementRootInDispute")
        .withArgs(1n, claimableAt);
    });

    it("reverts with SettlementZeroRoot for a zero root", async function () {
      const { distributor, poster } = await networkHelpers.loadFixture(claimableFixture);
      await expect(distributor.connect(poster).postRoot(2, ethers.ZeroHash, 0n)).to.be.revertedWithCustomError(
        distributor,
        "SettlementZeroRoot",
      );
    });

    it("reverts with SettlementUnderfunded(epoch, total, deposited) when the root promises more than deposited", async function () {
      const { distributor, poster, funder } = await networkHelpers.loadFixture(claimableFixture);
      await expect(distributor.connect(poster).postRoot(2, ethers.id("r"), POOL + 1n))
        .to.be.revertedWithCustomError(distributor, "SettlementUnderfunded")
        .withArgs(2n, POOL + 1n, POOL);
      await distributor.connect(funder).deposit(1n);
      await expect(distributor.connect(poster).postRoot(2, ethers.id("r"), POOL + 1n)).to.emit(
        distributor,
        "RootPosted",
      );
    });

    it("reverts with AccessControlUnauthorizedAccount without POSTER_ROLE", async function () {
      const { distributor, guardian } = await networkHelpers.loadFixture(deployDistributorFixture);
      await expect(distributor.connect(guardian).postRoot(1, ethers.id("r"), 0n))
        .to.be.revertedWithCustomError(distributor, "AccessControlUnauthorizedAccount")
        .withArgs(guardian.address, await distributor.POSTER_ROLE());
    });

    it("costs less than the pinned gas (first root)", async function () {
      const { postTx } = await networkHelpers.loadFixture(bigTreeFixture);
      const { gasUsed } = await postTx.wait();
      expect(gasUsed).to.be.lessThanOrEqual(POST_ROOT_GAS_BOUND);
    });
  });

  describe("voidRoot", function () {
    it("voids the latest root inside its window and emits RootVoided; the epoch can be re-posted at once", async function () {
      const { distributor, guardian, poster, tree1 } = await networkHelpers.loadFixture(postedFixture);
      await expect(distributor.connect(guardian).voidRoot(1))
        .to.emit(distributor, "RootVoided")
        .withArgs(1n, tree1.root, guardian.address);
      expect(await distributor.rootOf(1)).to.equal(ethers.ZeroHash);
      expect(await distributor.latestEpoch()).to.equal(0n);
      expect(await distributor.latestClaimableAt()).to.equal(0n);
      const corrected = ethers.id("corrected");
      await expect(distributor.connect(poster).postRoot(1, corrected, 1n)).to.emit(distributor, "RootPosted");
      expect(await distributor.rootOf(1)).to.equal(corrected);
    });

    it("leaves the previous root claimable and voidable no more", async function () {
      const { distributor, guardian, poster, alice, tree2, claimableAt2 } = await networkHelpers.loadFixture(
        secondEpochFixture,
      );
      await distributor.connect(poster).postRoot(3, ethers.id("bad"), 1n);
      await distributor.connect(guardian).voidRoot(3);
      expect(await distributor.latestEpoch()).to.equal(2n);
      expect(await distributor.rootOf(2)).to.equal(tree2.root);
      await expect(distributor.connect(alice).claim(2, E(250), tree2.proof(alice.address)))
        .to.emit(distributor, "Claimed")
        .withArgs(alice.address, 2n, E(150), E(250));
      // The previous root was claimable before the void; its claimable time reads 0 now ("long since").
      expect(await distributor.latestClaimableAt()).to.equal(0n);
      await expect(distributor.connect(guardian).voidRoot(2))
        .to.be.revertedWithCustomError(distributor, "SettlementNotVoidable")
        .withArgs(2n, 2n, 0n);
      expect(BigInt(await time.latest())).to.be.greaterThanOrEqual(claimableAt2);
    });

    it("reverts with SettlementNotVoidable(epoch, latest, claimableAt) once the window is over", async function () {
      const { distributor, guardian, claimableAt } = await networkHelpers.loadFixture(claimableFixture);
      await expect(distributor.connect(guardian).voidRoot(1))
        .to.be.revertedWithCustomError(distributor, "SettlementNotVoidable")
        .withArgs(1n, 1n, claimableAt);
    });

    it("reverts with SettlementNotVoidable for an epoch other than the latest, and for epoch 0", async function () {
      const { distributor, guardian, claimableAt } = await networkHelpers.loadFixture(postedFixture);
      for (const epoch of [0n, 2n]) {
        await expect(distributor.connect(guardian).voidRoot(epoch))
          .to.be.revertedWithCustomError(distributor, "SettlementNotVoidable")
          .withArgs(epoch, 1n, claimableAt);
      }
    });

    it("reverts with SettlementNotVoidable(0, 0, 0) before any root", async function () {
      const { distributor, guardian } = await networkHelpers.loadFixture(deployDistributorFixture);
      await expect(distributor.connect(guardian).voidRoot(0))
        .to.be.revertedWithCustomError(distributor, "SettlementNotVoidable")
        .withArgs(0n, 0n, 0n);
    });

    it("stays available while paused (the guardian's veto outlives the kill switch)", async function () {
      const { distributor, guardian } = await networkHelpers.loadFixture(postedFixture);
      await distributor.connect(guardian).pause();
      await expect(distributor.connect(guardian).voidRoot(1)).to.emit(distributor, "RootVoided");
    });

    it("reverts with AccessControlUnauthorizedAccount without GUARDIAN_ROLE", async function () {
      const { distributor, poster } = await networkHelpers.loadFixture(postedFixture);
      await expect(distributor.connect(poster).voidRoot(1))
        .to.be.revertedWithCustomError(distributor, "AccessControlUnauthorizedAccount")
        .withArgs(poster.address, await distributor.GUARDIAN_ROLE());
    });
  });

  describe("claim", function () {
    it("pays the leaf's cumulative amount and emits Claimed(account, epoch, amount, cumulative)", async function () {
      const { token, distributor, alice, tree1 } = await networkHelpers.loadFixture(claimableFixture);
      const proof = tree1.proof(alice.address);
      expect(await distributor.connect(alice).claim.staticCall(1, E(100), proof)).to.equal(E(100));
      const tx = distributor.connect(alice).claim(1, E(100), proof);
      await expect(tx).to.emit(distributor, "Claimed").withArgs(alice.address, 1n, E(100), E(100));
      await expect(tx).to.changeTokenBalances(ethers, token, [alice, distributor], [E(100), -E(100)]);
      expect(await distributor.claimed(alice.address)).to.equal(E(100));
    });

    it("is claimable from exactly postedAt + window", async function () {
      const { distributor, alice, bob, tree1, claimableAt } = await networkHelpers.loadFixture(postedFixture);
      // An explicit gas limit skips estimation, so each call runs in a block at exactly the timestamp set.
      await time.setNextBlockTimestamp(claimableAt - 1n);
      await expect(distributor.connect(alice).claim(1, E(100), tree1.proof(alice.address), { gasLimit: 300_000 }))
        .to.be.revertedWithCustomError(distributor, "SettlementRootInDispute")
        .withArgs(1n, claimableAt);
      await time.setNextBlockTimestamp(claimableAt);
      await expect(distributor.connect(bob).claim(1, E(200), tree1.proof(bob.address), { gasLimit: 300_000 }))
        .to.emit(distributor, "Claimed")
        .withArgs(bob.address, 1n, E(200), E(200));
    });

    it("reverts with SettlementNothingToClaim(account, cumulative, claimed) for a replayed claim", async function () {
      const { distributor, alice, tree1 } = await networkHelpers.loadFixture(claimableFixture);
      const proof = tree1.proof(alice.address);
      await distributor.connect(alice).claim(1, E(100), proof);
      await expect(distributor.connect(alice).claim(1, E(100), proof))
        .to.be.revertedWithCustomError(distributor, "SettlementNothingToClaim")
        .withArgs(alice.address, E(100), E(100));
    });

    it("pays only the difference on a later epoch's cumulative leaf", async function () {
      const { token, distributor, alice, tree2 } = await networkHelpers.loadFixture(secondEpochFixture);
      const tx = distributor.connect(alice).claim(2, E(250), tree2.proof(alice.address));
      await expect(tx).to.emit(distributor, "Claimed").withArgs(alice.address, 2n, E(150), E(250));
      await expect(tx).to.changeTokenBalances(ethers, token, [alice], [E(150)]);
      expect(await distributor.claimed(alice.address)).to.equal(E(250));
    });

    it("settles every earlier epoch with one claim on the newest root", async function () {
      const { token, distributor, bob, other, tree2 } = await networkHelpers.loadFixture(secondEpochFixture);
      await expect(distributor.connect(bob).claim(2, E(200), tree2.proof(bob.address))).to.changeTokenBalances(
        ethers,
        token,
        [bob],
        [E(200)],
      );
      await expect(distributor.connect(other).claim(2, E(50), tree2.proof(other.address)))
        .to.emit(distributor, "Claimed")
        .withArgs(other.address, 2n, E(50), E(50));
    });

    it("pays nothing twice: an older root after a newer claim reverts with SettlementNothingToClaim", async function () {
      const { distributor, alice, tree1, tree2 } = await networkHelpers.loadFixture(secondEpochFixture);
      await distributor.connect(alice).claim(2, E(250), tree2.proof(alice.address));
      await expect(distributor.connect(alice).claim(1, E(100), tree1.proof(alice.address)))
        .to.be.revertedWithCustomError(distributor, "SettlementNothingToClaim")
        .withArgs(alice.address, E(100), E(250));
    });

    it("keeps older roots claimable while the newest is in its window", async function () {
      const { distributor, poster, bob, tree1 } = await networkHelpers.loadFixture(claimableFixture);
      await distributor.connect(poster).postRoot(2, ethers.id("in-dispute"), 1n);
      await expect(distributor.connect(bob).claim(1, E(200), tree1.proof(bob.address)))
        .to.emit(distributor, "Claimed")
        .withArgs(bob.address, 1n, E(200), E(200));
    });

    it("reverts with SettlementRootInDispute(epoch, claimableAt) inside the window", async function () {
      const { distributor, alice, tree1, claimableAt } = await networkHelpers.loadFixture(postedFixture);
      await time.increase(WINDOW - 100n);
      await expect(distributor.connect(alice).claim(1, E(100), tree1.proof(alice.address)))
        .to.be.revertedWithCustomError(distributor, "SettlementRootInDispute")
        .withArgs(1n, claimableAt);
    });

    it("reverts with SettlementInvalidProof(account, epoch, cumulative) for a wrong amount or proof", async function () {
      const { distributor, alice, bob, tree1 } = await networkHelpers.loadFixture(claimableFixture);
      const proof = tree1.proof(alice.address);
      await expect(distributor.connect(alice).claim(1, E(101), proof))
        .to.be.revertedWithCustomError(distributor, "SettlementInvalidProof")
        .withArgs(alice.address, 1n, E(101));
      // bob's leaf and proof, sent by alice: the leaf is rebuilt from msg.sender, so it does not verify.
      await expect(distributor.connect(alice).claim(1, E(200), tree1.proof(bob.address)))
        .to.be.revertedWithCustomError(distributor, "SettlementInvalidProof")
        .withArgs(alice.address, 1n, E(200));
      await expect(distributor.connect(alice).claim(1, E(100), []))
        .to.be.revertedWithCustomError(distributor, "SettlementInvalidProof")
        .withArgs(alice.address, 1n, E(100));
    });

    it("reverts with SettlementUnknownEpoch(epoch, latest) for epoch 0, a future epoch and a voided one", async function () {
      const { distributor, guardian, alice, tree1 } = await networkHelpers.loadFixture(postedFixture);
      const proof = tree1.proof(alice.address);
      for (const epoch of [0n, 2n]) {
        await expect(distributor.connect(alice).claim(epoch, E(100), proof))
          .to.be.revertedWithCustomError(distributor, "SettlementUnknownEpoch")
          .withArgs(epoch, 1n);
      }
      await distributor.connect(guardian).voidRoot(1);
      await expect(distributor.connect(alice).claim(1, E(100), proof))
        .to.be.revertedWithCustomError(distributor, "SettlementUnknownEpoch")
        .withArgs(1n, 0n);
    });

    it("pays every sampled leaf of a 1,024-leaf tree with a 10-hash proof, and costs less than the pinned gas", async function () {
      const { token, distributor, signers, tree } = await networkHelpers.loadFixture(bigTreeFixture);
      expect(tree.depth).to.equal(10);
      let maxGas = 0n;
      for (const s of signers) {
        const cumulative = tree.cumulative(s.address);
        const proof = tree.proof(s.address);
        expect(proof.length).to.equal(10);
        const tx = distributor.connect(s).claim(1, cumulative, proof);
        await expect(tx).to.changeTokenBalances(ethers, token, [s], [cumulative]);
        const { gasUsed } = await (await tx).wait();
        if (gasUsed > maxGas) maxGas = gasUsed;
      }
      expect(maxGas).to.be.lessThanOrEqual(CLAIM_1024_GAS_BOUND);
    });
  });

  describe("claimFor", function () {
    it("pays the account, not the caller, and emits Claimed for the account", async function () {
      const { token, distributor, other, carol, tree1 } = await networkHelpers.loadFixture(claimableFixture);
      const tx = distributor.connect(other).claimFor(carol.address, 1, E(300), tree1.proof(carol.address));
      await expect(tx).to.emit(distributor, "Claimed").withArgs(carol.address, 1n, E(300), E(300));
      await expect(tx).to.changeTokenBalances(ethers, token, [carol, other, distributor], [E(300), 0n, -E(300)]);
      expect(await distributor.claimed(carol.address)).to.equal(E(300));
      expect(await distributor.claimed(other.address)).to.equal(0n);
    });

    it("shares the claimed-so-far with claim: neither pays twice", async function () {
      const { distributor, other, carol, tree1 } = await networkHelpers.loadFixture(claimableFixture);
      const proof = tree1.proof(carol.address);
      await distributor.connect(other).claimFor(carol.address, 1, E(300), proof);
      await expect(distributor.connect(carol).claim(1, E(300), proof))
        .to.be.revertedWithCustomError(distributor, "SettlementNothingToClaim")
        .withArgs(carol.address, E(300), E(300));
      await expect(distributor.connect(other).claimFor(carol.address, 1, E(300), proof))
        .to.be.revertedWithCustomError(distributor, "SettlementNothingToClaim")
        .withArgs(carol.address, E(300), E(300));
    });

    it("pays accounts that hold no key here (filler leaves of the 1,024-leaf tree)", async function () {
      const { token, distributor, other, accounts, tree } = await networkHelpers.loadFixture(bigTreeFixture);
      for (const a of [accounts[8], accounts[511], accounts[1023]]) {
        await expect(distributor.connect(other).claimFor(a, 1, tree.cumulative(a), tree.proof(a)))
          .to.emit(distributor, "Claimed")
          .withArgs(a, 1n, tree.cumulative(a), tree.cumulative(a));
        expect(await token.balanceOf(a)).to.equal(tree.cumulative(a));
      }
    });

    it("reverts with SettlementInvalidProof(account, epoch, cumulative) and SettlementRootInDispute", async function () {
      const { distributor, other, carol, tree1, claimableAt } = await networkHelpers.loadFixture(postedFixture);
      await expect(distributor.connect(other).claimFor(carol.address, 1, E(300), tree1.proof(carol.address)))
        .to.be.revertedWithCustomError(distributor, "SettlementRootInDispute")
        .withArgs(1n, claimableAt);
      await time.increaseTo(claimableAt);
      await expect(distributor.connect(other).claimFor(other.address, 1, E(300), tree1.proof(carol.address)))
        .to.be.revertedWithCustomError(distributor, "SettlementInvalidProof")
        .withArgs(other.address, 1n, E(300));
    });
  });

  describe("claimMany", function () {
    /** (accounts, cumulatives, proofs) for `signers` from `tree`. */
    function batch(tree, signers) {
      const accounts = signers.map((x) => (typeof x === "string" ? x : x.address));
      return [accounts, accounts.map((a) => tree.cumulative(a)), accounts.map((a) => tree.proof(a))];
    }

    /** The (account, amount, cumulative) of every Claimed event in a mined transaction. */
    async function claimedEvents(distributor, tx) {
      const receipt = await (await tx).wait();
      return receipt.logs
        .map((log) => distributor.interface.parseLog(log))
        .filter((e) => e !== null && e.name === "Claimed")
        .map((e) => [e.args.account, e.args.amount, e.args.cumulative]);
    }

    it("pays each account to itself, emits Claimed for each and returns the total; anyone may call", async function () {
      const { token, distributor, other, alice, bob, carol, tree1 } = await networkHelpers.loadFixture(
        claimableFixture,
      );
      const args = batch(tree1, [alice, bob, carol]);
      expect(await distributor.connect(other).claimMany.staticCall(1, ...args)).to.equal(E(600));
      const tx = distributor.connect(other).claimMany(1, ...args);
      await expect(tx).to.emit(distributor, "Claimed").withArgs(alice.address, 1n, E(100), E(100));
      await expect(tx).to.emit(distributor, "Claimed").withArgs(bob.address, 1n, E(200), E(200));
      await expect(tx).to.emit(distributor, "Claimed").withArgs(carol.address, 1n, E(300), E(300));
      await expect(tx).to.changeTokenBalances(
        ethers,
        token,
        [alice, bob, carol, other, distributor],
        [E(100), E(200), E(300), 0n, -E(600)],
      );
      for (const [who, v] of [
        [alice, 100],
        [bob, 200],
        [carol, 300],
        [other, 0],
      ]) {
        expect(await distributor.claimed(who.address)).to.equal(E(v));
      }
    });

    it("pays only what is new and skips accounts with nothing new (claimed meanwhile, listed twice)", async function () {
      const { token, distributor, other, alice, bob, carol, tree2 } = await networkHelpers.loadFixture(
        secondEpochFixture,
      );
      // alice claimed 100 at epoch 1 (the fixture); bob claims epoch 2 himself just before the batch lands.
      await distributor.connect(bob).claim(2, E(200), tree2.proof(bob.address));
      const args = batch(tree2, [alice, bob, carol, carol, other]);
      expect(await distributor.connect(other).claimMany.staticCall(2, ...args)).to.equal(E(500));
      const tx = distributor.connect(other).claimMany(2, ...args);
      await expect(tx).to.changeTokenBalances(
        ethers,
        token,
        [alice, bob, carol, other, distributor],
        [E(150), 0n, E(300), E(50), -E(500)],
      );
      expect(await claimedEvents(distributor, tx)).to.deep.equal([
        [alice.address, E(150), E(250)],
        [carol.address, E(300), E(300)],
        [other.address, E(50), E(50)],
      ]);
    });

    it("skips an entry with nothing new without checking its proof (it could pay nothing)", async function () {
      const { distributor, other, alice, bob, tree2 } = await networkHelpers.loadFixture(secondEpochFixture);
      // alice's old epoch-1 cumulative with a junk proof, and a 0 for an account with no leaf: both skipped.
      const accounts = [alice.address, other.address, bob.address];
      const proofs = [[ethers.ZeroHash], [], tree2.proof(bob.address)];
      const tx = distributor.connect(other).claimMany(2, accounts, [E(100), 0n, E(200)], proofs);
      expect(await claimedEvents(distributor, tx)).to.deep.equal([[bob.address, E(200), E(200)]]);
      expect(await distributor.claimed(alice.address)).to.equal(E(100));
    });

    it("returns 0 and emits nothing when every entry is already paid (a retried batch)", async function () {
      const { token, distributor, other, alice, bob, tree1 } = await networkHelpers.loadFixture(claimableFixture);
      const args = batch(tree1, [alice, bob]);
      await distributor.connect(other).claimMany(1, ...args);
      expect(await distributor.connect(other).claimMany.staticCall(1, ...args)).to.equal(0n);
      const tx = distributor.connect(other).claimMany(1, ...args);
      await expect(tx).to.not.emit(distributor, "Claimed");
      await expect(tx).to.changeTokenBalances(ethers, token, [alice, bob, distributor], [0n, 0n, 0n]);
    });

    it("shares the claimed-so-far with claim and claimFor: nobody is paid twice", async function () {
      const { distributor, other, carol, tree1 } = await networkHelpers.loadFixture(claimableFixture);
      const proof = tree1.proof(carol.address);
      await distributor.connect(other).claimMany(1, [carol.address], [E(300)], [proof]);
      await expect(distributor.connect(carol).claim(1, E(300), proof))
        .to.be.revertedWithCustomError(distributor, "SettlementNothingToClaim")
        .withArgs(carol.address, E(300), E(300));
      await expect(distributor.connect(other).claimFor(carol.address, 1, E(300), proof))
        .to.be.revertedWithCustomError(distributor, "SettlementNothingToClaim")
        .withArgs(carol.address, E(300), E(300));
    });

    it("reverts with SettlementInvalidProof(account, epoch, cumulative) for an entry that would pay; pays no one", async function () {
      const { token, distributor, other, alice, bob, carol, tree1 } = await networkHelpers.loadFixture(
        claimableFixture,
      );
      const [accounts, cumulatives, proofs] = batch(tree1, [alice, bob, carol]);
      await expect(distributor.connect(other).claimMany(1, accounts, [E(100), E(201), E(300)], proofs))
        .to.be.revertedWithCustomError(distributor, "SettlementInvalidProof")
        .withArgs(bob.address, 1n, E(201));
      // carol's leaf with bob's proof (and the other way round): the leaf is rebuilt from accounts[i].
      await expect(distributor.connect(other).claimMany(1, accounts, cumulatives, [proofs[0], proofs[2], proofs[1]]))
        .to.be.revertedWithCustomError(distributor, "SettlementInvalidProof")
        .withArgs(bob.address, 1n, E(200));
      expect(await token.balanceOf(alice.address)).to.equal(0n);
      expect(await distributor.claimed(alice.address)).to.equal(0n);
    });

    it("reverts with SettlementLengthMismatch(accounts, cumulatives, proofs) when the arrays differ", async function () {
      const { distributor, other, alice, bob, tree1 } = await networkHelpers.loadFixture(claimableFixture);
      const [accounts, cumulatives, proofs] = batch(tree1, [alice, bob]);
      for (const [a, c, p] of [
        [accounts.slice(1), cumulatives, proofs],
        [accounts, cumulatives.slice(1), proofs],
        [accounts, cumulatives, proofs.slice(1)],
      ]) {
        await expect(distributor.connect(other).claimMany(1, a, c, p))
          .to.be.revertedWithCustomError(distributor, "SettlementLengthMismatch")
          .withArgs(BigInt(a.length), BigInt(c.length), BigInt(p.length));
      }
    });

    it("reverts with SettlementRootInDispute(epoch, claimableAt) and SettlementUnknownEpoch(epoch, latest)", async function () {
      const { distributor, other, alice, tree1, claimableAt } = await networkHelpers.loadFixture(postedFixture);
      const args = batch(tree1, [alice]);
      await expect(distributor.connect(other).claimMany(1, ...args))
        .to.be.revertedWithCustomError(distributor, "SettlementRootInDispute")
        .withArgs(1n, claimableAt);
      for (const epoch of [0n, 2n]) {
        await expect(distributor.connect(other).claimMany(epoch, ...args))
          .to.be.revertedWithCustomError(distributor, "SettlementUnknownEpoch")
          .withArgs(epoch, 1n);
      }
    });

    it("pays 200 new holders of a 1,024-leaf tree in one transaction for less than the pinned gas", async function () {
      const { token, distributor, other, accounts, tree } = await networkHelpers.loadFixture(bigTreeFixture);
      const picked = accounts.slice(8, 208);
      const tx = await distributor.connect(other).claimMany(1, ...batch(tree, picked));
      const { gasUsed } = await tx.wait();
      for (const a of [picked[0], picked[199]]) expect(await token.balanceOf(a)).to.equal(tree.cumulative(a));
      expect(gasUsed).to.be.lessThanOrEqual(CLAIM_MANY_200_GAS_BOUND);
    });
  });

  describe("pause", function () {
    it("blocks postRoot, claim, claimFor and claimMany with EnforcedPause, and takes deposits", async function () {
      const { distributor, guardian, poster, funder, alice, other, tree1 } = await networkHelpers.loadFixture(
        claimableFixture,
      );
      await expect(distributor.connect(guardian).pause()).to.emit(distributor, "Paused").withArgs(guardian.address);
      // money in stays open (JobEscrow.releaseToPool pays verified work through it inside a cancel's grace)
      const before = await distributor.totalDeposited();
      await expect(distributor.connect(funder).deposit(1n)).to.emit(distributor, "Deposited");
      expect(await distributor.totalDeposited()).to.equal(before + 1n);
      const proof = tree1.proof(alice.address);
      const calls = [
        () => distributor.connect(poster).postRoot(2, ethers.id("r"), 1n),
        () => distributor.connect(alice).claim(1, E(100), proof),
        () => distributor.connect(other).claimFor(alice.address, 1, E(100), proof),
        () => distributor.connect(other).claimMany(1, [alice.address], [E(100)], [proof]),
      ];
      for (const call of calls) {
        await expect(call()).to.be.revertedWithCustomError(distributor, "EnforcedPause");
      }
    });

    it("reverts with AccessControlUnauthorizedAccount without GUARDIAN_ROLE", async function () {
      const { distributor, poster, governor } = await networkHelpers.loadFixture(deployDistributorFixture);
      for (const who of [poster, governor]) {
        await expect(distributor.connect(who).pause())
          .to.be.revertedWithCustomError(distributor, "AccessControlUnauthorizedAccount")
          .withArgs(who.address, await distributor.GUARDIAN_ROLE());
      }
    });
  });

  describe("unpause", function () {
    it("lets the governor restore claims and emits Unpaused", async function () {
      const { distributor, guardian, governor, alice, tree1 } = await networkHelpers.loadFixture(claimableFixture);
      await distributor.connect(guardian).pause();
      await expect(distributor.connect(governor).unpause()).to.emit(distributor, "Unpaused").withArgs(governor.address);
      await expect(distributor.connect(alice).claim(1, E(100), tree1.proof(alice.address))).to.emit(
        distributor,
        "Claimed",
      );
    });

    it("reverts with AccessControlUnauthorizedAccount for the guardian and the admin", async function () {
      const { distributor, admin, guardian } = await networkHelpers.loadFixture(deployDistributorFixture);
      await distributor.connect(guardian).pause();
      for (const who of [guardian, admin]) {
        await expect(distributor.connect(who).unpause())
          .to.be.revertedWithCustomError(distributor, "AccessControlUnauthorizedAccount")
          .withArgs(who.address, await distributor.GOVERNOR_ROLE());
      }
    });

    it("reverts with ExpectedPause when not paused", async function () {
      const { distributor, governor } = await networkHelpers.loadFixture(deployDistributorFixture);
      await expect(distributor.connect(governor).unpause()).to.be.revertedWithCustomError(distributor, "ExpectedPause");
    });
  });

  describe("setDisputeWindow", function () {
    it("sets the window for the next root and emits DisputeWindowSet", async function () {
      const { distributor, governor, poster, tree1 } = await networkHelpers.loadFixture(claimableFixture);
      await expect(distributor.connect(governor).setDisputeWindow(60))
        .to.emit(distributor, "DisputeWindowSet")
        .withArgs(60);
      expect(await distributor.disputeWindow()).to.equal(60n);
      const tx = await distributor.connect(poster).postRoot(2, tree1.root, tree1.total);
      const claimableAt = BigInt(await time.latest()) + 60n;
      await expect(tx).to.emit(distributor, "RootPosted").withArgs(2n, tree1.root, tree1.total, claimableAt);
      expect(await distributor.latestClaimableAt()).to.equal(claimableAt);
    });

    it("raising it does not reopen a root already claimable (claimed or not): not voidable, still claimable", async function () {
      const { distributor, governor, guardian, poster, alice, bob, tree1, claimableAt } =
        await networkHelpers.loadFixture(claimableFixture);
      await distributor.connect(alice).claim(1, E(100), tree1.proof(alice.address));
      await distributor.connect(governor).setDisputeWindow(WINDOW * 10n);
      expect(await distributor.latestClaimableAt()).to.equal(claimableAt);
      await expect(distributor.connect(guardian).voidRoot(1))
        .to.be.revertedWithCustomError(distributor, "SettlementNotVoidable")
        .withArgs(1n, 1n, claimableAt);
      await expect(distributor.connect(bob).claim(1, E(200), tree1.proof(bob.address)))
        .to.emit(distributor, "Claimed")
        .withArgs(bob.address, 1n, E(200), E(200));
      // The next root is postable at once and gets the new window.
      const tx = await distributor.connect(poster).postRoot(2, tree1.root, tree1.total);
      const claimableAt2 = BigInt(await time.latest()) + WINDOW * 10n;
      await expect(tx).to.emit(distributor, "RootPosted").withArgs(2n, tree1.root, tree1.total, claimableAt2);
      expect(await distributor.latestClaimableAt()).to.equal(claimableAt2);
    });

    it("lowering it does not cut short the dispute of the root in its window", async function () {
      const { distributor, governor, guardian, poster, alice, tree1, claimableAt } = await networkHelpers.loadFixture(
        postedFixture,
      );
      await distributor.connect(governor).setDisputeWindow(60);
      await time.increase(120); // past the new window, well inside the old one
      expect(await distributor.latestClaimableAt()).to.equal(claimableAt);
      await expect(distributor.connect(alice).claim(1, E(100), tree1.proof(alice.address)))
        .to.be.revertedWithCustomError(distributor, "SettlementRootInDispute")
        .withArgs(1n, claimableAt);
      await expect(distributor.connect(poster).postRoot(2, tree1.root, tree1.total))
        .to.be.revertedWithCustomError(distributor, "SettlementRootInDispute")
        .withArgs(1n, claimableAt);
      // The guardian keeps the whole window it was promised.
      await expect(distributor.connect(guardian).voidRoot(1))
        .to.emit(distributor, "RootVoided")
        .withArgs(1n, tree1.root, guardian.address);
    });

    it("reverts with AccessControlUnauthorizedAccount without GOVERNOR_ROLE", async function () {
      const { distributor, admin } = await networkHelpers.loadFixture(deployDistributorFixture);
      await expect(distributor.connect(admin).setDisputeWindow(0))
        .to.be.revertedWithCustomError(distributor, "AccessControlUnauthorizedAccount")
        .withArgs(admin.address, await distributor.GOVERNOR_ROLE());
    });
  });

  describe("leaf encoding", function () {
    it("the JS tree reproduces ledger/payout_tree.py's root and proof, and the contract pays on them", async function () {
      const { token, distributor, poster, funder, other } = await networkHelpers.loadFixture(deployDistributorFixture);
      const tree = buildPayoutTree(PY_VECTOR.entries);
      expect(tree.root).to.equal(PY_VECTOR.root);
      expect(tree.total).to.equal(PY_VECTOR.total);
      const [account, cumulative] = PY_VECTOR.entries[2];
      expect(tree.proof(account)).to.deep.equal(PY_VECTOR.proof2);
      expect(processProof(leafHash(account, cumulative), PY_VECTOR.proof2)).to.equal(PY_VECTOR.root);

      await distributor.connect(funder).deposit(PY_VECTOR.total);
      await distributor.connect(poster).postRoot(1, PY_VECTOR.root, PY_VECTOR.total);
      await time.increase(WINDOW);
      await distributor.connect(other).claimFor(account, 1, cumulative, PY_VECTOR.proof2);
      expect(await token.balanceOf(account)).to.equal(cumulative);
      // 5 -> 3 -> 2 -> 1 nodes: the odd fifth leaf moved up twice unchanged, so its proof is a single hash.
      const proofs = PY_VECTOR.entries.map(([a]) => tree.proof(a).length).sort();
      expect(proofs).to.deep.equal([1, 3, 3, 3, 3]);
      for (const [a, v] of PY_VECTOR.entries) {
        if (a === account) continue;
        await expect(distributor.connect(other).claimFor(a, 1, v, tree.proof(a)))
          .to.emit(distributor, "Claimed")
          .withArgs(a, 1n, v, v);
      }
      expect(await token.balanceOf(distributor)).to.equal(0n);
    });
  });
});
