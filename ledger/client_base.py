"""The shared core of the typed client: bound contracts, reads, sends, roles (``GridMintContracts`` builds on it)."""
from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from eth_account.signers.local import LocalAccount
from eth_utils import keccak
from web3.contract import Contract
from web3.logs import DISCARD
from web3.types import TxReceipt

from ledger.chain import Chain
from ledger.contracts import gridmint_error_decoder, load_artifact
from ledger.deploy import Deployment
from ledger.values import to_address
from protocol.errors import ChainError, GridMintValueError

#: Contract key (as in ``Deployment``) -> artifact name.
ARTIFACTS: dict[str, str] = {
    "token": "GridToken",
    "staking": "GridStaking",
    "escrow": "JobEscrow",
    "distributor": "PayoutDistributor",
    "kill_switch": "GridKillSwitch",
    "timelock": "GridTimelock",
    "lens": "GridLens",
}

#: Which contracts each role lives on. The token has no roles.
ROLE_CONTRACTS: dict[str, tuple[str, ...]] = {
    "DEFAULT_ADMIN_ROLE": ("staking", "escrow", "distributor"),
    "GUARDIAN_ROLE": ("staking", "escrow", "distributor"),
    "GOVERNOR_ROLE": ("staking", "escrow", "distributor"),
    "SLASHER_ROLE": ("staking",),
    "LOCKER_ROLE": ("staking",),
    "REFEREE_ROLE": ("staking",),
    "SETTLER_ROLE": ("escrow",),
    "UNIT_SETTLER_ROLE": ("escrow",),
    "POSTER_ROLE": ("distributor",),
    "PROPOSER_ROLE": ("timelock",),
    "EXECUTOR_ROLE": ("timelock",),
    "CANCELLER_ROLE": ("timelock",),
}
#: Contracts the kill switch pauses.
PAUSABLE = ("staking", "escrow", "distributor")


def role_id(role_name: str) -> bytes:
    """bytes32 id of an AccessControl role (``DEFAULT_ADMIN_ROLE`` is zero, others ``keccak256(name)``)."""
    if role_name not in ROLE_CONTRACTS:
        raise GridMintValueError(f"unknown role {role_name!r}; known: {', '.join(ROLE_CONTRACTS)}")
    return b"\x00" * 32 if role_name == "DEFAULT_ADMIN_ROLE" else keccak(text=role_name)


#: words of a node's refusal of an eth_getLogs query over its block range or result limit (Infura: "query returned
#: more than 10000 results"; Alchemy: "Log response size exceeded ... up to a 2K block range"; QuickNode:
#: "eth_getLogs is limited to a 10000 range", or HTTP 413 Payload Too Large; geth/erigon's "exceed maximum block
#: range"; Tenderly: "invalid params" with "range ... is bigger than range limit 2000" in its data): asked again in
#: halves
LOG_LIMIT_WORDS = ("range", "limit", "more than", "exceed", "too many", "too large", "bigger than")
#: ... unless it says the node is rate-limiting this client (Infura: "project ID request rate exceeded"; Chainstack:
#: "You've exceeded the RPS limit"; HTTP 429): smaller queries would only be more of them
RATE_LIMIT = re.compile(r"\b(rate|rps|quota|capacity|429)\b|per second|too many requests")
#: a block range a refusal names as the node's limit: a number on its own right after a limit's words ("limited to a
#: 10,000 range", "range limit 2000", "up to a 500 block range", "maximum block range: 5000", "10K"), never a hex
#: value, an id or a block number elsewhere in the text
NAMED_LIMIT = re.compile(r"(?:limit(?:ed)?(?: of| to| is)?(?: a)?|max(?:imum)?(?: block)?(?: range)?(?: of| is)?:?"
                         r"|up to(?: a)?) (\d[\d,]*)(k?)\b")
#: a refusal that names a result count or size (it may name a block range too, as Alchemy's does) is no fixed block
#: range: the range it refused is tried again where the logs are sparser
RESULT_LIMIT = re.compile(r"result|response size|payload too large")


