"""Dead peers are found (issue 17): a client or destination that vanishes without a FIN is
reclaimed by TCP keepalive, or by tcp-user-timeout once data stays unacknowledged, and is not
without them.

Each scenario runs dead_peer_scenario.py in a network namespace of its own (``unshare``, as
root), where a tc filter drops every packet from the vanished peer's loopback address; the
script reports what it saw as JSON and the assertions are here.
"""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCENARIO = Path(__file__).with_name("dead_peer_scenario.py")
RUN_LIMIT = 30.0  # seconds a scenario may run before it is killed, and its namespace with it
WATCH = 15.0  # seconds a scenario waits for gconn to end the connection
KEEPALIVE = ("--tcp-keepalive-idle", "1s", "--tcp-keepalive-interval", "1s",
             "--tcp-keepalive-count", "2")
KEEPALIVE_DEAD_AFTER = 1 + 2 * 1  # seconds of silence: the idle time, then 2 unanswered probes
USER_TIMEOUT = 2  # seconds sent data may stay unacknowledged (--tcp-user-timeout)
LATE = 3.0  # seconds past the expected time still counted as found in time
CONTROL_WATCH = 5.0  # seconds without keepalive: well past KEEPALIVE_DEAD_AFTER
TIMED_OUT = os.strerror(errno.ETIMEDOUT)  # what the kernel says of a peer found dead


def vanish(side, *options, send="", watch=WATCH):
    """Run the scenario where ``side`` vanishes (the other side sends ``send`` after that);
    its report: ``access`` (gconn's access line, None if none came within ``watch``),
    ``seconds`` since the vanishing, ``survivor_saw``, ``sockets`` (ss -tnoi), ``log``."""
    command = ["unshare", "--net", "--pid", "--kill-child", sys.executable, str(SCENARIO),
               "--vanish", side, "--send", send, "--watch", str(watch), "--", *options]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=RUN_LIMIT)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    return json.loads(finished.stdout)


def explained(report):
    """gconn's last lines and the sockets, for an assertion's message."""
    return "\n".join([*report["log"], report["sockets"]])


@pytest.mark.parametrize("side", ["destination", "client"])
def test_keepalive_finds_a_peer_that_vanished(side):
    """A silent peer that vanished is found dead after the keepalive idle time and its
    unanswered probes: the access line says which side and that it timed out, and the peer
    that is still there sees its side closed."""
    report = vanish(side, *KEEPALIVE)
    access = report["access"]
    assert access is not None, explained(report)
    assert f"end={side}_closed" in access and f'error="{side}: {TIMED_OUT}"' in access, access
    assert KEEPALIVE_DEAD_AFTER - 1 <= report["seconds"] <= KEEPALIVE_DEAD_AFTER + LATE, report
    assert report["survivor_saw"] in ("closed", "reset"), explained(report)


@pytest.mark.parametrize("side", ["destination", "client"])
def test_user_timeout_ends_a_connection_whose_data_is_never_acknowledged(side):
    """Without keepalive, bytes gconn forwards to a peer that vanished stay unacknowledged:
    tcp-user-timeout ends the connection about that long after."""
    report = vanish(side, "--tcp-keepalive", "no", "--tcp-user-timeout", f"{USER_TIMEOUT}s",
                    send="never acknowledged")
    access = report["access"]
    assert access is not None, explained(report)
    assert f"end={side}_closed" in access and f'error="{side}: {TIMED_OUT}"' in access, access
    assert USER_TIMEOUT - 0.5 <= report["seconds"] <= USER_TIMEOUT + LATE, report
    assert report["survivor_saw"] in ("closed", "reset"), explained(report)


def test_without_keepalive_a_silent_vanished_peer_is_not_found():
    """The control: with tcp-keepalive = no (same probe timings) a destination that vanished
    while the connection was quiet goes unnoticed well past the time keepalive takes."""
    report = vanish("destination", "--tcp-keepalive", "no", *KEEPALIVE, watch=CONTROL_WATCH)
    assert report["access"] is None, report["access"]
    assert report["survivor_saw"] == "open", explained(report)
