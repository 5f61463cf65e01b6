"""EVM chain client for the GridMint contracts, identical on the in-process py-evm chain and a JSON-RPC node.

- ``Chain``: a Web3 connection plus locally signed transaction sending (``Chain.in_process()`` / ``Chain.http(url)``).
  Transactions are always signed with a ``LocalAccount`` and sent raw, so one code path serves both backends.
- ``deploy()``: deploys GridToken, GridStaking and JobEscrow and returns a ``Deployment`` (JSON-serialisable).
- ``GridMintContracts``: one typed client over the three contracts, acting as one account.

Money is ``int`` base units (18 decimals) everywhere. Reverts raise ``protocol.errors.ChainError`` whose
``error_name``/``error_args`` hold the decoded custom error, e.g. ``("EscrowInsufficientFunds", (job_id, 0, 5))``;
both backends give the same name and args for the same revert.
"""
from __future__ import annotations

import ast
import json
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_tester import EthereumTester, PyEVMBackend
from eth_tester.backends.pyevm.main import get_default_account_keys
from eth_tester.exceptions import TransactionFailed
from eth_typing import ChecksumAddress
from eth_utils import is_address, keccak, to_checksum_address
from web3 import EthereumTesterProvider, HTTPProvider, Web3
from web3.contract import Contract
from web3.exceptions import ContractLogicError, TimeExhausted, Web3Exception, Web3RPCError
from web3.logs import DISCARD
from web3.types import RPCEndpoint, RPCResponse, TxReceipt

from ledger.contracts import DecodedError, ErrorDecoder, gridmint_error_decoder, load_artifact
from ledger.devchain import HARDHAT_DEFAULT_ACCOUNTS, hardhat_dev_keys
from protocol.errors import ChainError, GridMintValueError

Backend = Literal["in_process", "http"]

#: Tip paid per gas; dev chains only need it to be non-zero.
PRIORITY_FEE_WEI = 10**9
#: Head-room on top of eth_estimateGas (state can change between the estimate and inclusion).
GAS_MARGIN_NUM, GAS_MARGIN_DEN = 6, 5
# Absolute headroom on top of the estimate: another account's transaction mined between estimate and send can flip a
# storage slot this one writes from non-zero to zero (e.g. a provider claims while its release is in flight), and a
# zero -> non-zero SSTORE then costs ~17k more than estimated. Seen as 'ran out of gas' on a Hardhat node.
GAS_HEADROOM = 30_000
MAX_UINT256 = 2**256 - 1

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
        """A fresh in-memory py-evm chain (eth-tester); its 10 default accounts hold 1,000,000 ETH each."""
        tester = EthereumTester(PyEVMBackend())
        keys = [key.to_hex() for key in get_default_account_keys()]
        w3 = Web3(_SerializedTesterProvider(tester))
        return cls(w3, backend="in_process", key=f"py-evm:{uuid.uuid4()}", dev_keys=keys, tester=tester)

    @classmethod
    def http(cls, url: str, *, timeout: float = 30.0, dev_keys: Sequence[str] | None = None) -> Chain:
        """A JSON-RPC node at ``url``. ``dev_accounts()`` defaults to Hardhat's funded dev keys."""
        w3 = Web3(HTTPProvider(url, request_kwargs={"timeout": timeout}))
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
                raise _chain_error(exc, errors, label) from exc
            gas = estimate * GAS_MARGIN_NUM // GAS_MARGIN_DEN + GAS_HEADROOM
        tx["gas"] = gas
        base_fee = int(self.w3.eth.get_block("latest").get("baseFeePerGas", 0) or 0)
        tx["maxPriorityFeePerGas"] = PRIORITY_FEE_WEI
        tx["maxFeePerGas"] = 2 * base_fee + PRIORITY_FEE_WEI

        key = (self._key, account.address)
        with _lock_for(_nonce_locks, key, threading.Lock):
            nonce = max(int(self.w3.eth.get_transaction_count(account.address, "pending")), _next_nonce.get(key, 0))
            tx["nonce"] = nonce
            signed = account.sign_transaction(tx)
            try:
                tx_hash = self.w3.eth.send_raw_transaction(signed.raw_transaction)
            except (TransactionFailed, Web3Exception, ValueError) as exc:
                # Hardhat's automine executes the transaction inside eth_sendRawTransaction and reports a revert
                # there (the nonce is then used). The cached nonce is not advanced: the next send re-reads it.
                raise _chain_error(exc, errors, label) from exc
            _next_nonce[key] = nonce + 1
        try:
            receipt = self.w3.eth.wait_for_transaction_receipt(
                tx_hash, timeout=self.receipt_timeout, poll_latency=0.01
            )
        except TimeExhausted as exc:
            raise ChainError(f"{label}: no receipt for 0x{bytes(tx_hash).hex()} after {self.receipt_timeout}s") from exc
        if receipt["status"] != 1:
            raise self._failed_receipt_error(tx, receipt, errors, label)
        return receipt

    def call(self, contract_fn: Any, *, errors: ErrorDecoder | None = None, label: str = "call") -> Any:
        """Run a bound contract function read-only (``contract.functions.x(args)``); reverts raise ChainError."""
        try:
            return contract_fn.call()
        except (TransactionFailed, ContractLogicError) as exc:
            raise _chain_error(exc, errors, label) from exc

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
            return _chain_error(exc, errors, label)
        tx_hash = bytes(receipt["transactionHash"]).hex()
        return ChainError(f"{label}: transaction 0x{tx_hash} failed (status 0, gas used {receipt['gasUsed']})")


