"""How a route picks destinations for a new connection: pure functions and their name table.

Each strategy takes the route's destinations (in config order), the route's turn number (how
many connections it has routed before this one) and the monotonic time, and returns the
destinations to try, in order; the session tries them one after another until one connects.
Strategies never touch sockets and never change destination state (MySQL Router's semantics).
"""


def _rotated(items, turn):
    """``items`` starting at position ``turn`` modulo its length, wrapping around."""
    if not items:
        return []
    start = turn % len(items)
    return items[start:] + items[:start]


def first_available(destinations, turn, now):
    """Every healthy destination in list order, back at the head for every new connection.

    A destination that failed a moment ago is tried again (only health checks take it out).
    """
    return [d for d in destinations if d.healthy]


def next_available(destinations, turn, now):
    """Like first-available, but a destination that failed is skipped until retry or health."""
    return [d for d in destinations if d.available(now)]


def round_robin(destinations, turn, now):
    """Available destinations, starting one further along the list for each new connection."""
    return _rotated([d for d in destinations if d.available(now)], turn)


def round_robin_with_fallback(destinations, turn, now):
    """Round-robin over the available primaries, then over the backups when no primary works."""
    available = [d for d in destinations if d.available(now)]
    primaries = [d for d in available if not d.backup]
    backups = [d for d in available if d.backup]
    return _rotated(primaries, turn) + _rotated(backups, turn)


def least_connections(destinations, turn, now):
    """Available destinations by fewest active connections; ties taken round-robin."""
    return sorted(_rotated([d for d in destinations if d.available(now)], turn),
                  key=lambda d: d.active)


STRATEGIES = {
    "first-available": first_available,
    "next-available": next_available,
    "round-robin": round_robin,
    "round-robin-with-fallback": round_robin_with_fallback,
    "least-connections": least_connections,
}
