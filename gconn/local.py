"""Greenlet-local connection context, error state and a reentrant read/write lock.

What belongs here: per-connection state kept in the greenlet that serves the connection (created
with it, gone with it, no OS resource per key, so no ceiling like guacd's PTHREAD_KEYS_MAX), and the
lock that guards destination state between health checks and sessions. What must not: sockets,
routing decisions, or anything that blocks except waiting for the lock.

Storage: the context and the error are plain attributes on the greenlet object itself, not a
``gevent.local.local``. Measured with ``tools/bench_local.py`` (gevent 26.9, CPython 3.11, 2-core
box): ``current()`` takes about 100 ns where one attribute read through a ``gevent.local`` (what
``threading.local`` becomes under monkey-patching) takes about 130 ns, and binding a context and an
error costs about 110 bytes per greenlet against about 650. The attribute form also lets code
that holds a greenlet object read that greenlet's error (``last_error(greenlet)``).

The session (session.py) binds its context first thing in its greenlet and reads its error
state when it finishes: the access line's ``error=`` field.
"""

import logging
import time

from gevent import getcurrent
from gevent.event import Event

__all__ = [
    "PHASES",
    "ConnectionContext",
    "ContextFilter",
    "RWLock",
    "RWLockError",
    "clear_error",
    "current",
    "last_error",
    "set_current",
    "set_error",
    "stack_of",
]

# The life of a connection, in order; ConnectionContext.phase holds one of these.  A session
# starts queued (waiting for its slot, however briefly), unless a protocol step comes first
# (handshake: reading a PROXY header); draining is forwarding while the worker shuts down
# (Envoy's word): the connection holds up the drain; refusing: telling a refused client why.
PHASES = ("handshake", "queued", "connecting", "forwarding", "draining", "refusing")

# Attribute names on greenlet objects; prefixed so they cannot collide with gevent's own.
_CONTEXT_ATTRIBUTE = "_gconn_context"
_ERROR_ATTRIBUTE = "_gconn_error"


class ConnectionContext:
    """What is known about one connection: who, by which route, to where, how far, how many bytes.

    ``bytes_up`` counts client-to-destination bytes and ``bytes_down`` destination-to-client bytes;
    ``started`` is seconds since the epoch. ``__slots__`` keeps one instance at 128 bytes, which
    matters at 50,000+ live connections.
    """

    __slots__ = (
        "id",
        "route",
        "client",
        "via",
        "sni",
        "tls",
        "destination",
        "started",
        "bytes_up",
        "bytes_down",
        "phase",
        "__weakref__",
    )

    def __init__(self, id, route, client, started=None):  # `id` is the public field name
        self.id = id
        self.route = route
        self.client = client
        self.via = None  # the balancer's address when a PROXY header named the client
        self.sni = None  # the server name of its ClientHello, on a server-names bind
        self.tls = None  # (version, cipher) of a terminated TLS session
        self.destination = None
        self.started = time.time() if started is None else started
        self.bytes_up = 0
        self.bytes_down = 0
        self.phase = "queued"

    def as_dict(self):
        """Return the fields as a new plain dict for the admin endpoint, adding ``age_seconds``."""
        return {
            "id": self.id,
            "route": self.route,
            "client": self.client,
            "via": self.via,
            "sni": self.sni,
            "tls": self.tls,
            "destination": self.destination,
            "phase": self.phase,
            "started": self.started,
            "age_seconds": max(0.0, time.time() - self.started),
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
        }

    def __repr__(self):
        return (
            f"<ConnectionContext id={self.id!r} route={self.route!r} client={self.client!r}"
            f" destination={self.destination!r} phase={self.phase}"
            f" up={self.bytes_up} down={self.bytes_down}>"
        )


def current():
    """Return the running greenlet's context, or its nearest ancestor's, or None outside a session.

    A greenlet that bound nothing itself (a plain ``gevent.spawn`` from inside a session) is
    answered by walking gevent's ``spawning_greenlet`` weak references; that walk stops at the
    first bound ancestor, a dead ancestor, or the root, so it is a few attribute reads at most.
    """
    greenlet = getcurrent()
    context = getattr(greenlet, _CONTEXT_ATTRIBUTE, None)
    if context is not None:
        return context
    parent_reference = getattr(greenlet, "spawning_greenlet", None)
    while parent_reference is not None:
        parent = parent_reference()
        if parent is None:
            return None
        context = getattr(parent, _CONTEXT_ATTRIBUTE, None)
        if context is not None:
            return context
        parent_reference = getattr(parent, "spawning_greenlet", None)
    return None


def set_current(context):
    """Bind ``context`` to the running greenlet; None unbinds it (ancestors then answer again).

    The binding lives in the greenlet object's ``__dict__``, so it is dropped with the greenlet.
    A session that hands its finished greenlet to someone who keeps it should unbind in its
    ``finally`` so the context is not kept alive with it.
    """
    if context is not None and not isinstance(context, ConnectionContext):
        raise TypeError(f"set_current() takes a ConnectionContext or None, not {context!r}")
    setattr(getcurrent(), _CONTEXT_ATTRIBUTE, context)


