"""The pure halves of the MySQL, PostgreSQL and Redis protocol steps, without sockets."""

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gconn.protocols import mysql, postgres, redis, refusal

REASONS = ("queue_full", "queue_timeout", "blocked_host", "no_destination", "connect_failed")


def test_mysql_error_packet_is_a_pre_handshake_err():
    """An ERR packet: 3-byte length, sequence 0, 0xff, the code little-endian, no SQL state."""
    data = mysql.error_packet(1040, "Too many connections")
    assert data[:4] == struct.pack("<I", 23)[:3] + b"\x00"
    assert data[4:] == b"\xff\x10\x04Too many connections"
    sequence, payload, rest = mysql.split(data)
    assert (sequence, rest) == (0, b"")
    assert mysql.parse_error(payload) == (1040, "Too many connections")


@pytest.mark.parametrize("reason, code", [
    ("queue_full", 1040), ("queue_timeout", 1040), ("blocked_host", 1129),
    ("no_destination", 9001), ("connect_failed", 9001)])
def test_mysql_refusal_codes(reason, code):
    """MySQL Router's 1040 and 1129, ProxySQL's 9001 for an unreachable backend."""
    payload = mysql.split(mysql.refusal(reason, "db", "192.0.2.7", "127.0.0.1:6446"))[1]
    found, message = mysql.parse_error(payload)
    assert found == code and "gconn route db" in message
    if reason == "blocked_host":
        assert "Host '192.0.2.7' is blocked" in message


def test_mysql_split_waits_for_the_whole_packet():
    """split answers None until every byte of the first packet has come."""
    data = mysql.packet(b"abcdef", 3) + b"next"
    for cut in range(len(data) - 4):
        assert mysql.split(data[:cut]) is None
    assert mysql.split(data) == (3, b"abcdef", b"next")


def test_mysql_greeting_and_error_greeting():
    """A protocol-10 greeting gives its server version; an ERR greeting or other bytes raise."""
    greeting = b"\x0a10.11.19-MariaDB\x00" + bytes(40)
    assert mysql.parse_greeting(greeting) == "10.11.19-MariaDB"
    with pytest.raises(mysql.MysqlError, match="1129 Host"):
        mysql.parse_greeting(mysql.split(mysql.error_packet(1129, "Host 'x' is blocked"))[1])
    with pytest.raises(mysql.MysqlError, match="not a MySQL greeting"):
        mysql.parse_greeting(b"HTTP/1.1 200 OK\r\n")


def test_mysql_handshake_response_layout():
    """HandshakeResponse41: sequence 1, capabilities, max packet, utf8, 23 zeros, the user,
    an empty auth response and mysql_native_password."""
    sequence, payload, _ = mysql.split(mysql.handshake_response("gconn_check"))
    assert sequence == 1
    capabilities, max_packet, charset = struct.unpack("<IIB", payload[:9])
    assert capabilities & mysql.CLIENT_PROTOCOL_41 and capabilities & mysql.CLIENT_PLUGIN_AUTH
    assert (max_packet, charset) == (mysql.MAX_PACKET, 33)
    assert payload[9:32] == bytes(23)
    assert payload[32:] == b"gconn_check\x00\x00mysql_native_password\x00"


def fields(response):
    """The fields of an ErrorResponse as a dict of type letter -> text."""
    assert response[:1] == b"E"
    assert struct.unpack("!I", response[1:5])[0] == len(response) - 1
    body = response[5:]
    assert body.endswith(b"\x00\x00")
    return {item[:1].decode(): item[1:].decode() for item in body[:-2].split(b"\x00")}


@pytest.mark.parametrize("reason, code", [
    ("queue_full", "53300"), ("queue_timeout", "53300"), ("blocked_host", "08004"),
    ("no_destination", "08004"), ("connect_failed", "08004")])
def test_postgres_refusal_is_a_fatal_error_response(reason, code):
    """A FATAL ErrorResponse (S and V) with the SQLSTATE and a message naming the route."""
    found = fields(postgres.refusal(reason, "db", "192.0.2.7"))
    assert found["S"] == found["V"] == "FATAL"
    assert found["C"] == code and "gconn route db" in found["M"]


def test_postgres_startup_packet_lengths_and_codes():
    """The length field bounds the packet (8 to 10000); request codes tell SSL from startup."""
    ssl = struct.pack("!II", 8, postgres.SSL_REQUEST)
    assert postgres.packet_length(ssl[:3]) is None
    assert postgres.packet_length(ssl) == 8
    assert postgres.request_code(ssl) == postgres.SSL_REQUEST
    startup = struct.pack("!II", 17, 196608) + b"user\x00app\x00\x00"
    assert postgres.request_code(startup) == 196608
    for bad in (7, 10001, 0xFFFFFFFF):
        with pytest.raises(postgres.StartupError):
            postgres.packet_length(struct.pack("!I", bad))


@given(st.binary(max_size=64))
def test_fuzzed_bytes_never_crash_the_parsers(data):
    """Any bytes give a value or the module's own ValueError, never another exception."""
    for parse in (postgres.packet_length, mysql.parse_greeting, mysql.parse_error):
        try:
            parse(data)
        except ValueError:
            pass
    mysql.split(data)


def test_redis_refusals():
    """Redis's own text for a full route; a one-line -ERR naming the route otherwise."""
    assert redis.refusal("queue_full", "cache", "h") == b"-ERR max number of clients reached\r\n"
    reply = redis.refusal("no_destination", "cache", "h")
    assert reply.startswith(b"-ERR ") and reply.endswith(b"\r\n") and reply.count(b"\r\n") == 1
    assert redis.error_reply("two\r\nlines") == b"-ERR two lines\r\n"


@pytest.mark.parametrize("reason", REASONS)
def test_refusal_message_picks_the_protocol(reason):
    """tcp sends the shed-message; each database protocol its own refusal."""
    args = (reason, "r", "192.0.2.1", "127.0.0.1:1", b"BUSY\r\n")
    assert refusal.message("tcp", *args) == b"BUSY\r\n"
    assert refusal.message("mysql", *args)[4:5] == b"\xff"
    assert refusal.message("postgres", *args)[:1] == b"E"
    assert refusal.message("redis", *args)[:5] == b"-ERR "
    assert set(refusal.PROTOCOLS) == {"tcp", "mysql", "postgres", "redis"}
