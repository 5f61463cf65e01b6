"""A user's plausible mistakes end in one readable line and a failure status, never a traceback."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def gridmint(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GRIDMINT_")}
    return subprocess.run([sys.executable, "-c", "from gridmint.cli import main; main()", *args], cwd=REPO,
                          env={**clean, **(env or {})}, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("url, says", [("http://127.0.0.1:1", "Connection refused"),
                                       ("notaurl", "missing an 'http://' or 'https://'"),
                                       ("localhost:8000", "unsupported protocol")])
def test_a_marketplace_that_is_down_or_mistyped_is_one_line(tmp_path: Path, url: str, says: str) -> None:
    assert gridmint("node", "wallet", "--wallet", str(tmp_path / "w.json")).returncode == 0
    got = gridmint("node", "status", "--marketplace", url, "--wallet", str(tmp_path / "w.json"))
    assert got.returncode == 2 and "Traceback" not in got.stderr
    assert got.stderr.startswith("error: cannot reach ") and says in got.stderr and "--marketplace" in got.stderr


def test_a_wallet_that_is_a_folder_or_not_a_keystore_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty.json").write_text("{}")
    (tmp_path / "junk.json").write_bytes(b"\xff\xfe not json")
    for wallet, says in ((tmp_path, "is a directory"), (tmp_path / "empty.json", "not an Ethereum keystore"),
                         (tmp_path / "junk.json", "cannot read wallet")):
        got = gridmint("node", "wallet", "--wallet", str(wallet))
        assert got.returncode == 2 and "Traceback" not in got.stderr and says in got.stderr, got.stderr
    assert not (tmp_path / "wallet.json").exists()  # nothing created in the folder's place


def test_status_with_a_mistyped_wallet_creates_nothing_and_a_capacity_out_of_range_stakes_nothing(
        tmp_path: Path) -> None:
    """``node status`` only reads: a mistyped --wallet made a new (empty-password) keystore and reported on an
    address nobody owns. ``node run --capacity 0`` (or 65) staked 200 GMT before the marketplace refused it."""
    got = gridmint("node", "status", "--marketplace", "http://127.0.0.1:1", "--wallet", str(tmp_path / "typo.json"))
    assert got.returncode == 2 and "Traceback" not in got.stderr and "no wallet at" in got.stderr, got.stderr
    assert not (tmp_path / "typo.json").exists()
    for capacity in ("0", "65"):
        got = gridmint("node", "run", "--capacity", capacity, "--marketplace", "http://127.0.0.1:1",
                       "--wallet", str(tmp_path / "run.json"))
        assert got.returncode == 2 and "Traceback" not in got.stderr and "--capacity" in got.stderr, got.stderr
    assert not (tmp_path / "run.json").exists()  # refused before the wallet, the chain or the marketplace


def test_a_setting_that_does_not_parse_is_one_line() -> None:
    base = {"GRIDMINT_CHAIN_URL": "http://127.0.0.1:1", "GRIDMINT_REDIS_URL": "redis://127.0.0.1:1"}
    got = gridmint("marketplace", "serve", env={**base, "GRIDMINT_OPERATOR_KEY": "0x" + "11" * 32,
                                                 "GRIDMINT_UNIT_TIMEOUT_S": "2m"})
    assert got.returncode == 2 and "Traceback" not in got.stderr
    assert "bad setting (unit_timeout_s:" in got.stderr
    got = gridmint("marketplace", "serve", env={**base, "GRIDMINT_OPERATOR_KEY": "abc"})
    assert got.returncode == 2 and "Traceback" not in got.stderr
    assert "GRIDMINT_OPERATOR_KEY is not a private key" in got.stderr


def test_marketplace_deploy_writes_the_deployment_file_serve_reads(tmp_path: Path) -> None:
    """An operator's first step on a real chain: ``gridmint marketplace deploy`` (Hardhat node here) deploys the
    contracts with the operator key and writes the deployment file; a second run refuses to overwrite it.

    It is a production deployment unless --dev: it needs --governor, refuses zero delays and a governor or guardian
    that is the operator key, and leaves that key only its operational roles (review R2: it was admin of everything,
    with a 0 s timelock and dispute window by default)."""
    from eth_account import Account

    from ledger.chain import Chain
    from ledger.devchain import HardhatNode
    from ledger.evm import Deployment, GridMintContracts
    from protocol.money import tokens

    node = HardhatNode()
    node.start()
    try:
        chain = Chain.http(node.url)
        operator, governor, guardian = chain.dev_accounts(3)
        treasury = Account.create().address
        env = {"GRIDMINT_CHAIN_URL": node.url, "GRIDMINT_OPERATOR_KEY": operator.key.hex(),
               "GRIDMINT_DATA_DIR": str(tmp_path / "data")}
        deploy = ("marketplace", "deploy", "--treasury", treasury)
        nonce = chain.w3.eth.get_transaction_count(operator.address)
        for args, says in (((), "needs --governor ADDRESS"),
                           (("--governor", operator.address), f"--governor {operator.address} is GRIDMINT_OPERATOR_KEY"),
                           (("--governor", governor.address, "--guardian", operator.address), "--guardian"),
                           (("--governor", governor.address, "--treasury", operator.address),  # the last one counts
                            f"--treasury {operator.address} is GRIDMINT_OPERATOR_KEY"),
                           (("--governor", governor.address, "--timelock-delay-s", "0"), "--timelock-delay-s 0 is "
                                                                                          "refused"),
                           (("--governor", governor.address, "--dispute-window-s", "0"), "--dispute-window-s 0 is "
                                                                                         "refused"),
                           (("--governor", governor.address, "--unbonding-delay-s", "86400"),
                            "--unbonding-delay-s 86400 must be at least --slash-delay-s 86400 + 3600"),
                           (("--governor", "0x1234"), "--governor '0x1234' is not an address"),
                           (("--dev", "--governor", governor.address), "--dev leaves every role")):
            refused = gridmint(*deploy, *args, env=env)
            assert refused.returncode == 2 and says in refused.stderr and "Traceback" not in refused.stderr, (
                args, refused.stderr)
        assert chain.w3.eth.get_transaction_count(operator.address) == nonce  # refused before anything was sent
        assert not (tmp_path / "data" / "deployment.json").exists()

        got = gridmint(*deploy, "--governor", governor.address, "--guardian", guardian.address, "--supply", "5000",
                       "--verifier-bond", "25", env=env)
        assert got.returncode == 0, got.stderr
        out = tmp_path / "data" / "deployment.json"
        assert f"wrote {out}" in got.stdout
        deployment = Deployment.from_json(out)
        ops = GridMintContracts(chain, deployment, operator)
        assert deployment.chain_id == chain.chain_id and deployment.treasury == treasury
        assert ops.verifier_bond() == tokens(25)
        # the supply is the treasury's, never the hot key's (it used to be minted to the operator key)
        assert ops.balance_of(operator.address) == 0 and ops.balance_of(treasury) == tokens(5000)
        assert (ops.min_delay(), ops.dispute_window()) == (2 * 86400, 86400)  # the production defaults
        for role in ("SETTLER_ROLE", "POSTER_ROLE", "SLASHER_ROLE", "REFEREE_ROLE"):
            assert ops.has_role(role, operator.address), role
        for role in ("DEFAULT_ADMIN_ROLE", "GOVERNOR_ROLE", "GUARDIAN_ROLE", "PROPOSER_ROLE", "CANCELLER_ROLE"):
            assert not ops.has_role(role, operator.address), role
        assert ops.has_role("DEFAULT_ADMIN_ROLE", str(deployment.timelock))
        assert ops.has_role("PROPOSER_ROLE", governor.address) and ops.has_role("GUARDIAN_ROLE", guardian.address)
        again = gridmint(*deploy, "--governor", governor.address, env=env)
        assert again.returncode == 2 and "exists" in again.stderr and Deployment.from_json(out) == deployment
        bad = gridmint("marketplace", "deploy", "--treasury", "0x1234", env={**env, "GRIDMINT_DATA_DIR": str(tmp_path)})
        assert bad.returncode == 2 and "is not an address" in bad.stderr

        dev = gridmint(*deploy, "--dev", "--timelock-delay-s", "0", "--dispute-window-s", "0", "--force", env=env)
        assert dev.returncode == 0 and "development deployment" in dev.stdout, dev.stderr
        dev_ops = GridMintContracts(chain, Deployment.from_json(out), operator)
        assert dev_ops.has_role("DEFAULT_ADMIN_ROLE", operator.address) and dev_ops.min_delay() == 0
        assert dev_ops.balance_of(operator.address) == dev_ops.total_supply()  # --dev: the operator funds the demo
    finally:
        node.stop()


def test_the_customer_commands_exist_and_a_bad_spec_is_one_line(tmp_path: Path) -> None:
    got = gridmint("job", "--help")
    assert got.returncode == 0 and all(c in got.stdout for c in ("quote", "submit", "status", "weights", "cancel",
                                                                 "close"))
    (tmp_path / "spec.json").write_text('{"max_price": "1.5"}')  # GMT where base units are meant: not an integer
    got = gridmint("job", "quote", str(tmp_path / "spec.json"), "--marketplace", "http://127.0.0.1:1")
    assert got.returncode == 2 and "Traceback" not in got.stderr and "max_price" in got.stderr, got.stderr
    got = gridmint("job", "submit", str(tmp_path / "missing.json"), "--marketplace", "http://127.0.0.1:1",
                   "--wallet", str(tmp_path / "c.json"))
    assert got.returncode == 2 and "Traceback" not in got.stderr and "cannot read job spec" in got.stderr, got.stderr
    assert not (tmp_path / "c.json").exists()  # refused before a wallet was made


@pytest.mark.parametrize("role", ["node", "verifier"])
def test_a_second_agent_on_a_wallet_says_which_one_runs_and_stakes_nothing(tmp_path: Path, role: str) -> None:
    """Two processes on one wallet draw clashing nonces and could both stake: the second one exits before it reads
    the marketplace or the chain (here unreachable: the error would otherwise be "cannot reach")."""
    from node.wallet import hold, load_or_create

    wallet = tmp_path / "w.json"
    address = load_or_create(wallet, password="").address
    with hold(address, "gridmint node run", tmp_path / ".gridmint" / "work" / f"{address}.lock"):
        got = gridmint(role, "run", "--marketplace", "http://127.0.0.1:1", "--wallet", str(wallet),
                       env={"HOME": str(tmp_path)})
    assert got.returncode == 2 and "Traceback" not in got.stderr, got.stderr
    assert f"error: wallet {address} is in use by gridmint node run (pid {os.getpid()}" in got.stderr, got.stderr


def test_commands_that_open_an_existing_wallet_only_do_not_say_it_is_created() -> None:
    for role, command in [(r, c) for r in ("node", "verifier") for c in ("claim", "unbond", "withdraw")] + [
            ("node", "status")]:
        got = gridmint(role, command, "--help", env={"COLUMNS": "200"})
        assert got.returncode == 0 and "existing wallet" in got.stdout, (role, command, got.stdout)
        assert "created if missing" not in got.stdout, (role, command)
    assert "created if missing" in gridmint("node", "run", "--help", env={"COLUMNS": "200"}).stdout