def _log_refusal(exc: Exception, asked: int) -> tuple[bool, int | None]:
    """Whether ``exc`` is a node's refusal of an eth_getLogs over ``asked`` blocks for its limits, and the largest
    block range it says it takes where it names one below ``asked`` ("limited to a 10000 range", "range limit
    2000"): a fixed limit, never asked over again. Read from the node's JSON-RPC error (message and data) or its HTTP
    status (413: too large; 429: a rate limit), never from this client's own errors (a host name may hold
    "range")."""
    status = getattr(exc, "http_status", None)
    if status is not None:
        return status == 413, None
    error = (getattr(exc, "rpc_response", None) or {}).get("error")
    if isinstance(error, dict):
        text = _error_text(error)
    elif isinstance(exc, ChainError):
        return False, None
    else:
        text = str(exc).lower()
    if not any(w in text for w in LOG_LIMIT_WORDS) or RATE_LIMIT.search(text) is not None:
        return False, None
    if "range" not in text or RESULT_LIMIT.search(text):
        return True, None
    named = [int(n.replace(",", "")) * (1000 if k else 1) for n, k in NAMED_LIMIT.findall(text)]
    below = [n for n in named if 1 <= n < asked]
    return True, (min(below) if below else None)


def _error_text(error: dict[str, Any]) -> str:
    """A JSON-RPC error's message and the strings of its data (not its ids, hashes or block numbers)."""
    data = error.get("data")
    parts = [str(error.get("message", ""))]
    if isinstance(data, str):
        parts.append(data)
    elif isinstance(data, dict):
        parts += [v for v in data.values() if isinstance(v, str)]
    return " ".join(parts).lower()


