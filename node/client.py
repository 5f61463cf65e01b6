"""HTTP client for the marketplace: every request is EIP-712 signed by the node's wallet, with a fresh nonce."""
from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from eth_account.signers.local import LocalAccount

from protocol.errors import ChainUnavailable, GridMintError, GridMintValueError
from protocol.limits import wire_json
from protocol.signing import BEAT_LANE_PATHS, Domain, NonceSource, sign_request

REQUEST_TTL_S = 60
#: How the marketplace's ReplayError names the signer's last accepted nonce (marketplace.auth.consume_nonce_in).
_LAST_ACCEPTED = re.compile(r"last accepted (\d+)")


class MarketError(GridMintError, RuntimeError):
    """A refusal from the marketplace: its HTTP ``status``, its ``detail`` and ``error``, the class of the server's
    error (``Conflict``, ``ReplayError``, ``NotFound``...; None from a server or proxy that does not say)."""

    def __init__(self, status: int, detail: Any, error: str | None = None) -> None:
        super().__init__(f"marketplace answered {status}: {detail}")
        self.status = status
        self.detail = detail
        self.error = error

    @property
    def replayed(self) -> bool:
        """The request's nonce (or deadline) was refused: nothing was looked at, let alone decided; sending the
        request again under a fresh nonce is safe. Another process signing with this wallet, or a clock behind the
        one that signed before."""
        return self.error == "ReplayError"

    @property
    def transient(self) -> bool:
        """A marketplace restarting or busy (a 5xx, from it or a proxy in front), a body too slow for its deadline
        (408) or a rate limit (429): nothing was decided, and the same request may go through later."""
        return self.status >= 500 or self.status in (408, 429)

    @property
    def conflict(self) -> bool:
        """A 409 about the state of things (the unit is no longer ours, the task was withdrawn, slashed), as opposed
        to a refused nonce (:attr:`replayed`), which is also a 409."""
        return self.status == 409 and not self.replayed


class BlobMismatch(GridMintError):
    """A downloaded checkpoint's bytes do not hash to the name it was asked by: corrupted on the way or in the
    marketplace's store. Never used (a verifier replaying from it would accuse an honest provider; a provider
    training from it would be convicted): the agent tries again later."""


#: What a dropped link or a restarting service looks like to an agent: wait and try again, never exit.
UNREACHABLE: tuple[type[BaseException], ...] = (ChainUnavailable, httpx.TransportError, BlobMismatch)


def _last_accepted(resp: httpx.Response) -> int | None:
    """The last nonce the marketplace accepted from the signer, if ``resp`` refused a request's nonce as not above
    it (a 409 ReplayError); else None (an expired deadline is a ReplayError too, and names none)."""
    if resp.status_code != 409:
        return None
    try:
        body = resp.json()
    except ValueError:
        return None
    if not isinstance(body, dict) or body.get("error") != "ReplayError":
        return None
    found = _LAST_ACCEPTED.search(str(body.get("detail", "")))
    return int(found.group(1)) if found else None


