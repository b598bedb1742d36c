"""Fixtures shared by the plugin's tests."""

import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # prefetch_fakes


@pytest.fixture(scope="module")
def group():
    """A real one-rank gloo process group (initialising the default group if nobody did)."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed not built")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ours = not dist.is_initialized()
    if ours:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                                world_size=1)
    yield dist.new_group([0], backend="gloo")
    if ours:
        dist.destroy_process_group()
