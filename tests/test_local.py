"""Tests for gconn.local: greenlet-local context and error state, and the RWLock semantics table.

Pure tests with no sockets. Everything that binds state does it in a spawned greenlet, so the
pytest main greenlet stays unbound between tests. No sleeps are used to synchronise: greenlets
meet on gevent events and joins, and ``gevent.sleep(0)`` only yields.
"""

import ctypes
import gc
import logging
import time
import weakref

import gevent
import gevent.local
import psutil
import pytest
from gevent.event import Event
from gevent.pool import Pool

from gconn.local import (
    PHASES,
    ConnectionContext,
    ContextFilter,
    RWLock,
    RWLockError,
    current,
    last_error,
    set_current,
    set_error,
)
from gconn.session import SessionGreenlet

pytestmark = pytest.mark.timeout(30)

# The per-process limit on pthread keys that guacd ran into (Linux PTHREAD_KEYS_MAX).
PTHREAD_KEYS_MAX = 1024
# Concurrent sessions in the scale test.
SESSIONS = 100_000
# Distinct local objects alive at once: ten times PTHREAD_KEYS_MAX.
LOCAL_OBJECTS = 10 * PTHREAD_KEYS_MAX
# Memory the scale test may leave behind once the allocator has returned what it can. Measured:
# 4-5 MiB (partly filled pymalloc arenas). Keeping each session's context, error and client
# address would leave over 25 MiB, so this bound catches a leak of any one of them.
RESIDUAL_ALLOWED = 10 * 2**20  # bytes
# Time a caller gives a lock that cannot be had before it gives up, in the tests that expect that.
SHORT_WAIT = 0.05  # seconds
# Greenlets in the fairness streams.
STREAM_GREENLETS = 5


def _resident_bytes():
    """Return this process's resident set size."""
    return psutil.Process().memory_info().rss


def _return_free_memory_to_system():
    """Ask glibc to give its cached free memory back to the OS; return False if not glibc."""
    malloc_trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if malloc_trim is None:
        return False
    malloc_trim(0)
    return True


def _in_greenlet(function, *args):
    """Run ``function(*args)`` in a fresh greenlet and return its result (errors propagate)."""
    return gevent.spawn(function, *args).get(timeout=10)


def _error_in_greenlet(function, *args):
    """Run ``function(*args)`` in a fresh greenlet and return the exception it raised, or None.

    Catching inside the greenlet keeps the hub from printing an expected error as a crash.
    """

    def run():
        try:
            function(*args)
        except Exception as error:
            return error
        return None

    return _in_greenlet(run)


def _another_greenlet_can_take(lock, mode):
    """Return whether a fresh greenlet gets ``mode`` ("read"/"write") at once; it lets go again."""

    def attempt():
        if not getattr(lock, f"acquire_{mode}")(blocking=False):
            return False
        getattr(lock, f"release_{mode}")()
        return True

    return _in_greenlet(attempt)


def _take_and_release(lock, mode):
    """Wait for ``mode`` ("read"/"write") on ``lock``, release it, and return ``mode``."""
    with {"read": lock.reading, "write": lock.writing}[mode]():
        return mode


# --- ConnectionContext ---------------------------------------------------------------------------


def test_new_context_starts_queued_with_no_destination_and_no_bytes():
    """A new context has the given id, route and client, phase "queued" and zero bytes."""
    before = time.time()
    context = ConnectionContext(7, "web", ("192.0.2.1", 40000))
    assert (context.id, context.route, context.client) == (7, "web", ("192.0.2.1", 40000))
    assert context.destination is None
    assert (context.bytes_up, context.bytes_down) == (0, 0)
    assert context.phase == "queued" and "queued" in PHASES
    assert before <= context.started <= time.time()


def test_phases_are_the_connection_life_in_order():
    """PHASES lists the phases in the order a connection passes through them, refusing last."""
    assert PHASES == ("handshake", "queued", "connecting", "forwarding", "draining", "refusing")


