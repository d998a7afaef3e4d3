"""One client process of gconn-soak: thousands of clients sending verified echoes, in one loop.

The harness must cost far less than what it measures, so a client is not a greenlet but a few
slots of state, and the process is a single epoll loop with a 10 ms timer tick:

- connects are non-blocking, started at ``--rate`` per second from source addresses of the
  process's own range (127.0.N.x, with IP_BIND_ADDRESS_NO_PORT so the port is chosen per
  destination and ephemeral ports last), spread over the ``--target`` addresses;
- every client owns one slot of a timing wheel (``--interval`` seconds in 10 ms ticks); each
  tick sends ``seq | length | crc32 | payload`` on the clients of its slot, one ``send`` each;
- replies are parsed as they arrive and matched in order against the echoes in flight.

An echo is *verified* when it comes back byte for byte, *late* when that took longer than
``--late-after`` (counted with its delay, still verified), *corrupted* when the bytes differ,
and *lost* when it never came back although the connection stayed open (an echo overtaken by
a later one, or still missing when the run's drain time ends).  A connection the far side
ended (close or reset) while the client still wanted it is *cut*: its client address, what the
client saw and the echoes then in flight are reported, so gconn-soak can name the end reason
gconn logged for it.

For gconn-soak's fault injection, cuts, late and lost echoes are also counted per second of
the monotonic clock (which every process of the machine shares; late and lost ones by the
second they were sent), so that the orchestrator can tell which fault they belong to; and
SIGUSR1 turns every tenth client into a slow reader (it stops reading, keeps sending) until
the next SIGUSR1; from then on those clients' echoes stay out of the latency windows (the
windows say what the other clients see).

The loop measures itself: how late each tick runs (its lag) and its CPU time.  Once a second
it prints one JSON line of cumulative counts and log-scale histograms on stdout for the
orchestrator; the last line has ``"done": true``.
"""

import argparse
import collections
import errno
import json
import math
import os
import random
import resource
import select
import signal
import socket
import struct
import sys
import time
import zlib

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
HEADER = struct.Struct("!QII")  # sequence number, payload length, CRC-32 of the payload
TICK = 0.01  # seconds per timer tick (the timing wheel's resolution)
SOURCES_PER_PROCESS = 8  # source addresses each client process spreads over
CONNECT_TIMEOUT = 30.0  # seconds: a connect may wait in a full backlog during the ramp
REPORT_EVERY = 100  # ticks between JSON lines (one second)
CUTS_LISTED = 500  # cut connections listed by address per process (all are counted)
PATTERN = os.urandom(1 << 16)  # payload bytes are slices of this, different per echo
BUCKETS_PER_E = 20  # histogram resolution: buckets grow by e^(1/20), about 5 %
RECEIVE = 65536
EPOLLIN, EPOLLOUT = select.EPOLLIN, select.EPOLLOUT
EPOLLERR_HUP = select.EPOLLERR | select.EPOLLHUP
SLOW_EVERY = 10  # with slow readers on, every tenth client stops reading


def bucket(seconds):
    """The log-scale histogram bucket of a duration (microsecond resolution at the bottom)."""
    micros = seconds * 1e6
    return 0 if micros < 1 else int(math.log(micros) * BUCKETS_PER_E) + 1


def bucket_value(index):
    """A duration in seconds that stands for ``bucket`` (its geometric middle)."""
    return 0.0 if index == 0 else math.exp((index - 0.5) / BUCKETS_PER_E) / 1e6


class Histogram:
    """Counts per log-scale bucket; adds up exactly across processes and reports."""

    __slots__ = ("counts", "maximum")

    def __init__(self):
        self.counts = collections.Counter()
        self.maximum = 0.0

    def add(self, seconds):
        self.counts[bucket(seconds)] += 1
        if seconds > self.maximum:
            self.maximum = seconds

    def export(self):
        return {"counts": {str(k): v for k, v in self.counts.items()},
                "max": round(self.maximum, 6)}


class Client:
    __slots__ = ("number", "sock", "fd", "connecting_since", "slot", "sequence", "in_flight",
                 "received", "outgoing", "local", "slow")

    def __init__(self, number):
        self.number = number
        self.sock = None
        self.fd = -1
        self.connecting_since = None
        self.slot = None
        self.sequence = 0
        self.in_flight = collections.deque()  # (sequence, sent at, message)
        self.received = b""  # bytes of an echo not yet complete
        self.outgoing = b""  # bytes the socket did not take yet (rare: 16 + payload bytes)
        self.local = None  # "host:port" of our end, once connected
        self.slow = False  # a slow reader now: not reading its socket


