"""The byte pump: moves bytes both ways between two connected sockets, inside the connection's
greenlet.

``Pump.run`` is the forwarding step of a session: it starts one read watcher per socket whose
callback is the greenlet's own ``switch`` (the hub does no more than switch back in, handing
over which step is ready), parks in ``hub.switch()`` and, woken, moves one chunk and parks
again.  Going back to the hub after every chunk is what keeps one always-readable socket from
starving the other connections (gevent#1741).  Reads land in one buffer shared by every pump
of the process (safe: nothing switches between a recv and its send), and the read is sent on at
once; only what the receiver would not take is kept.  Then that side stops being read
(backpressure: at most one chunk held per direction) and a write watcher waits until the
receiver takes more.

Half-close aware: end-of-stream from one side shuts the other side's write half once everything
before it was delivered, and the other direction carries on until it ends too.  The pump never
closes sockets: the session owns them.  The sockets are plain non-blocking OS sockets
(``_socket.socket``, not gevent's wrapper: its watchers, timeouts and close bookkeeping cost a
new connection more than the forwarding does); the pump owns one read watcher per socket and
makes a write watcher only when a receiver is slow, and closes them all before ``run`` returns.

Bulk streams are spliced (HAProxy's splice-auto): once a read fills the whole buffer, that
direction moves its next chunks socket -> pipe -> socket with os.splice, never copying them
into Python, borrowing one of a few per-process pipes only while those bytes are in flight; a
read shorter than a pipe's capacity returns it to copying.

A connection past its lifetime (max-connection-lifetime) is closed at its first idle moment,
never mid-transfer: both directions at rest (each waiting to read its source, or ended and its
end passed on; no chunk kept, no byte in a splice pipe or buffered by a TLS end; no byte
unread in either socket's receive queue nor unacknowledged in its send queue) after no byte
moved either way for LIFETIME_QUIET.  It is checked by the pump's one timer, the idle
timer's, so it costs no per-read work, and nothing at all when the setting is off.
"""

import errno
import fcntl
import logging
import os
import socket
import struct
import termios

from gevent.hub import get_hub
from greenlet import getcurrent

from . import local

LOGGER = logging.getLogger("gconn.forward")
_buffers = {}  # size in bytes -> memoryview over one bytearray shared by every pump in the process
SPLICE = hasattr(os, "splice")  # Linux, Python 3.10+
SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
# bytes a pipe holds (F_SETPIPE_SZ; HAProxy's tune.pipesize): the most one splice, so one
# wake-up of a bulk flow, moves.  Measured with iperf3 through one worker: 256 KB carried
# 22-24 Gbit/s where the kernel's default 64 KB carried 13-16 (the greenlet's two switches
# per chunk are the cost a larger chunk spreads).
PIPE_SIZE = 256 * 1024
PIPES_MAX = 16  # pipes lent at once per process (two descriptors each, from the reserve)
# how long no byte may have moved either way before a connection past its lifetime counts as
# idle (it must also have nothing in flight, which alone is true for an instant between two
# chunks of a steady stream).  A peer resending a lost segment pauses too: Linux's
# retransmission timeout starts at 200 ms and doubles, so a second outlasts two resends of one
# segment; RFC 6298's floor is 1 s, so a peer following it pauses about this long once.  A
# second also lets most replies to a request forwarded just before come back; a slower reply
# is the cut that layer 4 cannot see.
LIFETIME_QUIET = 1.0