# -- revert decoding -------------------------------------------------------------------------------------------------


def _revert_payload(exc: BaseException) -> bytes | str | None:
    """Raw revert bytes from either backend's exception, else a text reason, else None.

    py-evm: eth-tester raises ``TransactionFailed("execution reverted: b'...'")`` (the bytes survive only as their
    repr, which ``ast.literal_eval`` reads back safely). JSON-RPC: web3 raises ``ContractCustomError`` /
    ``ContractLogicError`` with ``.data`` as 0x-hex, or ``Web3RPCError`` whose response carries ``error.data``.
    """
    data: Any = None
    if isinstance(exc, TransactionFailed):
        first: Any = exc.args[0] if exc.args else ""
        if isinstance(first, BaseException):
            first = first.args[0] if first.args else ""
        if isinstance(first, bytes):
            return first
        text = str(first).removeprefix("execution reverted: ")
        if text[:2] in ("b'", 'b"'):
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = None
            if isinstance(value, bytes):
                return value
        return text
    if isinstance(exc, ContractLogicError):
        data = exc.data
    elif isinstance(exc, Web3RPCError) and isinstance(exc.rpc_response, dict):
        error = exc.rpc_response.get("error")
        data = error.get("data") if isinstance(error, dict) else None
    if isinstance(data, dict):  # some nodes nest it: {"data": "0x...", "message": ...}
        data = data.get("data")
    if isinstance(data, str) and data.startswith("0x"):
        try:
            return bytes.fromhex(data[2:])
        except ValueError:
            return None
    return None


def _chain_error(exc: BaseException, errors: ErrorDecoder | None, label: str) -> ChainError:
    payload = _revert_payload(exc)
    if isinstance(payload, bytes):
        decoded = (errors or _BUILTIN_DECODER).decode(payload)
        return ChainError(f"{label} reverted: {decoded}", error_name=decoded.name, error_args=decoded.args)
    reason = payload if isinstance(payload, str) and payload else str(exc)
    return ChainError(f"{label} failed: {reason}")


_BUILTIN_DECODER = ErrorDecoder([])


# -- value checks ----------------------------------------------------------------------------------------------------


