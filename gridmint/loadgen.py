"""Load generation for signed marketplace requests: a fast pre-signer and a ``wrk`` driver.

Why a signer of its own: ``eth_account`` signs with eth-keys' pure-Python secp256k1 when ``coincurve`` is absent,
~13 ms a signature here, so pre-signing tens of thousands of requests would take minutes. :class:`FastSigner`
computes the same EIP-712 ``Request`` digest by hand and signs with a fixed-base comb table for ``k*G``
(~0.2 ms a signature). Its output is ordinary ECDSA over secp256k1 (random ``k``, low ``s``); the benchmark checks a
sample with ``protocol.signing.verify_request`` before it trusts the rest. For load generation only: wallets and
agents keep using ``eth_account``.

Why ``wrk``: an httpx load generator tops out near 750 requests/s on this kind of machine. ``wrk`` replays the
pre-signed requests from a Lua script, one signer per connection (and one connection per ``wrk`` thread), so each
signer's nonces reach the server in the order they were signed, as the server requires.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eth_utils import keccak, to_checksum_address

from protocol.errors import GridMintError
from protocol.signing import HEADER_DEADLINE, HEADER_NONCE, HEADER_SIGNATURE, HEADER_SIGNER
from protocol.signing import Domain, request_digest

# secp256k1
P = 2**256 - 2**32 - 977
N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
G = (0x79BE667EF9DCBBAC55A06295CE870B07029BFCDB2DCE28D959F2815B16F81798,
     0x483ADA7726A3C4655DA4FBFC0E1108A8FD17B448A68554199C47D08FFB10D4B8)

Point = tuple[int, int] | None
Jacobian = tuple[int, int, int]  # (X, Y, Z) is the affine point (X/Z^2, Y/Z^3); Z == 0 is infinity
_INF: Jacobian = (1, 1, 0)


def _double(a: Jacobian) -> Jacobian:
    x, y, z = a
    if z == 0 or y == 0:
        return _INF
    aa, bb = x * x % P, y * y % P
    cc = bb * bb % P
    d = 2 * ((x + bb) ** 2 - aa - cc) % P
    e = 3 * aa % P
    x3 = (e * e - 2 * d) % P
    return x3, (e * (d - x3) - 8 * cc) % P, 2 * y * z % P


def _add_affine(a: Jacobian, b: tuple[int, int]) -> Jacobian:
    """Jacobian + affine (mixed addition): no modular inverse, which costs ~50 us in CPython."""
    x1, y1, z1 = a
    if z1 == 0:
        return b[0], b[1], 1
    zz = z1 * z1 % P
    h = (b[0] * zz - x1) % P
    r = (b[1] * zz * z1 - y1) % P
    if h == 0:
        return _double(a) if r == 0 else _INF
    hh = h * h % P
    hhh = h * hh % P
    v = x1 * hh % P
    x3 = (r * r - hhh - 2 * v) % P
    return x3, (r * (v - x3) - y1 * hhh) % P, z1 * h % P


def _to_affine(a: Jacobian) -> Point:
    if a[2] == 0:
        return None
    zi = pow(a[2], -1, P)
    zi2 = zi * zi % P
    return a[0] * zi2 % P, a[1] * zi2 * zi % P


def _batch_affine(points: list[Jacobian]) -> list[tuple[int, int]]:
    """Many Jacobian points (none at infinity) to affine with one inverse (Montgomery's trick)."""
    prefix = [1]
    for pt in points:
        prefix.append(prefix[-1] * pt[2] % P)
    inv = pow(prefix[-1], -1, P)
    out: list[tuple[int, int]] = [(0, 0)] * len(points)
    for i in range(len(points) - 1, -1, -1):
        zi = inv * prefix[i] % P
        inv = inv * points[i][2] % P
        zi2 = zi * zi % P
        out[i] = (points[i][0] * zi2 % P, points[i][1] * zi2 * zi % P)
    return out


def _comb_table() -> list[list[tuple[int, int]]]:
    """``table[i][j - 1] = j * 256**i * G`` (affine): a multiple of G is then at most 32 mixed additions."""
    table: list[list[tuple[int, int]]] = []
    base = G
    for _ in range(32):
        row: list[Jacobian] = []
        acc = _INF
        for _ in range(255):
            acc = _add_affine(acc, base)
            row.append(acc)
        table.append(_batch_affine(row))
        nxt = _to_affine(_add_affine(acc, base))  # 256 * base
        assert nxt is not None
        base = nxt
    return table


_TABLE: list[list[tuple[int, int]]] | None = None


def _mul_g(k: int) -> Point:
    global _TABLE
    if _TABLE is None:
        _TABLE = _comb_table()
    acc = _INF
    for i, byte in enumerate(k.to_bytes(32, "little")):
        if byte:
            acc = _add_affine(acc, _TABLE[i][byte - 1])
    return _to_affine(acc)


class FastSigner:
    """An Ethereum key that signs ``Request`` envelopes quickly (load generation only; see the module docstring)."""

    def __init__(self, key: int | None = None) -> None:
        self.key = key if key is not None else 1 + secrets.randbelow(N - 1)
        pub = _mul_g(self.key)
        assert pub is not None
        self.address = to_checksum_address(keccak(pub[0].to_bytes(32, "big") + pub[1].to_bytes(32, "big"))[12:])

    def sign_digest(self, digest: bytes) -> bytes:
        """65-byte ``r || s || v`` (v = 27/28, low s), as ``eth_account`` produces and recovers."""
        z = int.from_bytes(digest, "big")
        while True:
            k = 1 + secrets.randbelow(N - 1)
            point = _mul_g(k)
            assert point is not None
            r = point[0] % N
            if r == 0 or point[0] >= N:  # x >= n would need recovery id 2/3: draw again (probability ~2**-128)
                continue
            s = pow(k, -1, N) * (z + r * self.key) % N
            if s == 0:
                continue
            parity = point[1] & 1
            if s > N // 2:
                s, parity = N - s, parity ^ 1
            return r.to_bytes(32, "big") + s.to_bytes(32, "big") + bytes([27 + parity])

    def request_headers(self, domain: Domain, method: str, path: str, body: bytes, nonce: int,
                        deadline: int) -> dict[str, str]:
        """The same headers as ``protocol.signing.sign_request``."""
        sig = self.sign_digest(request_digest(domain, self.address, method, path, body, nonce, deadline))
        return {HEADER_SIGNER: self.address, HEADER_NONCE: str(nonce), HEADER_DEADLINE: str(deadline),
                HEADER_SIGNATURE: "0x" + sig.hex()}


# ---------------------------------------------------------------- wrk

class LoadGenError(GridMintError, RuntimeError):
    """wrk is missing, failed, or printed no result."""


def wrk_path() -> str:
    found = shutil.which("wrk")
    if found is None:
        raise LoadGenError("wrk is not installed (Debian: apt-get install -y wrk)")
    return found


def write_connection_file(path: Path, signer: str, lines: list[tuple[int, int, str]]) -> None:
    """One connection's requests for the Lua script: the signer, then ``nonce deadline signature`` per line."""
    path.write_text(signer + "\n" + "".join(f"{n} {d} {s}\n" for n, d, s in lines))


_LUA = r"""-- generated by gridmint.loadgen: replay pre-signed requests, one signer per connection, in nonce order
local dir = %(dir)s
local method = %(method)s
local path = %(path)s
local body = %(body)s
local cycle = %(cycle)s
local counter = 0
local threads = {}

function setup(thread)
  counter = counter + 1
  thread:set("id", counter)
  table.insert(threads, thread)
end

function init(args)
  reqs = {}
  used = 0
  exhausted = 0
  local f = assert(io.open(dir .. "/conn-" .. id .. ".txt", "r"))
  local signer = f:read("*l")
  for line in f:lines() do
    local nonce, deadline, sig = line:match("(%%S+) (%%S+) (%%S+)")
    reqs[#reqs + 1] = wrk.format(method, path, {
      ["Content-Type"] = "application/json", ["%(h_signer)s"] = signer, ["%(h_nonce)s"] = nonce,
      ["%(h_deadline)s"] = deadline, ["%(h_signature)s"] = sig}, body)
  end
  f:close()
end

function request()
  used = used + 1
  if used > #reqs and cycle then
    -- a server that ignores signatures (the baseline): replay the same requests again
    used = 1
  elseif used > #reqs then
    -- out of pre-signed requests: stop this connection (a replayed nonce would only measure the 409 path)
    exhausted = 1
    wrk.thread:stop()
    return reqs[#reqs]
  end
  return reqs[used]
end

function response(status, headers, body)
  if status >= 400 and first_error == nil then
    first_error = status .. " " .. string.sub(body, 1, 300)
  end
end

function done(summary, latency, requests)
  local used_all, exhausted_all = 0, 0
  for _, t in ipairs(threads) do
    used_all = used_all + t:get("used")
    exhausted_all = exhausted_all + t:get("exhausted")
    local err = t:get("first_error")
    if err ~= nil then io.write("WRKERROR " .. string.gsub(err, "\n", " ") .. "\n") end
  end
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%%d,"duration_us":%%d,"connect_errors":%%d,"read_errors":%%d,"write_errors":%%d,' ..
    '"status_errors":%%d,"timeouts":%%d,"mean_us":%%.1f,"p50_us":%%d,"p90_us":%%d,"p99_us":%%d,"max_us":%%d,' ..
    '"signed_used":%%d,"exhausted_connections":%%d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout, latency.mean,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, used_all, exhausted_all))
end
"""


def _lua_str(s: str) -> str:
    return json.dumps(s)  # a JSON string literal is a valid Lua string literal for these (ASCII) values


def write_lua(dir_: Path, method: str, path: str, body: bytes, cycle: bool = False) -> Path:
    """The replay script for the connection files in ``dir_``. ``cycle``: start over when a connection's requests
    run out (only for a server that ignores signatures); otherwise that connection stops."""
    script = dir_ / "replay.lua"
    script.write_text(_LUA % {
        "dir": _lua_str(str(dir_)), "method": _lua_str(method), "path": _lua_str(path),
        "body": _lua_str(body.decode()), "cycle": "true" if cycle else "false", "h_signer": HEADER_SIGNER, "h_nonce": HEADER_NONCE,
        "h_deadline": HEADER_DEADLINE, "h_signature": HEADER_SIGNATURE})
    return script


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    rps: float
    ok: int  # responses with status < 400 (wrk counts >= 400 as status errors)
    errors: dict[str, int]
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    exhausted_connections: int
    client_cpu_s: float  # user + system CPU seconds wrk used
    first_errors: tuple[str, ...]  # the first error response (status and body) of each connection that had one

    def as_dict(self) -> dict[str, Any]:
        d = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in self.__dict__.items()}
        d["first_errors"] = list(self.first_errors)[:5]
        return d


