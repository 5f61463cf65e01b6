"""Wire schemas: what crosses HTTP between customers, nodes, verifiers and the marketplace.

Money fields are integer base units; JSON carries them as decimal strings (JavaScript-safe) and we
accept either an int or a digit string, never a float.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, model_validator

from protocol.money import base_units, check_amount

MoneyField = Annotated[int, BeforeValidator(base_units), PlainSerializer(lambda v: str(v), return_type=str)]
Bytes32Hex = Annotated[str, Field(pattern=r"^0x[0-9a-f]{64}$")]
Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
#: An execution plan (node.crosscheck.Plan): device, and gradient micro-batches if more than one, e.g. "cuda", "cpu/mb2".
# a CUDA plan may name its GPU model ("cuda:h200"): only then is it replayed bit for bit on the same plan
PlanLabel = Annotated[str, Field(pattern=r"^(cpu|cuda(:[a-z0-9][a-z0-9-]{0,23})?)(/mb([1-9]|[1-5][0-9]|6[0-4]))?$")]
#: Which kernels a machine computes a plan with (node.device.kernel_build): the torch build and the CPU kind, or the
#: CUDA and cuDNN versions. The same plan replays bit for bit only on the same kernels. "" = not said (never exact).
KERNEL_BUILD = r"[a-z0-9][a-z0-9._+/-]{0,159}"
KernelBuild = Annotated[str, Field(pattern=rf"^({KERNEL_BUILD})?$")]
#: The largest values the marketplace's integer columns hold: PostgreSQL INTEGER and BIGINT (SQLite's are 64-bit).
#: A wire integer stored in (or looked up by) such a column is bounded by its type, so a bigger one is a 422, not an
#: overflow in the database driver.
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
MAX_STEPS_PER_UNIT = 100_000
#: The most segments one unit's result may commit (ResultSubmit.segment_blobs).
MAX_SEGMENTS_PER_UNIT = 10_000
MAX_VRAM_MB = 10_000_000


def _no_nul(text: str) -> str:
    if "\x00" in text:
        raise ValueError(f"must not contain a NUL character (\\x00), got {text!r}")
    return text


def _one_line(text: str) -> str:
    bad = sorted({c for c in text if c < " " or c == "\x7f"})
    if bad:
        raise ValueError(f"must be one line of printable text, got control characters {''.join(bad)!r} in {text!r}")
    return text


#: Free text that is stored: PostgreSQL text cannot hold NUL at all (SQLite can), so it is refused on both.
Text = Annotated[str, AfterValidator(_no_nul)]
#: A name shown in lists and pages (a GPU, a region): one line, no control characters.
Label = Annotated[str, AfterValidator(_one_line)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(Strict):
    vocab: int = Field(256, ge=256, le=256)
    d_model: int = Field(64, ge=16, le=1024)
    n_layer: int = Field(2, ge=1, le=24)
    n_head: int = Field(4, ge=1, le=16)
    ctx: int = Field(64, ge=8, le=1024)

    @model_validator(mode="after")
    def _heads_divide(self) -> "ModelSpec":
        if self.d_model % self.n_head:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_head {self.n_head}")
        return self


class JobSpec(Strict):
    """A training job: ``rounds`` DiLoCo rounds of ``units_per_round`` parallel units of ``steps_per_unit`` steps."""

    model: ModelSpec = ModelSpec()
    rounds: int = Field(4, ge=1, le=1000)
    units_per_round: int = Field(3, ge=1, le=256)
    steps_per_unit: int = Field(60, ge=1, le=MAX_STEPS_PER_UNIT)
    segment_len: int = Field(15, ge=1, le=MAX_STEPS_PER_UNIT)
    batch_size: int = Field(16, ge=1, le=1024)
    lr: float = Field(3e-3, gt=0, lt=1)
    seed: int = Field(0, ge=0, lt=2**31)
    vram_mb: int = Field(1024, ge=0, le=MAX_VRAM_MB)
    max_price: MoneyField  # the most the customer pays for one work unit
    # How much of each unit verifiers re-execute (protocol.verification.LEVELS): none / standard / paranoid / full.
    verification: Literal["none", "standard", "paranoid", "full"] = "standard"
    # The arithmetic every provider must train in (and every replay runs): fp32, or bf16 autocast (what GPUs run
    # fastest; replays of it on other hardware drift more, so its tolerances are calibrated wider).
    precision: Literal["fp32", "bf16"] = "fp32"

    @model_validator(mode="after")
    def _segments_divide(self) -> "JobSpec":
        if self.steps_per_unit % self.segment_len:
            raise ValueError(f"steps_per_unit {self.steps_per_unit} is not a multiple of segment_len {self.segment_len}")
        return self

    @model_validator(mode="after")
    def _budget_fits(self) -> "JobSpec":
        # every amount stops at a uint256 (MAX_AMOUNT), and the escrow must hold this one
        check_amount(self.budget(), f"budget {self.rounds} rounds x {self.units_per_round} units x max_price "
                                    f"{self.max_price} =")
        return self

    def budget(self) -> int:
        """Escrow the job needs up front: every unit at :meth:`unit_budget`. The unspent rest is refunded."""
        return self.rounds * self.units_per_round * self.unit_budget()

    def unit_budget(self) -> int:
        """The most one unit of the job can cost: its price at the cap, and the most its verification level can cost
        in verifier fees at that price (protocol.verification.max_checks)."""
        from protocol.verification import check_fee, max_checks

        n = self.steps_per_unit // self.segment_len
        return self.max_price + check_fee(self.max_price, n) * max_checks(self.verification, n)


class QuoteOut(Strict):
    job_id: Bytes32Hex | None  # bound to the quote's ?customer= (protocol.jobs); None without one
    budget: MoneyField
    units: int
    escrow: str  # JobEscrow address to fund
    token: str
    chain_id: int
    verification: dict[str, Any] = {}  # the level's replay share, fee and catch odds (protocol.verification.quote)


class JobSubmit(Strict):
    job_id: Bytes32Hex
    spec: JobSpec


class ProviderRegister(Strict):
    region: Label = Field(min_length=1, max_length=32)
    gpu: Label = Field(min_length=1, max_length=128)
    vram_mb: int = Field(ge=0, le=MAX_VRAM_MB)
    price: MoneyField  # ask per work unit
    tokens_per_s: int = Field(ge=0, le=INT64_MAX)  # measured by the node's benchmark (a BIGINT column)
    capacity: int = Field(1, ge=1, le=64)


class Heartbeat(Strict):
    """A provider's sign of life while it trains: which unit, and how many of its steps are done."""

    unit_id: Bytes32Hex | None = None
    steps_done: int = Field(0, ge=0, le=10_000_000)


