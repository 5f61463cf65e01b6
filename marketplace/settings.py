"""One settings object for the marketplace; every field has an embedded default (env prefix GRIDMINT_)."""
from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from protocol.money import tokens
from protocol.schemas import KernelBuild
from protocol.verification import AUDIT_RATE, CANARY_RATE


#: ``provider_live_s`` by default: this many heartbeat deadlines (a provider's units are reaped after one) ...
PROVIDER_LIVE_TIMEOUTS = 3
#: ... and never under this (four beats at the agents' slowest cadence, 15 s), whatever a short unit_timeout_s says
PROVIDER_LIVE_FLOOR_S = 60


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GRIDMINT_", extra="ignore")

    data_dir: Path = Path(".gridmint")
    db_url: str | None = None  # default: SQLite file in data_dir
    redis_url: str | None = None  # `gridmint demo` starts its own redis-server (gridmint.procs); serve and worker need one
    chain_url: str | None = None  # JSON-RPC of the chain (Hardhat node); tests may inject an in-process chain instead
    deployment_file: Path | None = None  # default: data_dir/deployment.json
    # key holding the SLASHER/SETTLER roles (marketplace operator): a SecretStr, so no repr, log line or traceback
    # of the settings shows it (``get_secret_value()`` where it signs: marketplace.bootstrap.operator_account)
    operator_key: SecretStr | None = None
    max_upload_bytes: int = Field(default=32 * 1024 * 1024, ge=1)
    # a request body must arrive within body_timeout_s, or as long as its size takes at body_min_rate bytes/s if
    # that is longer (a 32 MiB upload: 128 s), else 408: a stalled client holds neither memory nor a slot for ever
    body_timeout_s: float = Field(default=30.0, gt=0)
    body_min_rate: int = Field(default=256 * 1024, ge=1)
    # uploads (PUT /blobs) one API process takes at once, each body in memory until stored; one more is a 503 with
    # Retry-After (nodes retry a 5xx), not a queue
    max_uploads_in_flight: int = Field(default=8, ge=1)
    #: of those, at most this many one signer's (a provider stalling its uploads cannot take every slot)
    max_uploads_per_signer: int = Field(default=2, ge=1)
    # `gridmint marketplace serve`'s uvicorn, per worker: connections and requests at once before new ones get a 503
    # (keep it under the process's file limit, `ulimit -n`), and how long an idle keep-alive connection stays open
    serve_limit_concurrency: int = Field(default=512, ge=1)
    serve_keep_alive_s: int = Field(default=5, ge=1)
    #: a connection waiting longer than this for a request's head is closed (marketplace.serving)
    serve_header_timeout_s: float = Field(default=10.0, gt=0)
    #: connections one peer address may hold at once, per worker (0: no cap); proxies uvicorn trusts are not capped
    serve_connections_per_peer: int = Field(default=64, ge=0)
    min_stake: int = Field(default=tokens(100), ge=0)  # base units a provider must stake to be matched
    # base units a verifier must keep staked to be handed tasks: what a planted canary it approves costs it (slashed
    # whole), and what a new wallet costs a verifier that was benched (a lazy approval or a proven false accusation)
    min_verifier_stake: int = Field(default=tokens(100), ge=0)
    # a verifier whose fraud verdicts the referee overrules this often is benched even where it cannot be proven false
    # (a plan the referee does not replay on): from `verifier_overruled_floor` overruled verdicts on, once they are
    # more than `verifier_overruled_share` of all its verdicts. Honest drift across plans disputes ~4-6% of segments
    verifier_overruled_floor: int = Field(default=5, ge=1)
    verifier_overruled_share: float = Field(default=0.5, ge=0.0, le=1.0)
    # how long a stake read that showed enough is reused by polls for work and tasks (marketplace.stakes); 0 reads
    # the chain on every request
    stake_read_ttl_s: float = Field(default=10.0, ge=0.0)
    unit_timeout_s: int = Field(default=120, ge=1)  # an assigned unit with no heartbeat (or submission) for this long is reassigned
    # a provider is offered work (matching rounds and standbys) only while seen (registered, polled for work or
    # heartbeat) within this many seconds (resolved_provider_live_s): a node idle polls every 0.5 s and one training
    # beats at least every 15 s, so one unseen for longer is gone, and a unit handed to it would only sit until
    # the reaper takes it back. None: 3 x unit_timeout_s, at least 60 s
    provider_live_s: int | None = Field(default=None, ge=1)
    # a unit not submitted by its deadline is reassigned even while its provider heartbeats (stuck, or holding it):
    # the deadline is `unit_deadline_factor` times the time the throughput the matching ranked the provider at says
    # the unit (and the units queued before it on that provider) should take, and never less than
    # `unit_deadline_min_s` (uploads, restarts)
    unit_deadline_min_s: int = Field(default=3600, ge=0)
    unit_deadline_factor: int = Field(default=4, ge=1)
    # a verification task is handed out again when its verifier misses `unit_timeout_s` of heartbeats while replaying
    # it, or has held it this long whatever its heartbeats say
    verify_deadline_s: int = Field(default=3600, ge=1)
    # a provider asked to reveal a state in a dispute that does not answer in time loses (its whole stake): long enough
    # for a crashed node to be restarted (an honest one re-derives any state from its checkpoints in seconds), short
    # against a job's hours; only a silent provider's dispute waits it out
    reveal_timeout_s: int = Field(default=1800, ge=1)
    # share of the verification tasks handed out that are planted known-bad segments (marketplace.canary): a verifier
    # that approves one is benched and slashed. A probability, not money; 0 plants none
    canary_rate: float = Field(default=float(CANARY_RATE), ge=0.0, le=1.0)
    # share of the checks a verifier passed that the referee replays itself before the unit is paid (an audit:
    # checking.audit_check), on CPU work and GPU work it replays bit for bit: a pass of a false claim (bisected with the
    # provider's reveals where the referee's replay is not bit for bit) costs the provider its whole stake
    # and a verifier that replayed on the unit's own plan (its pass asserted the same bits) its own. What a verifier
    # colluding with the provider cannot tell apart, as it can a canary (the provider knows its true states): at 0.1,
    # a unit cheated through a friend costs the provider its stake whenever the audited pass is of a segment it
    # faked, one time in ten; likelier for a verifier whose share of one provider's verdicts is over its share of
    # the plan's (checking.audit_odds). A probability, the base one; 0 audits none
    audit_rate: float = Field(default=float(AUDIT_RATE), ge=0.0, le=1.0)
    # execution plans the referee replays bit for bit besides the providers' default "cpu" (comma-separated labels,
    # e.g. "cpu/mb2" or, on a machine with that GPU, "cuda:h200"; marketplace.referee.exact_plans): a segment trained
    # on one is judged by an exact replay, so a cheat hiding inside the honest drift between plans (float8 steps) is
    # convicted, and a verifier on that plan bonds its disputes
    referee_plans: str = "cpu"
    # a check of a unit trained on an exact plan other than "cpu" (another CPU plan, a named GPU plan) is kept for
    # verifiers on that very plan (they replay it bit for bit) for this long after it was queued, while one of them
    # has been seen within `unit_timeout_s`; then any verifier whose devices run it may take it. 0: no wait
    same_plan_hold_s: int = Field(default=600, ge=0)
    # checkpoints nothing needs any more are deleted (marketplace.blobgc, hourly): a job's own once it ended this
    # long ago (its global model is kept), an upload nobody names once this old
    blob_retention_s: int = Field(default=7 * 86400, ge=0)
    blob_orphan_s: int = Field(default=86400, ge=60)
    # the CPU kernels the referee's workers compute with (node.device.kernel_build); "": this machine's own (the API
    # and its workers run one build on one CPU kind). Verifiers read it in GET /config: one on other kernels cannot
    # have its replay reproduced by the referee, so it bonds no dispute, and work on other kernels is refereed within a
    # tolerance calibrated against other kernels (node.foreign), never convicted on a bit mismatch
    referee_build: KernelBuild = ""
    # referee pools: CPU kernel builds besides referee_build that referee workers compute with (comma-separated
    # node.device.kernel_build strings, what `gridmint node probe` prints there). Each pool is a Celery queue of its
    # own (Runtime.referee_queue), consumed by `gridmint marketplace worker` started on a machine with those kernels:
    # a dispute over work on them is sent there and replayed bit for bit, so a cheat hiding inside the drift between
    # kernels (a float8 step in a bf16 job) is convicted, and a verifier on them bonds its disputes
    referee_pools: str = ""
    # the CUDA kernels the referee's GPU workers compute with (comma-separated node.device.kernel_build strings, what
    # `gridmint node probe` prints there), needed for each GPU plan named in referee_plans: GPU work on such a plan is
    # replayed bit for bit only where it was computed with one of these (another torch, CUDA or cuDNN computes other
    # bits on the same GPU model); on other kernels it is judged within the tolerance, a verifier bonds no dispute of
    # it, and its passes are not audited (the referee's ruling there may need states from the provider)
    referee_gpu_builds: str = ""
    # a pool's worker says it is alive every few seconds (marketplace.checking.pool_alive); a dispute whose pool has
    # not been seen for this long (nor the dispute, since its verdict) is handed to the default referee instead, so a
    # job never waits on a pool with no worker for ever. That referee judges it across kernels, within the tolerance:
    # a cheat past it is convicted as ever; one inside it (a float8 step) goes free, and the verifier's bond, posted
    # on the pool's promise, is released ("dismissed"). 0: never; the dispute waits for the pool
    referee_pool_wait_s: int = Field(default=3600, ge=0)
    clock_skew_s: int = Field(default=300, ge=0)  # the furthest a signed request's deadline may lie in the future
    # Customer login (SIWE, marketplace.siwe). The secret MACs session tokens: API processes that should accept each
    # other's tokens share it (same env var, or same data_dir, where it is generated on first start).
    session_secret: SecretStr | None = None
    session_ttl_s: int = Field(default=24 * 3600, ge=1)  # how long a login lasts
    login_nonce_ttl_s: int = Field(default=600, ge=1)  # how long a nonce from POST /auth/nonce may wait before it is used
    siwe_domain: str | None = None  # the domain login messages must name; unset: the Host, on loopback addresses only

    @field_validator("db_url", "redis_url", "chain_url", "operator_key", "siwe_domain")
    @classmethod
    def _not_blank(cls, v: str | SecretStr | None) -> str | SecretStr | None:
        """Set but empty (a templated env file): an error, not the default. An empty GRIDMINT_DB_URL put each API and
        worker on a SQLite file of its own, sharing no nonces, jobs or units, and everything started."""
        text = v.get_secret_value() if isinstance(v, SecretStr) else v
        if text is not None and not text.strip():
            raise ValueError("is set but empty: unset it for the default, or give a value")
        return v

    @field_validator("referee_plans")
    @classmethod
    def _plans_read(cls, v: str) -> str:
        """A malformed or inexact plan label fails at start-up (whether this machine runs it is the worker's check)."""
        from marketplace.referee import exact_plans

        exact_plans(v, here=False)
        return v

    @field_validator("referee_pools")
    @classmethod
    def _pools_read(cls, v: str) -> str:
        """Each pool must be a CPU kernel build (GPU plans are refereed through referee_plans)."""
        return _kernel_builds(v, cuda=False, what="referee pool", example="a CPU machine, e.g. "
                              "torch-2.13.0+cpu.cf30153c/x86_64.authenticamd.avx2/aten-avx2")

    @field_validator("referee_gpu_builds")
    @classmethod
    def _gpu_builds_read(cls, v: str) -> str:
        """Each must be a CUDA kernel build."""
        return _kernel_builds(v, cuda=True, what="referee GPU build", example="a GPU machine, e.g. "
                              "torch-2.13.0.4a8b0c1d/cuda-12.8.cudnn-91002.sm90")

    @model_validator(mode="after")
    def _pool_not_the_referee(self) -> "Settings":
        if self.referee_build and self.referee_build in pool_builds(self.referee_pools):
            raise ValueError(f"referee pool {self.referee_build!r} is the referee's own kernels (referee_build): "
                             f"its work would be taken from the referee's workers")
        return self

    @model_validator(mode="after")
    def _gpu_plans_have_builds(self) -> "Settings":
        from marketplace.referee import exact_plans

        gpu = sorted(p.label for p in exact_plans(self.referee_plans, here=False) if p.device == "cuda")
        if gpu and not pool_builds(self.referee_gpu_builds):
            raise ValueError(f"referee plans {', '.join(gpu)} need the CUDA kernels the referee replays them with: set "
                             f"GRIDMINT_REFEREE_GPU_BUILDS to what `gridmint node probe` prints on its GPU workers")
        return self

    def resolved_db_url(self) -> str:
        return self.db_url or f"sqlite:///{(self.data_dir / 'marketplace.db').resolve()}"

    def resolved_provider_live_s(self) -> int:
        """How recently a provider must have been seen to be offered work (``provider_live_s``)."""
        return self.provider_live_s or max(PROVIDER_LIVE_FLOOR_S, PROVIDER_LIVE_TIMEOUTS * self.unit_timeout_s)

    def resolved_deployment_file(self) -> Path:
        return self.deployment_file or self.data_dir / "deployment.json"

    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"


