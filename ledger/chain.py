"""A Web3 connection that signs transactions locally, identical on the in-process py-evm chain and a JSON-RPC node.

``Chain.in_process()`` runs py-evm (eth-tester) in this process; ``Chain.http(url)`` talks to any node (a Hardhat
node in development). Transactions are always signed with a ``LocalAccount`` and sent raw, so one code path serves
both backends; reverts raise the domain errors of ``ledger.errors`` with the decoded custom error.
"""
from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any, Literal

import requests
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_tester import EthereumTester, PyEVMBackend
from eth_tester.backends.pyevm.main import get_default_account_keys
from eth_tester.exceptions import TransactionFailed
from web3 import EthereumTesterProvider, HTTPProvider, Web3
from web3.providers.rpc.utils import REQUEST_RETRY_ALLOWLIST, ExceptionRetryConfiguration
from web3.contract import Contract
from web3.exceptions import ContractLogicError, TimeExhausted, TransactionNotFound, Web3Exception
from web3.types import RPCEndpoint, RPCResponse, TxReceipt

from ledger import fast_ecdsa
from ledger.contracts import ErrorDecoder, gridmint_error_decoder, load_artifact
from ledger.devchain import HARDHAT_DEFAULT_ACCOUNTS, hardhat_dev_keys
from ledger.errors import chain_error
from ledger.values import to_address, to_uint
from protocol.errors import ChainError, ChainUnavailable, GridMintValueError

Backend = Literal["in_process", "http"]

#: Tip paid per gas; dev chains only need it to be non-zero.
PRIORITY_FEE_WEI = 10**9
#: Head-room on top of eth_estimateGas (state can change between the estimate and inclusion).
GAS_MARGIN_NUM, GAS_MARGIN_DEN = 6, 5
# Absolute headroom on top of the estimate: another account's transaction mined between estimate and send can flip a
# storage slot this one writes from non-zero to zero (e.g. a provider claims while its release is in flight), and a
# zero -> non-zero SSTORE then costs ~17k more than estimated. Seen as 'ran out of gas' on a Hardhat node.
GAS_HEADROOM = 30_000

#: Transport failures talking to a JSON-RPC node. requests' ConnectionError is not a subclass of the builtin one, which
#: is all web3's default retry policy names, so without this list a dropped keep-alive connection is never retried.
#: Node's HTTP server closes a kept-alive connection after 5 s idle; a client that reuses it at that moment (a beat
#: task every 5 s does) gets 'Remote end closed connection without response'.
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError, TimeoutError,
)
#: HTTP statuses of a node that is busy or refuses a request's size for now (5xx too): ChainUnavailable, retried.
TRANSIENT_HTTP = frozenset({408, 413, 429})
#: Tries (and the first back-off, doubled per try) for one request that failed in transport.
TRANSPORT_RETRIES, TRANSPORT_BACKOFF_S = 6, 0.1
#: Methods safe to resend: web3's read-only eth_/net_ list. Not eth_sendRawTransaction (``Chain.transact`` resends it
#: itself, after checking by hash whether the lost attempt reached the node) nor the evm_/admin_ namespaces web3 also
#: lists (a resent evm_increaseTime or evm_revert would act twice).
_RETRY_ALLOWLIST = [m for m in REQUEST_RETRY_ALLOWLIST
                    if m.startswith(("eth_", "net")) and m != "eth_sendRawTransaction"]

# Process-wide per-(chain, account) locks and next nonces, shared by every Chain object in this process that talks to
# the same node: two threads (or two clients) sending as one account never pick the same nonce.
_registry_guard = threading.Lock()
_nonce_locks: dict[tuple[str, str], threading.Lock] = {}
_op_locks: dict[tuple[str, str], threading.RLock] = {}
_next_nonce: dict[tuple[str, str], int] = {}


def _lock_for(table: dict[tuple[str, str], Any], key: tuple[str, str], factory: Any) -> Any:
    with _registry_guard:
        lock = table.get(key)
        if lock is None:
            lock = table[key] = factory()
        return lock


