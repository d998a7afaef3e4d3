"""Each strategy's choice order over three destinations, with one down and then back, and
with weights (pure)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gconn.destinations import RouteDestinations
from gconn.settings import parse_destinations

RETRY = 5.0  # seconds a failed destination is skipped by the strategies that honour it


def route(strategy, text="a:1, b:2, c:3"):
    return RouteDestinations(parse_destinations(text), strategy)


def names(destinations):
    return [d.address.host for d in destinations]


def orders(routes, count, now=0.0):
    return [names(routes.candidates(now)) for _ in range(count)]


def test_first_available_always_starts_at_the_head():
    """first-available offers list order for every connection, even after a failure."""
    r = route("first-available")
    assert orders(r, 2) == [["a", "b", "c"]] * 2
    r.destinations[0].connect_failed(0.0, RETRY, "refused")
    assert orders(r, 1, now=1.0) == [["a", "b", "c"]]
    r.destinations[0].healthy = False  # a health check says it is down
    assert orders(r, 1, now=1.0) == [["b", "c"]]
    r.destinations[0].healthy = True
    assert orders(r, 1, now=1.0) == [["a", "b", "c"]]


def test_next_available_skips_a_failed_destination_until_retry():
    """next-available skips a failed destination until retry-interval passes, then takes it."""
    r = route("next-available")
    r.destinations[0].connect_failed(10.0, RETRY, "refused")
    assert orders(r, 2, now=11.0) == [["b", "c"]] * 2
    assert orders(r, 1, now=10.0 + RETRY) == [["a", "b", "c"]]
    r.destinations[0].connect_failed(20.0, RETRY, "refused")
    r.destinations[0].connect_succeeded()
    assert orders(r, 1, now=21.0) == [["a", "b", "c"]]


def test_round_robin_rotates_and_leaves_out_a_down_destination():
    """round-robin starts one further for each connection and skips the failed one."""
    r = route("round-robin")
    assert [o[0] for o in orders(r, 6)] == ["a", "b", "c", "a", "b", "c"]
    r.destinations[1].connect_failed(0.0, RETRY, "refused")
    firsts = [o[0] for o in orders(r, 4, now=1.0)]
    assert "b" not in firsts and set(firsts) == {"a", "c"}
    later = [o[0] for o in orders(r, 3, now=RETRY + 1)]
    assert set(later) == {"a", "b", "c"}


def test_round_robin_with_fallback_uses_backups_only_when_primaries_are_down():
    """round-robin-with-fallback rotates primaries; backups come last and lead when needed."""
    r = route("round-robin-with-fallback", "a:1, b:2, c:3 backup")
    got = orders(r, 4)
    assert [o[0] for o in got] == ["a", "b", "a", "b"]
    assert all(o[-1] == "c" for o in got)
    for primary in r.destinations[:2]:
        primary.connect_failed(0.0, RETRY, "refused")
    assert orders(r, 2, now=1.0) == [["c"], ["c"]]
    assert orders(r, 1, now=RETRY + 1)[0][0] in ("a", "b")


def test_least_connections_prefers_the_least_busy():
    """least-connections picks the fewest active; ties go round-robin; failed ones skipped."""
    r = route("least-connections")
    a, b, c = r.destinations
    a.active, b.active, c.active = 3, 1, 2
    assert orders(r, 1) == [["b", "c", "a"]]
    b.active = 3
    assert orders(r, 1)[0][0] == "c"
    c.connect_failed(0.0, RETRY, "refused")
    assert orders(r, 1, now=1.0)[0] in (["a", "b"], ["b", "a"])
    a.active = b.active = c.active = 0
    firsts = {o[0] for o in orders(r, 3, now=RETRY + 1)}
    assert firsts == {"a", "b", "c"}


@pytest.mark.parametrize("strategy", ["next-available", "round-robin", "least-connections",
                                      "round-robin-with-fallback", "source-hash"])
def test_every_strategy_offers_nothing_when_all_are_down(strategy):
    """With every destination failed and not yet due for retry, no candidate is offered."""
    r = route(strategy)
    for destination in r.destinations:
        destination.connect_failed(0.0, RETRY, "refused")
    assert r.candidates(1.0) == []


# weights --------------------------------------------------------------------------------------

def first_picks(routes, count):
    return "".join(names(routes.candidates(0.0))[0] for _ in range(count))


def test_round_robin_with_weights_is_smooth():
    """Weights 5, 1, 1: nginx's smooth sequence a a b a c a a, period after period, the
    others following the pick in list order for failover."""
    r = route("round-robin", "a:1 weight=5, b:2, c:3")
    assert first_picks(r, 14) == "aabacaa" * 2
    assert [names(r.candidates(0.0)) for _ in range(3)] == [
        ["a", "b", "c"], ["a", "b", "c"], ["b", "c", "a"]]


@given(st.lists(st.integers(0, 12), min_size=1, max_size=6).filter(any))
def test_weighted_shares_are_exact_per_period_and_never_bursty(weights):
    """Over each period (the weights' sum) every destination is picked exactly its weight
    times, at every turn less than two picks from its share (smooth weighted round-robin
    strays just over one: weights 1, 1, 1, 11, 11 after 16 turns), and a weight-0 one is
    never offered (not even for failover)."""
    text = ", ".join(f"h{i}:{i + 1} weight={w}" for i, w in enumerate(weights))
    r = route("round-robin", text)
    total = sum(weights)
    counts = dict.fromkeys(range(len(weights)), 0)
    for turn in range(1, 2 * total + 1):
        offered = names(r.candidates(0.0))
        assert all(weights[int(name[1:])] for name in offered)
        counts[int(offered[0][1:])] += 1
        for i, weight in enumerate(weights):  # |count - turn * weight / total| < 2
            assert abs(counts[i] * total - turn * weight) < 2 * total
    assert counts == {i: 2 * w for i, w in enumerate(weights)}


@pytest.mark.parametrize("strategy", ["first-available", "next-available", "round-robin",
                                      "round-robin-with-fallback", "least-connections",
                                      "source-hash"])
def test_weight_zero_takes_no_new_connection_under_any_strategy(strategy):
    r = route(strategy, "a:1 weight=0, b:2, c:3 backup")
    assert all("a" not in order for order in orders(r, 4))


def test_least_connections_counts_connections_per_unit_of_weight():
    """Weight 3 with 2 active (0.67 each) is less busy than weight 1 with 1 active."""
    r = route("least-connections", "a:1 weight=3, b:2")
    r.destinations[0].active, r.destinations[1].active = 2, 1
    assert names(r.candidates(0.0)) == ["a", "b"]
    r.destinations[0].active = 4  # 1.33 per unit: now b
    assert names(r.candidates(0.0)) == ["b", "a"]


@pytest.mark.parametrize("text", ["a:1 weight=257", "a:1 weight=-1", "a:1 weight=x",
                                  "a:1 weight="])
def test_a_bad_weight_is_refused_saying_what_is_allowed(text):
    with pytest.raises(ValueError, match="weight=0..256"):
        parse_destinations(text)


# source-hash ----------------------------------------------------------------------------------

CLIENTS = [f"10.{n // 65536}.{n // 256 % 256}.{n % 256}" for n in range(4000)]


def first_for(routes, client):
    return names(routes.candidates(0.0, client))[0]


def test_source_hash_keeps_a_client_on_one_destination():
    r = route("source-hash", "a:1, b:2, c:3, d:4")
    assert len({first_for(r, "192.0.2.7") for _ in range(100)}) == 1
    assert {first_for(r, client) for client in CLIENTS[:200]} == {"a", "b", "c", "d"}


def test_source_hash_moves_only_the_clients_of_a_destination_that_leaves():
    """One of four goes down: exactly the clients it had move (about a quarter), nobody
    else; when it comes back they return."""
    r = route("source-hash", "a:1, b:2, c:3, d:4")
    before = {client: first_for(r, client) for client in CLIENTS}
    r.destinations[1].healthy = False
    after = {client: first_for(r, client) for client in CLIENTS}
    moved = {client for client in CLIENTS if before[client] != after[client]}
    assert moved == {client for client in CLIENTS if before[client] == "b"}
    assert 0.18 < len(moved) / len(CLIENTS) < 0.32
    r.destinations[1].healthy = True
    assert {client: first_for(r, client) for client in CLIENTS} == before


@given(st.integers(1, 5))
def test_source_hash_shares_clients_by_weight(weight):
    r = route("source-hash", f"a:1 weight={weight}, b:2")
    share = sum(first_for(r, client) == "a" for client in CLIENTS) / len(CLIENTS)
    assert abs(share - weight / (weight + 1)) < 0.05


@pytest.mark.parametrize("strategy", ["round-robin", "least-connections"])
def test_slow_start_share_grows_linearly_over_slow_start(strategy):
    """A destination back up at time 100 with slow-start 10 s: at 2.5 s it takes about a
    quarter of its full share of new connections, at 7.5 s three quarters, after 10 s all of
    it (two destinations: a full share is a half)."""
    r = RouteDestinations(parse_destinations("a:1, b:2"), strategy, slow_start=10.0)
    health = {"a:1": [True, 5, 0.0], "b:2": [True, 5, 100.0]}  # b came back at 100
    r.publish(health, 100.0)
    assert r.warming == [r.destinations[1]]
    for elapsed, share in ((2.5, 0.125), (7.5, 0.375), (10.0, 0.5)):
        firsts = [names(r.candidates(100.0 + elapsed))[0] for _ in range(4000)]
        assert abs(firsts.count("b") / len(firsts) - share) < 0.03, (elapsed, share)
    assert r.warming == []  # warm now: no more work per connection
    assert orders(r, 2, now=111.0) in ([["a", "b"], ["b", "a"]], [["b", "a"], ["a", "b"]])


def test_slow_start_never_thins_first_available_or_a_lone_destination():
    """first-available has no share to grow (its order stays); a destination alone is
    offered as ever (there is nobody to send the rest to)."""
    r = RouteDestinations(parse_destinations("a:1, b:2"), "first-available", slow_start=10.0)
    r.publish({"a:1": [True, 5, 100.0], "b:2": [True, 5, 0.0]}, 100.0)
    assert orders(r, 20, now=101.0) == [["a", "b"]] * 20
    alone = RouteDestinations(parse_destinations("a:1"), "round-robin", slow_start=10.0)
    alone.publish({"a:1": [True, 5, 100.0]}, 100.0)
    assert orders(alone, 20, now=100.5) == [["a"]] * 20


def test_checks_and_discovery_start_the_slow_start():
    """The checker's side: a destination the checks bring back, or one discovery adds to a
    set it had already found, carries the time it came (published to the workers)."""
    r = RouteDestinations(parse_destinations("a:1"), "round-robin")
    a = r.destinations[0]
    assert r.check_result(a, False, 1, 1, 50.0)  # down at 50
    assert not a.healthy and a.warm_since == 0.0
    assert r.check_result(a, True, 1, 1, 60.0) and a.warm_since == 60.0
    first = r.update(parse_destinations("b:2"), now=70.0)
    assert [d.warm_since for d in first] == [0.0]  # the first set found: no slow start
    added = r.update(parse_destinations("b:2, c:3"), now=80.0)
    assert [(d.name, d.warm_since) for d in added] == [("c:3", 80.0)]
    assert r.health()["c:3"] == [True, 0, 80.0]