class ContractsBase:
    """Bound contracts of one deployment, acting as ``account`` (which signs every transaction)."""

    def __init__(self, chain: Chain, deployment: Deployment, account: LocalAccount) -> None:
        if deployment.chain_id != chain.chain_id:
            raise GridMintValueError(f"deployment is for chain {deployment.chain_id}, connected to {chain.chain_id}")
        self.chain = chain
        self.deployment = deployment
        self.account = account
        self._errors = gridmint_error_decoder()
        self._bound: dict[str, Contract] = {}
        self._names: dict[str, str] = {}
        #: receipt of the last transaction this client sent (benchmarks read its ``gasUsed``)
        self.last_receipt: TxReceipt | None = None
        #: the block range of one eth_getLogs query, once the node refused a larger one (None: the whole range), and
        #: the largest the node said it takes (None: it named none)
        self._log_window: int | None = None
        self._log_max: int | None = None
        for key in ("token", "staking", "escrow"):
            self._bind(key, getattr(deployment, key))
        for key in ("distributor", "kill_switch", "timelock", "lens"):
            if getattr(deployment, key) is not None:
                self._bind(key, getattr(deployment, key))

    @property
    def address(self) -> str:
        return str(self.account.address)

    @property
    def token(self) -> Contract:
        return self._bound["token"]

    @property
    def staking(self) -> Contract:
        return self._bound["staking"]

    @property
    def escrow(self) -> Contract:
        return self._bound["escrow"]

    @property
    def distributor(self) -> Contract:
        """The PayoutDistributor; read from ``escrow.distributor()`` when the deployment does not name it."""
        if "distributor" not in self._bound:
            self._bind("distributor", str(self._call(self.escrow, "distributor")))
        return self._bound["distributor"]

    def _optional(self, key: str) -> Contract:
        if key not in self._bound:
            raise GridMintValueError(f"this deployment does not name a {key} contract")
        return self._bound[key]

    # roles

    def has_role(self, role_name: str, address: str) -> bool:
        """True if ``address`` holds ``role_name`` on every contract that role applies to."""
        rid, addr = role_id(role_name), to_address(address)
        return all(self._call(self._contract(c), "hasRole", rid, addr) for c in ROLE_CONTRACTS[role_name])

    def grant_role(self, role_name: str, address: str) -> bool:
        """Grant ``role_name`` to ``address`` on the contracts it applies to (needs DEFAULT_ADMIN_ROLE there).

        Returns True if any grant was sent, False if ``address`` already held the role everywhere.
        """
        role_id(role_name)  # an unknown role is a GridMintValueError before anything is sent
        sent = False
        for name in ROLE_CONTRACTS[role_name]:
            sent |= self.grant_role_on(name, role_name, address)
        return sent

    def grant_role_on(self, contract: str, role_name: str, address: str) -> bool:
        """Grant ``role_name`` on one contract (``"staking"``, ``"kill_switch"``...); False if already held."""
        rid, addr = role_id(role_name), to_address(address)
        target = self._contract(contract)
        if self._call(target, "hasRole", rid, addr):
            return False
        self._send(target, "grantRole", rid, addr)
        return True

    def renounce_role_on(self, contract: str, role_name: str) -> bool:
        """Give up ``role_name`` on one contract for this client's own account (nobody can give it back but that
        contract's admin); False if not held."""
        rid = role_id(role_name)
        target = self._contract(contract)
        if not self._call(target, "hasRole", rid, self.address):
            return False
        self._send(target, "renounceRole", rid, self.address)
        return True

    # internals

    def _bind(self, key: str, address: str) -> None:
        contract = self.chain.w3.eth.contract(address=to_address(address), abi=load_artifact(ARTIFACTS[key])[0])
        self._bound[key] = contract
        self._names[contract.address] = ARTIFACTS[key]

    def _contract(self, name: str) -> Contract:
        if name == "distributor":
            return self.distributor
        return self._bound[name] if name in ("token", "staking", "escrow") else self._optional(name)

    def _call(self, contract: Contract, fn: str, *args: Any) -> Any:
        return self.chain.call(contract.functions[fn](*args), errors=self._errors, label=f"{self._name(contract)}.{fn}")

    def _send(self, contract: Contract, fn: str, *args: Any, gas: int | None = None) -> TxReceipt:
        data = contract.encode_abi(fn, args=list(args))
        receipt = self.chain.transact(
            self.account, to=contract.address, data=data, gas=gas, errors=self._errors,
            label=f"{self._name(contract)}.{fn}",
        )
        self.last_receipt = receipt
        return receipt

    def _send_once(self, contract: Contract, fn: str, *args: Any, done: str,
                   gas: int | None = None) -> TxReceipt | None:
        """:meth:`_send`, for a call its contract refuses with the custom error ``done`` once it has happened (a
        concurrent or earlier sender got there first): None then, having moved nothing; other errors raise. Callers
        check the chain's state first; this closes the race between that check and the send."""
        try:
            return self._send(contract, fn, *args, gas=gas)
        except ChainError as exc:
            if exc.error_name == done:
                return None
            raise

    def _name(self, contract: Contract) -> str:
        return self._names.get(contract.address, contract.address)

    @contextmanager
    def _account_op(self) -> Iterator[None]:
        """Serialises this account's approve+action pairs in this process, so concurrent ones cannot overwrite each
        other's allowance (or permit nonce) between the two steps."""
        with self.chain.account_lock(self.address):
            yield

    def _logs(self, contract: Contract, event: str, from_block: int = 0, **filters: Any) -> list[Any]:
        """``contract``'s ``event`` logs from block ``from_block`` on (never before the deployment's), filtered on
        indexed arguments, oldest first; ChainError if the node cannot answer (the caller's task retries it). A node
        that limits a query's block range or result count (hosted RPCs do) is asked for half the range after each
        refusal and twice the range after each answer (never over a block range limit it named), so the queries
        follow a result limit where the logs are dense and grow again where they are sparse; this client's next read
        starts at the last range answered."""
        start = max(from_block, self.deployment.from_block)
        try:
            end = int(self.chain.w3.eth.block_number)
            size = end - start + 1 if self._log_window is None else self._log_window
            limited = self._log_window is not None
            out: list[Any] = []
            while start <= end:
                if self._log_max is not None:
                    size = min(size, self._log_max)
                stop = min(end, start + size - 1)
                try:
                    got = contract.events[event]().get_logs(argument_filters=filters, from_block=start, to_block=stop)
                except Exception as exc:
                    refused, most = _log_refusal(exc, stop - start + 1)
                    if stop <= start or not refused:
                        raise
                    if most is not None:
                        self._log_max = min(self._log_max or most, most)
                    size, limited = (stop - start + 1) // 2, True
                    continue
                out += got
                if limited:  # (a node that refused a range: the range it answered, a larger one next)
                    if stop - start + 1 == size or self._log_window is None:  # (not the read's short tail)
                        self._log_window = stop - start + 1
                    size *= 2
                start = stop + 1
            return out
        except ChainError:
            raise
        except Exception as exc:  # transport failures
            raise ChainError(f"{self._name(contract)} {event} logs unreadable: {exc}") from exc

    def _event_arg(self, contract: Contract, event: str, receipt: TxReceipt, arg: str) -> Any:
        logs = contract.events[event]().process_receipt(receipt, errors=DISCARD)
        if not logs:
            raise ChainError(f"{self._name(contract)}: receipt has no {event} event")
        return logs[0]["args"][arg]