class Soak:
    def __init__(self, options):
        self.options = options
        self.targets = []
        for text in options.target.split(","):
            host, _, port = text.strip().rpartition(":")
            self.targets.append((host.strip("[]"), int(port)))
        self.sources = [f"127.0.{options.index + 2}.{k + 1}" for k in range(SOURCES_PER_PROCESS)]
        self.message_size = HEADER.size + options.payload
        self.slots = max(1, round(options.interval / TICK))
        self.wheel = collections.defaultdict(set)  # slot -> clients sending on it
        self.poller = select.epoll()
        self.by_fd = {}
        self.connecting = {}  # fd -> client, while its connect is in progress
        self.clients = [Client(number) for number in range(options.clients)]
        self.started_clients = 0
        self.settled = 0  # clients whose first connect succeeded or failed for good
        self.sending = True
        self.churn = min(1.0, options.churn * options.interval)  # chance to reconnect per echo
        self.counts = collections.Counter()  # connected, open, echoes_sent, echoes_verified,
        # bytes_verified, late, lost, corrupted, cut
        self.failed = collections.Counter()
        self.cut_seen = collections.Counter()
        self.cuts = []  # [{"client", "seen", "in_flight"}] up to CUTS_LISTED
        self.rtt = Histogram()
        self.late = Histogram()  # delays of the late echoes
        self.connect_time = Histogram()
        self.lag = Histogram()
        self.window_rtt = Histogram()  # since the last report line
        self.window_lag = Histogram()
        # per second of the monotonic clock (late and lost: the second the echo was sent)
        self.by_second = {"cut": collections.Counter(), "late": collections.Counter(),
                          "lost": collections.Counter()}
        self.slow_readers = False  # SIGUSR1's toggle
        self.slow_used = False  # slow readers were on once: their echoes leave the windows
        self.slow_toggled = False  # a SIGUSR1 came: the next tick applies it

    # connecting ------------------------------------------------------------------------------

    def connect(self, client, now):
        target = self.targets[client.number % len(self.targets)]
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((self.sources[client.number % len(self.sources)], 0))
            code = sock.connect_ex(target)
        except OSError as error:
            sock.close()
            self.connect_failed(client, error.errno)
            return
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            self.connect_failed(client, code)
            return
        client.sock, client.fd, client.connecting_since = sock, sock.fileno(), now
        client.received = client.outgoing = b""
        client.in_flight.clear()
        self.by_fd[client.fd] = client
        self.connecting[client.fd] = client
        self.poller.register(client.fd, EPOLLOUT)

    def connected(self, client, now):
        code = client.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        del self.connecting[client.fd]
        if code:
            self.drop_socket(client)
            self.connect_failed(client, code)
            return
        client.slow = self.slow_readers and client.number % SLOW_EVERY == 0
        self.poller.modify(client.fd, self.events(client))
        client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        host, port = client.sock.getsockname()[:2]
        client.local = f"{host}:{port}"
        self.connect_time.add(now - client.connecting_since)
        client.connecting_since = None
        self.counts["connected"] += 1
        self.counts["open"] += 1
        if client.slot is None:
            client.slot = random.randrange(self.slots)
            self.settle()
        self.wheel[client.slot].add(client)

    def connect_failed(self, client, code):
        names = {errno.ECONNREFUSED: "refused", errno.ECONNRESET: "reset",
                 errno.ETIMEDOUT: "timeout", errno.EADDRNOTAVAIL: "no_source_port",
                 errno.EMFILE: "client_out_of_fds", errno.ENFILE: "client_out_of_fds"}
        self.failed[names.get(code, errno.errorcode.get(code, str(code)))] += 1
        if client.slot is None:  # its first connect: that client is settled, for good
            client.slot = -1
            self.settle()
        elif client.slot >= 0:
            self.wheel[client.slot].discard(client)

    def settle(self):
        self.settled += 1
        if self.settled == self.options.clients:
            print(json.dumps({"ramped": time.monotonic() - self.t0}), flush=True)

    def drop_socket(self, client):
        self.poller.unregister(client.fd)
        del self.by_fd[client.fd]
        client.sock.close()
        client.sock, client.fd = None, -1

    def close(self, client):
        """This process is done with the connection: close it."""
        if client.slot is not None and client.slot >= 0:
            self.wheel[client.slot].discard(client)
        self.counts["open"] -= 1
        self.drop_socket(client)

    # echoes ----------------------------------------------------------------------------------

    def send(self, client, now):
        if self.churn and not client.in_flight and random.random() < self.churn:
            self.close(client)
            self.wheel[client.slot].add(client)  # keeps its slot across the reconnect
            self.connect(client, now)
            return
        size = self.options.payload
        sequence = client.sequence
        client.sequence += 1
        offset = (sequence * 7919 + client.number * 104729) % (len(PATTERN) - size)
        payload = PATTERN[offset:offset + size]
        message = HEADER.pack(sequence, size, zlib.crc32(payload)) + payload
        client.in_flight.append((sequence, now, message))
        self.counts["echoes_sent"] += 1
        if client.outgoing:
            client.outgoing += message
            return
        try:
            sent = client.sock.send(message)
        except BlockingIOError:
            sent = 0
        except OSError as error:
            self.cut(client, error)
            return
        if sent < len(message):
            client.outgoing = message[sent:]
            self.poller.modify(client.fd, self.events(client))

    def flush(self, client):
        try:
            sent = client.sock.send(client.outgoing)
        except BlockingIOError:
            return
        except OSError as error:
            self.cut(client, error)
            return
        client.outgoing = client.outgoing[sent:]
        if not client.outgoing:
            self.poller.modify(client.fd, self.events(client))

    @staticmethod
    def events(client):
        """The epoll events ``client`` waits for: its replies unless it is a slow reader now,
        and room to send while it has bytes the socket did not take."""
        return (0 if client.slow else EPOLLIN) | (EPOLLOUT if client.outgoing else 0)

    def toggle_slow_readers(self):
        """SIGUSR1 (applied from the loop): every tenth client stops reading, or reads again."""
        self.slow_readers = not self.slow_readers
        self.slow_used = True
        for client in self.clients[::SLOW_EVERY]:
            client.slow = self.slow_readers
            if client.sock is not None and client.connecting_since is None:
                self.poller.modify(client.fd, self.events(client))

    def receive(self, client, now):
        try:
            data = client.sock.recv(RECEIVE)
        except BlockingIOError:
            return
        except OSError as error:
            self.cut(client, error)
            return
        if not data:
            self.cut(client, None)
            return
        buffer = client.received + data if client.received else data
        size, position = self.message_size, 0
        while len(buffer) - position >= size:
            if not self.match(client, buffer[position:position + size], now):
                return  # corrupted: the connection was closed
            position += size
        client.received = buffer[position:]

    def match(self, client, reply, now):
        """Check one echoed message against the oldest in flight; False if it was corrupted."""
        sequence, size, crc = HEADER.unpack_from(reply)
        in_flight = client.in_flight
        while in_flight and in_flight[0][0] < sequence:  # overtaken: can never come back
            self.count_lost(in_flight.popleft())
        if (not in_flight or in_flight[0][0] != sequence or reply != in_flight[0][2]
                or crc != zlib.crc32(reply[HEADER.size:])):
            self.counts["corrupted"] += 1
            self.close(client)  # its stream cannot be trusted any more
            return False
        _, sent, _ = in_flight.popleft()
        rtt = now - sent
        self.rtt.add(rtt)
        if client.number % SLOW_EVERY or not self.slow_used:
            self.window_rtt.add(rtt)  # a slow reader's own delay is not gconn's latency
        if rtt > self.options.late_after:
            self.counts["late"] += 1
            self.late.add(rtt)
            self.by_second["late"][int(sent)] += 1
        self.counts["echoes_verified"] += 1
        self.counts["bytes_verified"] += len(reply)
        return True

    def cut(self, client, error):
        """The far side ended a connection this process still wanted."""
        seen = "close" if error is None else (
            "reset" if error.errno in (errno.ECONNRESET, errno.EPIPE) else
            errno.errorcode.get(error.errno, str(error.errno)))
        self.counts["cut"] += 1
        self.cut_seen[seen] += 1
        self.by_second["cut"][int(time.monotonic())] += 1
        if len(self.cuts) < CUTS_LISTED:
            self.cuts.append({"client": client.local, "seen": seen,
                              "in_flight": len(client.in_flight)})
        self.counts["cut_in_flight"] += len(client.in_flight)
        self.close(client)

    # the loop --------------------------------------------------------------------------------

    def count_lost(self, echo):
        """An echo in flight that can never come back."""
        self.counts["lost"] += 1
        self.by_second["lost"][int(echo[1])] += 1

    def tick(self, number, now):
        options = self.options
        if self.slow_toggled:
            self.slow_toggled = False
            self.toggle_slow_readers()
        if self.started_clients < options.clients:  # the ramp: --rate connects per second
            due = min(options.clients, math.ceil((number + 1) * TICK * options.rate))
            while self.started_clients < due:
                self.connect(self.clients[self.started_clients], now)
                self.started_clients += 1
        if self.sending:
            for client in list(self.wheel.get(number % self.slots, ())):
                if client.sock is not None and client.connecting_since is None:
                    self.send(client, now)
        if number % 100 == 0 and self.connecting:  # connect timeouts, once a second
            for client in [c for c in self.connecting.values()
                           if now - c.connecting_since > CONNECT_TIMEOUT]:
                del self.connecting[client.fd]
                self.drop_socket(client)
                self.connect_failed(client, errno.ETIMEDOUT)
        if number % REPORT_EVERY == 0:
            self.report()

    def run(self):
        options = self.options
        self.t0 = time.monotonic()
        poll, by_fd, connecting = self.poller.poll, self.by_fd, self.connecting
        number = 0
        hold_ends = drain_ends = None
        while True:
            now = time.monotonic()
            scheduled = self.t0 + number * TICK
            if now >= scheduled:
                lag = now - scheduled
                self.lag.add(lag)
                self.window_lag.add(lag)
                self.tick(number, now)
                number += 1
                if hold_ends is None and self.settled == options.clients:
                    hold_ends = now + options.duration
                if hold_ends is not None and self.sending and now >= hold_ends:
                    self.sending = False
                    drain_ends = now + options.drain
                if drain_ends is not None and number % 10 == 0 and (now >= drain_ends or not any(
                        c.in_flight for c in self.clients if c.sock is not None)):
                    break  # every echo came back, or the drain time is over
                continue
            for fd, events in poll(scheduled - now):
                client = by_fd.get(fd)
                if client is None:
                    continue
                now = time.monotonic()
                if fd in connecting:
                    self.connected(client, now)
                    continue
                if events & EPOLLOUT and client.outgoing:
                    self.flush(client)
                if events & (EPOLLIN | EPOLLERR_HUP) and client.sock is not None:
                    self.receive(client, now)
        for client in self.clients:  # still missing at the end of the drain: lost
            if client.sock is not None:
                for echo in client.in_flight:
                    self.count_lost(echo)
        self.report(done=True)
        for client in self.clients:
            if client.sock is not None:
                self.close(client)

    def report(self, done=False):
        usage = resource.getrusage(resource.RUSAGE_SELF)
        line = {**{key: self.counts[key] for key in (
            "connected", "open", "echoes_sent", "echoes_verified", "bytes_verified", "late",
            "lost", "corrupted", "cut", "cut_in_flight")},
            "failed": dict(self.failed), "cut_seen": dict(self.cut_seen),
            "cuts": self.cuts, "rtt": self.rtt.export(), "late_delay": self.late.export(),
            "connect": self.connect_time.export(), "lag": self.lag.export(),
            "window_rtt": self.window_rtt.export(), "window_lag": self.window_lag.export(),
            "by_second": {kind: {str(k): v for k, v in counts.items()}
                          for kind, counts in self.by_second.items()},
            "cpu": round(usage.ru_utime + usage.ru_stime, 3), "done": done}
        self.window_rtt, self.window_lag = Histogram(), Histogram()
        print(json.dumps(line, separators=(",", ":")), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="soak_client")
    for name, kind in (("--target", str), ("--clients", int), ("--rate", float),
                       ("--duration", float), ("--interval", float), ("--payload", int),
                       ("--churn", float), ("--index", int)):
        parser.add_argument(name, type=kind, required=True)
    parser.add_argument("--late-after", type=float, default=1.0)
    parser.add_argument("--drain", type=float, default=30.0)
    options = parser.parse_args(argv)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    soak = Soak(options)
    signal.signal(signal.SIGUSR1, lambda *_: setattr(soak, "slow_toggled", True))
    soak.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