def to_bytes32(value: bytes | str, what: str = "id") -> bytes:
    """A 32-byte id (job, unit, evidence) from ``bytes`` or a ``0x``-hex string."""
    if isinstance(value, (bytes, bytearray)):
        raw = bytes(value)
    elif isinstance(value, str) and value.startswith(("0x", "0X")):
        try:
            raw = bytes.fromhex(value[2:])
        except ValueError as exc:
            raise GridMintValueError(f"{what} is not hex: {value!r}") from exc
    else:
        raise GridMintValueError(f"{what} must be 32 bytes or a 0x-hex string, got {type(value).__name__}: {value!r}")
    if len(raw) != 32:
        raise GridMintValueError(f"{what} must be 32 bytes, got {len(raw)}: {value!r}")
    return raw


def to_address(value: str) -> ChecksumAddress:
    """Checksummed address; GridMintValueError if ``value`` is not one."""
    if not isinstance(value, str) or not is_address(value):
        raise GridMintValueError(f"not an address: {value!r}")
    return to_checksum_address(value)


def to_uint(value: int, what: str = "amount") -> int:
    """A uint256 amount in base units. Floats and bools are refused: money is never a float."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise GridMintValueError(f"{what} must be an int in base units, got {type(value).__name__}: {value!r}")
    if not 0 <= value <= MAX_UINT256:
        raise GridMintValueError(f"{what} out of uint256 range: {value}")
    return value


# -- deployment ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Deployment:
    """Where the GridMint contracts live on one chain. Addresses are checksummed."""

    chain_id: int
    token: str
    staking: str
    escrow: str
    treasury: str

    def to_json(self, path: str | Path | None = None) -> str:
        """JSON text of this deployment; also written to ``path`` if given."""
        text = json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, path: str | Path) -> Deployment:
        """Read a deployment written by ``to_json(path)``."""
        try:
            data = json.loads(Path(path).read_text())
            return cls(
                chain_id=int(data["chain_id"]),
                token=to_address(data["token"]),
                staking=to_address(data["staking"]),
                escrow=to_address(data["escrow"]),
                treasury=to_address(data["treasury"]),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise GridMintValueError(f"not a GridMint deployment file: {path} ({exc})") from exc


def deploy(chain: Chain, deployer: LocalAccount, *, supply: int, treasury: str, bounty_bps: int = 5000) -> Deployment:
    """Deploy GridToken (whole ``supply`` to ``deployer``), GridStaking and JobEscrow.

    ``deployer`` gets DEFAULT_ADMIN_ROLE, GUARDIAN_ROLE, SLASHER_ROLE (staking) and SETTLER_ROLE (escrow).
    ``bounty_bps`` is the verifier's share of each slash in basis points (the rest goes to ``treasury``).
    """
    treasury = to_address(treasury)
    token = chain.deploy_contract(deployer, "GridToken", deployer.address, to_uint(supply, "supply"))
    staking = chain.deploy_contract(deployer, "GridStaking", token.address, deployer.address, treasury, bounty_bps)
    escrow = chain.deploy_contract(deployer, "JobEscrow", token.address, deployer.address)
    deployment = Deployment(chain.chain_id, token.address, staking.address, escrow.address, treasury)
    client = GridMintContracts(chain, deployment, deployer)
    for role in ("GUARDIAN_ROLE", "SLASHER_ROLE", "SETTLER_ROLE"):
        client.grant_role(role, deployer.address)
    return deployment


# -- the client ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobState:
    """An escrowed job. ``remaining`` is what the escrow still holds for it: funded - released, or 0 once closed."""

    customer: str
    funded: int
    released: int
    closed: bool
    remaining: int


#: Which contracts each role lives on. The token has no roles.
ROLE_CONTRACTS: dict[str, tuple[str, ...]] = {
    "DEFAULT_ADMIN_ROLE": ("staking", "escrow"),
    "GUARDIAN_ROLE": ("staking", "escrow"),
    "SLASHER_ROLE": ("staking",),
    "SETTLER_ROLE": ("escrow",),
}
PAUSABLE = ("staking", "escrow")


def role_id(role_name: str) -> bytes:
    """bytes32 id of an AccessControl role (``DEFAULT_ADMIN_ROLE`` is zero, others ``keccak256(name)``)."""
    if role_name not in ROLE_CONTRACTS:
        raise GridMintValueError(f"unknown role {role_name!r}; known: {', '.join(ROLE_CONTRACTS)}")
    return b"\x00" * 32 if role_name == "DEFAULT_ADMIN_ROLE" else keccak(text=role_name)


class GridMintContracts:
    """GridToken + GridStaking + JobEscrow, acting as ``account`` (which signs every transaction).

    Write methods wait for the receipt and raise ChainError on a revert. ``slash``, ``release``, ``close_job`` and
    ``claim`` are idempotent: they check first and return False/0 without sending when there is nothing to do, and a
    lost race (another sender got there first) also returns False/0 instead of raising.
    """

    def __init__(self, chain: Chain, deployment: Deployment, account: LocalAccount) -> None:
        if deployment.chain_id != chain.chain_id:
            raise GridMintValueError(f"deployment is for chain {deployment.chain_id}, connected to {chain.chain_id}")
        self.chain = chain
        self.deployment = deployment
        self.account = account
        eth = chain.w3.eth
        self.token = eth.contract(address=to_address(deployment.token), abi=load_artifact("GridToken")[0])
        self.staking = eth.contract(address=to_address(deployment.staking), abi=load_artifact("GridStaking")[0])
        self.escrow = eth.contract(address=to_address(deployment.escrow), abi=load_artifact("JobEscrow")[0])
        self._errors = gridmint_error_decoder()

    @property
    def address(self) -> str:
        return str(self.account.address)

    def as_account(self, account: LocalAccount) -> GridMintContracts:
        """The same deployment, acting as another account."""
        return GridMintContracts(self.chain, self.deployment, account)

    # token

    def total_supply(self) -> int:
        return int(self._call(self.token, "totalSupply"))

    def balance_of(self, address: str) -> int:
        return int(self._call(self.token, "balanceOf", to_address(address)))

    def transfer(self, to: str, amount: int) -> TxReceipt:
        return self._send(self.token, "transfer", to_address(to), to_uint(amount))

    def contract_balances(self) -> dict[str, int]:
        """GMT held by the staking and escrow contracts."""
        return {"staking": self.balance_of(self.staking.address), "escrow": self.balance_of(self.escrow.address)}

    # staking

    def stake(self, amount: int) -> TxReceipt:
        """Approve (if the allowance is short) and stake ``amount``; returns the stake receipt."""
        amount = to_uint(amount)
        with self._account_op():
            self._ensure_allowance(self.staking.address, amount)
            return self._send(self.staking, "stake", amount)

    def unstake(self, amount: int) -> TxReceipt:
        return self._send(self.staking, "unstake", to_uint(amount))

    def stake_of(self, address: str) -> int:
        return int(self._call(self.staking, "stakeOf", to_address(address)))

    def total_staked(self) -> int:
        return int(self._call(self.staking, "totalStaked"))

    def evidence_used(self, evidence: bytes | str) -> bool:
        return bool(self._call(self.staking, "evidenceUsed", to_bytes32(evidence, "evidence")))

    def slash(self, provider: str, amount: int, verifier: str, evidence: bytes | str) -> bool:
        """Slash up to ``amount`` of ``provider``'s stake for ``evidence`` (needs SLASHER_ROLE).

        Exactly-once per evidence: returns False, sending nothing, if the evidence was already used.
        """
        ev = to_bytes32(evidence, "evidence")
        if self.evidence_used(ev):
            return False
        try:
            self._send(self.staking, "slash", to_address(provider), to_uint(amount), to_address(verifier), ev)
        except ChainError as exc:
            if exc.error_name == "StakingEvidenceUsed":
                return False
            raise
        return True

    # escrow

    def fund_job(self, job_id: bytes | str, amount: int) -> TxReceipt:
        """Approve (if the allowance is short) and fund ``job_id``; the first funder becomes the job's customer."""
        amount = to_uint(amount)
        with self._account_op():
            self._ensure_allowance(self.escrow.address, amount)
            return self._send(self.escrow, "fund", to_bytes32(job_id, "job_id"), amount)

    def fund_job_with_permit(self, job_id: bytes | str, amount: int, *, ttl_s: int = 3600) -> TxReceipt:
        """Fund ``job_id`` in one transaction: signs an EIP-2612 permit (valid ``ttl_s`` seconds) with this account's
        key and calls ``fundWithPermit``."""
        amount, job = to_uint(amount), to_bytes32(job_id, "job_id")
        with self._account_op():
            deadline = int(self.chain.w3.eth.get_block("latest")["timestamp"]) + ttl_s
            v, r, s = self._sign_permit(self.escrow.address, amount, deadline)
            return self._send(self.escrow, "fundWithPermit", job, amount, deadline, v, r, s)

    def get_job(self, job_id: bytes | str) -> JobState:
        customer, funded, released, closed = self._call(self.escrow, "getJob", to_bytes32(job_id, "job_id"))
        remaining = 0 if closed else int(funded) - int(released)
        return JobState(to_checksum_address(customer), int(funded), int(released), bool(closed), remaining)

    def unit_released(self, job_id: bytes | str, unit_id: bytes | str) -> bool:
        return bool(self._call(self.escrow, "unitReleased", to_bytes32(job_id, "job_id"), to_bytes32(unit_id, "unit_id")))

    def release(self, job_id: bytes | str, unit_id: bytes | str, provider: str, amount: int) -> bool:
        """Pay ``amount`` of ``job_id``'s escrow to ``provider`` for unit ``unit_id`` (needs SETTLER_ROLE).

        Idempotent per (job, unit): returns False, sending nothing, if that unit was already released.
        """
        job, unit = to_bytes32(job_id, "job_id"), to_bytes32(unit_id, "unit_id")
        if self.unit_released(job, unit):
            return False
        try:
            self._send(self.escrow, "release", job, unit, to_address(provider), to_uint(amount))
        except ChainError as exc:
            if exc.error_name == "EscrowUnitAlreadyReleased":
                return False
            raise
        return True

    def close_job(self, job_id: bytes | str) -> int:
        """Close ``job_id`` (as its customer or a settler) and return the refund sent to the customer.

        Idempotent: returns 0, sending nothing, if the job is already closed.
        """
        job = to_bytes32(job_id, "job_id")
        if self.get_job(job).closed:
            return 0
        try:
            receipt = self._send(self.escrow, "close", job)
        except ChainError as exc:
            if exc.error_name == "EscrowJobClosed":
                return 0
            raise
        return int(self._event_arg(self.escrow, "JobClosed", receipt, "refund"))

    def claimable(self, address: str) -> int:
        return int(self._call(self.escrow, "claimable", to_address(address)))

    def claim(self) -> int:
        """Withdraw everything released to this account; returns the amount (0, sending nothing, if none)."""
        if self.claimable(self.address) == 0:
            return 0
        try:
            receipt = self._send(self.escrow, "claim")
        except ChainError as exc:
            if exc.error_name == "EscrowNothingToClaim":
                return 0
            raise
        return int(self._event_arg(self.escrow, "Claimed", receipt, "amount"))

    # roles and the kill switch

    def has_role(self, role_name: str, address: str) -> bool:
        """True if ``address`` holds ``role_name`` on every contract that role applies to."""
        rid, addr = role_id(role_name), to_address(address)
        return all(self._call(self._contract(c), "hasRole", rid, addr) for c in ROLE_CONTRACTS[role_name])

    def grant_role(self, role_name: str, address: str) -> bool:
        """Grant ``role_name`` to ``address`` on the contracts it applies to (needs DEFAULT_ADMIN_ROLE there).

        Returns True if any grant was sent, False if ``address`` already held the role everywhere.
        """
        rid, addr = role_id(role_name), to_address(address)
        sent = False
        for name in ROLE_CONTRACTS[role_name]:
            contract = self._contract(name)
            if not self._call(contract, "hasRole", rid, addr):
                self._send(contract, "grantRole", rid, addr)
                sent = True
        return sent

    def pause_all(self) -> None:
        """Guardian kill switch: pause staking and escrow (those not yet paused). Needs GUARDIAN_ROLE."""
        for name in PAUSABLE:
            if not self._call(self._contract(name), "paused"):
                self._send(self._contract(name), "pause")

    def unpause_all(self) -> None:
        """Undo ``pause_all`` (those paused). Needs GUARDIAN_ROLE."""
        for name in PAUSABLE:
            if self._call(self._contract(name), "paused"):
                self._send(self._contract(name), "unpause")

    def paused(self) -> dict[str, bool]:
        """``{"staking": bool, "escrow": bool}``; the token itself cannot be paused."""
        return {name: bool(self._call(self._contract(name), "paused")) for name in PAUSABLE}

    # internals

    def _contract(self, name: str) -> Contract:
        return {"token": self.token, "staking": self.staking, "escrow": self.escrow}[name]

    def _call(self, contract: Contract, fn: str, *args: Any) -> Any:
        return self.chain.call(
            contract.functions[fn](*args), errors=self._errors, label=f"{self._name(contract)}.{fn}"
        )

    def _send(self, contract: Contract, fn: str, *args: Any) -> TxReceipt:
        data = contract.encode_abi(fn, args=list(args))
        return self.chain.transact(
            self.account, to=contract.address, data=data, errors=self._errors, label=f"{self._name(contract)}.{fn}"
        )

    def _name(self, contract: Contract) -> str:
        if contract.address == self.token.address:
            return "GridToken"
        return "GridStaking" if contract.address == self.staking.address else "JobEscrow"

    @contextmanager
    def _account_op(self) -> Iterator[None]:
        """Serialises this account's approve+action pairs in this process, so concurrent ones cannot overwrite each
        other's allowance (or permit nonce) between the two steps."""
        with _lock_for(_op_locks, (self.chain._key, self.address), threading.RLock):
            yield

    def _ensure_allowance(self, spender: str, amount: int) -> None:
        if int(self._call(self.token, "allowance", self.address, spender)) < amount:
            self._send(self.token, "approve", spender, amount)

    def _sign_permit(self, spender: str, value: int, deadline: int) -> tuple[int, bytes, bytes]:
        domain = {
            "name": self._call(self.token, "name"),
            "version": "1",
            "chainId": self.chain.chain_id,
            "verifyingContract": self.token.address,
        }
        types = {
            "Permit": [
                {"name": "owner", "type": "address"},
                {"name": "spender", "type": "address"},
                {"name": "value", "type": "uint256"},
                {"name": "nonce", "type": "uint256"},
                {"name": "deadline", "type": "uint256"},
            ]
        }
        message = {
            "owner": self.address,
            "spender": spender,
            "value": value,
            "nonce": int(self._call(self.token, "nonces", self.address)),
            "deadline": deadline,
        }
        signed = self.account.sign_typed_data(domain, types, message)
        return int(signed.v), int(signed.r).to_bytes(32, "big"), int(signed.s).to_bytes(32, "big")

    def _event_arg(self, contract: Contract, event: str, receipt: TxReceipt, arg: str) -> Any:
        logs = contract.events[event]().process_receipt(receipt, errors=DISCARD)
        if not logs:
            raise ChainError(f"{self._name(contract)}: receipt has no {event} event")
        return logs[0]["args"][arg]


__all__ = [
    "Chain",
    "ChainError",
    "Deployment",
    "DecodedError",
    "GridMintContracts",
    "JobState",
    "ROLE_CONTRACTS",
    "deploy",
    "role_id",
    "to_address",
    "to_bytes32",
    "to_uint",
]
