"""Micro-benchmark of gconn.local: context access, error state and RWLock acquire/release.

Compares with a plain attribute and with ``threading.local`` / ``threading.Lock`` /
``threading.RLock`` as they behave under gevent monkey-patching, and measures what binding a
context and an error costs per greenlet in each storage style. Not a test and asserts nothing:
run ``python tools/bench_local.py`` and read the tables. It patches first thing, as a gevent
server would; that is why the imports below come after code.
"""

# ruff: noqa: E402 -- monkey-patching must run before anything imports threading

from gevent import monkey

monkey.patch_all()

import argparse
import gc
import sys
import threading
import timeit
import tracemalloc
from pathlib import Path

import gevent
import gevent.local
from gevent.event import Event

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gconn import local as gconn_local

# Loop iterations per timing run for cheap operations; lock rows use a fifth of it.
ITERATIONS = 500_000
# Timing runs per row; the fastest is reported, as timeit's documentation advises.
REPEATS = 5
# Greenlets alive at once when measuring memory per greenlet.
MEMORY_GREENLETS = 10_000


class _Holder:
    """A plain object with slots: the baseline 'plain attribute'."""

    __slots__ = ("context", "error")


def _nanoseconds_per_operation(statement, namespace, iterations, repeats):
    """Return the fastest ns per run of ``statement``, minus the cost of the empty timing loop."""
    timer = timeit.Timer(statement, globals=namespace)
    empty = timeit.Timer("pass", globals=namespace)
    best_seconds = min(timer.repeat(repeat=repeats, number=iterations))
    empty_seconds = min(empty.repeat(repeat=repeats, number=iterations))
    return max(0.0, best_seconds - empty_seconds) * 1e9 / iterations


def _print_table(title, rows, baseline_label):
    """Print ``rows`` of (label, ns) with each row's ratio to the row named ``baseline_label``."""
    baseline = dict(rows)[baseline_label]
    print(f"\n{title}")
    print(f"  {'operation':<58} {'ns/op':>8} {'ratio':>8}")
    for label, nanoseconds in rows:
        ratio = nanoseconds / baseline if baseline else float("nan")
        print(f"  {label:<58} {nanoseconds:>8.1f} {ratio:>7.2f}x")
    print(f"  (ratio is against: {baseline_label})")


def measure_access(iterations, repeats):
    """Return timing rows for reading and writing per-connection state."""
    holder = _Holder()
    context = gconn_local.ConnectionContext(1, "route", ("127.0.0.1", 40000))
    holder.context = context
    thread_local = threading.local()
    thread_local.context = context
    library_local = gevent.local.local()
    library_local.context = context
    gconn_local.set_current(context)
    gconn_local.set_error("code", "message")
    namespace = {
        "holder": holder,
        "context": context,
        "thread_local": thread_local,
        "library_local": library_local,
        "current": gconn_local.current,
        "set_current": gconn_local.set_current,
        "last_error": gconn_local.last_error,
        "set_error": gconn_local.set_error,
    }
    patched = "gevent.local" if threading.local is gevent.local.local else "NOT patched"
    rows = [
        ("plain attribute read (holder.context)", "holder.context"),
        (f"threading.local read ({patched})", "thread_local.context"),
        ("gevent.local.local read", "library_local.context"),
        ("gconn current(), bound in this greenlet", "current()"),
        ("gconn last_error()", "last_error()"),
        ("plain attribute write", "holder.context = context"),
        (f"threading.local write ({patched})", "thread_local.context = context"),
        ("gconn set_current(context)", "set_current(context)"),
        ("gconn set_error(code, message)", "set_error('code', 'message')"),
    ]
    measured = [
        (label, _nanoseconds_per_operation(statement, namespace, iterations, repeats))
        for label, statement in rows
    ]

    def inherited():
        """Time current() in a plain gevent.spawn child that bound nothing itself."""
        return _nanoseconds_per_operation("current()", namespace, iterations, repeats)

    measured.append(("gconn current(), inherited one level up", gevent.spawn(inherited).get()))
    gconn_local.set_current(None)
    measured.append(
        (
            "gconn current(), outside any session (None)",
            _nanoseconds_per_operation("current()", namespace, iterations, repeats),
        )
    )
    return measured