def set_error(code, message):
    """Record ``(code, message)`` as the running greenlet's error; a later call replaces it."""
    setattr(getcurrent(), _ERROR_ATTRIBUTE, (code, message))


def clear_error():
    """Forget the running greenlet's recorded error (what it met is no longer its story)."""
    setattr(getcurrent(), _ERROR_ATTRIBUTE, None)


def last_error(greenlet=None):
    """Return the ``(code, message)`` recorded in ``greenlet`` (default: the running one), or None.

    Error state is never inherited or shared: a child and its parent each have their own.
    """
    return getattr(getcurrent() if greenlet is None else greenlet, _ERROR_ATTRIBUTE, None)


def stack_of(greenlet):
    """``greenlet``'s current stack, outermost call first, as ``file:line function`` strings
    (what a parked connection waits on, for the admin); empty when it is not running."""
    frames = []
    frame = getattr(greenlet, "gr_frame", None)
    while frame is not None:
        code = frame.f_code
        frames.append(f"{code.co_filename}:{frame.f_lineno} {code.co_name}")
        frame = frame.f_back
    frames.reverse()
    return frames


class ContextFilter(logging.Filter):
    """Logging filter that sets ``record.conn`` to the current context's id, or ``"-"``.

    A record that already carries ``conn`` (passed with ``extra=``) keeps it, so code that logs
    about another connection can say which. Never drops a record.
    """

    def filter(self, record):
        """Stamp the record and return True."""
        if not hasattr(record, "conn"):
            context = current()
            record.conn = "-" if context is None else context.id
        return True


class RWLockError(RuntimeError):
    """A read/write lock was misused: an upgrade from read to write, or a release not held."""