class _RetryingHTTPProvider(HTTPProvider):
    """HTTPProvider whose read-only requests are resent on a transport failure (``TRANSPORT_ERRORS``, with back-off)
    and whose final transport failure is a ``ChainUnavailable``: callers see one domain error for 'node unreachable',
    which the marketplace's Celery tasks retry."""

    def __init__(self, url: str, *, timeout: float) -> None:
        retry = ExceptionRetryConfiguration(errors=TRANSPORT_ERRORS, retries=TRANSPORT_RETRIES,
                                            backoff_factor=TRANSPORT_BACKOFF_S, method_allowlist=_RETRY_ALLOWLIST)
        super().__init__(url, request_kwargs={"timeout": timeout}, exception_retry_configuration=retry)

    def _make_request(self, method: RPCEndpoint, request_data: bytes) -> bytes:
        try:
            return super()._make_request(method, request_data)
        except TRANSPORT_ERRORS as exc:
            # neither the URL's credentials or path (a hosted node's API key) nor the transport's text (it repeats
            # the path) go into the error: a marketplace answers it to anonymous callers
            raise ChainUnavailable(f"chain node {redact_url(str(self.endpoint_uri))} unreachable during {method} "
                                   f"({type(exc).__name__})") from exc
        except requests.exceptions.HTTPError as exc:  # (its text repeats the URL: a hosted node's API key)
            answer = exc.response
            code = None if answer is None else answer.status_code
            status = "?" if answer is None else f"{answer.status_code} {answer.reason or ''}".strip()
            said = f"chain node {redact_url(str(self.endpoint_uri))} answered HTTP {status} to {method}"
            # a busy or failing node (retry later) or a query too large (asked again smaller); any other 4xx (a
            # wrong URL, an API key refused) is no outage: retrying would not help, and a stake check that takes an
            # outage for "no answer yet" must not pass on it
            err = ChainUnavailable(said) if code in TRANSIENT_HTTP or (code or 0) >= 500 else ChainError(said)
            err.http_status = code  # type: ignore[attr-defined]
            raise err from exc