def measure_locks(iterations, repeats):
    """Return timing rows for uncontended acquire + release pairs."""
    namespace = {
        "thread_lock": threading.Lock(),
        "thread_rlock": threading.RLock(),
        "rwlock": gconn_local.RWLock(),
        "held": gconn_local.RWLock(),
    }
    namespace["held"].acquire_read()
    rows = [
        (
            "threading.Lock acquire+release (patched)",
            "thread_lock.acquire(); thread_lock.release()",
        ),
        (
            "threading.RLock acquire+release (patched)",
            "thread_rlock.acquire(); thread_rlock.release()",
        ),
        ("RWLock acquire_read+release_read", "rwlock.acquire_read(); rwlock.release_read()"),
        ("RWLock acquire_write+release_write", "rwlock.acquire_write(); rwlock.release_write()"),
        ("RWLock reentrant read (already held)", "held.acquire_read(); held.release_read()"),
        ("with threading.RLock (patched)", "with thread_rlock: pass"),
        ("with RWLock.reading()", "with rwlock.reading(): pass"),
        ("with RWLock.writing()", "with rwlock.writing(): pass"),
    ]
    return [
        (label, _nanoseconds_per_operation(statement, namespace, iterations, repeats))
        for label, statement in rows
    ]


def _traced_bytes_for_greenlets(bind, count):
    """Return traced bytes while ``count`` greenlets that each ran ``bind()`` are alive."""
    release = Event()
    started = Event()
    remaining = [count]

    def session():
        bind()
        remaining[0] -= 1
        if not remaining[0]:
            started.set()
        release.wait()

    gc.collect()
    tracemalloc.start()
    before, _ = tracemalloc.get_traced_memory()
    greenlets = [gevent.spawn(session) for _ in range(count)]
    started.wait()
    during, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    release.set()
    gevent.joinall(greenlets)
    return during - before


def measure_memory(count):
    """Return bytes per greenlet for binding one context and one error, by storage style."""
    context = gconn_local.ConnectionContext(1, "route", ("127.0.0.1", 40000))
    error = ("code", "message")
    thread_local = threading.local()

    def nothing():
        """Bind nothing: the cost of the greenlet itself, subtracted from the others."""

    def on_greenlet():
        gconn_local.set_current(context)
        gconn_local.set_error(*error)

    def in_local():
        thread_local.context = context
        thread_local.error = error

    def least_bytes(bind):
        """Return the least of three measurements: the one least disturbed by other allocations."""
        return min(_traced_bytes_for_greenlets(bind, count) for _ in range(3))

    baseline = least_bytes(nothing)
    return [
        (label, (least_bytes(bind) - baseline) / count)
        for label, bind in (
            ("gconn: attributes on the greenlet", on_greenlet),
            ("threading.local (patched: gevent.local), 2 attributes", in_local),
        )
    ]


def main(argv=None):
    """Run every measurement inside a session-like greenlet and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=ITERATIONS, help="loops per timing run")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="timing runs per row")
    arguments = parser.parse_args(argv)
    print(
        f"Python {sys.version.split()[0]}, gevent {gevent.__version__}, "
        f"greenlet {sys.modules['greenlet'].__version__}"
    )
    access = gevent.spawn(measure_access, arguments.iterations, arguments.repeats).get()
    _print_table("Per-connection state access", access, "plain attribute read (holder.context)")
    locks = gevent.spawn(measure_locks, arguments.iterations // 5, arguments.repeats).get()
    _print_table(
        "Lock acquire + release, uncontended", locks, "threading.RLock acquire+release (patched)"
    )
    memory = gevent.spawn(measure_memory, MEMORY_GREENLETS).get()
    print(f"\nMemory to bind a context and an error, per greenlet ({MEMORY_GREENLETS:,} alive)")
    for label, bytes_per_greenlet in memory:
        print(f"  {label:<58} {bytes_per_greenlet:>8.0f} bytes")


if __name__ == "__main__":
    main()
