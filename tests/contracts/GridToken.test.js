import { expect } from "chai";
import { network } from "hardhat";

const { ethers, networkHelpers } = await network.create();

const SUPPLY = ethers.parseEther("1000000");

// Signs an EIP-2612 permit for `owner`; `signer` defaults to the owner (pass another to forge one).
async function signPermit(token, owner, spender, value, deadline, signer = owner) {
  const { chainId } = await ethers.provider.getNetwork();
  const domain = {
    name: await token.name(),
    version: "1",
    chainId,
    verifyingContract: await token.getAddress(),
  };
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
  const message = { owner: owner.address, spender, value, nonce, deadline };
  return ethers.Signature.from(await signer.signTypedData(domain, types, message));
}

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

    it("mints the whole fixed supply to the holder", async function () {
      const { token, deployer, holder } = await networkHelpers.loadFixture(deployTokenFixture);
      expect(await token.totalSupply()).to.equal(SUPPLY);
      expect(await token.balanceOf(holder.address)).to.equal(SUPPLY);
      expect(await token.balanceOf(deployer.address)).to.equal(0n);
    });

    it("exposes no mint or burn function", async function () {
      const { token } = await networkHelpers.loadFixture(deployTokenFixture);
      const names = token.interface.fragments.filter((f) => f.type === "function").map((f) => f.name);
      expect(names.filter((n) => /mint|burn/i.test(n))).to.deep.equal([]);
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
});