def run_wrk(url: str, script: Path, connections: int, seconds: float, timeout_s: float = 10.0) -> WrkResult:
    """``wrk`` with one thread per connection for ``seconds``; bounded by ``seconds + timeout_s + 30``."""
    argv = [wrk_path(), "-t", str(connections), "-c", str(connections), "-d", f"{seconds:g}s",
            "--timeout", f"{timeout_s:g}s", "-s", str(script), url]
    before = os.times()
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + timeout_s + 30)
    except subprocess.TimeoutExpired as exc:
        raise LoadGenError(f"wrk did not finish: {' '.join(argv)}") from exc
    after = os.times()
    match = re.search(r"^WRKJSON (\{.*\})$", out.stdout, re.M)
    if out.returncode != 0 or match is None:
        raise LoadGenError(f"wrk failed ({out.returncode}): {out.stdout[-2000:]}{out.stderr[-2000:]}")
    d = json.loads(match.group(1))
    secs = d["duration_us"] / 1e6
    errors = {k: d[k] for k in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts")}
    ok = d["requests"] - d["status_errors"]
    return WrkResult(requests=d["requests"], seconds=secs, rps=ok / secs, ok=ok, errors=errors,
                     mean_ms=d["mean_us"] / 1e3, p50_ms=d["p50_us"] / 1e3, p90_ms=d["p90_us"] / 1e3,
                     p99_ms=d["p99_us"] / 1e3, max_ms=d["max_us"] / 1e3,
                     exhausted_connections=d["exhausted_connections"],
                     first_errors=tuple(sorted(set(re.findall(r"^WRKERROR (.*)$", out.stdout, re.M)))),
                     client_cpu_s=(after.children_user - before.children_user)
                     + (after.children_system - before.children_system))
