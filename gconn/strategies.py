"""How a route picks destinations for a new connection: pure functions and their name table.

Each strategy takes the route's destinations (in config order), the route's turn number (how
many connections it has routed before this one), the monotonic time and the client's host,
and returns the destinations to try, in order; the session tries them one after another until
one connects.  Strategies never touch sockets and never change destination state (MySQL
Router's semantics).

Weights (``weight=N``; 1 by default, 0 takes no new connection) give round-robin nginx's smooth
weighted round-robin: over every run of turns as long as the weights' sum each destination is
picked as often as its weight, spread out rather than in bursts (weights 5, 1, 1 pick a a b a c
a a).  That sequence depends only on the weights, so it is computed once per set of weights and
indexed by the turn: the strategies stay pure.  least-connections compares active connections
per unit of weight.

``source-hash`` keeps a client host on one destination while the set is stable: rendezvous
(highest random weight) hashing of the client and each destination, weighted; when a
destination leaves, only the clients it had move (about 1/N of them), as with Envoy's ring hash
or Maglev, without a ring to rebuild.
"""

import functools
import hashlib
import math


def _rotated(items, turn):
    """``items`` starting at position ``turn`` modulo its length, wrapping around."""
    if not items:
        return []
    start = turn % len(items)
    return items[start:] + items[:start]


@functools.lru_cache(maxsize=256)
def smooth_schedule(weights):
    """nginx's smooth weighted round-robin over positive ``weights``: the positions picked in
    one period (as long as the weights' sum).  Each turn every position gains its weight, the
    highest (the first of equals) is picked and loses the sum."""
    total = sum(weights)
    current = [0] * len(weights)
    picks = []
    for _ in range(total):
        for position, weight in enumerate(weights):
            current[position] += weight
        best = max(range(len(weights)), key=lambda position: (current[position], -position))
        current[best] -= total
        picks.append(best)
    return tuple(picks)


def _weighted_rotation(items, turn):
    """``items`` (weights > 0) in the order to try them for ``turn``: the smooth weighted
    round-robin's pick first, then the others in list order after it (plain rotation when
    every weight is the same)."""
    if not items:
        return []
    weights = tuple(d.weight for d in items)
    if weights.count(weights[0]) == len(weights):
        return _rotated(items, turn)
    schedule = smooth_schedule(weights)
    return _rotated(items, schedule[turn % len(schedule)])


def first_available(destinations, turn, now, client=None):
    """Every healthy destination in list order, back at the head for every new connection.

    A destination that failed a moment ago is tried again (only health checks take it out).
    """
    return [d for d in destinations if d.healthy and d.weight]


def next_available(destinations, turn, now, client=None):
    """Like first-available, but a destination that failed is skipped until retry or health."""
    return [d for d in destinations if d.weight and d.available(now)]


def round_robin(destinations, turn, now, client=None):
    """Available destinations, the next one of the (weighted) rotation first."""
    return _weighted_rotation([d for d in destinations if d.weight and d.available(now)], turn)


def round_robin_with_fallback(destinations, turn, now, client=None):
    """Round-robin over the available primaries, then over the backups when no primary works."""
    available = [d for d in destinations if d.weight and d.available(now)]
    primaries = [d for d in available if not d.backup]
    backups = [d for d in available if d.backup]
    return _weighted_rotation(primaries, turn) + _weighted_rotation(backups, turn)


def least_connections(destinations, turn, now, client=None):
    """Available destinations by fewest active connections per unit of weight; ties taken
    round-robin."""
    return sorted(_rotated([d for d in destinations if d.weight and d.available(now)], turn),
                  key=lambda d: d.active / d.weight)


def _score(client, destination):
    """The client's rendezvous score for ``destination`` (weighted: -weight / ln(uniform))."""
    digest = hashlib.blake2b(f"{client}|{destination.name}".encode(), digest_size=8).digest()
    uniform = (int.from_bytes(digest, "big") + 1) / (2 ** 64 + 1)  # in (0, 1)
    return -destination.weight / math.log(uniform)


def source_hash(destinations, turn, now, client=None):
    """Available destinations by the client host's rendezvous score: the same client host
    gets the same first destination while the set stays, the others in score order for
    failover (without a client host: round-robin)."""
    available = [d for d in destinations if d.weight and d.available(now)]
    if client is None:
        return _weighted_rotation(available, turn)
    return sorted(available, key=lambda d: _score(client, d), reverse=True)


STRATEGIES = {
    "first-available": first_available,
    "next-available": next_available,
    "round-robin": round_robin,
    "round-robin-with-fallback": round_robin_with_fallback,
    "least-connections": least_connections,
    "source-hash": source_hash,
}
