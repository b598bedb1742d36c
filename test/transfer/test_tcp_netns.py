"""The tcp backend between two network namespaces joined by a veth pair (two "hosts" with their
own addresses and stacks), as across machines. Needs root and iproute2; skipped otherwise."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

NS = (f"dpt{os.getpid()}a", f"dpt{os.getpid()}b")
SUBNET = f"10.{200 + os.getpid() % 50}.{os.getpid() % 250}"
SIZE = 8 << 20


def _ip(*args):
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


@pytest.fixture
def two_hosts():
    if shutil.which("ip") is None or os.geteuid() != 0:
        pytest.skip("needs root and iproute2")
    veth = (f"dpv{os.getpid() % 100000}a", f"dpv{os.getpid() % 100000}b")
    try:
        for ns in NS:
            _ip("netns", "add", ns)
        _ip("link", "add", veth[0], "type", "veth", "peer", "name", veth[1])
        for k, (ns, dev) in enumerate(zip(NS, veth, strict=True)):
            _ip("link", "set", dev, "netns", ns)
            _ip("netns", "exec", ns, "ip", "addr", "add", f"{SUBNET}.{k + 1}/24", "dev", dev)
            _ip("netns", "exec", ns, "ip", "link", "set", dev, "up")
            _ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        for ns in NS:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        pytest.skip(f"network namespaces not available here: {e}")
    yield
    for ns in NS:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


SERVER = textwrap.dedent(f"""
    import sys, xxhash, numpy as np
    from dualpath.transfer import TransferEngine
    eng = TransferEngine("tcp", num_workers=4)
    buf = np.zeros({SIZE}, np.uint8)
    region = eng.register_array(buf)
    port = eng.listen("{SUBNET}.1", 0)
    print(port, region, flush=True)
    sys.stdin.readline()  # the writer is done
    print(xxhash.xxh64(buf.tobytes()).hexdigest(), flush=True)
""")

CLIENT = textwrap.dedent(f"""
    import sys, xxhash, numpy as np
    from dualpath.transfer import TransferBatch, TransferEngine
    port, region = int(sys.argv[1]), int(sys.argv[2])
    eng = TransferEngine("tcp", num_workers=4)
    src = np.random.default_rng(5).integers(0, 256, {SIZE}, dtype=np.uint8)
    local = eng.register_array(src)
    remote = eng.register_remote("{SUBNET}.1:%d" % port, region, {SIZE}, connections=4)
    n = 1000  # 1,000 one-sided writes of 8 KiB covering the buffer, then one large one
    off = np.arange(n, dtype=np.int64) * 8192
    h = eng.submit(TransferBatch.of(local, off, remote, off, 8192))
    st1 = eng.wait(h, 60)
    h2 = eng.submit(TransferBatch.of(local, n * 8192, remote, n * 8192, {SIZE} - n * 8192))
    st2 = eng.wait(h2, 60)
    print(st1, st2, xxhash.xxh64(src.tobytes()).hexdigest(), flush=True)
""")


def test_one_sided_writes_between_namespaces(two_hosts):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    server = subprocess.Popen(["ip", "netns", "exec", NS[0], sys.executable, "-c", SERVER],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        port, region = server.stdout.readline().split()
        client = subprocess.run(["ip", "netns", "exec", NS[1], sys.executable, "-c", CLIENT,
                                 port, region], capture_output=True, text=True, timeout=120,
                                env=env)
        assert client.returncode == 0, client.stderr
        st1, st2, want = client.stdout.split()
        assert (st1, st2) == ("done", "done")
        server.stdin.write("done\n")
        server.stdin.flush()
        assert server.stdout.readline().strip() == want  # every byte landed, in place
    finally:
        server.kill()
        server.wait(10)