class _Pipes:
    """The process's pipes for splicing, lent to a bulk flow only while its bytes are in
    flight (from the splice in until the splice out has emptied the pipe).

    Descriptors are the scarce resource (two per connection already), so at most PIPES_MAX
    pipes exist at once; a flow that finds none free copies that chunk instead.  An emptied
    pipe goes back to the free list; one that still holds bytes when its connection ends is
    closed.
    """

    def __init__(self):
        self.free = []
        self.lent = 0
        self.spliced = 0  # bytes moved by splice in this process (metrics publish it)

    def borrow(self):
        if self.free:
            self.lent += 1
            return self.free.pop()
        if self.lent >= PIPES_MAX:
            return None
        try:
            pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                fcntl.fcntl(pipe[1], fcntl.F_SETPIPE_SZ, PIPE_SIZE)
            except OSError:  # above /proc/sys/fs/pipe-max-size: the default size works too
                pass
        except OSError:  # out of descriptors: copying works without one
            return None
        self.lent += 1
        return pipe

    def give_back(self, pipe, empty):
        self.lent -= 1
        if empty:
            self.free.append(pipe)
        else:
            os.close(pipe[0])
            os.close(pipe[1])


PIPES = _Pipes()


def _shared_buffer(size):
    """The process's receive buffer of ``size`` bytes: safe to share, as nothing switches
    between a read into it and the send of what was read."""
    view = _buffers.get(size)
    if view is None:
        view = _buffers[size] = memoryview(bytearray(size))
    return view


def _kernel_queued(fd, request):
    """Bytes the kernel queues on socket ``fd``: unread (FIONREAD, Linux's SIOCINQ) or sent
    but not yet acknowledged by the peer (TIOCOUTQ, Linux's SIOCOUTQ)."""
    return struct.unpack("i", fcntl.ioctl(fd, request, b"\0\0\0\0"))[0]