def redact_url(url: str) -> str:
    """``scheme://host:port`` of ``url``: no user, password, path or query (where hosted nodes keep API keys)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        host = parts.hostname or "?"
        return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")
    except ValueError:
        return "<chain url>"


class _SerializedTesterProvider(EthereumTesterProvider):
    """EthereumTesterProvider that serialises requests: py-evm is not thread-safe, callers may be."""

    def __init__(self, tester: EthereumTester) -> None:
        super().__init__(tester)
        self._request_lock = threading.RLock()

    def make_request(self, method: RPCEndpoint, params: Any) -> RPCResponse:
        with self._request_lock:
            return super().make_request(method, params)


class Chain:
    """A Web3 connection that sends locally signed transactions.

    Use ``Chain.in_process()`` (py-evm, a fresh chain per call) or ``Chain.http(url)`` (any JSON-RPC node).
    """

    def __init__(
        self,
        w3: Web3,
        *,
        backend: Backend,
        key: str,
        dev_keys: Sequence[str],
        tester: EthereumTester | None = None,
        receipt_timeout: float = 120.0,
    ) -> None:
        self.w3 = w3
        self.backend: Backend = backend
        self.chain_id: int = int(w3.eth.chain_id)
        self.receipt_timeout = receipt_timeout
        self._key = key  # identifies the node for the process-wide nonce registry
        self._dev_keys = list(dev_keys)
        self._tester = tester

    @classmethod
    def in_process(cls) -> Chain:
        """A fresh in-memory py-evm chain (eth-tester); its 10 default accounts hold 1,000,000 ETH each.

        Installs ``ledger.fast_ecdsa`` (memoised sender recovery), which roughly halves each transaction's time."""
        fast_ecdsa.install()
        tester = EthereumTester(PyEVMBackend())
        keys = [key.to_hex() for key in get_default_account_keys()]
        w3 = Web3(_SerializedTesterProvider(tester))
        return cls(w3, backend="in_process", key=f"py-evm:{uuid.uuid4()}", dev_keys=keys, tester=tester)

    @classmethod
    def http(cls, url: str, *, timeout: float = 30.0, dev_keys: Sequence[str] | None = None) -> Chain:
        """A JSON-RPC node at ``url``. ``dev_accounts()`` defaults to Hardhat's funded dev keys."""
        w3 = Web3(_RetryingHTTPProvider(url, timeout=timeout))
        keys = list(dev_keys) if dev_keys is not None else hardhat_dev_keys(HARDHAT_DEFAULT_ACCOUNTS)
        return cls(w3, backend="http", key=f"http:{url}", dev_keys=keys)

    def dev_accounts(self, n: int | None = None) -> list[LocalAccount]:
        """Accounts funded with ETH on this dev chain (at most 10 in-process, 20 on a Hardhat node)."""
        keys = self._dev_keys if n is None else self._dev_keys[:n]
        if n is not None and n > len(self._dev_keys):
            raise GridMintValueError(f"{self.backend} chain has {len(self._dev_keys)} dev accounts, {n} requested")
        return [Account.from_key(k) for k in keys]

    def snapshot(self) -> str:
        """Snapshot the chain state (dev chains only: py-evm, Hardhat). Returns an id for ``revert``."""
        if self._tester is not None:
            return str(self._tester.take_snapshot())
        return str(self._rpc("evm_snapshot", []))

    def revert(self, snapshot_id: str) -> None:
        """Return to ``snapshot_id``. On Hardhat a snapshot is used up by ``revert``: take a new one each time.

        Forgets this process's cached nonces for the chain, since reverted transactions no longer count.
        """
        if self._tester is not None:
            self._tester.revert_to_snapshot(int(snapshot_id))
        elif self._rpc("evm_revert", [snapshot_id]) is not True:
            raise ChainError(f"evm_revert: unknown or used snapshot {snapshot_id}")
        with _registry_guard:
            for key in [k for k in _next_nonce if k[0] == self._key]:
                del _next_nonce[key]

    def timestamp(self) -> int:
        """Timestamp of the latest block (seconds)."""
        return int(self.w3.eth.get_block("latest")["timestamp"])

    def advance_time(self, seconds: int) -> int:
        """Dev chains only: mine a block ``seconds`` later than the latest one; returns its timestamp.

        Use it to pass unbonding delays, dispute windows and timelock delays in tests and the demo.
        """
        seconds = to_uint(seconds, "seconds", 64)
        if self._tester is not None:
            target = self.timestamp() + max(seconds, 1)
            # eth-tester mines its block at one second before the time asked for, and keeps that time for the
            # pending block: ask one more, so the latest block stands at ``target`` (as on Hardhat) and a second
            # call moves time on again
            self._tester.time_travel(target + 1)
            return target
        self._rpc("evm_increaseTime", [seconds])
        self._rpc("evm_mine", [])
        return self.timestamp()

    def account_lock(self, address: str) -> threading.RLock:
        """This process's lock for multi-transaction operations of ``address`` on this chain (approve + act)."""
        lock: threading.RLock = _lock_for(_op_locks, (self._key, to_address(address)), threading.RLock)
        return lock

    def _rpc(self, method: str, params: list[Any]) -> Any:
        response = self.w3.provider.make_request(RPCEndpoint(method), params)
        if "error" in response:
            raise ChainError(f"{method} failed: {response['error']}")
        return response.get("result")

    def eth_balance(self, address: str) -> int:
        return int(self.w3.eth.get_balance(to_address(address)))

    def send_eth(self, from_account: LocalAccount, to: str, wei: int) -> TxReceipt:
        """Send ``wei`` ETH from ``from_account`` to ``to``; returns the receipt."""
        to = to_address(to)
        gas = 21_000 if not self.w3.eth.get_code(to) else None
        return self.transact(from_account, to=to, value=to_uint(wei, "wei"), gas=gas, label="send_eth")

    def transact(
        self,
        account: LocalAccount,
        *,
        to: str | None,
        data: bytes | str = b"",
        value: int = 0,
        gas: int | None = None,
        errors: ErrorDecoder | None = None,
        label: str = "transaction",
    ) -> TxReceipt:
        """Sign ``account``'s transaction locally, send it raw and wait for the receipt.

        Without ``gas`` the transaction is first simulated with ``eth_estimateGas``, which also turns a revert into a
        ChainError before anything is sent. A mined transaction with status 0 raises ChainError too (its revert is
        decoded by replaying it on the parent block). ``to=None`` deploys ``data`` as a contract.
        """
        tx: dict[str, Any] = {"from": account.address, "value": value, "data": data, "chainId": self.chain_id}
        if to is not None:
            tx["to"] = to
        if gas is None:
            try:
                estimate = int(self.w3.eth.estimate_gas(tx))  # type: ignore[arg-type]
            except (TransactionFailed, Web3Exception) as exc:
                raise chain_error(exc, errors, label) from exc
            gas = estimate * GAS_MARGIN_NUM // GAS_MARGIN_DEN + GAS_HEADROOM
        tx["gas"] = gas
        base_fee = int(self.w3.eth.get_block("latest").get("baseFeePerGas", 0) or 0)
        tx["maxPriorityFeePerGas"] = PRIORITY_FEE_WEI
        tx["maxFeePerGas"] = 2 * base_fee + PRIORITY_FEE_WEI

        key = (self._key, account.address)
        with _lock_for(_nonce_locks, key, threading.Lock):
            counted = int(self.w3.eth.get_transaction_count(account.address, "pending"))
            nonce = max(counted, _next_nonce.get(key, 0))
            while True:
                tx["nonce"] = nonce
                signed = account.sign_transaction(tx)
                try:
                    tx_hash = self._send_raw(signed.raw_transaction, bytes(signed.hash), errors, label)
                    break
                except ChainError as exc:
                    # refused (a revert; "nonce too high": a transaction the node dropped left a gap below the
                    # cache) or unreachable: from now on count from the node's own pending count, not a cache past
                    # a gap for ever; a nonce the node refused, taken from the cache alone, is tried once more at
                    # the node's count
                    _next_nonce.pop(key, None)
                    if nonce == counted or "nonce" not in str(exc).lower():
                        raise
                    nonce = counted
            _next_nonce[key] = nonce + 1
        try:
            receipt = self.w3.eth.wait_for_transaction_receipt(
                tx_hash, timeout=self.receipt_timeout, poll_latency=0.01
            )
        except TimeExhausted as exc:
            if not self._knows_tx(bytes(tx_hash)):  # dropped by the node: its nonce is free again
                with _lock_for(_nonce_locks, key, threading.Lock):
                    if _next_nonce.get(key) == nonce + 1:
                        _next_nonce.pop(key, None)
            raise ChainError(f"{label}: no receipt for 0x{bytes(tx_hash).hex()} after {self.receipt_timeout}s") from exc
        if receipt["status"] != 1:
            raise self._failed_receipt_error(tx, receipt, errors, label)
        return receipt

    def _send_raw(self, raw: bytes, tx_hash: bytes, errors: ErrorDecoder | None, label: str) -> bytes:
        """Send a signed transaction, exactly once even when the connection drops.

        A transport failure leaves it unknown whether the node got the transaction. The same signed bytes can only
        ever be mined once (same nonce, same hash), so: ask the node for the hash; if it has it, done; if not,
        resend. An error reply to a resend (e.g. 'nonce too low') is only believed when the node still does not know
        the hash."""
        lost: BaseException | None = None
        for attempt in range(TRANSPORT_RETRIES):
            if lost is not None:
                time.sleep(TRANSPORT_BACKOFF_S * 2 ** (attempt - 1))
                if self._knows_tx(tx_hash):
                    return tx_hash
            try:
                return bytes(self.w3.eth.send_raw_transaction(raw))
            except ChainUnavailable as exc:
                lost = exc
            except (TransactionFailed, Web3Exception, ValueError) as exc:
                # Hardhat's automine executes the transaction inside eth_sendRawTransaction and reports a revert
                # there (the nonce is then used). The cached nonce is not advanced: the next send re-reads it.
                if lost is not None and self._knows_tx(tx_hash):
                    return tx_hash
                raise chain_error(exc, errors, label) from exc
        assert lost is not None
        raise lost

    def _knows_tx(self, tx_hash: bytes) -> bool:
        """Whether the node has the transaction (pending or mined). Unreachable counts as no: the caller then resends,
        which is harmless, since the node refuses a second copy of a signed transaction."""
        try:
            self.w3.eth.get_transaction(tx_hash)  # type: ignore[arg-type]
        except (TransactionNotFound, ChainUnavailable):
            return False
        return True

    def call(self, contract_fn: Any, *, errors: ErrorDecoder | None = None, label: str = "call") -> Any:
        """Run a bound contract function read-only (``contract.functions.x(args)``); reverts raise ChainError."""
        try:
            return contract_fn.call()
        except (TransactionFailed, ContractLogicError) as exc:
            raise chain_error(exc, errors, label) from exc

    def deploy_contract(self, account: LocalAccount, name: str, *args: Any) -> Contract:
        """Deploy artifact ``name`` with constructor ``args``; returns the bound contract."""
        abi, bytecode = load_artifact(name)
        data = self.w3.eth.contract(abi=abi, bytecode=bytecode).constructor(*args).data_in_transaction
        receipt = self.transact(account, to=None, data=data, errors=gridmint_error_decoder(), label=f"deploy {name}")
        address = receipt["contractAddress"]
        if address is None:  # pragma: no cover - a successful creation always has one
            raise ChainError(f"deploy {name}: receipt has no contract address")
        return self.w3.eth.contract(address=address, abi=abi)

    def _failed_receipt_error(
        self, tx: dict[str, Any], receipt: TxReceipt, errors: ErrorDecoder | None, label: str
    ) -> ChainError:
        replay = {k: tx[k] for k in ("from", "to", "data", "value", "gas") if k in tx}
        try:
            self.w3.eth.call(replay, block_identifier=receipt["blockNumber"] - 1)  # type: ignore[arg-type]
        except (TransactionFailed, Web3Exception) as exc:
            return chain_error(exc, errors, label)
        tx_hash = bytes(receipt["transactionHash"]).hex()
        return ChainError(f"{label}: transaction 0x{tx_hash} failed (status 0, gas used {receipt['gasUsed']})")
