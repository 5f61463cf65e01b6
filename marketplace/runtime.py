"""What a marketplace process needs at run time, built once by whoever starts the process and passed down."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy.orm import Session, sessionmaker

from marketplace.blobs import BlobStore
from marketplace.settings import Settings, judging_pool, pool_builds
from marketplace.stakes import StakeCache
from protocol.errors import GridMintValueError
from protocol.signing import Domain

class Enqueue(Protocol):
    """Send a Celery task by name (``queue`` None: the default queue; a referee pool's: Runtime.referee_queue).
    Called after a committed write, so it never raises for a broker that is away (marketplace.tasks.enqueue: logged;
    the sweep sends the step again)."""

    def __call__(self, name: str, args: list[Any], queue: str | None = None) -> None: ...


@dataclass
class Runtime:
    settings: Settings
    sessions: sessionmaker[Session]
    blobs: BlobStore
    chain_id: int
    contracts: Any  # ledger.evm.GridMintContracts acting as the marketplace operator
    enqueue: Enqueue  # send a Celery task by name
    stakes: StakeCache = field(default_factory=StakeCache)  # recent stake reads (marketplace.stakes)

    @property
    def domain(self) -> Domain:
        """What every signed request, proof, verdict and reveal to this marketplace is signed under: its chain and
        its GridStaking contract (so a signature for another deployment on the same chain is refused)."""
        d = self.__dict__.get("_domain")
        if d is None:
            d = self.__dict__["_domain"] = Domain(self.chain_id, self.contracts.staking.address)
        return d

    def referee_plans(self, here: bool = False, build: str | None = None) -> frozenset[Any]:
        """The execution plans this marketplace's referee replays bit for bit (settings.referee_plans; see
        :func:`marketplace.referee.exact_plans`), read from the settings on each call. ``here``: the referee itself
        (a worker), which must run each of them on this machine, with the CPU kernels the marketplace says a
        referee computes with (settings.referee_build, or a referee pool's): else verifiers would bond disputes it
        cannot judge; with ``build``, the kernels a disputed unit was computed with, it must be the very referee
        for that work (:meth:`referee_for`): a dispute on another referee's queue is refused, not judged."""
        from marketplace.referee import exact_plans
        from node.device import kernel_build

        mine = kernel_build("cpu")
        if here and build is not None and self.referee_for(build) != mine:
            raise GridMintValueError(f"this dispute is for the referee computing with {self.referee_for(build)}, "
                                     f"this worker computes with {mine}")
        if here and not self.referee_pool_here() and mine != self.referee_build():
            raise GridMintValueError(f"GRIDMINT_REFEREE_BUILD says the referee computes with "
                                     f"{self.referee_build()}, this worker computes with {mine}: set it "
                                     f"to what `gridmint node probe` prints on the workers, or name this worker's "
                                     f"kernels in GRIDMINT_REFEREE_POOLS")
        plans = exact_plans(self.settings.referee_plans, here)
        if here and any(p.device == "cuda" for p in plans) and kernel_build("cuda") not in self.referee_gpu_builds():
            raise GridMintValueError(f"GRIDMINT_REFEREE_GPU_BUILDS names {sorted(self.referee_gpu_builds())}, this "
                                     f"worker computes GPU work with {kernel_build('cuda')}: verifiers would bond "
                                     f"disputes it cannot replay bit for bit")
        return plans

    def referee_build(self) -> str:
        """The CPU kernels the referee replays with (settings.referee_build, or this machine's)."""
        return referee_build(self.settings)

    def referee_builds(self) -> frozenset[str]:
        """Every CPU kernel build some referee worker computes with: referee_build and the referee pools'."""
        return frozenset({self.referee_build(), *pool_builds(self.settings.referee_pools)})

    def referee_gpu_builds(self) -> frozenset[str]:
        """The CUDA kernel builds the referee's GPU workers compute with (settings.referee_gpu_builds)."""
        return frozenset(pool_builds(self.settings.referee_gpu_builds))

    def referee_pool_here(self) -> bool:
        """Whether this machine computes with a referee pool's kernels (its worker referees that pool's work)."""
        from node.device import kernel_build

        return kernel_build("cpu") in pool_builds(self.settings.referee_pools)

    def referee_for(self, build: str) -> str:
        """The kernels of the referee that judges work computed with ``build``: its pool's, where one computes with
        them, else the default referee's (referee_build)."""
        pool = judging_pool(build, pool_builds(self.settings.referee_pools))
        return pool if pool is not None else self.referee_build()

    def referee_queue(self, build: str, fallen_back: bool = False) -> str | None:
        """The Celery queue of the referee that judges work computed with ``build`` (None: the default queue; so
        too once the dispute has ``fallen_back``)."""
        pool = judging_pool(build, pool_builds(self.settings.referee_pools), fallen_back)
        return pool_queue(pool) if pool is not None else None


def referee_build(settings: Settings) -> str:
    """The CPU kernels the (default) referee replays with: settings.referee_build, or this machine's (unless they
    are a referee pool's: then the default referee computes with other kernels, which must be named)."""
    from node.device import kernel_build

    if settings.referee_build:
        return settings.referee_build
    here = kernel_build("cpu")
    if here in pool_builds(settings.referee_pools):
        raise GridMintValueError(f"this machine computes with a referee pool's kernels ({here}): set "
                                 f"GRIDMINT_REFEREE_BUILD to the default referee's (what `gridmint node probe` "
                                 f"prints on its workers)")
    return here


def pool_queue(build: str) -> str:
    """The Celery queue of the referee pool computing with kernel ``build`` (a short stable name: a build may hold
    characters a queue name should not)."""
    import hashlib

    return "referee." + hashlib.sha256(build.encode()).hexdigest()[:16]


_current: Runtime | None = None


def set_runtime(rt: Runtime | None) -> None:
    global _current
    _current = rt


def get_runtime() -> Runtime:
    """The runtime of this process. A Celery worker builds it from its settings on first use."""
    global _current
    if _current is None:
        from marketplace.bootstrap import runtime_from_settings

        _current = runtime_from_settings(Settings())
    return _current
