"""Admission, blocked hosts and health transitions as pure decisions (no sockets)."""

from gconn.admission import ADMIT, QUEUE, QUEUE_FULL, QUEUE_TIMEOUT, Admission, HostBlocker
from gconn.destinations import Destination
from gconn.settings import parse_destinations


def test_admit_then_queue_in_arrival_order_then_shed():
    """10 admitted, 5 queued, the 16th shed queue_full; released slots go to the queue in order."""
    admission = Admission(limit=10, max_queued=5, queue_timeout=5.0)
    decisions = [admission.arrive(n, now=0.0) for n in range(16)]
    assert decisions == [ADMIT] * 10 + [QUEUE] * 5 + [QUEUE_FULL]
    taken = []
    for _ in range(5):
        admission.release()
        taken.append(admission.take(now=1.0))
    assert taken == [10, 11, 12, 13, 14]
    assert admission.active == 10 and admission.admitted == 15 and admission.queued == 5
    assert admission.shed[QUEUE_FULL] == 1


def test_queue_timeout_sheds_the_expired_head_first():
    """Waiting clients past queue-timeout leave as queue_timeout; later arrivals stay."""
    admission = Admission(limit=1, max_queued=3, queue_timeout=2.0)
    admission.arrive("a", now=0.0)
    admission.arrive("b", now=0.0)
    admission.arrive("c", now=1.0)
    assert admission.next_deadline() == 2.0
    assert admission.expired(now=2.5) == ["b"]
    assert admission.next_deadline() == 3.0
    admission.release()
    assert admission.take(now=2.6) == "c"
    assert admission.shed[QUEUE_TIMEOUT] == 1


def test_a_slot_freed_after_the_head_expired_goes_to_the_next_waiting():
    """Release, then the expired head is shed, and the next waiting client takes the slot."""
    admission = Admission(limit=1, max_queued=3, queue_timeout=2.0)
    admission.arrive("a", now=0.0)
    admission.arrive("b", now=0.0)
    admission.arrive("c", now=1.0)
    admission.release()
    assert admission.expired(now=2.5) == ["b"]
    assert admission.take(now=2.5) == "c" and admission.active == 1


def test_no_queue_means_shed_when_full():
    """max-queued 0: a client arriving at a full route is shed at once."""
    admission = Admission(limit=1, max_queued=0)
    assert admission.arrive("a", 0.0) == ADMIT
    assert admission.arrive("b", 0.0) == QUEUE_FULL


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


def test_quarantine_takes_a_destination_out_until_it_rises():
    """A failed connect quarantines; only `rise` good checks bring it back."""
    destination = Destination(parse_destinations("a:1")[0])
    destination.quarantine("refused")
    assert not destination.available(0.0)
    destination.check_result(True, rise=2, fall=3)
    assert not destination.available(0.0)
    destination.check_result(True, rise=2, fall=3)
    assert destination.available(0.0)