def test_as_dict_reports_every_field_and_the_age():
    """as_dict gives the admin endpoint every field plus age_seconds measured from started."""
    context = ConnectionContext("c1", "db", ("192.0.2.2", 5000), started=time.time() - 5)
    context.destination = ("198.51.100.1", 5432)
    context.bytes_up, context.bytes_down, context.phase = 10, 20, "forwarding"
    report = context.as_dict()
    age_seconds = report.pop("age_seconds")
    assert 5 <= age_seconds < 60
    assert report == {
        "id": "c1",
        "route": "db",
        "client": ("192.0.2.2", 5000),
        "via": None,
        "sni": None,
        "tls": None,
        "destination": ("198.51.100.1", 5432),
        "phase": "forwarding",
        "started": context.started,
        "bytes_up": 10,
        "bytes_down": 20,
    }


def test_context_has_no_instance_dict_and_can_be_weakly_referenced():
    """Contexts use __slots__ (no per-instance dict) and still accept weak references."""
    context = ConnectionContext(1, "web", None)
    assert not hasattr(context, "__dict__")
    assert weakref.ref(context)() is context


# --- current(), set_current() ---------------------------------------------------------------------


def test_current_is_none_outside_a_session():
    """current() is None in a greenlet that nothing has bound, and in the main greenlet."""
    assert current() is None
    assert _in_greenlet(current) is None


def test_each_greenlet_sees_only_the_context_it_bound():
    """Two concurrent greenlets bind different contexts and each reads back only its own."""
    both_bound = Event()
    bound = []

    def session(number):
        context = ConnectionContext(number, "web", None)
        set_current(context)
        bound.append(number)
        if len(bound) == 2:
            both_bound.set()
        both_bound.wait()
        return current() is context

    sessions = [gevent.spawn(session, number) for number in (1, 2)]
    gevent.joinall(sessions, raise_error=True)
    assert [session.value for session in sessions] == [True, True]
    assert current() is None


def test_plain_spawn_inside_a_session_sees_the_nearest_ancestor_context():
    """A greenlet spawned with plain gevent.spawn, two levels down, answers with the session's."""

    def session():
        context = ConnectionContext(4, "web", None)
        set_current(context)
        grandchild_context = gevent.spawn(lambda: gevent.spawn(current).get()).get()
        return grandchild_context is context

    assert _in_greenlet(session)


def test_a_session_greenlet_keeps_its_spawner_but_no_spawning_stack():
    """The forwarding pool's greenlets (SessionGreenlet) record no spawning stack (about 240
    bytes a connection that says nothing), yet a child of one still answers with the
    session's context: the spawner link local.current() walks is kept."""

    def session():
        context = ConnectionContext(5, "web", None)
        set_current(context)
        return gevent.spawn(current).get() is context

    pool = Pool(1, greenlet_class=SessionGreenlet)
    plain = gevent.spawn(lambda: None)
    greenlet = pool.spawn(session)
    assert greenlet.get(timeout=5) is True
    assert plain.spawning_stack is not None  # gevent's default, which this class turns off
    assert greenlet.spawning_stack is None
    assert greenlet.spawning_greenlet() is gevent.getcurrent()


def test_own_binding_wins_over_the_ancestor_and_unbinding_restores_it():
    """A child's own binding shadows the parent's; set_current(None) falls back to the parent."""

    def child(parent_context):
        own = ConnectionContext("own", "web", None)
        set_current(own)
        seen_own = current() is own
        set_current(None)
        return seen_own, current() is parent_context

    def session():
        context = ConnectionContext("parent", "web", None)
        set_current(context)
        return gevent.spawn(child, context).get()

    assert _in_greenlet(session) == (True, True)


def test_set_current_none_unbinds():
    """After set_current(None) a session greenlet with no bound ancestor has no context."""

    def session():
        set_current(ConnectionContext(5, "web", None))
        set_current(None)
        return current()

    assert _in_greenlet(session) is None


def test_set_current_rejects_other_objects():
    """set_current refuses anything that is not a ConnectionContext or None."""
    assert isinstance(_error_in_greenlet(set_current, {"id": 1}), TypeError)