class BlobRef(Strict):
    sha256: Sha256Hex


class ResultSubmit(Strict):
    unit_id: Bytes32Hex
    proof: dict[str, Any]  # protocol.proof.TrainingProof JSON
    proof_signature: str = Field(pattern=r"^0x[0-9a-f]{130}$")
    final_blob: Sha256Hex
    segment_blobs: list[Sha256Hex] = Field(max_length=MAX_SEGMENTS_PER_UNIT)
    # one training loss per step, signed with the request: each segment's mean must be the loss its commitment
    # says (protocol.proof.check_step_losses), and a referee's loss scan judges every step against it
    losses: list[float] = Field(max_length=MAX_STEPS_PER_UNIT)
    # How the provider trained (its execution plan). A verifier on the same plan replays bit for bit; on another, it
    # checks within a calibrated tolerance, and a dispute is bisected to one step with the provider revealing states.
    plan: PlanLabel = "cpu"
    # with which kernels (node.device.kernel_build): bit for bit only on the same plan *and* kernels; on other kernels
    # (another CPU kind, torch build) the same plan is checked like another plan, within a calibrated tolerance
    build: KernelBuild = ""


class VerifierRegister(Strict):
    plan: PlanLabel = "cpu"  # how this verifier replays; it is handed only segments its devices can check
    build: KernelBuild = ""  # with which kernels: it is handed units of its own plan and kernels first


class RevealSubmit(Strict):
    """A provider's answer in a dispute over one of its segments: its training state before ``step``, uploaded as a
    checkpoint (``blob``), with its EIP-712 ``Reveal`` signature over (unit, step, state hash)."""

    verification_id: int = Field(ge=1, le=INT32_MAX)  # verifications.id is an INTEGER column
    step: int = Field(ge=0, le=MAX_STEPS_PER_UNIT)
    state_hash: Bytes32Hex
    blob: Sha256Hex
    signature: str = Field(pattern=r"^0x[0-9a-f]{130}$")


class VerificationBeat(Strict):
    """A verifier's sign of life while it replays a task: which task."""

    verification_id: int = Field(ge=1, le=INT32_MAX)


class VerdictSubmit(Strict):
    verification_id: int = Field(ge=1, le=INT32_MAX)
    ok: bool
    replayed_hash: Bytes32Hex
    signature: str = Field(pattern=r"^0x[0-9a-f]{130}$")  # EIP-712 Verdict by the verifier
    reason: Text = Field("", max_length=500)
    # with ok=false: the verifier's EIP-712 Accusation for GridStaking.accuse (protocol.signing.sign_accusation), which
    # bonds its stake; without one, a confirmed fraud is slashed by the governance path instead
    accusation: str | None = Field(None, pattern=r"^0x[0-9a-f]{130}$")
