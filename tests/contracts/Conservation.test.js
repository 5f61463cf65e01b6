import { expect } from "chai";
import { network } from "hardhat";

const { ethers, networkHelpers } = await network.create();

const SUPPLY = ethers.parseEther("1000000");
const BOUNTY_BPS = 5000n;

// End-to-end: the fixed GMT supply is accounted for after every step of a full marketplace round.
describe("GridMint protocol", function () {
  async function deployProtocolFixture() {
    const [admin, treasury, customer, provider, provider2, verifier] = await ethers.getSigners();
    const token = await ethers.deployContract("GridToken", [admin.address, SUPPLY]);
    const tokenAddress = await token.getAddress();
    const staking = await ethers.deployContract("GridStaking", [tokenAddress, admin.address, treasury.address, BOUNTY_BPS]);
    const escrow = await ethers.deployContract("JobEscrow", [tokenAddress, admin.address]);
    await staking.grantRole(await staking.SLASHER_ROLE(), admin.address);
    await escrow.grantRole(await escrow.SETTLER_ROLE(), admin.address);
    await token.transfer(customer.address, 1_000n);
    await token.transfer(provider.address, 500n);
    await token.transfer(provider2.address, 500n);
    const holders = [admin, treasury, customer, provider, provider2, verifier, staking, escrow];
    return { token, staking, escrow, admin, treasury, customer, provider, provider2, verifier, holders };
  }

  async function sumBalances(token, holders) {
    let sum = 0n;
    for (const h of holders) sum += await token.balanceOf(await h.getAddress());
    return sum;
  }

  describe("fund -> release -> close -> claim and stake -> slash", function () {
    it("conserves the total supply at every step and ends with the expected balances", async function () {
      const { token, staking, escrow, admin, treasury, customer, provider, provider2, verifier, holders } =
        await networkHelpers.loadFixture(deployProtocolFixture);
      const job = ethers.id("job-conservation");
      const steps = [
        async () => {
          await token.connect(provider).approve(await staking.getAddress(), 300n);
          await staking.connect(provider).stake(300n);
        },
        async () => {
          await token.connect(provider2).approve(await staking.getAddress(), 200n);
          await staking.connect(provider2).stake(200n);
        },
        async () => {
          await token.connect(customer).approve(await escrow.getAddress(), 900n);
          await escrow.connect(customer).fund(job, 900n);
        },
        () => escrow.connect(admin).release(job, ethers.id("u1"), provider.address, 250n),
        () => escrow.connect(admin).release(job, ethers.id("u2"), provider2.address, 333n),
        () => staking.connect(admin).slash(provider2.address, 101n, verifier.address, ethers.id("fraud-1")),
        () => escrow.connect(customer).close(job),
        () => escrow.connect(provider).claim(),
        () => escrow.connect(provider2).claim(),
        () => staking.connect(provider).unstake(300n),
      ];
      for (const step of steps) {
        await step();
        expect(await sumBalances(token, holders)).to.equal(SUPPLY);
      }

      // 101 slashed at 50%: 50 to the verifier, 51 to the treasury.
      expect(await token.balanceOf(verifier.address)).to.equal(50n);
      expect(await token.balanceOf(treasury.address)).to.equal(51n);
      expect(await token.balanceOf(customer.address)).to.equal(1_000n - 250n - 333n);
      expect(await token.balanceOf(provider.address)).to.equal(500n + 250n);
      expect(await token.balanceOf(provider2.address)).to.equal(500n - 200n + 333n);
      expect(await token.balanceOf(await escrow.getAddress())).to.equal(0n);
      expect(await token.balanceOf(await staking.getAddress())).to.equal(200n - 101n);
      expect(await staking.totalStaked()).to.equal(99n);
    });
  });
});