class RWLock:
    """A reentrant read/write lock for greenlets: many readers or one writer.

    Ownership is per greenlet, kept in plain dicts keyed by the greenlet object: no OS resource per
    lock or per greenlet. A greenlet holding read may read again; one holding write may write or
    read again; releasing write while still holding read is a downgrade. Asking for write while
    holding only read raises :class:`RWLockError` (two upgraders would wait for each other
    forever), as does releasing what you do not hold.

    Fairness (phase-fair, writers first). A new read request waits while a writer holds the lock
    or *is waiting* for it, so a continuous stream of readers cannot starve a writer: once it
    asks, the readers already inside drain and it goes next. Reentrant reads by a greenlet that
    already holds read are granted at once, or the writer would wait for a reader that waits for
    the writer. When a writer releases, every reader queued at that moment is admitted together
    before the next writer, so a stream of writers cannot starve readers either. Writers are
    served among themselves in arrival order. The lock is handed to the waiter before it wakes,
    so no newcomer can overtake it.

    A greenlet killed while waiting leaves the queue (and gives the lock back if it was granted
    in the same instant). A greenlet killed while holding releases on the way out if it used
    ``with lock.reading():`` / ``with lock.writing():`` (GreenletExit unwinds the block). A hold
    taken with ``acquire_*()`` and no ``finally`` is *not* released when its greenlet dies: the
    writer may have left the guarded state half-updated, and handing that to the next greenlet
    silently would hide it. Others then see the lock as held (non-blocking and timed acquires
    fail, untimed ones wait) and ``repr()`` names the dead owner; this is the contract of
    ``threading.Lock`` too.
    """

    __slots__ = (
        "_readers",
        "_writer",
        "_write_holds",
        "_waiting_readers",
        "_waiting_writers",
        "__weakref__",
    )

    def __init__(self):
        self._readers = {}  # greenlet -> read holds, including the writer's own reads
        self._writer = None  # the greenlet holding write, or None
        self._write_holds = 0  # how many times the writer has taken write
        self._waiting_readers = {}  # greenlet -> Event, in arrival order
        self._waiting_writers = {}  # greenlet -> Event, in arrival order

    def acquire_read(self, blocking=True, timeout=None):
        """Take a read hold; return True, or False if not ``blocking`` or ``timeout`` passes."""
        if timeout is not None:
            _check_timeout(blocking, timeout)
        current_greenlet = getcurrent()
        readers = self._readers
        holds = readers.get(current_greenlet)
        if holds:
            readers[current_greenlet] = holds + 1
            return True
        writer = self._writer
        if (writer is None and not self._waiting_writers) or writer is current_greenlet:
            readers[current_greenlet] = 1
            return True
        return self._wait(current_greenlet, self._waiting_readers, blocking, timeout)

    def release_read(self):
        """Give back one read hold of the running greenlet; raise RWLockError if it holds none."""
        current_greenlet = getcurrent()
        readers = self._readers
        holds = readers.get(current_greenlet)
        if not holds:
            raise RWLockError(f"{current_greenlet!r} released a read hold it does not have")
        if holds > 1:
            readers[current_greenlet] = holds - 1
            return
        del readers[current_greenlet]
        if not readers:
            # An emptied dict keeps its largest table: 5 MiB for ever after 100,000 readers.
            readers.clear()
            if self._waiting_writers or self._waiting_readers:
                self._dispatch(readers_first=False)

    def acquire_write(self, blocking=True, timeout=None):
        """Take a write hold; return True, or False if not ``blocking`` or ``timeout`` passes.

        Raises RWLockError if the running greenlet holds read but not write (an upgrade).
        """
        if timeout is not None:
            _check_timeout(blocking, timeout)
        current_greenlet = getcurrent()
        if self._writer is current_greenlet:
            self._write_holds += 1
            return True
        if current_greenlet in self._readers:
            raise RWLockError(
                f"{current_greenlet!r} holds read and asked for write: upgrading could deadlock;"
                " release the read hold first, or take write from the start"
            )
        if self._writer is None and not self._readers and not self._waiting_writers:
            self._writer = current_greenlet
            self._write_holds = 1
            return True
        return self._wait(current_greenlet, self._waiting_writers, blocking, timeout)

    def release_write(self):
        """Give back one write hold of the running greenlet; raise RWLockError if it holds none."""
        current_greenlet = getcurrent()
        if self._writer is not current_greenlet:
            raise RWLockError(f"{current_greenlet!r} released a write hold it does not have")
        self._write_holds -= 1
        if self._write_holds:
            return
        self._writer = None
        self._dispatch(readers_first=True)

    def reading(self):
        """Return a context manager holding read for the ``with`` block, released on any exit."""
        return _ReadHold(self)

    def writing(self):
        """Return a context manager holding write for the ``with`` block, released on any exit."""
        return _WriteHold(self)

    def _wait(self, current_greenlet, queue, blocking, timeout):
        """Queue the running greenlet until ``_dispatch`` hands it the lock; True if it did."""
        if not blocking:
            return False
        event = Event()
        queue[current_greenlet] = event
        try:
            event.wait(timeout)
        except BaseException:  # killed, or an outer gevent.Timeout: leave no trace, then re-raise
            self._abandon(current_greenlet, queue)
            raise
        # _dispatch removes a waiter from its queue exactly when it grants the lock.
        if current_greenlet not in queue:
            return True
        self._abandon(current_greenlet, queue)
        return False

    def _abandon(self, current_greenlet, queue):
        """Withdraw a waiter that stops waiting; give the lock back if it was granted meanwhile."""
        writing = queue is self._waiting_writers
        if queue.pop(current_greenlet, None) is not None:
            if writing:  # readers queued behind this writer may now go in
                self._dispatch(readers_first=False)
        elif writing:
            self.release_write()
        else:
            self.release_read()

    def _dispatch(self, readers_first):
        """Hand the free lock to the waiters whose turn it is (see the fairness rule above)."""
        if self._writer is not None:
            return
        waiting_readers = self._waiting_readers
        if waiting_readers and (readers_first or not self._waiting_writers):
            readers = self._readers
            for greenlet, event in waiting_readers.items():
                readers[greenlet] = 1
                event.set()  # only schedules the wake-up: no switch while we iterate
            waiting_readers.clear()
            return
        waiting_writers = self._waiting_writers
        if waiting_writers and not self._readers:
            greenlet = next(iter(waiting_writers))
            event = waiting_writers.pop(greenlet)
            if not waiting_writers:
                waiting_writers.clear()  # drop the table a long queue grew
            self._writer = greenlet
            self._write_holds = 1
            event.set()

    def __repr__(self):
        writer = self._writer
        owners = set(self._readers)
        if writer is not None:
            owners.add(writer)
        dead_owners = sum(1 for greenlet in owners if greenlet.dead)
        return (
            f"<RWLock writer={writer!r} write_holds={self._write_holds}"
            f" readers={len(self._readers)} dead_owners={dead_owners}"
            f" waiting_writers={len(self._waiting_writers)}"
            f" waiting_readers={len(self._waiting_readers)}>"
        )


def _check_timeout(blocking, timeout):
    """Reject the timeout combinations ``threading.Lock.acquire`` rejects."""
    if not blocking:
        raise ValueError("a timeout cannot be given for a non-blocking acquire")
    if timeout < 0:
        raise ValueError(f"timeout must be None or >= 0 seconds, not {timeout!r}")


class _ReadHold:
    """Context manager returned by :meth:`RWLock.reading`."""

    __slots__ = ("_lock",)

    def __init__(self, lock):
        self._lock = lock

    def __enter__(self):
        self._lock.acquire_read()
        return self._lock

    def __exit__(self, exception_type, exception, traceback):
        self._lock.release_read()


class _WriteHold:
    """Context manager returned by :meth:`RWLock.writing`."""

    __slots__ = ("_lock",)

    def __init__(self, lock):
        self._lock = lock

    def __enter__(self):
        self._lock.acquire_write()
        return self._lock

    def __exit__(self, exception_type, exception, traceback):
        self._lock.release_write()