# --- error state ---------------------------------------------------------------------------------


def test_error_is_recorded_read_and_replaced():
    """set_error records, last_error reads, a later set_error replaces."""

    def session():
        seen = [last_error()]
        set_error("destination-timeout", "no answer in 5 s")
        seen.append(last_error())
        set_error("client-abort", "reset by peer")
        seen.append(last_error())
        return seen

    assert _in_greenlet(session) == [
        None,
        ("destination-timeout", "no answer in 5 s"),
        ("client-abort", "reset by peer"),
    ]


def test_error_never_leaks_into_another_greenlet():
    """Errors set by concurrent greenlets stay with each; the main greenlet sees none."""
    all_set = Event()
    recorded = []

    def session(number):
        set_error("code", f"failure {number}")
        recorded.append(number)
        if len(recorded) == 3:
            all_set.set()
        all_set.wait()
        return last_error()

    sessions = [gevent.spawn(session, number) for number in range(3)]
    gevent.joinall(sessions, raise_error=True)
    assert [session.value for session in sessions] == [("code", f"failure {n}") for n in range(3)]
    assert last_error() is None


def test_a_spawned_greenlet_has_fresh_error_state_readable_by_its_spawner():
    """A greenlet spawned from a session starts with no error; the spawner reads its error
    through the greenlet object after joining it, and keeps its own."""

    def helper():
        inherited = last_error()
        set_error("destination-reset", "connection reset")
        return inherited

    def session():
        set_current(ConnectionContext(6, "web", None))
        set_error("parent-code", "parent message")
        child = gevent.spawn(helper)
        inherited = child.get()
        return inherited, last_error(), last_error(child)

    assert _in_greenlet(session) == (
        None,
        ("parent-code", "parent message"),
        ("destination-reset", "connection reset"),
    )


# --- ContextFilter -------------------------------------------------------------------------------


class _ListHandler(logging.Handler):
    """Logging handler that keeps the records it is given."""

    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)


def test_context_filter_stamps_the_session_id_or_a_dash():
    """Records logged inside a session carry its id; elsewhere "-"; an explicit conn is kept."""
    logger = logging.getLogger("gconn.tests.local")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    handler = _ListHandler()
    handler.addFilter(ContextFilter())
    logger.addHandler(handler)
    try:

        def session():
            set_current(ConnectionContext("c-42", "web", None))
            logger.info("in session")
            gevent.spawn(logger.info, "in child").get()

        _in_greenlet(session)
        logger.info("outside")
        logger.info("about another", extra={"conn": "c-7"})
    finally:
        logger.removeHandler(handler)
    assert [(record.getMessage(), record.conn) for record in handler.records] == [
        ("in session", "c-42"),
        ("in child", "c-42"),
        ("outside", "-"),
        ("about another", "c-7"),
    ]


# --- scale: no key limit, nothing left behind ----------------------------------------------------


