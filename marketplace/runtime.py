"""What a marketplace process needs at run time, built once by whoever starts the process and passed down."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from sqlalchemy.orm import Session, sessionmaker

from marketplace.blobs import BlobStore
from marketplace.settings import Settings
from marketplace.stakes import StakeCache
from protocol.errors import GridMintValueError

Enqueue = Callable[[str, list[Any]], None]


@dataclass
class Runtime:
    settings: Settings
    sessions: sessionmaker[Session]
    blobs: BlobStore
    chain_id: int
    contracts: Any  # ledger.evm.GridMintContracts acting as the marketplace operator
    enqueue: Enqueue  # send a Celery task by name
    stakes: StakeCache = field(default_factory=StakeCache)  # recent stake reads (marketplace.stakes)

    def referee_plans(self, here: bool = False) -> frozenset[Any]:
        """The execution plans this marketplace's referee replays bit for bit (settings.referee_plans; see
        :func:`marketplace.referee.exact_plans`), read from the settings on each call. ``here``: the referee itself
        (a worker), which must run each of them on this machine, with the CPU kernels the marketplace says its
        referee computes with (settings.referee_build): else verifiers would bond disputes it cannot judge."""
        from marketplace.referee import exact_plans
        from node.device import kernel_build

        if here and self.referee_build() != kernel_build("cpu"):
            raise GridMintValueError(f"GRIDMINT_REFEREE_BUILD says the referee computes with "
                                     f"{self.referee_build()}, this worker computes with {kernel_build('cpu')}: set it "
                                     f"to what `gridmint node probe` prints on the workers")
        return exact_plans(self.settings.referee_plans, here)

    def referee_build(self) -> str:
        """The CPU kernels the referee replays with (settings.referee_build, or this machine's)."""
        from node.device import kernel_build

        return self.settings.referee_build or kernel_build("cpu")


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