class MarketClient:
    def __init__(self, base_url: str, account: LocalAccount, timeout: float = 60.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.account = account
        self.http = httpx.Client(base_url=self.base_url, timeout=timeout)
        self.nonces = NonceSource()
        # one signed request at a time per nonce lane: nonces must reach the server in the order they were drawn;
        # heartbeats and the reveal poll have a lane of their own (protocol.signing.BEAT_LANE_PATHS), so the
        # heartbeat thread never waits behind an upload of the main thread's
        self._send_lock = threading.Lock()
        self.beat_nonces = NonceSource()
        self._beat_lock = threading.Lock()
        self._config: dict[str, Any] | None = None

    @property
    def config(self) -> dict[str, Any]:
        if self._config is None:
            cfg = self._check(self.http.get("/config"))
            if not isinstance(cfg, dict) or "chain_id" not in cfg or "staking" not in cfg:
                raise GridMintValueError(f"{self.base_url} does not look like a GridMint marketplace (its /config "
                                         f"names no chain and contracts): check --marketplace")
            self._config = cfg
        return self._config

    @property
    def chain_id(self) -> int:
        return int(self.config["chain_id"])

    @property
    def domain(self) -> Domain:
        """What this client signs under: the marketplace's chain and deployment (its staking contract)."""
        return Domain(self.chain_id, str(self.config["staking"]))

    def signed(self, method: str, path: str, body: bytes = b"", content_type: str = "application/json") -> httpx.Response:
        """Send a request signed under a fresh nonce. One whose nonce the marketplace refuses as not above the last
        it accepted from this wallet (another process signs with it, or this machine's clock is behind the one that
        signed before) is sent once more under a nonce past that one: a refused nonce changes nothing there."""
        resp = self._send_signed(method, path, body, content_type)
        last = _last_accepted(resp)
        if last is not None:
            self._lane(path)[0].skip_past(last)
            resp = self._send_signed(method, path, body, content_type)
        return resp

    def _lane(self, path: str) -> tuple[NonceSource, threading.Lock]:
        return (self.beat_nonces, self._beat_lock) if path in BEAT_LANE_PATHS else (self.nonces, self._send_lock)

    def _send_signed(self, method: str, path: str, body: bytes, content_type: str) -> httpx.Response:
        d = self.domain
        nonces, lock = self._lane(path)
        with lock:
            headers = sign_request(self.account, d, method, path, body, nonces.next(),
                                   int(time.time()) + REQUEST_TTL_S)
            headers["content-type"] = content_type
            return self.http.request(method, path, content=body, headers=headers)

    def signed_json(self, method: str, path: str, payload: Any) -> Any:
        return self._check(self.signed(method, path, wire_json(payload)))  # the encoding result sizes assume

    @staticmethod
    def _check(resp: httpx.Response) -> Any:
        if resp.status_code == 204:
            return None
        if resp.status_code >= 400:
            error = None
            try:
                body = resp.json()
                detail = body.get("detail") if isinstance(body, dict) else body
                error = body.get("error") if isinstance(body, dict) else None
            except ValueError:
                detail = resp.text[:300]
            raise MarketError(resp.status_code, detail, error if isinstance(error, str) else None)
        try:
            return resp.json()
        except ValueError:  # not a GridMint answer (a web page, another service on that port)
            raise MarketError(resp.status_code, f"not JSON from {resp.request.url}: {resp.text[:120]!r}") from None

    # provider
    def register(self, **fields: Any) -> Any:
        return self.signed_json("POST", "/providers/register", fields)

    def heartbeat(self, unit_id: str | None = None, steps_done: int = 0) -> Any:
        return self.signed_json("POST", "/providers/heartbeat", {"unit_id": unit_id, "steps_done": steps_done})

    def next_work(self) -> dict[str, Any] | None:
        return self._check(self.signed("POST", "/work/next"))

    def put_blob(self, path: Path) -> str:
        resp = self.signed("PUT", "/blobs", path.read_bytes(), "application/octet-stream")
        return str(self._check(resp)["sha256"])

    def get_blob(self, sha: str, dest: Path) -> Path:
        """Download checkpoint ``sha`` to ``dest`` (written whole or not at all), once its bytes hash to ``sha``."""
        resp = self.http.get(f"/blobs/{sha}")
        if resp.status_code != 200:
            self._check(resp)
        got = hashlib.sha256(resp.content).hexdigest()
        if got != sha:
            raise BlobMismatch(f"checkpoint {sha} from {self.base_url} hashes to {got} ({len(resp.content)} bytes): "
                               f"corrupted on the way or in its store; not used, asked again later")
        part = dest.with_name(dest.name + ".part")
        part.write_bytes(resp.content)
        os.replace(part, dest)
        return dest

    def submit(self, unit_id: str, body: dict[str, Any]) -> Any:
        return self.signed_json("POST", f"/units/{unit_id}/result", body)

    def next_reveal(self) -> dict[str, Any] | None:
        return self._check(self.signed("POST", "/reveals/next"))

    def reveal(self, body: dict[str, Any]) -> Any:
        return self.signed_json("POST", "/reveals", body)

    # verifier
    def register_verifier(self, plan: str | None = None, build: str = "") -> Any:
        if plan is None:
            return self._check(self.signed("POST", "/verifiers/register"))
        return self.signed_json("POST", "/verifiers/register", {"plan": plan, **({"build": build} if build else {})})

    def next_verification(self) -> dict[str, Any] | None:
        return self._check(self.signed("POST", "/verify/next"))

    def verification_heartbeat(self, verification_id: int) -> Any:
        return self.signed_json("POST", "/verify/heartbeat", {"verification_id": verification_id})

    def verdict(self, body: dict[str, Any]) -> Any:
        return self.signed_json("POST", "/verify/verdict", body)

    # customer
    def quote(self, spec: dict[str, Any], customer: str | None = None) -> Any:
        """The quote of ``spec``; its ``job_id`` is bound to ``customer`` (``protocol.jobs``), null without one."""
        params = {"customer": customer} if customer else None
        return self._check(self.http.post("/jobs/quote", json=spec, params=params))

    def submit_job(self, job_id: str, spec: dict[str, Any]) -> Any:
        return self.signed_json("POST", "/jobs", {"job_id": job_id, "spec": spec})

    def job(self, job_id: str) -> Any:
        return self._check(self.http.get(f"/jobs/{job_id}"))

    def provider(self, address: str | None = None) -> dict[str, Any]:
        """This account's (or ``address``'s) provider record, with ``unverified``: its submitted units not yet verified."""
        return self._check(self.http.get(f"/providers/{address or self.account.address}"))

    def payout(self, address: str | None = None) -> dict[str, Any]:
        """This account's (or ``address``'s) leaf and proof under the newest claimable payout root."""
        return self._check(self.http.get(f"/payouts/{address or self.account.address}"))