@pytest.mark.timeout(120)
def test_hundred_thousand_sessions_each_see_only_their_own_state(record_property):
    """100,000 live sessions with context, error and a reentrant read hold: no mix-up, none kept."""
    lock = RWLock()
    everyone_holding = Event()
    finish = Event()
    holding = 0
    mismatches = []
    references = []

    def session(number):
        nonlocal holding
        context = ConnectionContext(number, "scale", ("127.0.0.1", number))
        set_current(context)
        set_error("session", str(number))
        references.append(weakref.ref(context))
        with lock.reading(), lock.reading():
            holding += 1
            if holding == SESSIONS:
                everyone_holding.set()
            finish.wait()
            if current() is not context or last_error() != ("session", str(number)):
                mismatches.append(number)

    gc.collect()
    _return_free_memory_to_system()
    baseline_bytes = _resident_bytes()
    started = time.perf_counter()
    sessions = [gevent.spawn(session, number) for number in range(SESSIONS)]
    everyone_holding.wait()
    peak_bytes = _resident_bytes()
    assert lock.acquire_write(blocking=False) is False, "readers should exclude a writer"
    finish.set()
    gevent.joinall(sessions, raise_error=True)
    elapsed_seconds = time.perf_counter() - started
    del sessions
    # joinall returns from inside the last greenlet's link callback; the hub drops its reference
    # to that finished greenlet (and so to its context) on its next turn.
    gevent.sleep(0)
    gc.collect()
    assert not mismatches, f"{len(mismatches)} sessions saw another session's state"
    assert len(references) == SESSIONS
    alive = sum(1 for reference in references if reference() is not None)
    assert alive == 0, f"{alive} contexts outlived their greenlets"
    references.clear()
    gc.collect()
    after_bytes = _resident_bytes()
    trimmed = _return_free_memory_to_system()
    after_trim_bytes = _resident_bytes()
    assert lock.acquire_write(blocking=False) is True, "every read hold should be released"
    lock.release_write()

    mebibyte = 2**20
    figures = {
        "baseline_mib": baseline_bytes / mebibyte,
        "peak_mib": peak_bytes / mebibyte,
        "peak_per_session_bytes": (peak_bytes - baseline_bytes) / SESSIONS,
        "after_gc_mib": after_bytes / mebibyte,
        "after_malloc_trim_mib": after_trim_bytes / mebibyte,
        "residual_mib": (after_trim_bytes - baseline_bytes) / mebibyte,
        "seconds": elapsed_seconds,
    }
    for name, value in figures.items():
        record_property(name, round(value, 1))
    print(
        f"\n{SESSIONS:,} sessions in {elapsed_seconds:.1f} s: RSS baseline"
        f" {figures['baseline_mib']:.1f} MiB, peak {figures['peak_mib']:.1f} MiB"
        f" ({figures['peak_per_session_bytes']:,.0f} B/session), after gc"
        f" {figures['after_gc_mib']:.1f} MiB (glibc keeps freed memory cached), after"
        f" malloc_trim {figures['after_malloc_trim_mib']:.1f} MiB: residual"
        f" {figures['residual_mib']:+.1f} MiB"
    )
    if trimmed:
        assert after_trim_bytes - baseline_bytes < RESIDUAL_ALLOWED
    else:  # another allocator may keep its cache: require only that most of the peak went back
        assert after_bytes - baseline_bytes < (peak_bytes - baseline_bytes) / 2


def test_ten_thousand_local_objects_alive_and_in_use_at_once():
    """10,240 gevent.local objects, RWLocks and contexts live together; no OS thread or fd added."""
    process = psutil.Process()
    threads_before, descriptors_before = process.num_threads(), process.num_fds()
    keys = [gevent.local.local() for _ in range(LOCAL_OBJECTS)]
    locks = [RWLock() for _ in range(LOCAL_OBJECTS)]
    all_set = Event()
    check = Event()
    ready = 0
    wrong = []

    def connection(number):
        nonlocal ready
        keys[number].value = number
        set_current(ConnectionContext(number, "keys", None))
        set_error("connection", str(number))
        with locks[number].writing():
            ready += 1
            if ready == LOCAL_OBJECTS:
                all_set.set()
            check.wait()
            neighbour = keys[(number + 1) % LOCAL_OBJECTS]
            if (
                keys[number].value != number
                or getattr(neighbour, "value", None) is not None
                or current().id != number
                or last_error() != ("connection", str(number))
            ):
                wrong.append(number)

    connections = [gevent.spawn(connection, number) for number in range(LOCAL_OBJECTS)]
    all_set.wait()
    # The main greenlet sees none of the connections' values, and uses all 10,240 keys itself.
    assert all(getattr(key, "value", None) is None for key in keys)
    for number, key in enumerate(keys):
        key.value = -number
    assert all(key.value == -number for number, key in enumerate(keys))
    assert not any(lock.acquire_read(blocking=False) for lock in locks), "writers hold every lock"
    assert (process.num_threads(), process.num_fds()) == (threads_before, descriptors_before)
    check.set()
    gevent.joinall(connections, raise_error=True)
    assert not wrong, f"{len(wrong)} connections saw a value that was not theirs"


