"""Admission, blocked hosts and health transitions as pure decisions (no sockets)."""

from gconn.admission import ADMIT, QUEUE, QUEUE_FULL, QUEUE_TIMEOUT, Admission, HostBlocker
from gconn.destinations import Destination, RouteDestinations
from gconn.settings import parse_destinations


def test_admit_then_queue_in_arrival_order_then_shed():
    """10 admitted, 5 queued, the 16th shed queue_full; released slots go to the queue in order."""
    admission = Admission(limit=10, max_queued=5)
    decisions = [admission.arrive(n) for n in range(16)]
    assert decisions == [ADMIT] * 10 + [QUEUE] * 5 + [QUEUE_FULL]
    handed = [admission.release() for _ in range(5)]
    assert handed == [10, 11, 12, 13, 14]
    assert admission.active == 10 and admission.admitted == 15 and admission.queued == 5
    assert admission.shed[QUEUE_FULL] == 1
    assert admission.release() is None and admission.active == 9


def test_a_newcomer_never_overtakes_the_queue():
    """While sessions wait, a newcomer queues even at the moment a slot is given back."""
    admission = Admission(limit=1, max_queued=3)
    assert [admission.arrive(name) for name in "ab"] == [ADMIT, QUEUE]
    assert admission.release() == "b"  # handed over: the slot never looks free
    assert admission.arrive("c") == QUEUE and admission.active == 1


def test_giving_up_leaves_the_line_counted_once():
    """A waiter whose queue-timeout ran out leaves the line as queue_timeout; the next waiter
    gets the slot; a waiter dropped at shutdown is counted by the drop, not again."""
    admission = Admission(limit=1, max_queued=3)
    for name in "abcd":
        admission.arrive(name)
    admission.give_up("b")
    assert admission.shed[QUEUE_TIMEOUT] == 1
    assert admission.release() == "c"
    assert admission.drop_waiting() == ["d"] and admission.shed[QUEUE_TIMEOUT] == 2
    admission.give_up("d")
    assert admission.shed[QUEUE_TIMEOUT] == 2


def test_no_queue_means_shed_when_full():
    """max-queued 0: a client arriving at a full route is shed at once."""
    admission = Admission(limit=1, max_queued=0)
    assert admission.arrive("a") == ADMIT
    assert admission.arrive("b") == QUEUE_FULL


def test_host_blocker_counts_consecutive_failures_and_unblocks():
    """max-connect-errors 3: three failures block; a success resets; the block ends in time."""
    blocker = HostBlocker(max_errors=3, block_time=10.0)
    assert not blocker.failed("h", 0.0) and not blocker.failed("h", 0.0)
    blocker.succeeded("h")
    assert not blocker.failed("h", 0.0) and not blocker.failed("h", 0.0)
    assert blocker.failed("h", 1.0)
    assert blocker.blocked("h", 5.0) and not blocker.blocked("other", 5.0)
    assert blocker.blocked_hosts(5.0) == 1
    assert not blocker.blocked("h", 11.0)


def test_host_blocker_off_with_zero():
    """max-connect-errors 0 never blocks."""
    blocker = HostBlocker(max_errors=0, block_time=10.0)
    assert not any(blocker.failed("h", 0.0) for _ in range(100))


def test_rise_and_fall():
    """A healthy destination falls after `fall` failed checks; rises after `rise` good ones."""
    destination = Destination(parse_destinations("a:1")[0])
    results = [destination.check_result(False, rise=2, fall=3) for _ in range(3)]
    assert results == [False, False, True] and not destination.healthy
    assert destination.check_result(True, 2, 3) is False
    assert destination.check_result(False, 2, 3) is False  # a failure breaks the good streak
    assert [destination.check_result(True, 2, 3) for _ in range(2)] == [False, True]
    assert destination.healthy


def test_quarantine_takes_a_destination_out_until_the_checker_saw_it_rise():
    """A failed connect quarantines in this worker (the checker still says up); only `rise`
    more good checks, as the checker publishes them, bring it back."""
    routes = RouteDestinations(parse_destinations("a:1"), "first-available")
    destination = routes.destinations[0]
    routes.publish({"a:1": [True, 7, 0.0]}, 0.0)
    routes.quarantine(destination, "refused", rise=2)
    assert not destination.available(0.0) and destination.healthy
    assert routes.publish({"a:1": [True, 8, 0.0]}, 0.0) == ([], [], [])
    assert not destination.available(0.0)
    assert routes.publish({"a:1": [True, 9, 0.0]}, 0.0) == ([], [], [destination])
    assert destination.available(0.0)
