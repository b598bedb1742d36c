"""The rdma backend where no RDMA device exists (the project's machines): its work-request
planning, and a clean refusal to start. Moving bytes needs a device: not tested here."""

import pytest

from dualpath import _C
from dualpath.transfer import TransferEngine


def plan(lengths, max_msg=1 << 30, max_chain=32):
    return _C._rdma_plan(lengths, max_msg, max_chain)


def test_one_chain_signaled_once():
    chains = plan([4096] * 10)
    assert len(chains) == 1 and len(chains[0]) == 10
    assert [w[3] for w in chains[0]] == [False] * 9 + [True]
    assert [w[0] for w in chains[0]] == list(range(10))


def test_chains_are_capped_and_each_ends_signaled():
    chains = plan([100] * 70, max_chain=32)
    assert [len(c) for c in chains] == [32, 32, 6]
    assert all(c[-1][3] and not any(w[3] for w in c[:-1]) for c in chains)


def test_long_pieces_are_cut_at_the_max_message_and_empty_ones_skipped():
    chains = plan([10, 0, 25], max_msg=8, max_chain=4)
    flat = [w for c in chains for w in c]
    assert [(p, o, n) for p, o, n, _ in flat] == [(0, 0, 8), (0, 8, 2), (2, 0, 8), (2, 8, 8),
                                                  (2, 16, 8), (2, 24, 1)]
    assert sum(n for _, _, n, _ in flat) == 35
    assert [len(c) for c in chains] == [4, 2]
    assert plan([5], max_msg=0) == [] and plan([], max_chain=3) == []


def test_without_a_device_the_backend_says_why():
    with pytest.raises((ValueError, RuntimeError),
                       match="no RDMA device|libibverbs|not built|no device named"):
        TransferEngine("rdma")
    assert isinstance(_C.build_info()["with_rdma"], bool)