def pool_beat_s(wait_s: int) -> float:
    """How often a referee pool's worker says it is alive: well inside ``referee_pool_wait_s`` (at most every 15 s)."""
    return max(0.5, min(15.0, wait_s / 4)) if wait_s else 15.0


def _kernel_builds(v: str, *, cuda: bool, what: str, example: str) -> str:
    """``v``, a comma-separated list of kernel builds, if each is one of a CUDA (``cuda``) or a CPU machine's
    (node.device.kernel_build); else a ValueError naming it as ``what``."""
    import re

    from protocol.schemas import KERNEL_BUILD

    kind = "CUDA" if cuda else "CPU"
    for b in pool_builds(v):
        if not re.fullmatch(KERNEL_BUILD, b) or ("/cuda-" in b) != cuda:
            raise ValueError(f"{what} {b!r} is not a {kind} kernel build (what `gridmint node probe` prints on "
                             f"{example})")
    return v


def pool_builds(pools: str) -> list[str]:
    """The kernel builds named in a referee_pools setting, in order, without blanks."""
    return [b for b in (x.strip() for x in pools.split(",")) if b]


def judging_pool(build: str | None, pools: Collection[str], fallen_back: bool = False) -> str | None:
    """The referee pool that judges a dispute over work computed with kernel ``build`` (None: the default referee):
    the pool in ``pools`` computing with those kernels, unless the dispute has ``fallen_back`` to the default
    referee (its pool was away). The one routing rule: the queue a dispute is sent to and the /metrics count of
    open disputes by referee both follow it."""
    return build if build in pools and not fallen_back else None
