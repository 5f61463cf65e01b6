"""Job ids bound to their customer (protocol.jobs), mirroring JobEscrow's rule: the first 20 bytes are the address
that may fund the id first (review R3)."""
from __future__ import annotations

import pytest
from eth_account import Account

from protocol.errors import GridMintValueError
from protocol.jobs import RANDOM_BYTES, JobIdNotYours, check_job_id, job_id_bytes, job_id_customer, new_job_id
from protocol.schemas import JobSubmit, JobSpec


def test_a_new_job_id_is_its_customer_then_random_bytes() -> None:
    me = Account.create().address
    a, b = new_job_id(me), new_job_id(me)
    assert a != b and a[:42] == me.lower() and len(a) == 66
    assert job_id_customer(a) == me and job_id_bytes(me, bytes(RANDOM_BYTES)) == bytes.fromhex(me[2:]) + bytes(12)
    assert new_job_id(me, b"\x01" * RANDOM_BYTES) == me.lower() + "01" * RANDOM_BYTES
    JobSubmit(job_id=a, spec=JobSpec(max_price=1))  # the wire schema takes it (lowercase hex)


def test_an_id_of_another_customer_is_refused_with_both_named() -> None:
    me, other = Account.create().address, Account.create().address
    job_id = new_job_id(other)
    check_job_id(job_id, other)
    check_job_id(job_id, other.lower())
    with pytest.raises(JobIdNotYours, match=f"job id {job_id} is not {me}'s") as got:
        check_job_id(job_id, me)
    assert (got.value.job_id, got.value.customer) == (job_id, me) and isinstance(got.value, GridMintValueError)


@pytest.mark.parametrize("bad", ["0x1234", "0x" + "zz" * 32, "0x" + "00" * 33])
def test_malformed_ids_and_tails_are_value_errors(bad: str) -> None:
    with pytest.raises(GridMintValueError):
        job_id_customer(bad)
    with pytest.raises(GridMintValueError):
        new_job_id(Account.create().address, b"short")
    with pytest.raises(GridMintValueError):
        new_job_id("not an address")
