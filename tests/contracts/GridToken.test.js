import { expect } from "chai";
import { network } from "hardhat";

import { PERMIT_TYPES, signPermit } from "./helpers.js";

const { ethers, networkHelpers } = await network.create();

const SUPPLY = ethers.parseEther("1000000");

describe("GridToken", function () {
  async function deployTokenFixture() {
    const [deployer, holder, spender, other] = await ethers.getSigners();
    const token = await ethers.deployContract("GridToken", [holder.address, SUPPLY], deployer);
    return { token, deployer, holder, spender, other };
  }

  describe("constructor", function () {
    it("sets name, symbol and 18 decimals", async function () {
      const { token } = await networkHelpers.loadFixture(deployTokenFixture);
      expect(await token.name()).to.equal("GridMint Token");
      expect(await token.symbol()).to.equal("GMT");
      expect(await token.decimals()).to.equal(18n);
    });

    it("mints the whole fixed supply to the holder and emits Transfer from zero", async function () {
      const { token, deployer, holder } = await networkHelpers.loadFixture(deployTokenFixture);
      expect(await token.totalSupply()).to.equal(SUPPLY);
      expect(await token.balanceOf(holder.address)).to.equal(SUPPLY);
      expect(await token.balanceOf(deployer.address)).to.equal(0n);
      await expect(token.deploymentTransaction())
        .to.emit(token, "Transfer")
        .withArgs(ethers.ZeroAddress, holder.address, SUPPLY);
    });

    it("exposes no mint or burn function", async function () {
      const { token } = await networkHelpers.loadFixture(deployTokenFixture);
      const names = token.interface.fragments.filter((f) => f.type === "function").map((f) => f.name);
      expect(names.filter((n) => /mint|burn/i.test(n))).to.deep.equal([]);
    });
  });

  describe("transfer", function () {
    it("moves tokens and emits Transfer", async function () {
      const { token, holder, other } = await networkHelpers.loadFixture(deployTokenFixture);
      await expect(token.connect(holder).transfer(other.address, 7n))
        .to.emit(token, "Transfer")
        .withArgs(holder.address, other.address, 7n);
      expect(await token.balanceOf(other.address)).to.equal(7n);
      expect(await token.totalSupply()).to.equal(SUPPLY);
    });

    it("reverts with ERC20InsufficientBalance(sender, balance, needed)", async function () {
      const { token, other, holder } = await networkHelpers.loadFixture(deployTokenFixture);
      await expect(token.connect(other).transfer(holder.address, 1n))
        .to.be.revertedWithCustomError(token, "ERC20InsufficientBalance")
        .withArgs(other.address, 0n, 1n);
    });
  });

  describe("approve / transferFrom", function () {
    it("spends the allowance and emits Transfer", async function () {
      const { token, holder, spender, other } = await networkHelpers.loadFixture(deployTokenFixture);
      await expect(token.connect(holder).approve(spender.address, 10n))
        .to.emit(token, "Approval")
        .withArgs(holder.address, spender.address, 10n);
      await expect(token.connect(spender).transferFrom(holder.address, other.address, 4n))
        .to.emit(token, "Transfer")
        .withArgs(holder.address, other.address, 4n);
      expect(await token.allowance(holder.address, spender.address)).to.equal(6n);
    });

    it("reverts with ERC20InsufficientAllowance(spender, allowance, needed)", async function () {
      const { token, holder, spender, other } = await networkHelpers.loadFixture(deployTokenFixture);
      await token.connect(holder).approve(spender.address, 3n);
      await expect(token.connect(spender).transferFrom(holder.address, other.address, 4n))
        .to.be.revertedWithCustomError(token, "ERC20InsufficientAllowance")
        .withArgs(spender.address, 3n, 4n);
    });
  });

  describe("permit", function () {
    it("sets the allowance from an EIP-712 signature and bumps the nonce", async function () {
      const { token, holder, spender } = await networkHelpers.loadFixture(deployTokenFixture);
      const deadline = (await networkHelpers.time.latest()) + 3600;
      const sig = await signPermit(token, holder, spender.address, 500n, deadline);
      await expect(token.connect(spender).permit(holder.address, spender.address, 500n, deadline, sig.v, sig.r, sig.s))
        .to.emit(token, "Approval")
        .withArgs(holder.address, spender.address, 500n);
      expect(await token.allowance(holder.address, spender.address)).to.equal(500n);
      expect(await token.nonces(holder.address)).to.equal(1n);
    });

    it("reverts with ERC2612InvalidSigner when the permit is replayed", async function () {
      const { token, holder, spender } = await networkHelpers.loadFixture(deployTokenFixture);
      const deadline = (await networkHelpers.time.latest()) + 3600;
      const sig = await signPermit(token, holder, spender.address, 500n, deadline);
      await token.permit(holder.address, spender.address, 500n, deadline, sig.v, sig.r, sig.s);
      // The nonce moved on, so the same signature now recovers to some other address.
      const tx = token.permit(holder.address, spender.address, 500n, deadline, sig.v, sig.r, sig.s);
      await expect(tx).to.be.revertedWithCustomError(token, "ERC2612InvalidSigner");
      const { chainId } = await ethers.provider.getNetwork();
      const recovered = ethers.verifyTypedData(
        { name: "GridMint Token", version: "1", chainId, verifyingContract: await token.getAddress() },
        PERMIT_TYPES,
        { owner: holder.address, spender: spender.address, value: 500n, nonce: 1n, deadline },
        sig,
      );
      await expect(tx).to.be.revertedWithCustomError(token, "ERC2612InvalidSigner").withArgs(recovered, holder.address);
    });

    it("reverts with ERC2612ExpiredSignature after the deadline", async function () {
      const { token, holder, spender } = await networkHelpers.loadFixture(deployTokenFixture);
      const deadline = (await networkHelpers.time.latest()) - 1;
      const sig = await signPermit(token, holder, spender.address, 500n, deadline);
      await expect(token.permit(holder.address, spender.address, 500n, deadline, sig.v, sig.r, sig.s))
        .to.be.revertedWithCustomError(token, "ERC2612ExpiredSignature")
        .withArgs(deadline);
    });

    it("reverts with ERC2612InvalidSigner when someone else signed", async function () {
      const { token, holder, spender, other } = await networkHelpers.loadFixture(deployTokenFixture);
      const deadline = (await networkHelpers.time.latest()) + 3600;
      // `other` signs a permit that names `holder` as the owner.
      const sig = await signPermit(token, holder, spender.address, 500n, deadline, other);
      await expect(token.permit(holder.address, spender.address, 500n, deadline, sig.v, sig.r, sig.s))
        .to.be.revertedWithCustomError(token, "ERC2612InvalidSigner")
        .withArgs(other.address, holder.address);
    });
  });

  describe("DOMAIN_SEPARATOR / eip712Domain", function () {
    it("is the EIP-712 domain {GridMint Token, 1, chainId, token}", async function () {
      const { token } = await networkHelpers.loadFixture(deployTokenFixture);
      const { chainId } = await ethers.provider.getNetwork();
      const domain = { name: "GridMint Token", version: "1", chainId, verifyingContract: await token.getAddress() };
      expect(await token.DOMAIN_SEPARATOR()).to.equal(ethers.TypedDataEncoder.hashDomain(domain));
      const d = await token.eip712Domain();
      expect([d.name, d.version, d.chainId, d.verifyingContract]).to.deep.equal([
        domain.name,
        domain.version,
        chainId,
        domain.verifyingContract,
      ]);
    });
  });
});