class _Flow:
    """One direction: reads ``source``, writes ``target``, keeps at most one unsent chunk."""

    __slots__ = ("pump", "source", "target", "reader", "writer", "pending", "count", "ended",
                 "from_client", "bulk", "pipe", "in_pipe", "tls_source", "tls_target", "later")

    def __init__(self, pump, source, target, from_client):
        self.pump = pump
        self.source = source
        self.target = target
        self.reader = pump.loop.io(source.fileno(), 1)
        self.writer = None  # made when the target first cannot take a whole chunk
        self.pending = None  # bytes read but not yet taken by the target
        self.count = 0  # bytes read from the source (all delivered unless the peer failed)
        self.ended = False  # the source sent end-of-stream
        self.from_client = from_client
        self.bulk = False  # the last read filled the buffer: splice while that lasts
        self.pipe = None  # (read fd, write fd) while spliced bytes are in flight
        self.in_pipe = 0  # bytes spliced in from the source, not yet out to the target
        # a TLS end (protocols/tls.py) buffers bytes its socket will not signal: decrypted
        # plaintext to read on, ciphertext still to send
        self.tls_source = hasattr(source, "unsent")
        self.tls_target = hasattr(target, "unsent")
        self.later = None  # a loop callback that reads on what a TLS source has buffered

    def on_readable(self):
        """Read one chunk and send it on; keep what the target would not take."""
        if self.bulk:
            self.pipe = PIPES.borrow()
            if self.pipe is not None:  # else (every pipe lent) copy this chunk
                return self.splice_in()
        buffer = self.pump.buffer
        try:
            received = self.source.recv_into(buffer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            self.pump.fail(self.from_client, error)
            return
        if not received:
            return self.source_ended()
        self.count += received
        self.pump.active_at = self.pump.loop.now()
        try:
            sent = self.target.send(buffer[:received])
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as error:
            self.pump.fail(not self.from_client, error)
            return
        if sent < received or (self.tls_target and self.target.unsent):
            self.pending = bytes(buffer[sent:received])  # b"": only ciphertext is left
            self.wait_writable()
        elif received == len(buffer) and self.pump.splice:  # a bulk stream: splice from now
            self.bulk = True
        elif self.tls_source and self.source.pending():  # more already decrypted or queued
            self.read_later()

    def read_later(self):
        """A TLS source holds bytes its socket will not signal: read them on the next turn of
        the loop (a callback that only switches back here), after other connections had
        theirs, rather than in a loop or a recursion that a fast sender could make endless."""
        if self.later is None:
            self.later = self.pump.loop.run_callback(self.pump.switch, self.read_buffered)

    def read_buffered(self):
        """The step ``read_later`` scheduled: read on, unless this flow is waiting for its
        target or has ended meanwhile."""
        self.later = None
        if self.pending is None and not self.ended and self.reader.active:
            self.on_readable()

    def wait_writable(self):
        """The target is full: stop reading the source until it takes what is kept."""
        self.reader.stop()
        if self.writer is None:
            self.writer = self.pump.loop.io(self.target.fileno(), 2)
        self.writer.start(self.pump.switch, self.on_writable)

    def splice_in(self):
        """Splice one chunk from the source into the pipe and on to the target."""
        try:
            received = os.splice(self.source.fileno(), self.pipe[1], PIPE_SIZE, flags=SPLICE_FLAGS)
        except (BlockingIOError, InterruptedError):
            self.release_pipe()
            return
        except OSError as error:
            self.pump.fail(self.from_client, error)
            return
        if not received:
            self.release_pipe()
            return self.source_ended()
        self.count += received
        PIPES.spliced += received
        self.in_pipe = received
        self.pump.active_at = self.pump.loop.now()
        if received < PIPE_SIZE:
            self.bulk = False  # the burst is over: copy small chunks again
        if self.splice_out():
            self.release_pipe()  # lent only while bytes are in flight

    def splice_out(self):
        """Splice what the pipe holds to the target; True once it is empty."""
        try:
            self.in_pipe -= os.splice(self.pipe[0], self.target.fileno(), self.in_pipe,
                                      flags=SPLICE_FLAGS)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as error:
            self.pump.fail(not self.from_client, error)
            return False
        else:
            self.pump.active_at = self.pump.loop.now()  # a slow reader taking bytes is not idle
        if self.in_pipe:
            if self.reader.active or self.writer is None or not self.writer.active:
                self.wait_writable()
            return False
        return True

    def release_pipe(self):
        """Give the pipe back (closed if bytes are still in it: the connection is ending)."""
        if self.pipe is not None:
            PIPES.give_back(self.pipe, empty=not self.in_pipe)
            self.pipe = None
            self.in_pipe = 0

    def on_writable(self):
        """Send the kept remainder; once all is taken, read the source again (or end)."""
        if self.pipe is not None:
            if self.splice_out():
                self.release_pipe()
                self.resume()
            return
        try:
            sent = self.target.send(self.pending)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            self.pump.fail(not self.from_client, error)
            return
        self.pump.active_at = self.pump.loop.now()  # a slow reader taking bytes is not idle
        if sent < len(self.pending):
            self.pending = self.pending[sent:]
            return
        self.pending = None
        self.resume()

    def resume(self):
        """The target took everything kept: read the source again (or pass its end on)."""
        self.writer.stop()
        if self.ended:
            self.pass_end_on()
        else:
            self.reader.start(self.pump.switch, self.on_readable)
            if self.tls_source and self.source.pending():  # its socket will not signal these
                self.read_later()

    def source_ended(self):
        """The source sent end-of-stream: stop reading it and pass the end on."""
        self.reader.stop()
        self.ended = True
        self.pass_end_on()

    def pass_end_on(self):
        """The source ended and all its bytes were delivered: pass the end on (half-close)."""
        if self.pending is not None:
            return  # on_writable calls again once the remainder is delivered
        if self.pump.finished and not self.tls_target:  # the other way is over too: the
            self.pump.flow_finished(self)  # session's close sends the FIN (a TLS peer still
            return  # gets its close_notify first, or it would see a truncation)
        try:
            self.target.shutdown(socket.SHUT_WR)
        except OSError as error:
            if error.errno != errno.ENOTCONN:
                self.pump.fail(not self.from_client, error)
                return
        self.pump.flow_finished(self)

    def at_rest(self):
        """Whether this direction has no byte in flight: it waits to read its source (or has
        ended and passed its end on), keeps no chunk, holds no byte in a pipe or a TLS end,
        and the kernel has none unread from the source nor unacknowledged to the target (a
        close with unread bytes would reset the connection)."""
        if self.pending is not None or self.pipe is not None or self.later is not None:
            return False
        if self.tls_target and self.target.unsent:
            return False
        if not self.ended and (not self.reader.active
                               or (self.tls_source and self.source.pending())):
            return False
        try:
            return not (_kernel_queued(self.source.fileno(), termios.FIONREAD)
                        or _kernel_queued(self.target.fileno(), termios.TIOCOUTQ))
        except OSError:  # cannot tell: not idle (the socket's own error comes by its watcher)
            return False

    def stop(self):
        """Stop this direction's watchers for good (before the sockets close); idempotent."""
        if self.later is not None:
            self.later.stop()
            self.later = None
        self.reader.close()
        if self.writer is not None:
            self.writer.close()
        self.release_pipe()


class Pump:
    """Forwards between a client and a destination socket until both directions end.

    ``run`` does the forwarding in the calling greenlet and returns how it ended:
    ``client_closed`` or ``destination_closed`` (the side that ended first, cleanly or by
    reset: a reset is recorded in the greenlet's error state), ``idle_timeout``,
    ``fin_timeout`` (one side ended and the other way stayed quiet past the fin timeout), or
    ``max_lifetime`` (past its lifetime, closed at its first idle moment).  A kill
    (GreenletExit) raised while it waits passes through, its watchers closed.  Sockets stay
    open for the session to close.
    """

    __slots__ = ("loop", "buffer", "to_destination", "to_client", "active_at", "outcome", "switch",
                 "first_closer", "finished", "timer", "idle_timeout", "splice", "fin_timeouts",
                 "lifetime_at")

    def __init__(self, client, destination, buffer_size, splice=True):
        self.loop = get_hub().loop
        self.buffer = _shared_buffer(buffer_size)
        self.splice = splice and SPLICE
        self.switch = None  # the forwarding greenlet's switch, while it runs
        self.to_destination = _Flow(self, client, destination, from_client=True)
        self.to_client = _Flow(self, destination, client, from_client=False)
        self.active_at = self.loop.now()
        self.outcome = None  # set once forwarding is over
        self.finished = 0  # directions that ended and were passed on
        self.first_closer = None  # the end of the direction that ended first
        self.timer = None
        self.idle_timeout = 0
        self.fin_timeouts = (0, 0)  # once the client's / the destination's side has ended
        self.lifetime_at = None  # loop time the connection's lifetime is up; None: no lifetime

    @property
    def bytes_up(self):
        """Bytes forwarded from the client to the destination so far."""
        return self.to_destination.count

    @property
    def bytes_down(self):
        """Bytes forwarded from the destination to the client so far."""
        return self.to_client.count

    def run(self, idle_timeout=0, client_fin_timeout=0, server_fin_timeout=0, lifetime=None):
        """Forward until both directions end, the peers fail or nothing moved for
        ``idle_timeout`` seconds (0: no limit), or for the fin timeout once the client's /
        the destination's side ended (0: idle_timeout goes on), or, ``lifetime`` seconds from
        now (None: never), at the first idle moment; return the outcome.  Call it from the
        connection's greenlet: it waits there, never in the hub."""
        hub = get_hub()
        switch = self.switch = getcurrent().switch
        to_destination, to_client = self.to_destination, self.to_client
        try:
            self.idle_timeout = idle_timeout
            self.fin_timeouts = (client_fin_timeout, server_fin_timeout)
            if lifetime is not None:
                self.lifetime_at = self.loop.now() + lifetime
            self.arm_timer()
            to_destination.reader.start(switch, to_destination.on_readable)
            to_client.reader.start(switch, to_client.on_readable)
            # the client's first bytes are usually waiting already (it sent them while we
            # connected): move them now rather than after another trip through the loop
            to_destination.on_readable()
            while self.outcome is None:
                step = hub.switch()  # a watcher hands back the ready step
                step()
        finally:
            self.stop()
        return self.outcome

    def arm_timer(self):
        """(Re)start the one timer of this pump for whichever comes first: the idle (or fin)
        timeout if no byte moves meanwhile, or the next look at the lifetime; none when
        neither is set."""
        now = self.loop.now()
        quiet = now - self.active_at
        wait = self.idle_timeout - quiet if self.idle_timeout > 0 else None
        if self.lifetime_at is not None:
            # not before the lifetime is up nor before the quiet period could be; past both
            # and yet not at rest (a slow reader holds bytes): look again a period later
            look = max(self.lifetime_at - now, LIFETIME_QUIET - quiet)
            if look <= 0:
                look = LIFETIME_QUIET
            wait = look if wait is None else min(wait, look)
        if self.timer is not None:
            self.timer.close()
            self.timer = None
        if wait is not None:
            self.timer = self.loop.timer(max(wait, 0.0))
            self.timer.start(self.switch, self.on_timer)

    def on_timer(self):
        """Close when no byte moved for idle-timeout (the fin timeout once one side has
        ended), or when past the lifetime no byte moved for LIFETIME_QUIET and both ways are
        at rest; else wait for whichever may come next."""
        now = self.loop.now()
        quiet = now - self.active_at
        if self.idle_timeout <= 0 or quiet < self.idle_timeout:
            if self.lifetime_at is not None and now >= self.lifetime_at \
                    and quiet >= LIFETIME_QUIET and self.to_destination.at_rest() \
                    and self.to_client.at_rest():
                late = now - self.lifetime_at
                local.set_error("max_lifetime", f"closed at its first idle moment, {late:.3f}s "
                                                f"past its lifetime")
                self.outcome = "max_lifetime"
            else:
                self.arm_timer()
        elif self.finished:
            side = "client" if self.first_closer == "client_closed" else "destination"
            local.set_error("fin_timeout", f"half-closed: no byte for {self.idle_timeout:g}s "
                                           f"after the {side} ended its side")
            self.outcome = "fin_timeout"
        else:
            local.set_error("idle_timeout", f"no byte either way for {self.idle_timeout:g}s")
            self.outcome = "idle_timeout"

    def flow_finished(self, flow):
        """One direction ended cleanly; the first one to end names who closed, and from then
        on the fin timeout of its side (when set) is how long the other way may be quiet."""
        self.finished += 1
        if self.first_closer is None:
            self.first_closer = "client_closed" if flow.from_client else "destination_closed"
            fin_timeout = self.fin_timeouts[0 if flow.from_client else 1]
            if fin_timeout > 0 and (self.idle_timeout <= 0 or fin_timeout < self.idle_timeout):
                self.idle_timeout = fin_timeout
                self.active_at = self.loop.now()
                self.arm_timer()
        if self.finished == 2:
            self.outcome = self.first_closer

    def fail(self, client_side, error):
        """A socket error on one side: that side closed the connection; stop both ways."""
        side = "client" if client_side else "destination"
        message = f"{side}: {error.strerror or error}"
        local.set_error(f"{side}_error", message)
        LOGGER.debug("forwarding ends: %s", message)
        self.outcome = f"{side}_closed"

    def stop(self):
        """Stop every watcher and let go of the flows' links back here (so that reference
        counting, not the cyclic collector, frees a finished connection: garbage left for the
        collector survived into the next wave of connections); safe to call more than once."""
        self.to_destination.stop()
        self.to_client.stop()
        self.to_destination.pump = self.to_client.pump = None
        self.switch = None
        if self.timer is not None:
            self.timer.close()
            self.timer = None
