"""Build a marketplace Runtime from settings (the API process and each Celery worker call this)."""
from __future__ import annotations

from eth_account import Account
from eth_account.signers.local import LocalAccount

from ledger.evm import Chain, Deployment, GridMintContracts
from marketplace import tasks
from marketplace.blobs import BlobStore
from marketplace.db import make_sessionmaker
from marketplace.runtime import Runtime, referee_build
from marketplace.settings import Settings
from protocol.errors import GridMintValueError


def operator_account(settings: Settings) -> LocalAccount:
    """The operator's key (GRIDMINT_OPERATOR_KEY), or a readable error (which never shows the key)."""
    try:
        return Account.from_key(settings.operator_key.get_secret_value() if settings.operator_key else "")
    except (ValueError, TypeError) as exc:
        raise GridMintValueError(f"GRIDMINT_OPERATOR_KEY is not a private key (64 hex digits): {exc}") from None


def runtime_from_settings(settings: Settings) -> Runtime:
    if not settings.chain_url:
        raise GridMintValueError("GRIDMINT_CHAIN_URL is not set: the marketplace needs a chain (gridmint demo starts one)")
    if not settings.operator_key:
        raise GridMintValueError("GRIDMINT_OPERATOR_KEY is not set: the marketplace operator signs slashes and releases")
    if not settings.redis_url:
        raise GridMintValueError("GRIDMINT_REDIS_URL is not set: Celery needs a broker (gridmint demo starts one)")
    operator = operator_account(settings)
    referee_build(settings)  # on a referee pool's machine the default referee's kernels must be named: fail here
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    chain = Chain.http(settings.chain_url)
    deployment = Deployment.from_json(settings.resolved_deployment_file())
    tasks.configure(settings.redis_url)
    return Runtime(
        settings=settings,
        sessions=make_sessionmaker(settings.resolved_db_url()),
        blobs=BlobStore(settings.blob_dir()),
        chain_id=chain.chain_id,
        contracts=GridMintContracts(chain, deployment, operator),
        enqueue=tasks.enqueue,
    )