# --- RWLock: reentrancy --------------------------------------------------------------------------


def test_read_is_reentrant():
    """A greenlet holding read can take read again and must release as many times."""
    lock = RWLock()
    assert lock.acquire_read(blocking=False)
    assert lock.acquire_read(blocking=False)
    lock.release_read()
    assert not _another_greenlet_can_take(lock, "write"), "one read hold is still held"
    lock.release_read()
    with pytest.raises(RWLockError):
        lock.release_read()


def test_reentrant_read_is_granted_while_a_writer_waits():
    """A reader re-entering while a writer queues is let in, since refusing it would deadlock."""
    lock = RWLock()
    lock.acquire_read()
    writer = gevent.spawn(lock.acquire_write)
    gevent.sleep(0)  # let the writer queue
    assert "waiting_writers=1" in repr(lock)
    assert lock.acquire_read(blocking=False) is True
    lock.release_read()
    lock.release_read()
    assert writer.get(timeout=5) is True


def test_write_is_reentrant_and_may_take_read():
    """A writer can take write and read again; the lock frees only after the last release."""

    def holder():
        assert lock.acquire_write()
        assert lock.acquire_write(blocking=False)
        assert lock.acquire_read(blocking=False)
        lock.release_read()
        lock.release_write()
        still_held = not _another_greenlet_can_take(lock, "read")
        lock.release_write()
        return still_held

    lock = RWLock()
    assert _in_greenlet(holder) is True
    assert lock.acquire_write(blocking=False)


def test_releasing_write_while_holding_read_downgrades():
    """Write, read, release write: still a reader, so others may read but not write."""
    lock = RWLock()
    lock.acquire_write()
    lock.acquire_read()
    lock.release_write()
    assert _another_greenlet_can_take(lock, "read")
    assert not _another_greenlet_can_take(lock, "write")
    lock.release_read()
    assert _another_greenlet_can_take(lock, "write")


# --- RWLock: exclusion ---------------------------------------------------------------------------


def test_many_readers_hold_at_once():
    """Several greenlets hold read at the same time."""
    lock = RWLock()
    inside = 0
    all_inside = Event()

    def reader():
        nonlocal inside
        with lock.reading():
            inside += 1
            if inside == STREAM_GREENLETS:
                all_inside.set()
            all_inside.wait()

    gevent.joinall([gevent.spawn(reader) for _ in range(STREAM_GREENLETS)], raise_error=True)
    assert inside == STREAM_GREENLETS


def test_write_excludes_readers_and_other_writers():
    """While one greenlet writes, others can neither read nor write until it releases."""
    lock = RWLock()
    order = []
    lock.acquire_write()
    assert not _another_greenlet_can_take(lock, "read")
    assert not _another_greenlet_can_take(lock, "write")

    def reader():
        with lock.reading():
            order.append("reader")

    def writer():
        with lock.writing():
            order.append("writer")

    waiting = [gevent.spawn(reader), gevent.spawn(writer)]
    gevent.sleep(0)
    assert order == []
    order.append("released")
    lock.release_write()
    gevent.joinall(waiting, raise_error=True)
    assert order == ["released", "reader", "writer"]


def test_readers_exclude_a_writer():
    """A writer waits while any reader holds, and gets in when the last one releases."""
    lock = RWLock()
    lock.acquire_read()
    writer = gevent.spawn(_take_and_release, lock, "write")
    gevent.sleep(0)
    assert not writer.ready()
    lock.release_read()
    assert writer.get(timeout=5) == "write"


# --- RWLock: fairness ----------------------------------------------------------------------------


def test_writer_is_not_starved_by_continuous_readers():
    """Once a writer asks, no new reader is admitted until it has written."""
    lock = RWLock()
    stop = False
    read_grants = 0
    stream_started = Event()

    def reader():
        nonlocal read_grants
        while not stop:
            with lock.reading():
                read_grants += 1
                stream_started.set()
                gevent.sleep(0)

    readers = [gevent.spawn(reader) for _ in range(STREAM_GREENLETS)]
    stream_started.wait()
    for _ in range(STREAM_GREENLETS * 2):
        gevent.sleep(0)
        assert lock.acquire_write(blocking=False) is False, "the read stream should be continuous"

    def writer():
        asked = read_grants
        with lock.writing():
            return read_grants - asked

    try:
        assert gevent.spawn(writer).get(timeout=5) == 0
    finally:
        stop = True
        gevent.joinall(readers, raise_error=True)


