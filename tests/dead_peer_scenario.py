"""One scenario of test_dead_peer.py, run in a network and pid namespace of its own:
``unshare --net --pid --kill-child python tests/dead_peer_scenario.py --vanish SIDE ...``.

A client and a destination (plain sockets of this script, each on its own loopback address)
talk through a gconn daemon; then one of them vanishes without a FIN: a tc filter drops every
packet from its address. The script observes and reports, as one JSON object on stdout, and
judges nothing (the test does). Nothing here touches the host's network, and every process
started here dies with the namespace when the script (its pid 1) ends.
"""

import argparse
import json
import select
import socket
import subprocess
import time

from conftest import Daemon

ADDRESSES = {"client": "127.0.0.6", "destination": "127.0.0.5"}  # one each: either can vanish
SETTLE_WAIT = 10.0  # seconds for the connection to be set up and forward its round trip
CLOSE_WAIT = 5.0  # seconds the surviving peer may take to see its side closed, once logged
DROP_CLASS = "1:1"  # the tc class whose queue (pfifo limit 0) drops everything sent to it


def run(*command):
    subprocess.run(command, check=True, capture_output=True, timeout=10)


def prepare_loopback():
    """Bring lo up with a drop class ready, so that vanishing is a single filter."""
    run("ip", "link", "set", "lo", "up")
    # this kernel has no drop action (act_gact) nor netem: an htb class whose only queue
    # holds no packet drops what a filter sends there; the rest goes straight through
    run("tc", "qdisc", "add", "dev", "lo", "root", "handle", "1:", "htb")
    run("tc", "class", "add", "dev", "lo", "parent", "1:", "classid", DROP_CLASS,
        "htb", "rate", "1mbit")
    run("tc", "qdisc", "add", "dev", "lo", "parent", DROP_CLASS, "pfifo", "limit", "0")


def vanish(address):
    """From now on every packet from ``address`` is lost: no FIN, no RST, no ACK."""
    run("tc", "filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "prio", "1",
        "u32", "match", "ip", "src", f"{address}/32", "flowid", DROP_CLASS)


def what_arrives(peer, timeout):
    """How the other end treats ``peer`` within ``timeout`` seconds: ``closed`` (end of
    stream), ``reset``, ``open`` (nothing came) or ``data``."""
    if not select.select([peer], [], [], timeout)[0]:
        return "open"
    try:
        return "data" if peer.recv(4096) else "closed"
    except ConnectionResetError:
        return "reset"


def connected_pair(daemon, listener):
    """A client connected through ``daemon`` and the destination's end of it, after a round
    trip each way (so both of gconn's sockets are established and forwarding)."""
    client = socket.socket()
    client.settimeout(SETTLE_WAIT)
    client.bind((ADDRESSES["client"], 0))
    client.connect(("127.0.0.1", daemon.port()))
    listener.settimeout(SETTLE_WAIT)
    destination, _ = listener.accept()
    destination.settimeout(SETTLE_WAIT)
    client.sendall(b"ping")
    assert destination.recv(4) == b"ping"
    destination.sendall(b"pong")
    assert client.recv(4) == b"pong"
    return client, destination


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vanish", choices=ADDRESSES, required=True)
    parser.add_argument("--send", default="", help="the survivor sends this once the other "
                                                   "vanished")
    parser.add_argument("--watch", type=float, required=True,
                        help="seconds to wait for gconn's access line")
    parser.add_argument("options", nargs="*", help="gconn's route options")
    arguments = parser.parse_args()

    prepare_loopback()
    listener = socket.create_server((ADDRESSES["destination"], 0))
    host, port = listener.getsockname()
    daemon = Daemon(["--workers", "1", "--access-log", "-", "--bind", "127.0.0.1:0",
                     "--destination", f"{host}:{port}", *arguments.options])
    try:
        client, destination = connected_pair(daemon, listener)
        survivor = destination if arguments.vanish == "client" else client
        mark = daemon.mark()
        vanish(ADDRESSES[arguments.vanish])
        vanished_at = time.monotonic()
        if arguments.send:
            survivor.sendall(arguments.send.encode())
        try:
            access = daemon.wait_contains(" end=", timeout=arguments.watch, since=mark)
        except AssertionError:
            if daemon.finished:  # gconn died: no observation to report
                raise
            access = None  # the connection outlived the watch
        seconds = time.monotonic() - vanished_at
        survivor_saw = what_arrives(survivor, CLOSE_WAIT if access else 0)
        sockets = subprocess.run(["ss", "-tnoi"], capture_output=True, text=True,
                                 timeout=10).stdout
        print(json.dumps({"access": access, "seconds": round(seconds, 2),
                          "survivor_saw": survivor_saw, "sockets": sockets,
                          "log": daemon.lines[-20:]}))
    finally:
        daemon.stop()


if __name__ == "__main__":
    main()
