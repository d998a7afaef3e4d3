"""What a config asks of the machine: how many connections workers can hold (two descriptors
each), how many workers a load needs, and the warnings the supervisor logs at start and reload
and ``--check-config`` prints (capacity short of max-connections, certificates near their end).
Pure: it reads the config and the open-files limit, never a socket.
"""

import datetime
import os

from .protocols import tls
from .sockets import connections_per_process

EXPIRY_WARNING = datetime.timedelta(days=7)  # a certificate closer to its end is logged


def capacity(open_files_limit, workers):
    """How many forwarded connections ``workers`` processes can hold."""
    return connections_per_process(open_files_limit) * workers


def workers_needed(connections, open_files_limit):
    """The fewest workers that can hold ``connections`` forwarded connections."""
    return -(-connections // connections_per_process(open_files_limit))


def worker_count(config):
    """The configured number of workers; 0 means one per CPU core."""
    return config.process.workers or os.cpu_count() or 1


def certificate_warnings(config, now=None):
    """Each terminating route's certificate that has expired or ends within EXPIRY_WARNING,
    one sentence each: logged once at start and reload (not by every worker)."""
    now = now or datetime.datetime.now(datetime.UTC)
    warnings = []
    for route in config.routes:
        for path in route.tls_cert:
            left = tls.expiry(path) - now
            if left < EXPIRY_WARNING:
                warnings.append(f"route={route.name} certificate {path} " + (
                    "has expired" if left.total_seconds() < 0
                    else f"expires in {left.days} days"))
    return warnings


def capacity_warnings(config, open_files_limit):
    """What ``config`` asks for that its workers cannot give, one sentence each (empty when it
    fits): the supervisor logs these at start and reload, ``--check-config`` prints them."""
    workers = worker_count(config)
    wanted = sum(route.max_connections for route in config.routes)
    held = capacity(open_files_limit, workers)
    warnings = []
    if wanted > held:
        warnings.append(
            f"max-connections over all routes is {wanted} but {workers} workers with an "
            f"open-files limit of {open_files_limit} hold at most {held}; set workers = "
            f"{workers_needed(wanted, open_files_limit)} to reach it")
    for route in config.routes:
        if route.max_connections < workers:
            warnings.append(
                f"route={route.name} max-connections {route.max_connections} is below the "
                f"{workers} workers: each worker serves at most 1, so up to {workers} at once")
    return warnings