def test_readers_are_not_starved_by_continuous_writers():
    """A reader that asks while writers queue gets in when the current writer releases."""
    lock = RWLock()
    stop = False
    write_grants = 0
    stream_started = Event()

    def writer():
        nonlocal write_grants
        while not stop:
            with lock.writing():
                write_grants += 1
                stream_started.set()
                gevent.sleep(0)

    writers = [gevent.spawn(writer) for _ in range(STREAM_GREENLETS)]
    stream_started.wait()
    for _ in range(STREAM_GREENLETS * 2):
        gevent.sleep(0)

    def reader():
        asked = write_grants
        with lock.reading():
            return write_grants - asked

    try:
        # At most the writer already handed the lock (but not yet running) counts in between;
        # strict arrival order would put the reader behind the other queued writers.
        assert gevent.spawn(reader).get(timeout=5) <= 1
    finally:
        stop = True
        gevent.joinall(writers, raise_error=True)


def test_writers_are_served_in_arrival_order():
    """Queued writers get the lock in the order they asked for it."""
    lock = RWLock()
    order = []
    lock.acquire_read()

    def writer(number):
        with lock.writing():
            order.append(number)

    writers = []
    for number in range(STREAM_GREENLETS):
        writers.append(gevent.spawn(writer, number))
        gevent.sleep(0)
    lock.release_read()
    gevent.joinall(writers, raise_error=True)
    assert order == list(range(STREAM_GREENLETS))


# --- RWLock: misuse ------------------------------------------------------------------------------


def test_upgrade_from_read_to_write_raises_and_keeps_the_read_hold():
    """Asking for write while holding only read raises RWLockError, blocking or not."""
    lock = RWLock()
    lock.acquire_read()
    with pytest.raises(RWLockError, match="upgrad"):
        lock.acquire_write()
    with pytest.raises(RWLockError):
        lock.acquire_write(blocking=False)
    assert not _another_greenlet_can_take(lock, "write"), "the read hold is still there"
    lock.release_read()
    assert lock.acquire_write(blocking=False)


def test_releasing_a_hold_not_held_raises():
    """Releasing read or write you do not hold, or another greenlet's write, raises RWLockError."""
    lock = RWLock()
    with pytest.raises(RWLockError):
        lock.release_read()
    with pytest.raises(RWLockError):
        lock.release_write()
    lock.acquire_write()
    assert isinstance(_error_in_greenlet(lock.release_write), RWLockError)
    with pytest.raises(RWLockError):
        lock.release_read()  # holding write is not holding read
    lock.release_write()
    lock.acquire_read()
    assert isinstance(_error_in_greenlet(lock.release_read), RWLockError)
    lock.release_read()
    assert lock.acquire_write(blocking=False)


def test_timeout_arguments_are_checked_like_threading():
    """A timeout with blocking=False, or a negative timeout, is a ValueError."""
    lock = RWLock()
    with pytest.raises(ValueError):
        lock.acquire_read(blocking=False, timeout=1)
    with pytest.raises(ValueError):
        lock.acquire_write(timeout=-1)


# --- RWLock: waiting that ends without the lock --------------------------------------------------


def test_timed_out_reader_leaves_no_trace():
    """A reader whose timeout passes gets False and is no longer queued."""
    lock = RWLock()
    lock.acquire_write()
    assert _in_greenlet(lock.acquire_read, True, SHORT_WAIT) is False
    assert "waiting_readers=0" in repr(lock)
    lock.release_write()
    assert _another_greenlet_can_take(lock, "write")


