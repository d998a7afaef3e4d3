"""One client process of gconn-soak: a gevent pool of clients sending verified echoes.

Each client connects from a source address of its own range (127.0.N.x, with
IP_BIND_ADDRESS_NO_PORT so the port is chosen per destination and ephemeral ports last), then
every ``--interval`` seconds sends ``seq | length | crc32 | payload`` and expects it back byte
for byte.  Once a second it prints one JSON line of cumulative counts and sampled latencies
(reservoirs of at most SAMPLES values) on stdout for the orchestrator; the last line has
``"done": true``.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import errno  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import socket  # noqa: E402
import struct  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import zlib  # noqa: E402

import gevent  # noqa: E402
from gevent.event import Event  # noqa: E402

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
HEADER = struct.Struct("!QII")  # sequence number, payload length, CRC-32 of the payload
SAMPLES = 5000  # latency samples kept per process (uniform reservoir)
SOURCES_PER_PROCESS = 8  # source addresses each client process spreads over
CONNECT_TIMEOUT = 30.0  # seconds: a connect may wait in a full backlog during the ramp
ECHO_TIMEOUT = 30.0  # seconds for an echo to come back before it counts as lost
REPORT_EVERY = 1.0  # seconds between JSON lines
PATTERN = os.urandom(1 << 16)  # payload bytes are slices of this, different per echo


class Reservoir:
    """A uniform sample of at most ``size`` values from a stream."""

    def __init__(self, size=SAMPLES):
        self.size, self.seen, self.values = size, 0, []

    def add(self, value):
        self.seen += 1
        if len(self.values) < self.size:
            self.values.append(value)
        else:
            slot = random.randrange(self.seen)
            if slot < self.size:
                self.values[slot] = value


class Stats:
    def __init__(self):
        self.connected = self.open = self.echoes_sent = self.echoes_verified = 0
        self.bytes_verified = self.lost = self.corrupted = 0
        self.failed = {}
        self.rtt = Reservoir()
        self.connect = Reservoir()

    def fail(self, reason):
        self.failed[reason] = self.failed.get(reason, 0) + 1

    def line(self, done=False):
        return json.dumps({
            "connected": self.connected, "open": self.open, "failed": self.failed,
            "echoes_sent": self.echoes_sent, "echoes_verified": self.echoes_verified,
            "bytes_verified": self.bytes_verified, "lost": self.lost,
            "corrupted": self.corrupted, "rtt": [round(v, 6) for v in self.rtt.values],
            "connect": [round(v, 6) for v in self.connect.values], "done": done})


def failure_reason(error):
    """A short, stable name for why a connect failed."""
    if isinstance(error, (TimeoutError, socket.timeout)):
        return "timeout"
    names = {errno.ECONNREFUSED: "refused", errno.ECONNRESET: "reset",
             errno.EADDRNOTAVAIL: "no_source_port", errno.EMFILE: "client_out_of_fds"}
    return names.get(getattr(error, "errno", None), type(error).__name__)


def receive_exactly(connection, size):
    chunks, left = [], size
    while left:
        chunk = connection.recv(left)
        if not chunk:
            raise ConnectionResetError(errno.ECONNRESET, "closed mid-echo")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


class Clients:
    def __init__(self, options):
        self.options = options
        self.stats = Stats()
        self.stopping = Event()
        self.ramped = Event()  # set once every client connected or failed
        self.settled = 0  # clients that connected or failed for good
        host, _, port = options.target.rpartition(":")
        self.target = (host.strip("[]"), int(port))
        self.sources = [f"127.0.{options.index + 2}.{k + 1}" for k in range(SOURCES_PER_PROCESS)]

    def connect(self, number):
        started = time.monotonic()
        connection = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            connection.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            connection.bind((self.sources[number % len(self.sources)], 0))
            connection.settimeout(CONNECT_TIMEOUT)
            connection.connect(self.target)
        except BaseException:
            connection.close()
            raise
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connection.settimeout(ECHO_TIMEOUT)
        self.stats.connect.add(time.monotonic() - started)
        return connection

    def echo(self, connection, number, sequence):
        """Send one message and verify its echo; False when the connection is unusable."""
        size = self.options.payload
        offset = (sequence * 7919 + number * 104729) % (len(PATTERN) - size)
        payload = PATTERN[offset:offset + size]
        message = HEADER.pack(sequence, size, zlib.crc32(payload)) + payload
        self.stats.echoes_sent += 1
        started = time.monotonic()
        try:
            connection.sendall(message)
            reply = receive_exactly(connection, len(message))
        except OSError:
            self.stats.lost += 1
            return False
        self.stats.rtt.add(time.monotonic() - started)
        got_sequence, got_size, got_crc = HEADER.unpack_from(reply)
        if reply != message or got_crc != zlib.crc32(reply[HEADER.size:]):
            self.stats.corrupted += 1
            return False
        self.stats.echoes_verified += 1
        self.stats.bytes_verified += len(message)
        return True

    def settle_one(self):
        """One more client connected or failed; the ramp ends when all have."""
        self.settled += 1
        if self.settled == self.options.clients:
            self.ramped.set()

    def client(self, number):
        """One client: connect, echo every interval, reconnect on churn, until stopped."""
        options = self.options
        first = True
        churn = min(1.0, options.churn * options.interval)  # chance to reconnect per echo
        while not self.stopping.is_set():
            try:
                connection = self.connect(number)
            except OSError as error:
                self.stats.fail(failure_reason(error))
                if first:
                    self.settle_one()
                return
            if first:
                self.settle_one()
                first = False
            self.stats.connected += 1
            self.stats.open += 1
            sequence, healthy = 0, True
            try:
                if self.stopping.wait(random.uniform(0, options.interval)):
                    break
                while healthy and not self.stopping.is_set():
                    healthy = self.echo(connection, number, sequence)
                    sequence += 1
                    if churn and random.random() < churn:
                        break
                    if self.stopping.wait(options.interval):
                        break
            finally:
                self.stats.open -= 1
                connection.close()
            if not healthy:
                return

    def run(self):
        options = self.options
        reporter = gevent.spawn(self.report)
        clients = []
        started = time.monotonic()
        batch = max(1, int(options.rate / 100))  # clients started per 10 ms tick
        for number in range(options.clients):
            clients.append(gevent.spawn(self.client, number))
            if (number + 1) % batch == 0:
                due = started + (number + 1) / options.rate
                gevent.sleep(max(0.0, due - time.monotonic()))
        self.ramped.wait()  # every client of this process connected (or failed for good)
        print(json.dumps({"ramped": time.monotonic() - started}), flush=True)
        self.stopping.wait(options.duration)  # the hold
        self.stopping.set()
        gevent.joinall(clients, timeout=ECHO_TIMEOUT + 5)
        reporter.kill()
        print(self.stats.line(done=True), flush=True)

    def report(self):
        while True:
            gevent.sleep(REPORT_EVERY)
            print(self.stats.line(), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="soak_client")
    for name, kind in (("--target", str), ("--clients", int), ("--rate", float),
                       ("--duration", float), ("--interval", float), ("--payload", int),
                       ("--churn", float), ("--index", int)):
        parser.add_argument(name, type=kind, required=True)
    options = parser.parse_args(argv)
    import resource
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    Clients(options).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
