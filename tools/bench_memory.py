"""What one idle forwarded connection costs in a worker's memory, and how much of it is its
greenlet: RSS per connection for N connections parked in three ways, in one process.

- ``greenlet``: a bare greenlet of the kind gconn spawns per connection (session.SessionGreenlet,
  a gevent.Greenlet) parked in ``hub.switch()`` (the price of the contract alone);
- ``pump``: gconn's Pump (two flows, two read watchers) parked in its forwarding loop in one
  Greenlet per connection, over a pair of connected loopback socket pairs;
- the sockets themselves are made first and are the baseline (their memory is the kernel's).

Every greenlet is checked to be started and parked, and every socket open, before RSS is read.
Each figure comes from a fresh process (memory freed by an earlier measurement would be reused
and hide the cost), twice.

    python -m gconn_tools.bench_memory [--connections 4000]
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import gevent  # noqa: E402
from gevent.hub import get_hub  # noqa: E402
from gevent.pool import Pool  # noqa: E402

from gconn.forward import Pump  # noqa: E402
from gconn.session import SessionGreenlet  # noqa: E402
from gconn.sockets import process_usage, raise_open_files_limit  # noqa: E402


def resident():
    """This process's resident bytes after a full collection."""
    gc.collect()
    return process_usage()[2]


def socket_pairs(count):
    """``count`` (client side, destination side) plain non-blocking socket pairs, each end
    connected to a peer end kept open too (so nothing reads end-of-stream)."""
    kept = []
    pairs = []
    for _ in range(count):
        client, client_peer = socket.socketpair()
        destination, destination_peer = socket.socketpair()
        for end in (client, destination):
            end.setblocking(False)
        kept += [client_peer, destination_peer]
        pairs.append((client._sock if hasattr(client, "_sock") else client,
                      destination._sock if hasattr(destination, "_sock") else destination))
        kept += [client, destination]
    return pairs, kept


def park_bare(_pair):
    """A connection greenlet that holds nothing: parked until killed."""
    get_hub().switch()


def park_pump(pair):
    """A connection greenlet forwarding an idle pair: parked in Pump.run."""
    client, destination = pair
    Pump(client, destination, 65536, splice=False).run(0)


def measure(count, body):
    """RSS bytes per connection for ``count`` greenlets running ``body`` over socket pairs."""
    pairs, kept = socket_pairs(count)
    pool = Pool(count, greenlet_class=SessionGreenlet)
    before = resident()
    for pair in pairs:
        pool.spawn(body, pair)
    gevent.sleep(0)  # each greenlet runs until it parks
    gevent.sleep(0)
    parked = sum(1 for greenlet in pool.greenlets if greenlet and not greenlet.dead)
    assert parked == count, f"{parked} of {count} greenlets parked"
    after = resident()
    assert process_usage()[0] >= 4 * count, "sockets closed early"
    pool.kill()
    for end in kept:
        end.close()
    return (after - before) / count


KINDS = {"greenlet": park_bare, "pump": park_pump}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="gconn_tools.bench_memory",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=4000)
    parser.add_argument("--kind", choices=sorted(KINDS), help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    limit = raise_open_files_limit()
    if 4 * options.connections + 256 > limit:
        parser.error(f"--connections {options.connections} needs four descriptors each; "
                     f"the open-files limit {limit} allows {(limit - 256) // 4}")
    if options.kind:  # one measurement, in this fresh process
        measure(200, KINDS[options.kind])  # warm-up: buffers, code objects, the first arenas
        print(round(measure(options.connections, KINDS[options.kind]) / 1024, 2))
        return 0
    figures = {kind: [float(subprocess.run(
        [sys.executable, "-m", "gconn_tools.bench_memory", "--kind", kind,
         "--connections", str(options.connections)],
        capture_output=True, text=True, check=True).stdout) for _ in range(2)]
        for kind in KINDS}
    print(json.dumps({"connections": options.connections, "kb_per_connection": figures}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