def test_timed_out_writer_lets_readers_queued_behind_it_in():
    """When a waiting writer times out, the readers that queued behind it are admitted."""
    lock = RWLock()
    lock.acquire_read()
    writer = gevent.spawn(lock.acquire_write, True, SHORT_WAIT)
    gevent.sleep(0)
    reader = gevent.spawn(_take_and_release, lock, "read")
    gevent.sleep(0)
    assert not reader.ready(), "a new reader queues behind the waiting writer"
    assert writer.get(timeout=5) is False
    assert reader.get(timeout=5) == "read"
    lock.release_read()


def test_outer_gevent_timeout_while_waiting_leaves_no_trace():
    """A gevent.Timeout raised into a waiting writer removes it from the queue."""
    lock = RWLock()
    lock.acquire_read()

    def writer():
        with gevent.Timeout(SHORT_WAIT, False):
            lock.acquire_write()
            return "acquired"
        return "timed out"

    assert _in_greenlet(writer) == "timed out"
    assert "waiting_writers=0" in repr(lock)
    lock.release_read()


# --- RWLock: greenlets killed while holding or waiting -------------------------------------------


@pytest.mark.parametrize("mode", ["reading", "writing"])
def test_greenlet_killed_inside_with_block_releases(mode):
    """Killing a greenlet inside ``with lock.reading()/writing()`` releases its hold."""
    lock = RWLock()
    holding = Event()

    def holder():
        with getattr(lock, mode)():
            holding.set()
            Event().wait()  # until killed

    victim = gevent.spawn(holder)
    holding.wait()
    assert lock.acquire_write(blocking=False) is False
    victim.kill()
    assert lock.acquire_write(blocking=False) is True
    assert "dead_owners=0" in repr(lock)


def test_greenlet_killed_holding_a_manual_acquire_keeps_the_lock():
    """A hold taken by acquire_write() with no finally outlives its killed greenlet: others wait."""
    lock = RWLock()
    holding = Event()

    def careless_writer():
        lock.acquire_write()
        holding.set()
        Event().wait()  # until killed; never releases

    victim = gevent.spawn(careless_writer)
    holding.wait()
    victim.kill()
    assert victim.dead
    assert lock.acquire_read(blocking=False) is False
    assert lock.acquire_read(timeout=SHORT_WAIT) is False
    assert lock.acquire_write(timeout=SHORT_WAIT) is False
    assert "dead_owners=1" in repr(lock)


def test_greenlet_killed_while_waiting_is_never_granted():
    """A reader killed while queued leaves the queue; the lock stays free of it afterwards."""
    lock = RWLock()
    lock.acquire_write()
    victim = gevent.spawn(lock.acquire_read)
    gevent.sleep(0)
    assert "waiting_readers=1" in repr(lock)
    victim.kill()
    assert "waiting_readers=0" in repr(lock)
    lock.release_write()
    assert _another_greenlet_can_take(lock, "write")


def test_killed_waiting_writer_lets_readers_queued_behind_it_in():
    """Killing a queued writer admits the readers that were waiting behind it."""
    lock = RWLock()
    lock.acquire_read()
    writer = gevent.spawn(lock.acquire_write)
    gevent.sleep(0)
    reader = gevent.spawn(_take_and_release, lock, "read")
    gevent.sleep(0)
    assert not reader.ready()
    writer.kill()
    assert reader.get(timeout=5) == "read"
    lock.release_read()


def test_greenlet_killed_in_the_instant_it_is_granted_gives_the_lock_back():
    """A waiter killed after the lock was handed to it, but before it ran, releases it."""
    lock = RWLock()
    lock.acquire_write()
    granted = Event()

    def careless_reader():
        lock.acquire_read()
        granted.set()
        Event().wait()  # never releases: only the kill path inside acquire_read can

    victim = gevent.spawn(careless_reader)
    gevent.sleep(0)
    victim.kill(block=False)  # the GreenletExit is scheduled first ...
    lock.release_write()  # ... then the hand-off wakes it, too late
    victim.join(timeout=5)
    assert victim.dead and not granted.is_set()
    assert lock.acquire_write(blocking=False) is True
