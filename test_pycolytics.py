"""Tests for pycolytics.py: the WSGI application under WebTest, the built-in server over real sockets."""

import base64
import binascii
import collections
import concurrent.futures
import contextlib
import csv
import datetime
import decimal
import functools
import gzip
import html
import http.client
import http.server
import io
import itertools
import json
import logging
import math
import os
import random
import re
import shutil
import shlex
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import time
import types
import urllib.parse
import warnings
import wsgiref.validate
import zlib

import hypothesis
import pytest
import schemathesis
import webtest
from hypothesis import strategies as st

import pycolytics

try:
    import psycopg
except ImportError:  # the PostgreSQL tests say so, and fail in CI
    psycopg = None

KEY = "test-key-0123456789"
HERE = os.path.dirname(os.path.abspath(__file__))


def event(**changes):
    base = {
        "event_type": "level_started", "application": "my-game", "version": "1.0.2", "platform": "Linux",
        "user_id": "3f2a9c1e", "session_id": "a81c0f", "value": {"level": 3}, "api_key": KEY,
    }
    base.update(changes)
    return {name: value for name, value in base.items() if value is not ...}


def body(document):
    return json.dumps(document).encode()


# The same columns as SQLite's text, from PostgreSQL: UTC times with microseconds, compact JSON.
POSTGRES_TEXT = {
    "time": "to_char(time AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US')",
    "received_at": "to_char(received_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US')",
    "value": "value::text",
}


def is_postgres(database):
    return database.startswith("postgresql://")


def stored(database, columns="event_type, application, version, platform, user_id, session_id, value"):
    if not is_postgres(database):
        with sqlite3.connect(database) as connection:
            return connection.execute(f"SELECT {columns} FROM event ORDER BY id").fetchall()
    names = [name.strip() for name in columns.split(",")]
    expressions = re.sub(r"\b(time|received_at|value)\b", lambda found: POSTGRES_TEXT[found.group(1)], columns)
    with psycopg.connect(database) as connection:
        rows = connection.execute(f"SELECT {expressions} FROM event ORDER BY id").fetchall()
    if "value" not in names:
        return rows
    # jsonb keeps its own key order and spacing: compare the JSON, written compactly
    at = names.index("value")
    compact = functools.partial(json.dumps, separators=(",", ":"), ensure_ascii=False)
    return [row[:at] + (compact(json.loads(row[at])),) + row[at + 1:] for row in rows]


def count(database):
    if is_postgres(database):
        with psycopg.connect(database) as connection:
            return connection.execute("SELECT count(*) FROM event").fetchone()[0]
    with sqlite3.connect(database) as connection:
        return connection.execute("SELECT count(*) FROM event").fetchone()[0]


# The shared PostgreSQL server the tests make their schemas in; other programs use it too.
POSTGRES_SERVER = os.environ.get("PYCOLYTICS_TEST_POSTGRES", "postgresql://127.0.0.1:5432/test")


@pytest.fixture
def postgres_url():
    """A PostgreSQL URL whose tables live in a schema of this test's own, dropped afterwards."""
    with postgres_schema() as url:
        yield url


@contextlib.contextmanager
def postgres_schema():
    if psycopg is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install psycopg (requirements-dev.txt) for the PostgreSQL tests")
        pytest.skip("psycopg is not installed")
    schema = "test_" + os.urandom(6).hex()
    try:
        with psycopg.connect(POSTGRES_SERVER, connect_timeout=5, autocommit=True) as connection:
            connection.execute(f"CREATE SCHEMA {schema}")
    except psycopg.OperationalError as error:
        if os.environ.get("CI"):
            pytest.fail(f"the PostgreSQL server at {POSTGRES_SERVER} must run in CI: {error}")
        pytest.skip(f"no PostgreSQL server at {POSTGRES_SERVER}")
    # the schema's name is its collectors' application_name too: a test cuts only its own connections
    joint = "&" if "?" in POSTGRES_SERVER else "?"
    yield f"{POSTGRES_SERVER}{joint}options=-csearch_path%3D{schema}&application_name={schema}"
    with psycopg.connect(POSTGRES_SERVER, autocommit=True) as connection:
        connection.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
def database(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "events.db")
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def sqlite_only():
    """Marks a test that is about SQLite files: see pytest_generate_tests."""


@pytest.fixture
def settings(database):
    return {"database": database, "api_keys": KEY, "quiet": "yes"}


@pytest.fixture
def config(tmp_path, monkeypatch, settings):
    monkeypatch.chdir(tmp_path)
    return pycolytics.load_config(environ={}, overrides=settings)


@pytest.fixture
def make_app():
    """The app factory: make_app(config) opens an application; every one it made is closed at the end."""
    made = []

    def make(config):
        made.append(pycolytics.create_app(config))
        return made[-1]

    yield make
    for app in made:
        app.close()


@pytest.fixture
def app(config, make_app):
    return make_app(config)


@pytest.fixture
def client(app):
    return webtest.TestApp(app)


def post(client, path, payload, status=204, **kwargs):
    data = payload if isinstance(payload, bytes) else body(payload)
    return client.post(path, data, status=status, **kwargs)


# -- Storing events ----------------------------------------------------------------------------


def test_one_event_is_stored_with_a_utc_time(client, database):
    before = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
    response = post(client, "/v1.0/event", event())
    assert response.body == b""
    assert stored(database) == [("level_started", "my-game", "1.0.2", "Linux", "3f2a9c1e", "a81c0f", '{"level":3}')]
    (text,), = stored(database, "time")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}", text)
    assert before <= datetime.datetime.strptime(text, "%Y-%m-%d %H:%M:%S.%f") <= before + datetime.timedelta(seconds=5)


def test_a_batch_is_stored_in_order(client, database):
    post(client, "/v1.0/events", [event(event_type=f"e{n}") for n in range(50)])
    assert [row[0] for row in stored(database)] == [f"e{n}" for n in range(50)]


def test_an_empty_batch_is_accepted_and_stores_nothing(client, database):
    post(client, "/v1.0/events", [])
    assert count(database) == 0


def test_value_defaults_to_an_empty_object_and_extra_fields_are_ignored(client, database):
    post(client, "/v1.0/event", event(value=..., colour="blue"))
    assert stored(database, "value") == [("{}",)]


def test_empty_strings_are_valid_field_values(client, database):
    # Godot's default project version is "", and the addon sends it as is.
    post(client, "/v1.0/event", event(version=""))
    assert stored(database, "version") == [("",)]


def test_value_is_stored_as_compact_valid_json(client, database, sqlite_only):
    value = {"text": "héllo \u2603 \"quoted\"", "nested": {"list": [1, 2.5, None, True]}, "big": 1e999}
    post(client, "/v1.0/event", event(value=value))
    (text, valid), = stored(database, "value, json_valid(value)")
    assert valid == 1
    assert " " not in text.replace("héllo \u2603 ", "")
    assert json.loads(text) == dict(value, big=None)


def test_any_content_type_or_none_is_accepted(client, database):
    post(client, "/v1.0/event", event(), content_type="text/plain")
    post(client, "/v1.0/event", event())  # WebTest sends no Content-Type when given none
    assert count(database) == 2


# -- Godot's addon and its JSON quirks -------------------------------------------------------------


def godot_json(**fields):
    """What the addon's PycoEvent.to_json() writes: fixed field order, Godot's float spelling."""
    return "{" + ",".join(f'"{name}":{text}' for name, text in fields.items()) + "}"


GODOT_EVENT = godot_json(
    event_type='"startup"', application='"My Game"', version='""', platform='"Linux"', user_id='"1a2b3c4d"',
    session_id='"' + "ab" * 32 + '"', value="{}", api_key=json.dumps(KEY),
)
GODOT_QUIRKS = godot_json(
    event_type='"death"', application='"My Game"', version='"0.3"', platform='"Windows"', user_id='"1a2b3c4d"',
    session_id='"s1"', value='{"speed":nan,"max":inf,"min":-inf,"name":"tab\\vhere","path":"C:\\\\vol"}',
    api_key=json.dumps(KEY),
)


def test_godot_non_finite_floats_and_vertical_tab_are_accepted_as_valid_json(client, database, sqlite_only):
    post(client, "/v1.0/events", ("[" + GODOT_EVENT + "," + GODOT_QUIRKS + "]").encode())
    (first, first_valid), (text, valid) = stored(database, "value, json_valid(value)")
    assert (first, first_valid, valid) == ("{}", 1, 1)
    assert json.loads(text) == {"speed": None, "max": None, "min": None, "name": "tab\x0bhere", "path": "C:\\vol"}


def test_words_like_nan_inside_strings_are_left_alone(client, database):
    quirky = event(event_type="nan", value={"note": "inf and nan", "x": 1})
    text = json.dumps([quirky]).replace('"x": 1', '"x": nan')
    post(client, "/v1.0/events", text.encode())
    (event_type, value), = stored(database, "event_type, value")
    assert (event_type, json.loads(value)) == ("nan", {"note": "inf and nan", "x": None})


# -- Refused requests store nothing and say what to fix ----------------------------------------------

BAD_REQUESTS = [
    # (path, body, status, words the detail must contain)
    ("/v1.0/event", b"", 400, ["empty"]),
    ("/v1.0/event", b"{not json", 400, ["not valid JSON", "line 1 column 2"]),
    ("/v1.0/event", b'{"event_type": "\xff"}', 400, ["not UTF-8"]),
    ("/v1.0/events", b"[" + body(event()) + b",]", 400, ["not valid JSON"]),
    ("/v1.0/events", b"[" * 100000, 400, ["nests arrays or objects too deeply"]),
    ("/v1.0/events", body(event()), 422, ["expected a JSON array"]),
    ("/v1.0/event", body([event()]), 422, ["expected a JSON object"]),
    ("/v1.0/event", body(event(user_id=...)), 422, ["'user_id' is required"]),
    ("/v1.0/event", body(event(platform=None)), 422, ["'platform' must be a string, not null"]),
    ("/v1.0/event", body(event(version=2)), 422, ["'version' must be a string"]),
    ("/v1.0/event", body(event(value=[1, 2])), 422, ["'value' must be a JSON object"]),
    ("/v1.0/event", body(event(value=None)), 422, ["'value' must be a JSON object"]),
    ("/v1.0/event", body(event(application="x" * 256)), 422, ["'application' is longer than 255 characters"]),
    ("/v1.0/event", body(event(value={"blob": "x" * 70000})), 422, ["'value' is", "at most 65536"]),
    ("/v1.0/event", body(event(value=json.loads("[" * 40 + "]" * 40) and {"a": json.loads("[" * 40 + "]" * 40)})),
     422, ["'value' nests", "32 deep"]),
    ("/v1.0/event", body(event(session_id="\ud800")), 422, ["'session_id' holds an unpaired UTF-16 surrogate"]),
    ("/v1.0/event", body(event(value={"\udfff": 1})), 422, ["'value' holds an unpaired UTF-16 surrogate"]),
    ("/v1.0/event", body(event(user_id="a\0b")), 422, ["'user_id' holds a NUL character"]),
    ("/v1.0/event", body(event(value={"a": ["x\0"]})), 422, ["'value' holds a NUL character"]),
    ("/v1.0/event", body(event(value={"k\0": 1})), 422, ["'value' holds a NUL character"]),
    ("/v1.0/event", body(event(api_key=12345)), 422, ["'api_key' must be a string"]),
    ("/v1.0/events", body([event(), event(user_id=...), event(), event(value="x")]), 422,
     ["event 1: 'user_id' is required", "event 3: 'value' must be a JSON object"]),
    ("/v1.0/events", body([event(), 7]), 422, ["event 1: expected a JSON object"]),
    ("/v1.0/events", body([event()] * 1001), 422, ["at most 1000 events"]),
    ("/v1.0/event", body(event(api_key=...)), 401, ["invalid or missing api_key"]),
    ("/v1.0/event", body(event(api_key="wrong")), 401, ["invalid or missing api_key"]),
    ("/v1.0/event", body(event(api_key=pycolytics.DEV_KEY)), 401, ["invalid or missing api_key"]),
    ("/v1.0/event", body(event(api_key="ключ")), 401, ["invalid or missing api_key"]),
    ("/v1.0/events", body([event(), event(api_key="wrong"), event(), event(api_key=...)]), 401, ["events 1, 3"]),
]


@pytest.mark.parametrize("path, payload, status, words", BAD_REQUESTS,
                         ids=[f"{status} {path.rsplit('/', 1)[1]}: {words[-1]}" for path, _, status, words in BAD_REQUESTS])
def test_bad_requests_are_refused_with_a_clear_detail_and_store_nothing(client, database, path, payload, status, words):
    post(client, "/v1.0/event", event(event_type="before"))  # the database exists and holds one row
    response = client.post(path, payload, status=status)
    assert response.content_type == "application/json"
    detail = json.dumps(response.json["detail"], ensure_ascii=False)
    for word in words:
        assert word in detail
    assert stored(database, "event_type") == [("before",)]


def test_a_batch_with_one_bad_event_lists_every_problem_and_stores_nothing(client, database):
    batch = [event(), event(user_id=None, platform=...), event(), event(value=[])]
    detail = post(client, "/v1.0/events", batch, status=422).json["detail"]
    assert [problem["loc"] for problem in detail] == [
        ["body", 1, "platform"], ["body", 1, "user_id"], ["body", 3, "value"],
    ]
    assert count(database) == 0


def test_a_key_is_never_echoed_in_an_error(client):
    secret = "almost-the-key-but-not-quite"
    response = post(client, "/v1.0/events", [event(api_key=secret, user_id=5)], status=401)
    assert secret not in response.text


def test_a_body_over_the_limit_is_refused_before_it_is_read(tmp_path, settings, database, make_app):
    app = make_app(pycolytics.load_config(environ={}, overrides=dict(settings, max_body_bytes=100)))
    client = webtest.TestApp(app)
    response = post(client, "/v1.0/events", [event()] * 3, status=413)
    assert "at most 100" in response.json["detail"]
    assert count(database) == 0


def test_an_unknown_content_encoding_is_refused_with_415(client, database):
    response = post(client, "/v1.0/event", event(), status=415, headers={"Content-Encoding": "br"})
    assert "gzip, deflate or identity" in response.json["detail"]
    assert count(database) == 0


def test_an_unknown_path_is_404(client):
    assert "/v1.0/event" in client.get("/v2/thing", status=404).json["detail"]


def test_a_wrong_method_is_405_with_allow(client):
    response = client.get("/v1.0/events", status=405)
    assert response.headers["Allow"] == "POST, OPTIONS"
    assert client.post("/openapi.json", status=405).headers["Allow"] == "GET, HEAD"


def test_a_database_that_cannot_be_written_answers_503_with_retry_after(tmp_path, settings):
    config = pycolytics.load_config(environ={}, overrides=dict(settings, database=str(tmp_path / "events.db")))
    app = pycolytics.Pycolytics(config)
    client = webtest.TestApp(app)
    post(client, "/v1.0/event", event())
    with sqlite3.connect(config.database) as connection:
        connection.execute("CREATE TRIGGER refuse BEFORE INSERT ON event BEGIN SELECT RAISE(ABORT, 'disk full'); END")
    response = post(client, "/v1.0/events", [event(), event()], status=503)
    assert response.headers["Retry-After"]
    assert "send them again" in response.json["detail"]
    assert count(config.database) == 1
    app.close()


def test_an_integer_too_long_to_convert_is_refused_on_every_python(client, database):
    text = json.dumps(event(value={"n": 1})).replace('"n": 1', '"n": ' + "7" * 5000)
    response = post(client, "/v1.0/event", text.encode(), status=400)
    assert "over 4300 digits" in response.json["detail"]
    assert count(database) == 0


def test_a_literal_backslash_u0000_in_a_value_is_just_text(client, database):
    post(client, "/v1.0/event", event(value={"path": "C:\\u0000"}))
    assert json.loads(stored(database, "value")[0][0]) == {"path": "C:\\u0000"}


def test_a_long_run_of_digits_inside_a_string_is_fine(client, database):
    post(client, "/v1.0/event", event(value={"n": "7" * 5000, "m": 12345678901234567890}))
    assert json.loads(stored(database, "value")[0][0]) == {"n": "7" * 5000, "m": 12345678901234567890}


# -- Offline and retrying clients ----------------------------------------------------------------------


def parse_time(text):
    return datetime.datetime.strptime(text, "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=datetime.timezone.utc)


def utc(**delta):
    return datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(**delta)


def test_without_client_times_time_is_the_receive_time(client, database):
    post(client, "/v1.0/event", event())
    (when, received), = stored(database, "time, received_at")
    assert when == received


def test_a_timestamp_alone_is_taken_as_the_time(client, database):
    post(client, "/v1.0/events", [event(timestamp="2025-03-04T05:06:07.5Z"), event(timestamp=1700000000),
                                  event(timestamp="2025-03-04T06:06:07+01:00")])
    times = [parse_time(row[0]) for row in stored(database, "time")]
    assert times == [datetime.datetime(2025, 3, 4, 5, 6, 7, 500000, tzinfo=datetime.timezone.utc),
                     datetime.datetime.fromtimestamp(1700000000, datetime.timezone.utc),
                     datetime.datetime(2025, 3, 4, 5, 6, 7, tzinfo=datetime.timezone.utc)]


def test_sent_at_corrects_a_wrong_client_clock(client, database):
    # The client's clock is an hour fast; the event happened ten minutes before sending.
    sent_at = utc(hours=1)
    post(client, "/v1.0/event", event(timestamp=(sent_at - datetime.timedelta(minutes=10)).isoformat(),
                                      sent_at=sent_at.timestamp()))
    (when, received), = stored(database, "time, received_at")
    gap = parse_time(received) - parse_time(when)
    assert datetime.timedelta(minutes=9, seconds=55) < gap < datetime.timedelta(minutes=10, seconds=5)


def test_a_time_in_the_future_is_clamped_to_the_receive_time(client, database):
    post(client, "/v1.0/event", event(timestamp=utc(days=3).isoformat()))
    (when, received), = stored(database, "time, received_at")
    assert when == received


def test_client_clocks_centuries_apart_still_give_a_time_between_1970_and_the_receive_time(client, database):
    post(client, "/v1.0/events", [event(timestamp="1970-01-01", sent_at="9999-12-31T23:59:59Z"),
                                  event(timestamp="9999-12-31", sent_at=0), event(timestamp="2024-05-01 12:30")])
    (first, _), (second, received), (third, _) = stored(database, "time, received_at")
    assert (first, second, third) == ("1970-01-01 00:00:00.000000", received, "2024-05-01 12:30:00.000000")


def test_an_event_id_makes_retries_safe(client, database):
    post(client, "/v1.0/events", [event(event_id="a-1"), event(event_id="a-2"), event(event_id="a-1")])
    post(client, "/v1.0/events", [event(event_id="a-2"), event(event_id="a-3"), event()])
    post(client, "/v1.0/event", event(event_id="a-3"))
    assert stored(database, "event_id") == [("a-1",), ("a-2",), ("a-3",), (None,)]


@pytest.mark.parametrize("changes, words", [
    ({"timestamp": "yesterday"}, ["'timestamp' must be ISO 8601"]),
    ({"timestamp": "1969-12-31T00:00:00Z"}, ["'timestamp' must be", "from 1970"]),
    ({"timestamp": True}, ["'timestamp' must be"]),
    ({"timestamp": 1e300}, ["'timestamp' must be"]),
    ({"sent_at": [2024]}, ["'sent_at' must be"]),
    ({"event_id": ""}, ["'event_id' must be a string of 1 to 100 characters"]),
    ({"event_id": "x" * 101}, ["'event_id' must be a string of 1 to 100"]),
    ({"event_id": 17}, ["'event_id' must be a string"]),
])
def test_bad_client_fields_are_refused_naming_them(client, database, changes, words):
    response = post(client, "/v1.0/events", [event(), event(**changes)], status=422)
    detail = json.dumps(response.json["detail"])
    assert all(word in detail for word in words) and "event 1" in detail
    assert count(database) == 0


def test_a_database_without_the_added_columns_is_upgraded_in_place(config, database, sqlite_only, make_app):
    with sqlite3.connect(database) as connection:
        connection.executescript(ORIGINAL_SCHEMA)
        connection.executemany("INSERT INTO event VALUES ('old', 'g', '1', 'L', 'u', 's', '{}', ?, '2024-05-01 12:00:00')",
                               [(n,) for n in range(2, 1002)])
    app = make_app(config)
    post(webtest.TestApp(app), "/v1.0/events", [event(event_id="e-1"), event(event_id="e-1")])
    assert count(database) == 1001 + 1
    assert stored(database, "event_id")[-2:] == [(None,), ("e-1",)]


# -- Browsers and compressed bodies ------------------------------------------------------------------


def test_every_answer_carries_cors_headers_errors_included(client):
    origin = {"Origin": "https://games.example"}
    assert post(client, "/v1.0/event", event(), headers=origin).headers["Access-Control-Allow-Origin"] == "*"
    assert post(client, "/v1.0/event", b"{", status=400, headers=origin).headers["Access-Control-Allow-Origin"] == "*"
    assert client.get("/nothing", status=404, headers=origin).headers["Access-Control-Allow-Origin"] == "*"


@pytest.mark.parametrize("path", ["/v1.0/event", "/v1.0/events"])
def test_a_preflight_is_answered_for_a_day(client, path):
    response = client.options(path, headers={"Origin": "https://games.example", "Access-Control-Request-Method": "POST",
                                             "Access-Control-Request-Headers": "content-type, content-encoding"},
                              status=204)
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert "POST" in response.headers["Access-Control-Allow-Methods"]
    assert response.headers["Access-Control-Allow-Headers"] == "Content-Type, Content-Encoding"
    assert int(response.headers["Access-Control-Max-Age"]) >= 3600


def test_listed_origins_are_echoed_and_others_refused(settings, database, make_app):
    config = pycolytics.load_config(environ={}, overrides=dict(settings, cors_origins="https://a.example, http://localhost:8060"))
    app = make_app(config)
    client = webtest.TestApp(app)
    response = post(client, "/v1.0/event", event(), headers={"Origin": "http://localhost:8060"})
    assert response.headers["Access-Control-Allow-Origin"] == "http://localhost:8060"
    refused = post(client, "/v1.0/event", event(), status=403, headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in refused.headers
    assert "pages from https://evil.example may not send events" in refused.json["detail"]
    post(client, "/v1.0/event", event())  # no Origin: a game, a script, curl
    assert count(database) == 2


@pytest.mark.parametrize("encoding, compress", [
    ("gzip", gzip.compress), ("deflate", zlib.compress),
    ("deflate", lambda data: zlib.compress(data)[2:-4]),  # raw deflate, as some clients send it
])
def test_compressed_bodies_are_accepted(client, database, encoding, compress):
    post(client, "/v1.0/events", compress(body([event(event_type="zipped")] * 50)), headers={"Content-Encoding": encoding})
    assert stored(database, "event_type") == [("zipped",)] * 50


def test_a_decompression_bomb_is_a_quick_413(client, database):
    bomb = gzip.compress(b"[" + b" " * 50_000_000 + b"]")  # 50 MB of nothing, in about 50 kB
    assert len(bomb) < 100_000
    response = post(client, "/v1.0/events", bomb, status=413, headers={"Content-Encoding": "gzip"})
    assert "decompresses to over 1048576 bytes" in response.json["detail"]
    assert count(database) == 0


@pytest.mark.parametrize("payload, words", [
    (b"not gzip at all", "not valid gzip data"),
    (gzip.compress(b"[]")[:-12], "cut short"),
])
def test_broken_compressed_bodies_are_400(client, database, payload, words):
    response = post(client, "/v1.0/events", payload, status=400, headers={"Content-Encoding": "gzip"})
    assert words in response.json["detail"]


def test_cors_and_gzip_over_a_real_socket(server, database):
    payload = gzip.compress(body([event()] * 3))
    connection = http.client.HTTPConnection(*server.server_address, timeout=10)
    connection.request("OPTIONS", "/v1.0/events", headers={"Origin": "https://games.example",
                                                           "Access-Control-Request-Method": "POST"})
    preflight = connection.getresponse()
    preflight.read()
    connection.request("POST", "/v1.0/events", payload, {"Content-Encoding": "gzip", "Content-Type": "text/plain",
                                                         "Origin": "https://games.example"})
    response = connection.getresponse()
    response.read()
    connection.close()
    assert (preflight.status, preflight.getheader("Access-Control-Allow-Origin")) == (204, "*")
    assert (response.status, response.getheader("Access-Control-Allow-Origin")) == (204, "*")
    assert count(database) == 3


# -- The browser client ----------------------------------------------------------------------------


def test_the_client_script_is_served_to_anyone_and_cached_by_its_etag(client):
    script = client.get("/v1.0/client.js")
    assert script.content_type == "text/javascript" and "Pycolytics.init" in script.text
    assert "max-age=" in script.headers["Cache-Control"] and script.headers["ETag"].startswith('"')
    etag = script.headers["ETag"]
    for asked in (etag, "W/" + etag, f'"other", {etag}', "*"):
        assert client.get("/v1.0/client.js", headers={"If-None-Match": asked}, status=304).body == b""
    assert client.get("/v1.0/client.js", headers={"If-None-Match": '"other"'}).body == script.body


def test_the_docs_page_documents_the_browser_client(client):
    page = client.get("/docs").text
    assert "GET /v1.0/client.js" in page and "sendBeacon" in page
    assert 'Pycolytics.track("level_started", {level: 3})' in page


def test_a_429_lets_a_pages_script_read_its_retry_after(settings, make_app):
    app = make_app(pycolytics.load_config(environ={}, overrides=dict(settings, rate_limit="1/minute")))
    client = webtest.TestApp(app)
    post(client, "/v1.0/event", event())
    refused = post(client, "/v1.0/event", event(), status=429, headers={"Origin": "https://games.example"})
    assert refused.headers["Access-Control-Allow-Origin"] == "*"
    assert "Retry-After" in refused.headers["Access-Control-Expose-Headers"].split(", ")


# Root needs --no-sandbox; the rest keeps a test browser from talking to anything but the test.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-quic", "--remote-debugging-pipe"]


class DevTools:
    """Chromium driven by the DevTools protocol over --remote-debugging-pipe: JSON messages ended
    by NUL, which the browser reads from its file descriptor 3 and writes to its 4."""

    def __init__(self, profile):
        import fcntl

        # Above 4, so that putting the browser's ends on 3 and 4 cannot overwrite one of them.
        ends = os.pipe() + os.pipe()
        commands_end, self._commands, self._answers, answers_end = (fcntl.fcntl(end, fcntl.F_DUPFD_CLOEXEC, 5)
                                                                    for end in ends)
        for end in ends:
            os.close(end)
        redirect = f'exec "$0" "$@" 3<&{commands_end} 4>&{answers_end} {commands_end}<&- {answers_end}>&-'
        self.process = subprocess.Popen(["bash", "-c", redirect, find_chromium(), *CHROMIUM_FLAGS,
                                         f"--user-data-dir={profile}"], pass_fds=(commands_end, answers_end),
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(commands_end)
        os.close(answers_end)
        self._numbers = itertools.count(1)
        self._received = threading.Condition()
        self._results = {}
        self._closed = False
        self.quitted = False
        self.console = []  # (session, type, texts) of every console call
        self.crashed = set()  # sessions whose tab crashed
        self._reader = threading.Thread(target=self._read)
        self._reader.start()

    def _read(self):
        pending = b""
        while True:
            data = os.read(self._answers, 65536)
            messages = (pending + data).split(b"\0")
            pending = messages.pop()
            with self._received:
                for message in map(json.loads, messages):
                    if "id" in message:
                        self._results[message["id"]] = message
                    elif message.get("method") == "Runtime.consoleAPICalled":
                        params = message["params"]
                        texts = [argument.get("value", argument.get("description")) for argument in params["args"]]
                        self.console.append((message.get("sessionId"), params["type"], texts))
                    elif message.get("method") == "Inspector.targetCrashed":
                        self.crashed.add(message["sessionId"])
                self._closed = not data
                self._received.notify_all()
            if not data:
                os.close(self._answers)
                return

    def send(self, method, session=None, **params):
        number = next(self._numbers)
        message = {"id": number, "method": method, "params": params, **({"sessionId": session} if session else {})}
        data = json.dumps(message).encode() + b"\0"
        while data:
            data = data[os.write(self._commands, data):]
        return number

    def call(self, method, session=None, timeout=60, **params):
        number = self.send(method, session, **params)
        with self._received:
            self._received.wait_for(lambda: number in self._results or self._closed, timeout)
            answer = self._results.pop(number, None)
        assert answer is not None, f"the browser did not answer {method} within {timeout} s"
        assert "error" not in answer, f"{method}: {answer['error']}"
        return answer["result"]

    def open(self, url):
        """A new tab showing `url`, once its scripts have run: (target, session)."""
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Runtime.enable", session)
        self.call("Page.navigate", session, url=url)
        self.wait(session, "document.readyState === 'complete' && window.Pycolytics !== undefined")
        return target, session

    def evaluate(self, session, expression):
        result = self.call("Runtime.evaluate", session, expression=expression, awaitPromise=True, returnByValue=True)
        assert "exceptionDetails" not in result, f"{expression}: {result['exceptionDetails']}"
        return result["result"].get("value")

    def wait(self, session, expression, timeout=60):
        deadline = time.monotonic() + timeout
        while not self.evaluate(session, expression):
            assert time.monotonic() < deadline, f"still not true after {timeout} s: {expression}"
            time.sleep(0.1)

    def close_tab(self, target):
        self.call("Target.closeTarget", targetId=target)

    def crash_tab(self, session, timeout=60):
        """Kills the tab's renderer, as a crash would: no pagehide, no beacon."""
        self.call("Inspector.enable", session)  # which reports the crash
        self.send("Page.crash", session)  # never answered
        with self._received:
            assert self._received.wait_for(lambda: session in self.crashed, timeout), "the tab did not crash"

    def quit(self):
        """Close the browser as a user would, so it writes its profile (localStorage) to disk."""
        self.quitted = True
        try:
            self.call("Browser.close", timeout=30)
        except (AssertionError, OSError):
            pass  # gone before it answered, gone already, or stuck: waited for below either way
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(30)
        os.close(self._commands)
        self._reader.join(30)


@pytest.fixture
def browsers(tmp_path):
    """Opens Chromium on one profile, again and again; every browser it started is gone after the test."""
    started = []

    def start():
        started.append(DevTools(tmp_path / "profile"))
        return started[-1]

    yield start
    for devtools in started:
        if not devtools.quitted:
            devtools.quit()


@contextlib.contextmanager
def game_page(script_url, collector_url, prelude="", **options):
    """A web server of a game's page, which loads the client from the collector and starts it with
    `options` and those of the page's query (?{"interval": 600}); first it notes what an earlier page
    left in localStorage, in window.leftover, and runs the script `prelude`."""
    import http.server
    import urllib.parse

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            asked = urllib.parse.unquote(urllib.parse.urlsplit(self.path).query) or "{}"
            settings = dict({"url": collector_url, "application": "web-game", "version": "1.0", "interval": 0.3},
                            **options, **json.loads(asked))
            page = (f'<!doctype html><meta charset="utf-8"><title>game</title><script>window.leftover = JSON.parse('
                    f'localStorage.getItem("pycolytics:web-game:queue") || "[]"); {prelude}</script>'
                    f'<script src="{script_url}"></script><script>Pycolytics.init({json.dumps(settings)})</script>')
            data = page.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *arguments):
            pass

    with stdlib_server(Page) as address:
        yield "http://%s:%d/" % address


@contextlib.contextmanager
def stdlib_server(handler):
    """A standard-library HTTP server of `handler` on a free port of 127.0.0.1, in a thread: its (host, port)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        yield server.server_address
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def track(devtools, session, event_type, numbers, pad=0):
    """Tracks events in the page in one go (so in one batch): [(event_id, the page's clock in Unix seconds)]."""
    tracked = devtools.evaluate(session, f"""{json.dumps(list(numbers))}.map(n => [
        Pycolytics.track({json.dumps(event_type)}, {{n, pad: "x".repeat({pad})}}), Date.now() / 1000])""")
    return [tuple(each) for each in tracked]


def stored_by_id(path):
    """{event_id: (event_type, n, user_id, session_id, time in Unix seconds, how many rows)} from the database."""
    found = {}
    with sqlite3.connect(path) as connection:
        for event_type, value, user_id, session_id, moment, event_id in connection.execute(
                "SELECT event_type, value, user_id, session_id, time, event_id FROM event"):
            seconds = datetime.datetime.strptime(moment, pycolytics.TIME_FORMAT).replace(
                tzinfo=datetime.timezone.utc).timestamp()
            copies = found.get(event_id, (0,) * 6)[5] + 1
            found[event_id] = (event_type, json.loads(value)["n"], user_id, session_id, seconds, copies)
    return found


def wait_for(condition, timeout=60):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not true after {timeout} s"
        time.sleep(0.1)


# The offline spells below last at least this long, beyond the clock tolerance, so a client that
# sent events without their own times would store them visibly late.
OFFLINE_SECONDS = 4
CLOCK_TOLERANCE = 2.5


def test_the_browser_client_stores_every_event_once_across_collector_restarts_and_closed_tabs(tmp_path, browsers):
    environ = dict(os.environ, PYCOLYTICS_API_KEYS=KEY)
    database = str(tmp_path / "events.db")
    collector, address, _, _ = start_server(tmp_path, "--quiet", "--database", "events.db", environ=environ)
    port = address[1]
    url = "http://127.0.0.1:%d" % port
    tracked = {}  # event_id: (event_type, n, the page's clock)

    def stop_collector():
        collector.send_signal(signal.SIGTERM)
        assert collector.wait(15) == 0

    def start_collector():
        return start_server(tmp_path, "--quiet", "--database", "events.db", "--port", str(port), environ=environ)[0]

    def track_some(devtools, session, event_type):
        for n, (event_id, now) in enumerate(track(devtools, session, event_type, range(5), pad=300)):  # gzip'd
            tracked[event_id] = (event_type, n, now)
        return time.monotonic()

    try:
        with game_page(url + "/v1.0/client.js", url + "/", apiKey=KEY) as page:
            devtools = browsers()
            opened = [devtools]
            tab, session = devtools.open(page)
            track_some(devtools, session, "online")
            wait_for(lambda: len(stored_by_id(database)) == 5)

            stop_collector()
            offline_since = track_some(devtools, session, "collector-down")
            devtools.wait(session, "Pycolytics.stats().failures >= 2")
            time.sleep(max(0, offline_since + OFFLINE_SECONDS - time.monotonic()))
            collector = start_collector()
            track_some(devtools, session, "collector-back")
            wait_for(lambda: len(stored_by_id(database)) == 15)

            stop_collector()
            offline_since = track_some(devtools, session, "tab-closed-offline")
            devtools.close_tab(tab)
            devtools.quit()
            time.sleep(max(0, offline_since + OFFLINE_SECONDS - time.monotonic()))
            collector = start_collector()
            devtools = browsers()
            opened.append(devtools)
            tab, session = devtools.open(page)
            leftover = devtools.evaluate(session, "window.leftover.map(event => event.event_type)")
            assert leftover == ["tab-closed-offline"] * 5
            wait_for(lambda: len(stored_by_id(database)) == 20)
            devtools.close_tab(tab)

            tab, session = devtools.open(page + '?{"interval": 600}')  # nothing goes out but by beacon
            devtools.wait(session, "Pycolytics.stats().queued === 0")
            track_some(devtools, session, "tab-closed-online")
            devtools.close_tab(tab)
            wait_for(lambda: len(stored_by_id(database)) == 25)
            tab, session = devtools.open(page)
            leftover = devtools.evaluate(session, "window.leftover.map(event => event.event_type)")
            assert leftover == ["tab-closed-online"] * 5  # the beacon's answer is never seen: sent again
            devtools.wait(session, "Pycolytics.stats().queued === 0")
            devtools.quit()
    finally:
        if collector.poll() is None:
            stop_collector()

    rows = stored_by_id(database)
    assert {event_id: (event_type, n, copies) for event_id, (event_type, n, _, _, _, copies) in rows.items()} == {
        event_id: (event_type, n, 1) for event_id, (event_type, n, _) in tracked.items()
    }
    for event_id, (_, _, _, _, moment, _) in rows.items():
        assert abs(moment - tracked[event_id][2]) < CLOCK_TOLERANCE, tracked[event_id]
    assert len({user_id for _, _, user_id, _, _, _ in rows.values()}) == 1  # localStorage kept it
    sessions = {event_type: {row[3] for row in rows.values() if row[0] == event_type}
                for event_type, _, _ in tracked.values()}
    assert all(len(ids) == 1 for ids in sessions.values()) and len(set.union(*sessions.values())) == 2
    assert [entry for devtools in opened for entry in devtools.console if entry[1] in ("error", "warning")] == []

@pytest.fixture
def sqlite_app(tmp_path, make_app):
    """The collector's application on an SQLite file of the test's own, at tmp_path / events.db."""
    app = make_app(pycolytics.load_config(
        environ={}, overrides={"database": str(tmp_path / "events.db"), "api_keys": KEY, "quiet": "yes"}))
    yield app


@contextlib.contextmanager
def scripted_collector(app, refusals):
    """A collector whose first answers to POST /v1.0/events are `refusals` (HTTPErrors, with the real
    server's headers and CORS), then the real app's; it notes each POST: (time, headers, event_ids)."""
    import socketserver
    import wsgiref.simple_server

    posts = []

    def collector(environ, start_response):
        if environ["REQUEST_METHOD"] != "POST":
            return app(environ, start_response)
        data = environ["wsgi.input"].read(int(environ["CONTENT_LENGTH"]))
        environ["wsgi.input"] = io.BytesIO(data)
        encoding = environ.get("HTTP_CONTENT_ENCODING")
        events = json.loads(gzip.decompress(data) if encoding == "gzip" else data)
        posts.append((time.monotonic(), (environ.get("CONTENT_TYPE"), encoding), [each["event_id"] for each in events]))
        if len(posts) > len(refusals):
            return app(environ, start_response)
        status, headers, answer = pycolytics.error_answer(refusals[len(posts) - 1])
        start_response(status, headers + app.cors_headers(environ.get("HTTP_ORIGIN")))
        return [answer]

    class Server(socketserver.ThreadingMixIn, wsgiref.simple_server.WSGIServer):
        daemon_threads = True  # a browser's idle spare connection must not hold up shutdown

    class Quiet(wsgiref.simple_server.WSGIRequestHandler):
        def log_message(self, *arguments):
            pass

    server = wsgiref.simple_server.make_server("127.0.0.1", 0, collector, server_class=Server, handler_class=Quiet)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        yield "http://127.0.0.1:%d" % server.server_address[1], posts
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.mark.parametrize("refusal, seconds", [
    (pycolytics.busy("busy", 1), 1),
    (pycolytics.HTTPError(429, "over the rate limit", retry_after=3), 3),
], ids=["503", "429"])
def test_the_browser_client_sends_a_503_or_429_batch_again_after_retry_after(tmp_path, browsers, sqlite_app, refusal,
                                                                              seconds):
    with scripted_collector(sqlite_app, [refusal]) as (url, posts), \
            game_page(url + "/v1.0/client.js", url, apiKey=KEY) as page:
        devtools = browsers()
        _, session = devtools.open(page)
        tracked = [event_id for event_id, _ in track(devtools, session, "retried", range(3), pad=400)]
        devtools.wait(session, "Pycolytics.stats().queued === 0")
    assert [event_ids for _, _, event_ids in posts] == [tracked, tracked]
    assert posts[1][0] - posts[0][0] >= seconds
    assert posts[0][1] == ("text/plain", "gzip")
    assert sorted(stored_by_id(str(tmp_path / "events.db"))) == sorted(tracked)


def test_the_browser_client_drops_a_batch_refused_with_401_and_says_so_once(tmp_path, browsers, sqlite_app):
    with scripted_collector(sqlite_app, []) as (url, posts), \
            game_page(url + "/v1.0/client.js", url, apiKey="wrong") as page:
        devtools = browsers()
        _, session = devtools.open(page)
        first = [event_id for event_id, _ in track(devtools, session, "refused", range(3))]
        wait_for(lambda: len(posts) == 1)
        second = [event_id for event_id, _ in track(devtools, session, "refused", range(3, 6))]
        devtools.wait(session, "Pycolytics.stats().refused === 6")
        assert devtools.evaluate(session, "Pycolytics.stats().queued") == 0
    assert [event_ids for _, _, event_ids in posts] == [first, second]  # not again, not with the next batch
    errors = [texts for _, kind, texts in devtools.console if kind == "error"]
    assert len(errors) == 1 and "HTTP 401" in errors[0][0]
    assert count(str(tmp_path / "events.db")) == 0


def test_the_browser_client_sends_again_the_events_a_422_does_not_name(tmp_path, browsers, sqlite_app):
    with scripted_collector(sqlite_app, []) as (url, posts), \
            game_page(url + "/v1.0/client.js", url, apiKey=KEY) as page:
        devtools = browsers()
        _, session = devtools.open(page)
        tracked = devtools.evaluate(session, """[Pycolytics.track("fine", {n: 0}), Pycolytics.track("fine", {n: 1}),
            Pycolytics.track("x".repeat(300), {n: 2}), Pycolytics.track("fine", {n: 3})]""")  # one too long
        devtools.wait(session, "Pycolytics.stats().queued === 0")
    good = tracked[:2] + tracked[3:]
    assert [event_ids for _, _, event_ids in posts] == [tracked, good]
    assert sorted(stored_by_id(str(tmp_path / "events.db"))) == sorted(good)


def test_the_browser_clients_full_queue_drops_the_oldest_events_and_counts_them(tmp_path, browsers, sqlite_app):
    with scripted_collector(sqlite_app, []) as (url, _), \
            game_page(url + "/v1.0/client.js", url, apiKey=KEY, maxQueue=5, interval=600) as page:
        devtools = browsers()
        _, session = devtools.open(page)
        stats, queued = devtools.evaluate(session, """[...Array(8).keys()].forEach(n => Pycolytics.track("full", {n}));
            [Pycolytics.stats(), JSON.parse(localStorage.getItem("pycolytics:web-game:queue")).map(event => event.value.n)]""")
        track(devtools, session, "full", [8])  # in a task of its own
        devtools.evaluate(session, "Pycolytics.flush()")
        devtools.wait(session, "Pycolytics.stats().queued === 0")
        _, session = devtools.open(page)
        dropped = devtools.evaluate(session, "Pycolytics.stats().dropped")
    assert queued == [3, 4, 5, 6, 7] and (stats["queued"], stats["dropped"], dropped) == (5, 3, 4)
    with sqlite3.connect(tmp_path / "events.db") as connection:
        values = connection.execute("SELECT value FROM event ORDER BY id").fetchall()
    assert [json.loads(value)["n"] for value, in values] == [4, 5, 6, 7, 8]
    warnings = [texts for _, kind, texts in devtools.console if kind == "warning"]
    assert len(warnings) == 1 and "the queue is full" in warnings[0][0]


def test_the_browser_client_works_where_local_storage_is_blocked(tmp_path, browsers, sqlite_app):
    blocked = 'Object.defineProperty(window, "localStorage", {get() { throw new DOMException("", "SecurityError"); }});'
    with scripted_collector(sqlite_app, []) as (url, _), \
            game_page(url + "/v1.0/client.js", url, blocked, apiKey=KEY) as page:
        devtools = browsers()
        _, session = devtools.open(page)
        tracked = [event_id for event_id, _ in track(devtools, session, "no-storage", range(3))]
        devtools.wait(session, "Pycolytics.stats().queued === 0")
    assert sorted(stored_by_id(str(tmp_path / "events.db"))) == sorted(tracked)


def test_the_browser_client_sends_a_full_batch_without_waiting_for_its_interval(tmp_path, browsers, sqlite_app):
    with scripted_collector(sqlite_app, []) as (url, posts), \
            game_page(url + "/v1.0/client.js", url, apiKey=KEY, interval=600, batchSize=3) as page:
        devtools = browsers()
        _, session = devtools.open(page)
        tracked = [event_id for event_id, _ in track(devtools, session, "batched", range(2))]
        tracked += [event_id for event_id, _ in track(devtools, session, "batched", [2])]
        devtools.wait(session, "Pycolytics.stats().queued === 0")
    assert [event_ids for _, _, event_ids in posts] == [tracked]


def test_flush_sends_the_queue_now(tmp_path, browsers, sqlite_app):
    with scripted_collector(sqlite_app, []) as (url, posts), \
            game_page(url + "/v1.0/client.js", url, apiKey=KEY, interval=600) as page:
        devtools = browsers()
        _, session = devtools.open(page)
        tracked = [event_id for event_id, _ in track(devtools, session, "level_ended", range(2))]
        devtools.evaluate(session, "Pycolytics.flush()")
        devtools.wait(session, "Pycolytics.stats().queued === 0")
    assert [event_ids for _, _, event_ids in posts] == [tracked]


def test_a_per_session_user_id_is_new_with_each_page_load_and_neither_read_nor_stored(tmp_path, browsers, sqlite_app):
    earlier = "localStorage.setItem('pycolytics:web-game:user', 'from-an-earlier-build');"
    with scripted_collector(sqlite_app, []) as (url, _), \
            game_page(url + "/v1.0/client.js", url, earlier, apiKey=KEY, persistentUser=False) as page:
        devtools = browsers()
        for _ in range(2):
            target, session = devtools.open(page)
            track(devtools, session, "anonymous", [0])
            devtools.wait(session, "Pycolytics.stats().queued === 0")
            kept = devtools.evaluate(session, "localStorage.getItem('pycolytics:web-game:user')")
            devtools.close_tab(target)
            assert kept == "from-an-earlier-build"
    users = {user_id for _, _, user_id, _, _, _ in stored_by_id(str(tmp_path / "events.db")).values()}
    assert len(users) == 2 and "from-an-earlier-build" not in users



def test_events_tracked_before_the_tab_crashes_are_sent_by_the_next_page(tmp_path, browsers, sqlite_app):
    with scripted_collector(sqlite_app, []) as (url, _), \
            game_page(url + "/v1.0/client.js", url, apiKey=KEY) as page:
        devtools = browsers()
        _, session = devtools.open(page + '?{"interval": 600}')
        tracked = [event_id for event_id, _ in track(devtools, session, "crashed", range(3))]
        devtools.crash_tab(session)
        _, session = devtools.open(page)
        assert devtools.evaluate(session, "window.leftover.map(event => event.event_id)") == tracked
        devtools.wait(session, "Pycolytics.stats().queued === 0")
    assert sorted(stored_by_id(str(tmp_path / "events.db"))) == sorted(tracked)

# -- Keys per game ---------------------------------------------------------------------------------------

PER_GAME = """[pycolytics]
api_keys = global-key
[app:space-game]
api_keys = space-key
cors_origins = https://space.example
[app:farm-game]
api_keys = farm-key, farm-key-2
"""


# -- Consent in the browser client ---------------------------------------------------------------

CONSENT_PREFIX = "pycolytics:web-game:"


@contextlib.contextmanager
def consent_collector(answer_after=0):
    """Serves CLIENT_JS at GET /v1.0/client.js and answers every POST /v1.0/events with 204, after
    `answer_after` seconds; yields (its URL, posts): the events of each POST, in the order they came."""
    posts = []
    script = pycolytics.CLIENT_JS.encode()

    class Collector(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path != "/v1.0/client.js":
                return self.answer(404)
            self.answer(200, script, {"Content-Type": "text/javascript"})

        def do_OPTIONS(self):  # the preflight of a gzip'd batch
            self.answer(204, headers={"Access-Control-Allow-Methods": "POST",
                                      "Access-Control-Allow-Headers": "Content-Type, Content-Encoding"})

        def do_POST(self):
            data = self.rfile.read(int(self.headers["Content-Length"]))
            if self.headers.get("Content-Encoding") == "gzip":
                data = gzip.decompress(data)
            posts.append(json.loads(data))
            time.sleep(answer_after)
            self.answer(204 if self.path == "/v1.0/events" else 404)

        def answer(self, status, data=b"", headers={}):
            self.send_response(status)
            for name, value in dict(headers, **{"Access-Control-Allow-Origin": "*"}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *arguments):
            pass

    with stdlib_server(Collector) as address:
        yield "http://%s:%d" % address, posts


@contextlib.contextmanager
def consent_game(prelude="", **options):
    """A collector and a game's page that loads the client from it: (page URL, posts)."""
    with consent_collector(options.pop("answer_after", 0)) as (url, posts), \
            game_page(url + "/v1.0/client.js", url, prelude, apiKey=KEY, **options) as page:
        yield page, posts


def local_storage(devtools, session):
    """What the page's origin holds in localStorage: {key: value}."""
    return dict(json.loads(devtools.evaluate(session, "JSON.stringify(Object.entries(localStorage))")))


def track_played(devtools, session, count):
    """Tracks `count` events in one go: their event_ids (null where the client tracked nothing)."""
    return devtools.evaluate(session, f"[...Array({count}).keys()].map(n => Pycolytics.track('played', {{n}}))")


def sent_events(posts):
    """The events of every POST, in order."""
    return [event for batch in posts for event in batch]


# Notes every call the client makes to localStorage, in window.storageCalls.
SPY = """window.storageCalls = [];
for (const name of ["getItem", "setItem", "removeItem", "key", "clear"]) {
  const original = Storage.prototype[name];
  Storage.prototype[name] = function (...args) { storageCalls.push([name, ...args]); return original.apply(this, args); };
}"""

# The page's localStorage throws on access, as with storage turned off; the test still reads it through
# window.realStorage.
BLOCKED = """window.realStorage = window.localStorage;
Object.defineProperty(window, "localStorage", {get() { throw new DOMException("", "SecurityError"); }});"""


def stay_quiet(seconds=1.2):
    """Long enough for several sends at the pages' interval of 0.3 s."""
    time.sleep(seconds)


# -- Tests -----------------------------------------------------------------------------------------------


def test_pending_consent_keeps_events_in_memory_sends_nothing_and_stores_nothing_not_even_on_pagehide(browsers):
    with consent_game(SPY, consent="pending") as (page, posts):
        devtools = browsers()
        tab, session = devtools.open(page)
        assert all(track_played(devtools, session, 3))
        devtools.evaluate(session, "Pycolytics.flush()")
        stay_quiet()
        assert posts == []
        assert local_storage(devtools, session) == {}
        stats = devtools.evaluate(session, "Pycolytics.stats()")
        assert (stats["queued"], stats["consent"]) == (3, "pending")
        assert local_storage(devtools, session) == {}
        assert devtools.evaluate(session, "storageCalls") == []  # not even read

        devtools.close_tab(tab)  # pagehide, where a granted page sends a beacon
        stay_quiet()
        assert posts == []
        _, session = devtools.open(page)
        stay_quiet()
        assert posts == []
        assert local_storage(devtools, session) == {}
        assert devtools.evaluate(session, "storageCalls") == []


@pytest.mark.parametrize("earlier_user", [None, "from-an-earlier-visit"], ids=["new-player", "returning-player"])
def test_granting_consent_sends_the_events_tracked_while_pending_once_with_their_times_and_the_stored_user_id(
        browsers, earlier_user):
    prelude = f"localStorage.setItem('{CONSENT_PREFIX}user', '{earlier_user}');" if earlier_user else ""
    with consent_game(prelude, consent="pending") as (page, posts):
        devtools = browsers()
        _, session = devtools.open(page)
        before = devtools.evaluate(session, "new Date().toISOString()")
        tracked = track_played(devtools, session, 3)
        after = devtools.evaluate(session, "new Date().toISOString()")
        stay_quiet()
        assert posts == []
        assert local_storage(devtools, session) == ({CONSENT_PREFIX + "user": earlier_user} if earlier_user else {})

        granted_at = devtools.evaluate(session, "new Date().toISOString()")
        devtools.evaluate(session, "Pycolytics.setConsent('granted')")
        devtools.wait(session, "Pycolytics.stats().queued === 0")
        stay_quiet()  # time to send anything twice
        stored = local_storage(devtools, session)
        consent = devtools.evaluate(session, "Pycolytics.stats().consent")

    events = sent_events(posts)
    assert [event["event_id"] for event in events] == tracked
    assert [event["value"]["n"] for event in events] == [0, 1, 2]
    assert all(before <= event["timestamp"] <= after < granted_at <= event["sent_at"] for event in events)
    user = stored[CONSENT_PREFIX + "user"]
    assert {event["user_id"] for event in events} == {user} and user == (earlier_user or user)
    assert len({event["session_id"] for event in events}) == 1
    assert stored == {CONSENT_PREFIX + "user": user, CONSENT_PREFIX + "queue": "[]"}
    assert consent == "granted"


def test_consent_back_to_pending_stops_sending_and_keeps_new_events_in_memory_until_granted_again(browsers):
    with consent_game() as (page, posts):
        devtools = browsers()
        _, session = devtools.open(page)
        first = track_played(devtools, session, 2)
        devtools.wait(session, "Pycolytics.stats().queued === 0")
        second = track_played(devtools, session, 1)  # its send is due in 0.3 s
        third = devtools.evaluate(session, "Pycolytics.setConsent('pending'); [Pycolytics.track('played', {n: 9})]")
        stay_quiet()
        assert [event["event_id"] for event in sent_events(posts)] == first
        waiting = json.loads(local_storage(devtools, session)[CONSENT_PREFIX + "queue"])
        assert [event["event_id"] for event in waiting] == second  # the one tracked while pending is in memory

        devtools.evaluate(session, "Pycolytics.setConsent('granted')")
        devtools.wait(session, "Pycolytics.stats().queued === 0")
        stay_quiet()
        stored = local_storage(devtools, session)
    events = sent_events(posts)
    assert [event["event_id"] for event in events] == first + second + third
    assert {event["user_id"] for event in events} == {stored[CONSENT_PREFIX + "user"]}
    assert stored == {CONSENT_PREFIX + "user": stored[CONSENT_PREFIX + "user"], CONSENT_PREFIX + "queue": "[]"}


def test_where_local_storage_is_blocked_granting_consent_sends_the_pending_events_once(browsers):
    with consent_game(BLOCKED, consent="pending") as (page, posts):
        devtools = browsers()
        _, session = devtools.open(page)
        tracked = track_played(devtools, session, 3)
        stay_quiet()
        assert posts == []
        devtools.evaluate(session, "Pycolytics.setConsent('granted')")
        devtools.wait(session, "Pycolytics.stats().queued === 0")
        stay_quiet()
        stored = dict(json.loads(devtools.evaluate(session, "JSON.stringify(Object.entries(realStorage))")))
    events = sent_events(posts)
    assert [event["event_id"] for event in events] == tracked
    assert len({event["user_id"] for event in events}) == 1
    assert stored == {}


def test_opting_out_erases_the_clients_storage_and_later_tracking_sends_and_stores_nothing(browsers):
    with consent_game() as (page, posts):
        devtools = browsers()
        tab, session = devtools.open(page + '?{"consent": "granted", "interval": 600}')  # events stay queued
        track_played(devtools, session, 3)
        devtools.evaluate(session, f"localStorage.setItem('{CONSENT_PREFIX}by-an-older-version', '1');"
                                   "localStorage.setItem('the-games-own', 'kept')")
        before = local_storage(devtools, session)
        assert len(json.loads(before[CONSENT_PREFIX + "queue"])) == 3 and CONSENT_PREFIX + "user" in before

        devtools.evaluate(session, "Pycolytics.optOut()")
        assert local_storage(devtools, session) == {"the-games-own": "kept"}
        assert track_played(devtools, session, 2) == [None, None]
        devtools.evaluate(session, "Pycolytics.flush()")
        stats = devtools.evaluate(session, "Pycolytics.stats()")
        assert (stats["queued"], stats["consent"]) == (0, "denied")
        stay_quiet()
        assert local_storage(devtools, session) == {"the-games-own": "kept"}
        devtools.close_tab(tab)  # pagehide: no beacon
        stay_quiet()
        assert posts == []

        _, session = devtools.open(page + '?{"consent": "denied"}')
        assert track_played(devtools, session, 3) == [None, None, None]
        stay_quiet()
        assert local_storage(devtools, session) == {"the-games-own": "kept"}
        assert devtools.evaluate(session, "Pycolytics.stats().consent") == "denied"
    assert posts == []


def test_a_page_opened_with_consent_denied_erases_what_an_earlier_visit_left_and_sends_none_of_it(browsers):
    with consent_game() as (page, posts):
        devtools = browsers()
        _, session = devtools.open(page + '?{"interval": 600}')
        track_played(devtools, session, 3)
        devtools.crash_tab(session)  # no pagehide, no beacon: the events stay queued
        _, session = devtools.open(page + '?{"consent": "pending"}')
        left = local_storage(devtools, session)
        assert len(json.loads(left[CONSENT_PREFIX + "queue"])) == 3 and CONSENT_PREFIX + "user" in left

        _, session = devtools.open(page + '?{"consent": "denied"}')
        assert local_storage(devtools, session) == {}
        stay_quiet()
        assert local_storage(devtools, session) == {}
    assert posts == []


def test_the_answer_to_a_request_in_flight_when_consent_is_withdrawn_saves_nothing(browsers):
    with consent_game(answer_after=1.5) as (page, posts):
        devtools = browsers()
        _, session = devtools.open(page)
        tracked = track_played(devtools, session, 3)
        deadline = time.monotonic() + 30
        while not posts:
            assert time.monotonic() < deadline, "nothing was sent"
            time.sleep(0.05)
        devtools.evaluate(session, "Pycolytics.optOut()")
        assert local_storage(devtools, session) == {}
        stay_quiet(2.5)  # the answer has come
        assert local_storage(devtools, session) == {}
        assert devtools.evaluate(session, "Pycolytics.stats()")["queued"] == 0
    assert [event["event_id"] for event in sent_events(posts)] == tracked  # once: the answer did not bring a retry


def test_init_without_consent_sends_events_and_stores_the_user_id_as_before(browsers):
    with consent_game() as (page, posts):
        devtools = browsers()
        _, session = devtools.open(page)
        assert CONSENT_PREFIX + "user" in local_storage(devtools, session)  # at init, as before: not only once events come
        tracked = track_played(devtools, session, 3)
        devtools.wait(session, "Pycolytics.stats().queued === 0")
        stored = local_storage(devtools, session)
        consent = devtools.evaluate(session, "Pycolytics.stats().consent")
    events = sent_events(posts)
    assert [event["event_id"] for event in events] == tracked
    assert {event["user_id"] for event in events} == {stored[CONSENT_PREFIX + "user"]}
    assert stored == {CONSENT_PREFIX + "user": stored[CONSENT_PREFIX + "user"], CONSENT_PREFIX + "queue": "[]"}
    assert consent == "granted"


def test_bad_consent_values_throw_a_type_error_naming_the_accepted_values(browsers):
    with consent_game(consent="pending") as (page, posts):
        devtools = browsers()
        _, session = devtools.open(page)
        settings = json.dumps({"url": page, "apiKey": KEY, "application": "web-game"})
        calls = ["Pycolytics.setConsent('maybe')", "Pycolytics.setConsent()", "Pycolytics.setConsent('Granted')",
                 f"Pycolytics.init(Object.assign({settings}, {{consent: 5}}))",
                 f"Pycolytics.init(Object.assign({settings}, {{consent: null}}))"]
        errors = [devtools.evaluate(session, f"(() => {{ try {{ {call}; }} catch (error) {{ "
                                             "return [error.name, error.message]; } })()") for call in calls]
        consent = devtools.evaluate(session, "Pycolytics.stats().consent")
        track_played(devtools, session, 2)
        stay_quiet()
        stored = local_storage(devtools, session)
    for (name, message), call in zip(errors, calls):
        assert name == "TypeError", call
        assert all(f'"{value}"' in message for value in ("pending", "granted", "denied")), message
    assert consent == "pending"  # as it was: the bad calls changed nothing
    assert posts == [] and stored == {}


@pytest.fixture
def per_game(tmp_path, database, make_app):
    (tmp_path / "games.ini").write_text(PER_GAME)
    config = pycolytics.load_config(str(tmp_path / "games.ini"), environ={}, overrides={"database": database})
    app = make_app(config)
    yield webtest.TestApp(app)


def test_a_games_key_works_for_that_game_only(per_game, database):
    post(per_game, "/v1.0/events", [event(application="space-game", api_key="space-key"),
                                    event(application="farm-game", api_key="farm-key-2"),
                                    event(application="any-game", api_key="global-key")])
    response = post(per_game, "/v1.0/events", [event(application="space-game", api_key="space-key"),
                                               event(application="farm-game", api_key="space-key")], status=403)
    assert "event 1: this api_key is for application 'space-game', not 'farm-game'" in response.json["detail"]
    assert "space-key" not in response.text
    assert count(database) == 3


def test_a_games_own_origins_apply_to_its_events(per_game, database):
    page = {"Origin": "https://space.example"}
    post(per_game, "/v1.0/event", event(application="space-game", api_key="space-key"), headers=page)
    post(per_game, "/v1.0/event", event(application="space-game", api_key="space-key"), status=403,
         headers={"Origin": "https://farm.example"})
    post(per_game, "/v1.0/event", event(application="farm-game", api_key="farm-key"), headers={"Origin": "https://farm.example"})
    assert count(database) == 2


def test_an_unknown_key_in_an_app_section_is_a_configuration_error(tmp_path):
    (tmp_path / "bad.ini").write_text("[app:game]\napi_key = typo\n")
    with pytest.raises(pycolytics.ConfigError, match="unknown key 'api_key' in \\[app:game\\]"):
        pycolytics.load_config(str(tmp_path / "bad.ini"), environ={})


def test_keygen_prints_a_new_random_key():
    run = [sys.executable, os.path.join(HERE, "pycolytics.py"), "keygen"]
    first, second = (subprocess.run(run, capture_output=True, text=True, check=True).stdout.strip() for _ in range(2))
    assert first != second and len(first) >= 32 and re.fullmatch(r"[A-Za-z0-9_-]+", first)


# -- Health, metrics and maintenance -----------------------------------------------------------------


def test_healthz_is_200_while_the_database_takes_writes(client):
    response = client.get("/healthz")
    assert response.json["status"] == "ok" and response.headers["Cache-Control"] == "no-store"


def test_healthz_is_503_while_the_database_is_locked(client, database, sqlite_only):
    blocker = sqlite3.connect(database, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        response = client.get("/healthz", status=503)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert response.json["status"] == "unavailable" and "locked" in response.json["database"]
    assert healthz_once_settled(client)["status"] == "ok"  # an answer may be HEALTH_CACHE_SECONDS old


def test_healthz_is_503_after_a_failed_commit(client, database, sqlite_only):
    with sqlite3.connect(database) as connection:
        connection.execute("CREATE TRIGGER refuse BEFORE INSERT ON event BEGIN SELECT RAISE(ABORT, 'disk I/O'); END")
    post(client, "/v1.0/event", event(), status=503)
    assert "disk I/O" in client.get("/healthz", status=503).json["database"]


def test_metrics_count_requests_stored_events_and_commit_time(client):
    post(client, "/v1.0/events", [event(event_id="m-1"), event(event_id="m-2")])
    post(client, "/v1.0/events", [event(event_id="m-1")])  # a retry: acknowledged, not stored again
    post(client, "/v1.0/event", b"{", status=400)
    text = client.get("/metrics").text
    assert client.get("/metrics").content_type == "text/plain"
    assert "\npycolytics_events_stored_total 2\n" in text
    assert 'pycolytics_requests_total{status="204"} 2' in text and 'pycolytics_requests_total{status="400"} 1' in text
    assert re.search(r'^pycolytics_commit_seconds_bucket\{le="\+Inf"\} 2$', text, re.M)
    assert re.search(r"^pycolytics_commit_seconds_count 2$", text, re.M)


def test_each_commit_time_is_counted_in_every_bucket_at_or_over_it():
    metrics = pycolytics.Metrics()
    for seconds in (0.0004, 0.001, 0.003, 0.3, 7.0):
        metrics.commit(seconds, stored=1)
    text = metrics.text()
    buckets = dict(re.findall(r'^pycolytics_commit_seconds_bucket\{le="([^"]+)"\} (\d+)$', text, re.M))
    assert buckets == {"0.001": "2", "0.0025": "2", "0.005": "3", "0.01": "3", "0.025": "3", "0.05": "3",
                       "0.1": "3", "0.25": "3", "0.5": "4", "1.0": "4", "2.5": "4", "5.0": "4", "+Inf": "5"}


def test_metrics_count_the_built_in_servers_fast_path(server):
    connection = http.client.HTTPConnection(*server.server_address, timeout=10)
    statuses = [post_over(connection, event()), post_over(connection, event(api_key="nope"))]
    connection.request("GET", "/metrics")
    text = connection.getresponse().read().decode()
    assert statuses == [204, 401]
    assert 'pycolytics_requests_total{status="204"} 1' in text and 'pycolytics_requests_total{status="401"} 1' in text


def run_cli(tmp_path, *arguments):
    return subprocess.run([sys.executable, os.path.join(HERE, "pycolytics.py"), *arguments], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)


def seed(client):
    post(client, "/v1.0/events", [
        event(application="space", timestamp="2024-01-01T10:00:00Z", value={"a": 1}),
        event(application="farm", timestamp="2024-02-01T10:00:00Z", value={"b": [1, 2]}, event_id="f-1"),
        event(application="space", timestamp="2024-03-01T10:00:00Z", user_id='quote " and, comma'),
    ])


def test_export_writes_csv_that_reads_back_and_filters(client, database, tmp_path):
    seed(client)
    result = run_cli(tmp_path, "--database", database, "export", "--application", "space", "--since", "2024-01-15")
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [(row["application"], row["user_id"], row["time"]) for row in rows] == [
        ("space", 'quote " and, comma', "2024-03-01 10:00:00.000000")]
    assert list(rows[0]) == list(pycolytics.EXPORT_COLUMNS)


def test_export_writes_json_lines_to_a_file(client, database, tmp_path):
    seed(client)
    result = run_cli(tmp_path, "--database", database, "export", "--format", "jsonl", "--until", "1709200000",
                     "--output", "out.jsonl")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [(record["value"], record["event_id"]) for record in records] == [({"a": 1}, None), ({"b": [1, 2]}, "f-1")]


def test_export_refuses_a_bad_time_and_a_missing_database(tmp_path, database):
    result = run_cli(tmp_path, "--database", database, "export", "--since", "last tuesday")
    assert result.returncode == 2 and "--since 'last tuesday' is not a time" in result.stderr
    result = run_cli(tmp_path, "--database", str(tmp_path / "absent.db"), "export")
    assert result.returncode == 2 and "there is no database" in result.stderr and not (tmp_path / "absent.db").exists()


def test_prune_deletes_old_events_only(client, database, tmp_path):
    seed(client)
    for _ in range(2):
        post(client, "/v1.0/events", [event(timestamp=f"2023-06-{day:02d}") for day in range(1, 29)] * 20)
    result = run_cli(tmp_path, "--database", database, "prune", "--before", "2024-01-15", "--yes")
    assert result.returncode == 0, result.stderr
    assert "deleted 1121 events" in result.stderr
    assert [row[0] for row in stored(database, "time")] == ["2024-02-01 10:00:00.000000", "2024-03-01 10:00:00.000000"]


def test_retention_days_prunes_in_the_running_server(settings, database, make_app):
    config = pycolytics.load_config(environ={}, overrides=dict(settings, retention_days=30))
    app = make_app(config)
    client = webtest.TestApp(app)
    post(client, "/v1.0/events", [event(timestamp="2020-01-01")] * 600)
    post(client, "/v1.0/events", [event(timestamp="2020-01-01")] * 600 + [event()])
    app.writer.prune_soon()
    deadline = time.monotonic() + 20
    while count(database) > 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert count(database) == 1
    assert "pycolytics_events_pruned_total 1200" in client.get("/metrics").text


def test_retention_days_deletes_whole_days_and_the_reports_forget_them(settings, database, make_app):
    config = pycolytics.load_config(environ={}, overrides=dict(settings, retention_days=30, read_keys="reader-key"))
    app = make_app(config)
    client = webtest.TestApp(app)
    kept = datetime.datetime.combine(TODAY - datetime.timedelta(days=30), datetime.time(0), tzinfo=datetime.timezone.utc)
    rows = [("my-game", "gone", "s1", "start", "1.0", kept - datetime.timedelta(microseconds=1), {}),
            ("my-game", "both", "s2", "start", "1.0", kept - datetime.timedelta(hours=30), {}),
            ("my-game", "both", "s3", "start", "1.0", kept + datetime.timedelta(days=2), {}),
            ("my-game", "kept", "s4", "start", "1.0", kept, {})]
    post_history(client, rows)
    wait_for(lambda: not app.writer._summary_behind)  # the summaries hold the days about to go
    app.writer.prune_soon()
    wait_for(lambda: count(database) == 2)
    since = TODAY - datetime.timedelta(days=40)
    answer = client.get(f"/v1.0/report?since={since}&until={TODAY}", headers=READER).json
    assert answer == oracle_report(rows[2:], since, TODAY)  # "both" is new on their first day still stored
    assert answer["totals"] == {"events": 2, "users": 2, "new_users": 2, "sessions": 2}


def test_backup_is_a_consistent_copy_taken_while_events_arrive(server, database, sqlite_only, tmp_path):
    stop = threading.Event()

    def keep_posting():
        connection = http.client.HTTPConnection(*server.server_address, timeout=10)
        while not stop.is_set():
            post_over(connection, [event()] * 20, "/v1.0/events")

    writer = threading.Thread(target=keep_posting)
    writer.start()
    try:
        time.sleep(0.3)
        result = run_cli(tmp_path, "--database", database, "backup", "copy.db")
    finally:
        stop.set()
        writer.join(10)
    assert result.returncode == 0, result.stderr
    with sqlite3.connect(tmp_path / "copy.db") as copy:
        assert copy.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        copied = copy.execute("SELECT count(*) FROM event").fetchone()[0]
    assert 0 < copied <= count(database) and copied % 20 == 0


# -- The dashboard -------------------------------------------------------------------------------------


@pytest.fixture
def reading(settings, database, make_app):
    config = pycolytics.load_config(environ={}, overrides=dict(settings, read_keys="reader-key"))
    app = make_app(config)
    client = webtest.TestApp(app)
    seed_recent(client)
    yield client


def seed_recent(client):
    """A month of events from two games, up to today."""
    today = datetime.datetime.now(datetime.timezone.utc)
    batch = []
    for n in range(300):
        moment = today - datetime.timedelta(hours=n * 2.3)
        batch.append(event(application="space-game" if n % 3 else "farm-game", event_type=("death", "win", "start")[n % 3],
                           version=f"1.{n % 4}", platform=("Linux", "Windows", "Web")[n % 3], user_id=f"u{n % 40}",
                           session_id=f"s{n // 5}", timestamp=moment.isoformat()))
    post(client, "/v1.0/events", batch)


def seed_levels_and_purchases(client):
    """Three weeks of space-game's levels (started, then completed or failed) and purchases, up to today."""
    today, rng, batch = datetime.datetime.now(datetime.timezone.utc), random.Random(3), []
    for player in range(30):
        moment = today - datetime.timedelta(days=rng.randrange(21), hours=rng.random())
        for level in range(1, rng.randint(2, 9)):
            for outcome in ["level_fail"] * rng.randint(0, 2) + ["level_complete"]:
                for kind in ("level_start", outcome):
                    moment += datetime.timedelta(seconds=rng.randint(20, 200))
                    batch.append(event(application="space-game", event_type=kind, user_id=f"p{player}",
                                       session_id=f"p{player}", value={"level": level}, timestamp=moment.isoformat()))
        if player % 4 == 0:
            batch.append(event(application="space-game", event_type="purchase", user_id=f"p{player}",
                               session_id=f"p{player}", timestamp=moment.isoformat(), value={
                                   "price": rng.choice([0.99, 4.99]), "currency": ("USD", "EUR")[player % 8 // 4],
                                   "item": rng.choice(["gems", "skin"])}))
    for start in range(0, len(batch), 1000):
        post(client, "/v1.0/events", batch[start:start + 1000])


def basic(key):
    return {"Authorization": "Basic " + base64.b64encode(f"anyone:{key}".encode()).decode()}


def test_the_dashboard_is_off_without_read_keys(client):
    assert "set read_keys" in client.get("/dashboard", status=403).json["detail"]


@pytest.mark.parametrize("headers", [{}, basic("wrong"), {"Authorization": "Basic !!!"}, {"Authorization": "Digest x"}])
def test_the_dashboard_needs_a_read_key(reading, headers):
    response = reading.get("/dashboard", headers=headers, status=401)
    assert response.headers["WWW-Authenticate"].startswith("Basic realm=")
    assert "reader-key" not in response.text


@pytest.mark.parametrize("headers", [basic(KEY), {"Authorization": f"Bearer {KEY}"}])
def test_a_write_key_never_opens_the_dashboard(reading, headers):
    response = reading.get("/dashboard", headers=headers, status=403)
    assert "read_keys" in response.json["detail"] and KEY not in response.text


@pytest.mark.parametrize("headers", [basic("reader-key"), {"Authorization": "Bearer reader-key"}])
def test_the_dashboard_draws_its_charts_as_inline_svg(reading, headers):
    page = reading.get("/dashboard", headers=headers)
    assert page.content_type == "text/html" and "default-src 'none'" in page.headers["Content-Security-Policy"]
    assert page.text.count("<svg") == 7 and page.text.count('<rect class="bar') >= 30
    assert "<h1>Pycolytics &middot; space-game</h1>" in page.text  # the busiest game, not both mixed
    assert "<b>200</b>events" in page.text and "<b>40</b>players" in page.text
    assert not re.search(r"<script|<link|https?://", page.text)
    every = reading.get("/dashboard?application=", headers=headers).text
    assert "<b>300</b>events" in every and "<b>80</b>players" in every and "<h1>Pycolytics</h1>" in every


def test_the_dashboard_filters_by_application_and_dates(reading):
    page = reading.get("/dashboard?application=farm-game", headers=basic("reader-key"))
    assert "<b>100</b>events" in page.text and '<option value="space-game">' in page.text
    today = datetime.datetime.now(datetime.timezone.utc).date()
    page = reading.get(f"/dashboard?since={today}&until={today}", headers=basic("reader-key"))
    assert page.text.count('<rect class="bar') >= 1
    assert reading.get("/dashboard?since=yesterday", headers=basic("reader-key"), status=400)


def find_chromium():
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install chromium (Debian's package) for the dashboard's browser test")
        pytest.skip("chromium is not installed")
    return browser


def png_colours(path):
    """How many different byte values the image's pixel data holds: a blank page has very few."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    position, pixels = 8, b""
    while position < len(data):
        length = int.from_bytes(data[position:position + 4], "big")
        if data[position + 4:position + 8] == b"IDAT":
            pixels += data[position + 8:position + 8 + length]
        position += 12 + length
    return len(set(zlib.decompress(pixels)))


def test_the_dashboard_renders_in_a_real_browser(tmp_path, settings, database):
    browser = find_chromium()
    config = pycolytics.load_config(environ={}, overrides=dict(settings, read_keys="reader-key"))
    app = pycolytics.create_app(config)
    seed_recent(webtest.TestApp(app))
    seed_levels_and_purchases(webtest.TestApp(app))
    server = built_in_server(app, config)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    url = "http://viewer:reader-key@%s:%d/dashboard" % server.server_address
    headless = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,5400"]  # the whole page
    try:
        dom = subprocess.run(headless + ["--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
        shot = tmp_path / "dashboard.png"
        subprocess.run(headless + [f"--screenshot={shot}", url], capture_output=True, timeout=120)
    finally:
        server.shutdown()
        thread.join(10)
        app.close()
    # the charts of the days, retention, stickiness, revenue (a currency each), levels and versions
    assert dom.count("<svg") == 11 and dom.count("<polyline") == 3 and "Events per day" in dom
    assert "USD" in dom and "EUR" in dom and "Progression" in dom
    assert "Retention" in dom and dom.count("<form") == 3 and 'href="v1.0/report?' in dom
    assert png_colours(shot) > 40
    if os.environ.get("SCREENSHOT_TO"):
        shutil.copyfile(shot, os.environ["SCREENSHOT_TO"])


# -- Reports: retention, sessions, funnels ---------------------------------------------------------------

NOW = datetime.datetime.now(datetime.timezone.utc)
TODAY = NOW.date()
READER = {"Authorization": "Bearer reader-key"}


def history(seed=7):
    """Events of a made-up month and a half, as (application, user, session, type, version, time, value).

    Players arrive on different days (some before any range asked, so they are not new in it),
    come back on chosen days, play sessions of known lengths and drop out of the tutorial at known
    steps; another game's events share user and session ids and must count only for it.
    Days run up to yesterday: the server never stores a time in the future.
    """
    rng = random.Random(seed)
    rows = []
    for n in range(60):
        application = "my-game" if n % 4 else "other-game"
        first = rng.randint(1, 45)  # days before today
        returns = sorted({first} | {first - gap for gap in (1, 2, 7, 14, 30) if gap < first and rng.random() < 0.5})
        for visit, back in enumerate(sorted(returns, reverse=True)):
            start = datetime.datetime.combine(TODAY - datetime.timedelta(days=back), datetime.time(8 + n % 10),
                                              tzinfo=datetime.timezone.utc) + datetime.timedelta(seconds=rng.randint(0, 3000))
            length = rng.choice([0, 45, 300, 1250.5, 3600, 7300])
            session = f"s{n % 30}-{visit}"  # the other game reuses the same ids
            steps = ["tutorial_start", "tutorial_step", "tutorial_end"][:1 + n % 3] if visit == 0 else ["level_start"]
            for index, kind in enumerate(steps + ["session_end"]):
                moment = start + datetime.timedelta(seconds=length * index / len(steps))
                value = {"level": rng.randint(1, 9)} if kind == "level_start" else {"item": f"item{rng.randint(0, 30)}"}
                rows.append((application, f"u{n % 30}", session, kind, f"1.{rng.randint(0, 24)}", moment, value))
    return rows


def post_history(client, rows):
    batch = [event(application=application, user_id=user, session_id=session, event_type=kind, version=version,
                   timestamp=moment.isoformat(), value=value)
             for application, user, session, kind, version, moment, value in rows]
    for start in range(0, len(batch), 500):
        post(client, "/v1.0/events", batch[start:start + 500])


def nearest_rank(ordered, share):
    return ordered[max(1, math.ceil(share * len(ordered))) - 1] if ordered else 0


def top_rows(rows, key, total_events):
    """The oracle's ranking: (name -> events, users), top 20 then "(other)"."""
    events, users = collections.Counter(), collections.defaultdict(set)
    for row in rows:
        events[key(row)] += 1
        users[key(row)].add((row[0], row[1]))
    ordered = sorted(events, key=lambda name: (-events[name], name))
    ranked = [{"name": name, "events": events[name], "users": len(users[name])} for name in ordered[:20]]
    if len(ordered) > 20:
        rest = set().union(*(users[name] for name in ordered[20:]))
        ranked.append({"name": "(other)", "events": total_events - sum(row["events"] for row in ranked),
                       "users": len(rest)})
    return ranked


def oracle_report(rows, since, until, application=None, today=TODAY):
    """The report computed in plain Python from the posted events, following README.md's definitions."""
    chosen = [row for row in rows if application in (None, row[0])]
    first_day = {}
    for row in chosen:
        user = (row[0], row[1])
        first_day[user] = min(first_day.get(user, row[5].date()), row[5].date())
    inside = [row for row in chosen if since <= row[5].date() <= until]
    days = [since + datetime.timedelta(days=n) for n in range((until - since).days + 1)]
    active = {(row[0], row[1], row[5].date()) for row in inside}
    sessions = collections.defaultdict(list)
    for row in inside:
        sessions[row[0], row[2]].append(row[5])
    lengths = sorted(round((max(times) - min(times)).total_seconds(), 3) for times in sessions.values())
    users = {(row[0], row[1]) for row in inside}
    table = [{"date": day.isoformat(), "events": sum(row[5].date() == day for row in inside),
              "users": len({(row[0], row[1]) for row in inside if row[5].date() == day}),
              "new_users": sum(first == day for first in first_day.values()),
              "sessions": len({(row[0], row[2]) for row in inside if row[5].date() == day})} for day in days]
    retention = []
    for day in days:
        cohort = [user for user, first in first_day.items() if first == day]
        if cohort:
            retention.append(dict({"cohort": day.isoformat(), "users": len(cohort)}, **{
                f"day_{n}": None if day + datetime.timedelta(days=n) > min(until, today) else round(
                    sum((*user, day + datetime.timedelta(days=n)) in active for user in cohort) / len(cohort), 4)
                for n in pycolytics.RETENTION_DAYS}))
    return {
        "since": since.isoformat(), "until": until.isoformat(), "application": application,
        "totals": {"events": len(inside), "users": len(users),
                   "new_users": sum(since <= first <= until for first in first_day.values()), "sessions": len(sessions)},
        "days": table, "retention": retention,
        "sessions": {"count": len(lengths), "median_seconds": nearest_rank(lengths, 0.5),
                     "p90_seconds": nearest_rank(lengths, 0.9), "per_user": round(len(lengths) / len(users), 2) if users else 0},
        "event_types": top_rows(inside, lambda row: row[3], len(inside)),
        "versions": top_rows(inside, lambda row: row[4], len(inside)),
        "platforms": top_rows(inside, lambda row: "Linux", len(inside)),
    }


def oracle_funnel(rows, since, until, steps, application=None):
    times = collections.defaultdict(lambda: collections.defaultdict(list))
    for row in rows:
        if application in (None, row[0]) and since <= row[5].date() <= until:
            times[row[0], row[1]][row[3]].append(row[5])
    reached = []
    for n in range(len(steps)):
        count = 0
        for per_type in times.values():
            moment = datetime.datetime.min.replace(tzinfo=datetime.timezone.utc)
            for step in steps[:n + 1]:
                later = [found for found in per_type[step] if found >= moment]
                if not later:
                    break
                moment = min(later)
            else:
                count += 1
        reached.append({"name": steps[n], "users": count})
    return reached


def summarise(database, limit=None, restart=False):
    """Bring an SQLite database's summaries up to date (or `limit` events further), as the writer does."""
    config = pycolytics.load_config(os.devnull, environ={}, overrides={"database": database})
    connection = pycolytics.connect(database)
    try:
        if restart:
            with pycolytics.transaction(connection):
                pycolytics.restart_summaries(connection)
        while True:
            with pycolytics.transaction(connection):
                read, upto = pycolytics.summarise(connection, pycolytics.SQLITE, limit or 500, config)
            if upto >= 0 and (limit is not None or not read):
                return read
    finally:
        connection.close()


def hold_back_the_writers_summaries(monkeypatch):
    """The writer's own summarising steps do nothing: the test takes them."""
    monkeypatch.setattr(pycolytics.SQLiteStore, "summarise", lambda store, connection, limit, config: (0, 0))


def pytest_generate_tests(metafunc):
    """Every test of the API, storage and hardening runs on both backends, but those that ask for
    `sqlite_only` (about SQLite files themselves): they run on SQLite alone, with no skipped copy.
    A report test runs on SQLite in each of the ways a report is read (`summaries`), and once on
    PostgreSQL, which keeps none."""
    if "summaries" in metafunc.fixturenames:
        metafunc.parametrize("database, summaries", [("sqlite", "summarised"), ("sqlite", "half-summarised"),
                                                    ("sqlite", "events"), ("postgresql", "events")],
                             indirect=["database"])
    elif "database" in metafunc.fixturenames:
        backends = ["sqlite"] if "sqlite_only" in metafunc.fixturenames else ["sqlite", "postgresql"]
        metafunc.parametrize("database", backends, indirect=True)


@pytest.fixture
def reports(settings, database, make_app, summaries, monkeypatch):
    """A client with a read key, over the generated history; yields (client, the history). On SQLite
    the report reads: summaries made before it asks ("summarised"); half of them, the other half made
    by the writer when the report asks it to catch up ("half-summarised"); or none, so that the
    report summarises the events it reads itself ("events", as on PostgreSQL always)."""
    config = pycolytics.load_config(environ={}, overrides=dict(settings, read_keys="reader-key"))
    if summaries == "events":
        hold_back_the_writers_summaries(monkeypatch)
        monkeypatch.setattr(pycolytics, "CATCH_UP_EVENTS", -1)
    app = make_app(config)
    client = webtest.TestApp(app)
    rows = history()
    with pytest.MonkeyPatch.context() as held:
        if summaries == "half-summarised":  # the writer takes the steps left when a report asks
            hold_back_the_writers_summaries(held)
        post_history(client, rows)
        if not is_postgres(database) and summaries != "events":
            summarise(database, len(rows) // 2 if summaries == "half-summarised" else None, restart=True)
    yield client, rows


def day_text(days_ago):
    return (TODAY - datetime.timedelta(days=days_ago)).isoformat()


@pytest.mark.parametrize("days_ago, length, application", [
    ((1, 30), None, None), ((1, 30), None, "my-game"), ((1, 30), None, "other-game"), ((10, 40), None, "my-game"),
    ((3, 3), None, None), ((0, 45), None, "my-game"), ((-5, 20), None, None), ((50, 60), None, "my-game"),
])
def test_every_figure_of_the_report_matches_a_plain_python_oracle(reports, days_ago, length, application):
    client, rows = reports
    since, until = TODAY - datetime.timedelta(days=days_ago[1]), TODAY - datetime.timedelta(days=days_ago[0])
    query = f"/v1.0/report?since={since}&until={until}" + (f"&application={application}" if application else "")
    assert client.get(query, headers=READER).json == oracle_report(rows, since, until, application)


def test_the_report_defaults_to_the_last_30_days_up_to_today(reports):
    client, rows = reports
    assert client.get("/v1.0/report", headers=READER).json == oracle_report(
        rows, TODAY - datetime.timedelta(days=29), TODAY)


def test_the_history_has_what_the_oracle_tests_need(reports):
    """A check on the generator: a test whose data lacked returns or an "(other)" row could not fail."""
    _, rows = reports
    report = oracle_report(rows, TODAY - datetime.timedelta(days=45), TODAY - datetime.timedelta(days=1), "my-game")
    assert any(row["day_1"] for row in report["retention"]) and any(row["day_7"] for row in report["retention"])
    assert report["versions"][-1]["name"] == "(other)" and 0 < report["totals"]["new_users"] < report["totals"]["users"] + 1
    assert len(set(report["days"][n]["new_users"] for n in range(45))) > 2
    later = oracle_report(rows, TODAY - datetime.timedelta(days=20), TODAY - datetime.timedelta(days=1), "my-game")
    assert later["totals"]["new_users"] < later["totals"]["users"]  # some came before the range
    funnel = oracle_funnel(rows, TODAY - datetime.timedelta(days=45), TODAY, ["tutorial_start", "tutorial_step", "tutorial_end"])
    assert funnel[0]["users"] > funnel[1]["users"] > funnel[2]["users"] > 0


# -- Players' data: erase and export one player, hashed ids, what is kept ---------------------------------

ADMIN = {"Authorization": "Bearer admin-key-for-testing"}


@pytest.fixture
def privacy(settings, database, make_app, summaries):
    """A client with read and admin keys over the generated history, summarised as `summaries` says
    (the writer's own steps and the reports' catching up do the rest): (client, rows, config)."""
    config = pycolytics.load_config(environ={}, overrides=dict(settings, read_keys="reader-key",
                                                               admin_keys="admin-key-for-testing"))
    client = webtest.TestApp(make_app(config))
    rows = game_history(seed=5)
    with pytest.MonkeyPatch.context() as held:
        if summaries != "summarised":
            hold_back_the_writers_summaries(held)
        post_history(client, rows)
        if not is_postgres(database) and summaries != "events":
            summarise(database, len(rows) // 2 if summaries == "half-summarised" else None, restart=True)
    return client, rows, config


def every_view(client, rows, application=None):
    """Each view of the last 40 days, from the server and from the oracles."""
    since, until = TODAY - datetime.timedelta(days=40), TODAY
    query = f"?since={since}&until={until}" + (f"&application={application}" if application else "")
    expected = oracle_revenue(rows, since, until, application)
    player_days = expected.pop("player_days")
    for row in expected["currencies"]:
        row["arppu"], row["arpdau"] = row["revenue"] / row["paying_users"], row["revenue"] / player_days
    return [(client.get(f"/v1.0/report{view}{query}", headers=READER).json, oracle) for view, oracle in (
        ("", oracle_report(rows, since, until, application)), ("/revenue", expected),
        ("/retention", oracle_retention(rows, since, until, application)),
        ("/stickiness", oracle_stickiness(rows, since, until, application)),
        ("/progression", oracle_progression(rows, since, until, application)))]


@pytest.mark.parametrize("application", [None, "my-game"])
def test_erasing_a_player_deletes_their_events_and_every_figure_that_counted_them(privacy, database, application):
    client, rows, _ = privacy
    assert all(rounded(answer) == rounded(oracle) for answer, oracle in every_view(client, rows))
    theirs = [row for row in rows if row[1] == "p3" and application in (None, row[0])]
    assert {row[0] for row in rows if row[1] == "p3"} == {"my-game", "other-game"} and theirs
    answer = client.post("/v1.0/player/erase", body({"user_id": "p3", "application": application}), headers=ADMIN).json
    assert answer == {"removed": len(theirs), "application": application}
    rows = [row for row in rows if row not in theirs]
    assert count(database) == len(rows)
    assert all(rounded(answer) == rounded(oracle) for answer, oracle in every_view(client, rows))
    assert all(rounded(answer) == rounded(oracle) for answer, oracle in every_view(client, rows, "my-game"))
    again = client.post("/v1.0/player/erase", body({"user_id": "p3", "application": application}), headers=ADMIN).json
    assert again == {"removed": 0, "application": application} and count(database) == len(rows)
    if not is_postgres(database):  # no row of the summaries still names them
        with sqlite3.connect(database) as connection:
            for table in pycolytics.PLAYER_TABLES:
                found = connection.execute(f"SELECT count(*) FROM {table} WHERE user_id = 'p3'"
                                           + (" AND application = 'my-game'" if application else "")).fetchone()
                assert found == (0,), table


@pytest.mark.parametrize("headers, status, words", [
    ({}, 401, "admin_keys"), (basic("wrong"), 401, "admin_keys"), (READER, 403, "admin_keys"),
    ({"Authorization": f"Bearer {KEY}"}, 403, "admin_keys")])
def test_only_an_admin_key_erases_or_exports_and_a_refused_request_deletes_nothing(privacy, database, headers, status,
                                                                                 words):
    client, rows, _ = privacy
    for action in ("erase", "export"):
        answer = client.post(f"/v1.0/player/{action}", body({"user_id": "p3"}), headers=headers, status=status)
        assert words in answer.json["detail"]
    assert count(database) == len(rows)


@pytest.mark.parametrize("document, words", [
    ([], "JSON object"), ({}, "'user_id'"), ({"user_id": ""}, "'user_id'"), ({"user_id": 3}, "'user_id'"),
    ({"user_id": "p3", "application": 5}, "'application'"), ({"user_id": "p3", "after_id": -1}, "'after_id'")])
def test_a_bad_player_request_is_a_422_that_names_the_field_and_deletes_nothing(privacy, database, document, words):
    client, rows, _ = privacy
    answer = client.post("/v1.0/player/erase", body(document), headers=ADMIN, status=422)
    assert words in answer.json["detail"] and count(database) == len(rows)


def test_without_admin_keys_erasing_is_off_with_a_403_that_says_how_to_turn_it_on(reading):
    answer = reading.post("/v1.0/player/erase", body({"user_id": "u1"}), headers=READER, status=403)
    assert "admin_keys" in answer.json["detail"]


def test_an_erasure_is_logged_without_the_players_id(privacy, caplog):
    client, _, _ = privacy
    with caplog.at_level("INFO", logger="pycolytics"):
        client.post("/v1.0/player/erase", body({"user_id": "p3"}), headers=ADMIN)
    lines = [record.getMessage() for record in caplog.records if "erased" in record.getMessage()]
    assert len(lines) == 1 and "p3" not in caplog.text


def test_exporting_a_player_gives_all_their_events_as_json_lines_in_pages(privacy, monkeypatch):
    client, rows, _ = privacy
    theirs = sorted((row[0], row[3], row[5].astimezone(datetime.timezone.utc).strftime(pycolytics.TIME_FORMAT))
                    for row in rows if row[1] == "p3")
    monkeypatch.setattr(pycolytics, "MAX_PLAYER_EXPORT", 5)
    found, after = [], 0
    while True:
        answer = client.post("/v1.0/player/export", body({"user_id": "p3", "after_id": after}), headers=ADMIN)
        assert answer.content_type == "application/x-ndjson"
        records = [json.loads(line) for line in answer.text.splitlines()]
        found += records
        if "Pycolytics-Next-After-Id" not in answer.headers:
            break
        assert len(records) == 5 and int(answer.headers["Pycolytics-Next-After-Id"]) == records[-1]["id"]
        after = records[-1]["id"]
    assert sorted((record["application"], record["event_type"], record["time"]) for record in found) == theirs
    assert {record["user_id"] for record in found} == {"p3"} and all(isinstance(record["value"], dict) for record in found)
    monkeypatch.undo()
    mine = client.post("/v1.0/player/export", body({"user_id": "p3", "application": "other-game"}), headers=ADMIN).text
    assert len(mine.splitlines()) == sum(row[0] == "other-game" for row in rows if row[1] == "p3")


def test_forget_and_export_from_the_command_line(client, database, tmp_path):
    post(client, "/v1.0/events", [event(user_id="gone", event_id=f"g{n}") for n in range(3)] + [event(user_id="kept")])
    exported = run_cli(tmp_path, "--database", database, "export", "--user", "gone")
    assert exported.returncode == 0 and [json.loads(line)["event_id"] for line in exported.stdout.splitlines()] == [
        "g0", "g1", "g2"]
    refused = run_cli(tmp_path, "--database", database, "forget", "--user", "gone")  # no terminal to ask on
    assert refused.returncode == 2 and "--yes" in refused.stderr and count(database) == 4
    done = run_cli(tmp_path, "--database", database, "forget", "--user", "gone", "--yes")
    assert done.returncode == 0 and json.loads(done.stdout) == {"removed": 3, "application": None}
    assert stored(database, "user_id") == [("kept",)] and "gone" not in done.stderr


def test_hashed_ids_keep_no_raw_id_and_still_count_players_and_their_erasure_takes_the_raw_id(tmp_path, make_app):
    database = str(tmp_path / "events.db")
    (tmp_path / "hashed.ini").write_text(
        f"[pycolytics]\napi_keys = {KEY}\nread_keys = reader-key\nadmin_keys = admin-key-for-testing\nquiet = yes\n"
        f"database = {database}\nid_secret = a-secret-of-the-server-0123\n[app:my-game]\nhash_user_ids = yes\n")
    client = webtest.TestApp(make_app(pycolytics.load_config(str(tmp_path / "hashed.ini"), environ={})))
    rows = game_history(seed=5)
    post_history(client, rows)
    stored_ids = {(application, user, session) for application, user, session in stored(
        database, "application, user_id, session_id")}
    assert not {(row[0], row[1]) for row in rows if row[0] == "my-game"} & {(a, u) for a, u, _ in stored_ids}
    assert all(re.fullmatch("[0-9a-f]{32}", user) and re.fullmatch("[0-9a-f]{32}", session)
               for application, user, session in stored_ids if application == "my-game")
    assert {(a, u) for a, u, _ in stored_ids if a == "other-game"} == {(r[0], r[1]) for r in rows if r[0] == "other-game"}
    since, until = TODAY - datetime.timedelta(days=40), TODAY
    report = client.get(f"/v1.0/report?since={since}&until={until}&application=my-game", headers=READER).json
    assert report["totals"] == oracle_report(rows, since, until, "my-game")["totals"]  # the same players, hashed
    theirs = sum(row[1] == "p3" and row[0] == "my-game" for row in rows)
    exported = client.post("/v1.0/player/export", body({"user_id": "p3", "application": "my-game"}), headers=ADMIN)
    assert len(exported.text.splitlines()) == theirs and "p3" not in exported.text
    erased = client.post("/v1.0/player/erase", body({"user_id": "p3"}), headers=ADMIN).json  # both games'
    assert erased["removed"] == sum(row[1] == "p3" for row in rows)


def test_hashed_ids_without_an_id_secret_stop_start_up_saying_what_to_set(tmp_path):
    (tmp_path / "bad.ini").write_text("[app:my-game]\nhash_user_ids = yes\n")
    with pytest.raises(pycolytics.ConfigError, match="id_secret"):
        pycolytics.load_config(str(tmp_path / "bad.ini"), environ={})


def test_the_privacy_command_and_docs_say_what_is_kept_and_for_how_long(tmp_path, client):
    (tmp_path / "p.ini").write_text("[pycolytics]\nretention_days = 400\nlog_addresses = no\n"
                                    "id_secret = a-secret-of-the-server-0123\n[app:my-game]\nhash_user_ids = yes\n")
    printed = run_cli(tmp_path, "--config", "p.ini", "privacy")
    assert printed.returncode == 0
    for words in ("user_id", "IP address", "400 days", "my-game", "HMAC", "no client address", "forget --user",
                  "privacy forms", "Shared with third parties: no"):
        assert words in printed.stdout, words
    docs = client.get("/docs").text
    assert "What is stored, per event" in docs and "kept until deleted" in docs and "/v1.0/player/erase" in docs


def test_log_addresses_no_leaves_client_addresses_out_of_the_access_log(settings):
    with serving(settings, quiet="no", log_addresses="no") as server:
        lines = []
        server.log = types.SimpleNamespace(write=lines.append)
        exchange(server, b"GET /docs HTTP/1.1\r\nHost: t\r\nX-Forwarded-For: 203.0.113.9\r\nConnection: close\r\n\r\n")
    assert len(lines) == 1 and lines[0].startswith("- - - [") and "203.0.113.9" not in lines[0]


# -- Game analytics: retention, stickiness, versions, revenue, progression --------------------------------


def game_history(seed=21):
    """Two games' players over 40 days, in the shape of history(): sessions of levels started, then
    completed or failed, purchases in three currencies (some without one, one whose price is not a
    number), versions that change every ten days, and the other game reusing user ids."""
    rng = random.Random(seed)
    rows = []
    for n in range(45):
        application, user = ("my-game" if n % 3 else "other-game"), f"p{n % 25}"
        first = rng.randint(1, 38)
        returns = sorted({first} | {rng.randint(0, first - 1) for _ in range(rng.randint(0, 5))}, reverse=True)
        level = 1
        for visit, back in enumerate(returns):
            moment = datetime.datetime.combine(TODAY - datetime.timedelta(days=back), datetime.time(8 + n % 9),
                                               tzinfo=datetime.timezone.utc) + datetime.timedelta(seconds=rng.randint(0, 900))
            if back == 0:  # today's sessions are over by now: the server would store a later time as now
                moment = NOW - datetime.timedelta(hours=2, seconds=rng.randint(0, 3600))
            version, session = f"1.{(40 - back) // 10}", f"{user}-{visit}"

            def played(kind, value=None):
                nonlocal moment
                rows.append((application, user, session, kind, version, moment, value or {}))
                moment += datetime.timedelta(seconds=rng.randint(5, 400))

            played("session_start")
            for _ in range(rng.randint(1, 3)):
                played("level_start", {"level": level})
                if rng.random() < 0.55:
                    played("level_complete", {"level": level})
                    level += 1
                else:
                    played("level_fail", {"level": level})
            if rng.random() < 0.35:
                purchase = {"price": rng.choice([0.99, 4.99, 9.99]), "item": rng.choice(["gems", "pack", "skin"])}
                currency = rng.choice(["USD", "EUR", "GBP", None])
                if currency:
                    purchase["currency"] = currency
                played("purchase", purchase)
            if n == 7 and visit == 0:
                played("purchase", {"price": "free", "currency": "USD"})  # not a number: not a purchase
    return rows


def active_days(rows, application=None):
    """{day: {(application, user)}} of the rows (of one application)."""
    found = collections.defaultdict(set)
    for row in rows:
        if application in (None, row[0]):
            found[row[5].date()].add((row[0], row[1]))
    return found


def oracle_retention(rows, since, until, application=None, minimum=10, today=TODAY):
    first_day, active = {}, active_days(rows, application)
    for day in sorted(active):
        for player in active[day]:
            first_day.setdefault(player, day)
    observed = min(until, today)

    def cohort(first, last):
        players = [player for player, day in first_day.items() if first <= day <= last]
        row = {"cohort": first.isoformat(), "users": len(players)}
        for after in pycolytics.RETENTION_DAYS:
            seen = [player for player in players if first_day[player] + datetime.timedelta(days=after) <= observed]
            back = sum(player in active[first_day[player] + datetime.timedelta(days=after)] for player in seen)
            row[f"day_{after}"] = round(back / len(seen), 4) if seen else None
        return row

    days = [since + datetime.timedelta(days=n) for n in range((until - since).days + 1)]
    weeks = []
    for start in days[::7]:
        end = min(start + datetime.timedelta(days=6), until)
        size = cohort(start, end)["users"]
        if weeks and weeks[-1][2] < minimum:
            weeks[-1][1:] = [end, weeks[-1][2] + size]
        else:
            weeks.append([start, end, size])
    if len(weeks) > 1 and weeks[-1][2] < minimum:
        weeks[-2][1:] = [weeks[-1][1], weeks[-2][2] + weeks[-1][2]]
        weeks.pop()
    whole = cohort(since, until)
    return {"since": since.isoformat(), "until": until.isoformat(), "application": application,
            "min_cohort": minimum, "new_users": whole["users"],
            "average": {name: value for name, value in whole.items() if name.startswith("day_")},
            "weekly": [row for row in (cohort(first, last) for first, last, _ in weeks) if row["users"]],
            "daily": [row for row in (cohort(day, day) for day in days) if row["users"]]}


def oracle_stickiness(rows, since, until, application=None):
    active = active_days(rows, application)

    def players(day, window):
        return len(set().union(*(active[day - datetime.timedelta(days=n)] for n in range(window))))

    days = [since + datetime.timedelta(days=n) for n in range((until - since).days + 1)]
    return {"since": since.isoformat(), "until": until.isoformat(), "application": application, "days": [
        {"date": day.isoformat(), "dau": players(day, 1), "wau": players(day, 7), "mau": players(day, 30),
         "dau_mau": round(players(day, 1) / players(day, 30), 4) if players(day, 30) else None} for day in days]}


def oracle_versions(rows, since, until, application=None):
    inside = [row for row in rows if application in (None, row[0]) and since <= row[5].date() <= until]
    ranking = top_rows(inside, lambda row: row[4], len(inside))
    top = [row["name"] for row in ranking if row["name"] != "(other)"]
    days = [since + datetime.timedelta(days=n) for n in range((until - since).days + 1)]
    return {"since": since.isoformat(), "until": until.isoformat(), "application": application,
            "versions": ranking, "days": [
                {"date": day.isoformat(), "version": version,
                 "events": sum(row[5].date() == day and row[4] == version for row in inside),
                 "users": len({(row[0], row[1]) for row in inside if row[5].date() == day and row[4] == version})}
                for day in days for version in top] if top else []}


def purchases_of(rows, application=None):
    """(day, player, currency, item, price) of the rows that are purchases by the default conventions."""
    return [(row[5].date(), (row[0], row[1]), row[6].get("currency", ""), row[6].get("item", ""), row[6]["price"])
            for row in rows if application in (None, row[0]) and row[3] == "purchase"
            and isinstance(row[6].get("price"), (int, float))]


def oracle_revenue(rows, since, until, application=None):
    bought = [purchase for purchase in purchases_of(rows, application) if since <= purchase[0] <= until]
    active = {day: players for day, players in active_days(rows, application).items() if since <= day <= until}
    players = set().union(*active.values()) if active else set()
    player_days = sum(map(len, active.values()))
    currencies = sorted({currency for _, _, currency, _, _ in bought},
                        key=lambda currency: -sum(price for _, _, c, _, price in bought if c == currency))
    first_day, first_purchase = {}, {}
    for day in sorted(active_days(rows, application)):
        for player in active_days(rows, application)[day]:
            first_day.setdefault(player, day)
    for day, player, *_ in sorted(purchases_of(rows, application)):
        first_purchase.setdefault(player, day)
    buckets = collections.Counter()
    for player, day in first_purchase.items():
        if since <= day <= until:
            after = (day - first_day[player]).days
            buckets[next(n for n, (bound, _) in enumerate(pycolytics.FIRST_PURCHASE_DAYS) if after <= bound)] += 1

    def figures(chosen):
        return sum(price for *_, price in chosen), len(chosen), len({player for _, player, *_ in chosen})

    per_day = []
    for day, currency in sorted({(day, currency) for day, _, currency, _, _ in bought}):
        revenue, count, payers = figures([p for p in bought if p[0] == day and p[2] == currency])
        day_players = len(active.get(day, ()))
        per_day.append({"date": day.isoformat(), "currency": currency, "revenue": revenue, "purchases": count,
                        "paying_users": payers, "active_users": day_players,
                        "conversion": round(len({p[1] for p in bought if p[0] == day}) / day_players, 4),
                        "arpdau": revenue / day_players})
    items = collections.defaultdict(list)
    for purchase in bought:
        items[purchase[2], purchase[3]].append(purchase)
    ranked = sorted(items, key=lambda key: (-sum(p[4] for p in items[key]), key))
    paying = len({player for _, player, *_ in bought})
    return {"since": since.isoformat(), "until": until.isoformat(), "application": application,
            "players": len(players), "paying_users": paying,
            "conversion": round(paying / len(players), 4) if players else None,
            "currencies": [dict(zip(("revenue", "purchases", "paying_users"), figures(
                [p for p in bought if p[2] == currency])), currency=currency) for currency in currencies],
            "days": per_day,
            "first_purchase": [{"days": label, "users": buckets[n]}
                               for n, (_, label) in enumerate(pycolytics.FIRST_PURCHASE_DAYS)],
            "items": [{"currency": currency, "item": item, "revenue": sum(p[4] for p in items[currency, item]),
                       "purchases": len(items[currency, item])} for currency, item in ranked[:20]],
            "player_days": player_days}


def oracle_progression(rows, since, until, application=None, churn_days=7, today=TODAY):
    played = collections.defaultdict(lambda: {"starts": 0, "completes": 0, "fails": 0, "start": None, "complete": None})
    kinds = {"level_start": "starts", "level_complete": "completes", "level_fail": "fails"}
    for row in rows:
        if application in (None, row[0]) and since <= row[5].date() <= until and row[3] in kinds:
            figures = played[row[0], row[1], str(row[6]["level"])]
            figures[kinds[row[3]]] += 1
            moment = row[5].astimezone(datetime.timezone.utc).replace(tzinfo=None)
            for kind, name in (("level_start", "start"), ("level_complete", "complete")):
                if row[3] == kind and (figures[name] is None or moment < figures[name]):
                    figures[name] = moment
    end = min(until, today)
    active = active_days(rows, application)
    recent = set().union(*(active[end - datetime.timedelta(days=n)] for n in range(churn_days)))
    last_levels = collections.Counter()
    for player in {key[:2] for key in played} - recent:
        reached = [(figures["start"] or figures["complete"], key[2])  # when they first reached each level
                   for key, figures in played.items() if key[:2] == player]
        last_levels[min(reached, key=lambda pair: (-pair[0].timestamp(), pair[1]))[1]] += 1
    levels = sorted({key[2] for key in played}, key=lambda level: float(level))
    result = []
    for level in levels:
        mine = [figures for key, figures in played.items() if key[2] == level]
        started = sum(figures["starts"] > 0 for figures in mine)
        completed = [figures for figures in mine if figures["completes"]]
        attempts = sorted(figures["starts"] / figures["completes"] for figures in completed)
        times = sorted((figures["complete"] - figures["start"]).total_seconds() for figures in mine
                       if figures["complete"] and figures["start"])
        result.append({"level": level, "started": started, "completed": len(completed),
                       "failed": sum(figures["fails"] > 0 for figures in mine),
                       "completion_rate": round(len(completed) / started, 4) if started else None,
                       "median_attempts": round(nearest_rank(attempts, 0.5), 2) if attempts else None,
                       "median_seconds_to_complete": round(max(0, nearest_rank(times, 0.5)), 3) or 0 if times else None,
                       "last_level_of_churned": last_levels[level]})
    return {"since": since.isoformat(), "until": until.isoformat(), "application": application,
            "churn_days": churn_days, "churned": sum(last_levels.values()), "more_levels": 0, "levels": result}


def rounded(document):
    """`document` with every float rounded to 6 places: sums of prices are added in other orders."""
    if isinstance(document, float):
        return round(document, 6)
    if isinstance(document, dict):
        return {name: rounded(value) for name, value in document.items()}
    if isinstance(document, list):
        return [rounded(value) for value in document]
    return document


@pytest.fixture
def games(settings, database, make_app, summaries, monkeypatch):
    """As `reports`, over game_history(): (client, rows)."""
    config = pycolytics.load_config(environ={}, overrides=dict(settings, read_keys="reader-key"))
    if summaries == "events":
        hold_back_the_writers_summaries(monkeypatch)
        monkeypatch.setattr(pycolytics, "CATCH_UP_EVENTS", -1)
    client = webtest.TestApp(make_app(config))
    rows = game_history()
    with pytest.MonkeyPatch.context() as held:
        if summaries == "half-summarised":
            hold_back_the_writers_summaries(held)
        post_history(client, rows)
        if not is_postgres(database) and summaries != "events":
            summarise(database, len(rows) // 2 if summaries == "half-summarised" else None, restart=True)
    return client, rows


GAME_RANGES = [(1, 30, None), (0, 39, "my-game"), (5, 20, "other-game"), (12, 12, "my-game"), (-3, 10, None)]


def game_view(client, view, recent, old, application, extra=""):
    since, until = TODAY - datetime.timedelta(days=old), TODAY - datetime.timedelta(days=recent)
    query = f"/v1.0/report/{view}?since={since}&until={until}" + (f"&application={application}" if application else "")
    return since, until, client.get(query + extra, headers=READER).json


@pytest.mark.parametrize("recent, old, application", GAME_RANGES)
def test_retention_gives_daily_and_weekly_cohorts_and_the_ranges_d1_d7_d30_as_the_oracle(games, recent, old,
                                                                                       application):
    client, rows = games
    since, until, answer = game_view(client, "retention", recent, old, application)
    assert answer == oracle_retention(rows, since, until, application)
    since, until, answer = game_view(client, "retention", recent, old, application, "&min_cohort=1")
    assert answer == oracle_retention(rows, since, until, application, minimum=1)


@pytest.mark.parametrize("recent, old, application", GAME_RANGES)
def test_stickiness_and_versions_match_the_oracle(games, recent, old, application):
    client, rows = games
    since, until, answer = game_view(client, "stickiness", recent, old, application)
    assert answer == oracle_stickiness(rows, since, until, application)
    since, until, answer = game_view(client, "versions", recent, old, application)
    assert answer == oracle_versions(rows, since, until, application)


@pytest.mark.parametrize("recent, old, application", GAME_RANGES)
def test_revenue_matches_the_oracle_one_line_per_currency(games, recent, old, application):
    client, rows = games
    since, until, answer = game_view(client, "revenue", recent, old, application)
    expected = oracle_revenue(rows, since, until, application)
    player_days = expected.pop("player_days")
    for row in expected["currencies"]:
        row["arppu"] = row["revenue"] / row["paying_users"]
        row["arpdau"] = row["revenue"] / player_days if player_days else None
    assert rounded(answer) == rounded(expected)


@pytest.mark.parametrize("recent, old, application", GAME_RANGES)
def test_progression_matches_the_oracle_level_by_level(games, recent, old, application):
    client, rows = games
    since, until, answer = game_view(client, "progression", recent, old, application)
    assert answer == oracle_progression(rows, since, until, application)
    since, until, answer = game_view(client, "progression", recent, old, application, "&churn_days=3")
    assert answer == oracle_progression(rows, since, until, application, churn_days=3)


def test_the_game_history_has_what_the_game_view_tests_need(games):
    client, rows = games
    since, until = TODAY - datetime.timedelta(days=39), TODAY
    revenue = oracle_revenue(rows, since, until)
    assert len(revenue["currencies"]) == 4 and revenue["paying_users"] > 5  # USD, EUR, GBP and none
    progression = oracle_progression(rows, since, until, "my-game")
    assert len(progression["levels"]) > 3 and progression["churned"] > 3
    assert any(row["median_attempts"] not in (None, 1.0) for row in progression["levels"])
    retention, unfolded = oracle_retention(rows, since, until), oracle_retention(rows, since, until, minimum=1)
    assert retention["average"]["day_1"] and len(unfolded["weekly"]) > len(retention["weekly"]) > 1  # some folded
    assert len(oracle_versions(rows, since, until)["versions"]) == 5  # 1.0 to 1.4


def test_the_game_views_csv_are_their_lists_and_pandas_reads_them_with_one_call(games):
    client, rows = games
    since, until = TODAY - datetime.timedelta(days=30), TODAY
    for view, listed in (("retention", "weekly"), ("revenue", "days"), ("progression", "levels"),
                         ("stickiness", "days"), ("versions", "days")):
        answer = client.get(f"/v1.0/report/{view}?since={since}&until={until}", headers=READER).json
        text = client.get(f"/v1.0/report/{view}?since={since}&until={until}&format=csv", headers=READER).text
        read = list(csv.DictReader(io.StringIO(text)))
        assert len(read) == len(answer[listed]) and read and set(read[0]) <= set(answer[listed][0])
        assert all(isinstance(value, (str, int, float, type(None))) for row in answer[listed] for value in row.values())


@pytest.mark.parametrize("ini, field", [("purchase_event = buy\nprice_field = cost\n", "revenue"),
                                        ("level_complete_event = won\nlevel_field = stage\n", "progression")])
def test_the_conventions_are_settings_per_application_and_a_change_makes_the_summaries_again(tmp_path, make_app, ini,
                                                                                             field):
    database = str(tmp_path / "events.db")
    (tmp_path / "game.ini").write_text(f"[pycolytics]\napi_keys = {KEY}\nread_keys = reader-key\nquiet = yes\n"
                                       f"database = {database}\n[app:renamed]\n{ini}")
    config = pycolytics.load_config(str(tmp_path / "game.ini"), environ={})
    client = webtest.TestApp(make_app(config))
    now = datetime.datetime.now(datetime.timezone.utc)
    post(client, "/v1.0/events", [
        event(application="renamed", event_type="buy", value={"cost": 2.5, "currency": "EUR"}, timestamp=now.isoformat()),
        event(application="renamed", event_type="level_start", value={"stage": 4}, timestamp=now.isoformat()),
        event(application="renamed", event_type="won", value={"stage": 4}, timestamp=now.isoformat()),
        event(application="plain", event_type="purchase", value={"price": 1.0, "currency": "EUR"},
              timestamp=now.isoformat()),
        event(application="plain", event_type="buy", value={"cost": 7.0, "currency": "EUR"}, timestamp=now.isoformat())])
    revenue = client.get("/v1.0/report/revenue?application=renamed", headers=READER).json
    assert [row["revenue"] for row in revenue["currencies"]] == ([2.5] if field == "revenue" else [])
    assert [row["revenue"] for row in client.get("/v1.0/report/revenue?application=plain",
                                                   headers=READER).json["currencies"]] == [1.0]
    progression = client.get("/v1.0/report/progression?application=renamed", headers=READER).json
    assert [row["completed"] for row in progression["levels"]] == ([1] if field == "progression" else [])
    assert f"<code>{field == 'revenue' and 'purchase_event' or 'level_field'}</code>" in client.get("/docs").text
    client.app.reconfigure(pycolytics.load_config(environ={}, overrides={  # [app:renamed] gone: the defaults
        "database": database, "api_keys": KEY, "read_keys": "reader-key", "quiet": "yes"}))
    for _ in range(2):  # from the events while the summaries are made again, then from them
        assert client.get("/v1.0/report/revenue?application=renamed", headers=READER).json["currencies"] == []
        assert client.get("/v1.0/report/progression?application=renamed", headers=READER).json["levels"] == []
        with sqlite3.connect(database) as connection:
            wait_for(lambda: connection.execute("SELECT last_id FROM pycolytics_summary").fetchone() == (5,))


@pytest.mark.parametrize("steps", [["tutorial_start", "tutorial_step", "tutorial_end"], ["tutorial_end", "tutorial_start"],
                                   ["level_start", "session_end", "level_start"], ["tutorial_start", "no_such_event"]])
@pytest.mark.parametrize("application", [None, "my-game"])
def test_the_funnel_counts_users_who_did_each_step_at_or_after_the_last(reports, steps, application):
    client, rows = reports
    since, until = TODAY - datetime.timedelta(days=40), TODAY - datetime.timedelta(days=2)
    query = f"/v1.0/report/funnel?since={since}&until={until}&steps={','.join(steps)}"
    answer = client.get(query + (f"&application={application}" if application else ""), headers=READER).json
    assert answer["steps"] == oracle_funnel(rows, since, until, steps, application)


def test_a_value_breakdown_gives_numbers_as_statistics_and_strings_as_a_ranking(reports):
    client, rows = reports
    since, until = TODAY - datetime.timedelta(days=30), TODAY - datetime.timedelta(days=1)
    inside = [row for row in rows if since <= row[5].date() <= until and row[0] == "my-game"]
    levels = sorted(row[6]["level"] for row in inside if row[3] == "level_start")
    answer = client.get(f"/v1.0/report/values?since={since}&until={until}&application=my-game"
                        "&event_type=level_start&field=level", headers=READER).json
    counts = collections.Counter(levels)
    histogram = [{"from": level, "to": level + 1, "events": counts[level]} for level in range(levels[0], levels[-1] + 1)]
    assert answer["numbers"] == {"count": len(levels), "min": levels[0], "p50": nearest_rank(levels, 0.5),
                                 "p90": nearest_rank(levels, 0.9), "max": levels[-1], "sum": sum(levels),
                                 "values": [{"value": level, "events": counts[level]} for level in sorted(counts)],
                                 "histogram": histogram}  # whole numbers: bins one wide
    assert answer["strings"] == [] and answer["missing"] == 0 and answer["events"] == len(levels)
    items = collections.Counter(row[6]["item"] for row in inside if row[3] == "session_end")
    answer = client.get(f"/v1.0/report/values?since={since}&until={until}&application=my-game"
                        "&event_type=session_end&field=item", headers=READER).json
    ranked = [{"value": name, "events": items[name]} for name in sorted(items, key=lambda name: (-items[name], name))]
    assert answer["numbers"] is None and answer["strings"][:20] == ranked[:20]
    assert answer["strings"][20] == {"value": "(other)", "events": sum(items.values()) - sum(r["events"] for r in ranked[:20])}


def test_filters_make_the_report_of_only_the_matching_events(reports):
    client, rows = reports
    since, until = TODAY - datetime.timedelta(days=30), TODAY - datetime.timedelta(days=1)
    only = [row for row in rows if row[3] == "level_start"]
    answer = client.get(f"/v1.0/report?since={since}&until={until}&event_type=level_start", headers=READER).json
    assert answer == oracle_report(only, since, until)


def test_the_csv_report_is_the_days_table(reports):
    client, rows = reports
    since, until = TODAY - datetime.timedelta(days=10), TODAY - datetime.timedelta(days=1)
    answer = client.get(f"/v1.0/report?since={since}&until={until}&format=csv", headers=READER)
    assert answer.content_type == "text/csv" and "attachment" in answer.headers["Content-Disposition"]
    table = list(csv.DictReader(io.StringIO(answer.text)))
    assert [{name: str(value) for name, value in day.items()} for day in oracle_report(rows, since, until)["days"]] == table
    assert answer.text.startswith("date,events,users,new_users,sessions\r\n")


def test_a_late_event_and_a_prune_change_the_next_report(reports, config):
    client, rows = reports
    since, until = TODAY - datetime.timedelta(days=30), TODAY - datetime.timedelta(days=1)
    query = f"/v1.0/report?since={since}&until={until}"
    assert client.get(query, headers=READER).json == oracle_report(rows, since, until)
    late = ("my-game", "u1", "late", "tutorial_start", "1.0",
            datetime.datetime.combine(since - datetime.timedelta(days=5), datetime.time(9), tzinfo=datetime.timezone.utc), {})
    rows.append(late)
    post_history(client, [late])  # u1's first event is now before the range: no longer new in it
    assert client.get(query, headers=READER).json == oracle_report(rows, since, until)
    store = client.app.writer.store
    cutoff = datetime.datetime.combine(TODAY - datetime.timedelta(days=20), datetime.time(0))
    connection = store.connect()
    try:
        while any(store.prune(connection, cutoff.strftime(pycolytics.TIME_FORMAT))):
            pass
    finally:
        connection.close()
    kept = [row for row in rows if row[5].replace(tzinfo=None) >= cutoff]
    assert client.get(query, headers=READER).json == oracle_report(kept, since, until)


REPORT_RANGES = [((1, 30), None), ((1, 30), "my-game"), ((10, 40), None), ((12, 14), "my-game"), ((0, 45), None),
                 ((25, 26), None), ((3, 3), "other-game")]


def assert_reports_match(client, rows):
    for (recent, old), application in REPORT_RANGES:
        since, until = TODAY - datetime.timedelta(days=old), TODAY - datetime.timedelta(days=recent)
        query = f"/v1.0/report?since={since}&until={until}" + (f"&application={application}" if application else "")
        assert client.get(query, headers=READER).json == oracle_report(rows, since, until, application), query


def test_summaries_stay_right_through_late_events_prunes_and_deleted_events(tmp_path, make_app, monkeypatch):
    """Events summarised in id order, out of time order, a step at a time; then late events, a prune of
    whole days, a prune of part of a day, and the newest events deleted by hand (their ids used again)."""
    hold_back_the_writers_summaries(monkeypatch)  # the test steps; a report that finds them behind reads the events
    monkeypatch.setattr(pycolytics, "CATCH_UP_EVENTS", -1)
    database = str(tmp_path / "events.db")
    config = pycolytics.load_config(environ={}, overrides={"database": database, "api_keys": KEY, "quiet": "yes",
                                                           "read_keys": "reader-key"})
    client = webtest.TestApp(make_app(config))
    rows = history(seed=3)
    random.Random(5).shuffle(rows)  # a session's events arrive in any order, in different steps
    post_history(client, rows)
    for step in (37, 150, 400):
        summarise(database, step)
        assert_reports_match(client, rows)
    summarise(database)
    assert_reports_match(client, rows)
    late = [(application, user, session, kind, version, moment - datetime.timedelta(days=9, seconds=1), value)
            for application, user, session, kind, version, moment, value in rows[::7]]
    rows += late
    post_history(client, late)  # older than their sessions' first events, some before their users' first
    assert_reports_match(client, rows)
    summarise(database)
    assert_reports_match(client, rows)
    for cutoff in (datetime.datetime.combine(TODAY - datetime.timedelta(days=35), datetime.time(0)),
                   datetime.datetime.combine(TODAY - datetime.timedelta(days=28), datetime.time(13, 30))):
        assert pycolytics.main(["--database", database, "prune", "--yes",
                                "--before", cutoff.isoformat()]) == 0
        rows = [row for row in rows if row[5].replace(tzinfo=None) >= cutoff]
        assert_reports_match(client, rows)
        summarise(database)
        assert_reports_match(client, rows)
    connection = pycolytics.connect(database)
    newest = connection.execute("SELECT max(id) FROM event").fetchone()[0]
    deleted = collections.Counter(connection.execute(
        "SELECT application, user_id, session_id, event_type, time FROM event WHERE id > ?", (newest - 40,)))
    connection.execute("DELETE FROM event WHERE id > ?", (newest - 40,))
    connection.close()
    for row in list(rows):
        key = row[:4] + (row[5].astimezone(datetime.timezone.utc).strftime(pycolytics.TIME_FORMAT),)
        if deleted[key]:
            deleted[key] -= 1
            rows.remove(row)
    assert not +deleted
    more = [("my-game", f"n{n}", f"t{n}", "level_start", "2.0",
             datetime.datetime.combine(TODAY - datetime.timedelta(days=n % 20), datetime.time(7),
                                       tzinfo=datetime.timezone.utc), {}) for n in range(50)]
    rows += more
    post_history(client, more)  # their ids are the deleted events' and 10 more
    assert_reports_match(client, rows)
    summarise(database)
    assert_reports_match(client, rows)
    connection = pycolytics.connect(database)  # ...from the summaries, built again, not from the events
    assert connection.execute("SELECT sum(events) FROM pycolytics_names WHERE field = 'platform'").fetchone() == (
        len(rows),)
    assert connection.execute("SELECT last_id FROM pycolytics_summary").fetchone() == connection.execute(
        "SELECT max(id) FROM event").fetchone() and newest < connection.execute("SELECT max(id) FROM event").fetchone()[0]
    connection.close()
def test_sqlite_and_postgresql_give_the_same_report(tmp_path, postgres_url):
    answers = []
    for database in (str(tmp_path / "events.db"), postgres_url):
        config = pycolytics.load_config(environ={}, overrides={"database": database, "api_keys": KEY, "quiet": "yes",
                                                               "read_keys": "reader-key"})
        app = pycolytics.create_app(config)
        client = webtest.TestApp(app)
        post_history(client, history(seed=11))
        since, until = day_text(45), day_text(0)
        answers.append([client.get(f"/v1.0/report{path}?since={since}&until={until}&{query}", headers=READER).json
                        for path, query in [("", ""), ("", "application=my-game"),
                                            ("/funnel", "steps=tutorial_start,tutorial_step,tutorial_end"),
                                            ("/values", "event_type=level_start&field=level"),
                                            ("/values", "event_type=session_end&field=item")]])
        app.close()
    assert answers[0] == answers[1] and answers[0][0]["totals"]["events"] > 100


def test_a_report_of_a_database_made_by_the_original(config, database, sqlite_only, make_app):
    with sqlite3.connect(database) as connection:
        connection.executescript(ORIGINAL_SCHEMA)
    config = pycolytics.load_config(environ={}, overrides={"database": database, "api_keys": KEY, "quiet": "yes",
                                                           "read_keys": "reader-key"})
    app = make_app(config)
    client = webtest.TestApp(app)
    answer = client.get("/v1.0/report?since=2024-04-30&until=2024-05-02", headers=READER).json
    assert answer["totals"] == {"events": 1, "users": 1, "new_users": 1, "sessions": 1}
    assert answer["days"][1] == {"date": "2024-05-01", "events": 1, "users": 1, "new_users": 1, "sessions": 1}


@pytest.mark.parametrize("live", [False, True])
def test_session_lengths_at_the_edges_of_the_dashboards_bars_fall_as_their_rounded_seconds(tmp_path, make_app,
                                                                                           monkeypatch, live):
    if live:  # the report summarises the events itself
        hold_back_the_writers_summaries(monkeypatch)
        monkeypatch.setattr(pycolytics, "CATCH_UP_EVENTS", -1)
    database = str(tmp_path / "events.db")
    config = pycolytics.load_config(environ={}, overrides={"database": database, "api_keys": KEY, "quiet": "yes",
                                                           "read_keys": "reader-key"})
    client = webtest.TestApp(make_app(config))
    start = datetime.datetime.combine(TODAY - datetime.timedelta(days=2), datetime.time(1), tzinfo=datetime.timezone.utc)
    lengths = [59.9994, 59.9995, 59.999501, 60, 299.9995, 299.9994, 7199.9996, 0]
    rows = [row for n, length in enumerate(lengths) for row in (
        ("my-game", f"u{n}", f"s{n}", "start", "1.0", start, {}),
        ("my-game", f"u{n}", f"s{n}", "end", "1.0", start + datetime.timedelta(seconds=length), {}))]
    post_history(client, rows)
    if not live:
        summarise(database)
    since = TODAY - datetime.timedelta(days=3)
    page = client.get(f"/dashboard?since={since}&until={TODAY}", headers=READER).text
    rounded = [round(round(length * 1_000_000) / 1_000_000, 3) for length in lengths]
    bars = [sum(1 for length in rounded if low <= length < high) for low, high in zip(
        [0] + [bound for bound, _ in pycolytics.SESSION_BUCKETS[:-1]], [bound for bound, _ in pycolytics.SESSION_BUCKETS])]
    for (_, label), bar in zip(pycolytics.SESSION_BUCKETS, bars):
        assert f"<title>{html.escape(label)}: {bar}</title>" in page, (label, bar)


def test_an_original_database_is_summarised_in_the_background_and_reports_right_meanwhile(tmp_path, make_app,
                                                                                        monkeypatch):
    monkeypatch.setattr(pycolytics, "CATCH_UP_EVENTS", 100)  # more behind: a report summarises what it reads itself
    monkeypatch.setattr(pycolytics, "SUMMARY_STEP_ROWS", 150)
    database = str(tmp_path / "original.db")
    rows = history(seed=9)
    with sqlite3.connect(database) as connection:
        connection.executescript(ORIGINAL_SCHEMA)
        connection.execute("DELETE FROM event")
        connection.executemany(
            "INSERT INTO event (event_type, application, version, platform, user_id, session_id, value, time)"
            " VALUES (?, ?, ?, 'Linux', ?, ?, '{}', ?)",
            [(kind, application, version, user, session,
              moment.astimezone(datetime.timezone.utc).strftime(pycolytics.TIME_FORMAT))
             for application, user, session, kind, version, moment, _ in rows])
    steps = []
    real = pycolytics.SQLiteStore.summarise

    def step(store, connection, limit, config):  # the writer's steps, one each time the test allows one
        if len(steps) >= allowed[0]:
            return 0, 0
        steps.append(real(store, connection, limit, config))
        return steps[-1]

    allowed = [1]
    monkeypatch.setattr(pycolytics.SQLiteStore, "summarise", step)
    config = pycolytics.load_config(environ={}, overrides={"database": database, "api_keys": KEY, "quiet": "yes",
                                                           "read_keys": "reader-key"})
    client = webtest.TestApp(make_app(config))
    while not steps or steps[-1][0]:
        wait_for(lambda: len(steps) == allowed[0])
        assert_reports_match(client, rows)  # from the events while far behind, then from the summaries
        allowed[0] += 1
        client.app.writer.catch_up(0, 0)  # a nudge: the writer looks for work
    with sqlite3.connect(database) as connection:
        assert connection.execute("SELECT last_id FROM pycolytics_summary").fetchone() == (len(rows),)
    assert len(steps) > len(rows) // 150


def test_summarising_steps_that_take_long_read_fewer_events_and_still_catch_up(tmp_path, make_app, monkeypatch):
    steps = []  # (limit, events read)
    real = pycolytics.SQLiteStore.summarise

    def step(store, connection, limit, config):
        found = real(store, connection, limit, config)
        steps.append((limit, found[0]))
        return found

    monkeypatch.setattr(pycolytics.SQLiteStore, "summarise", step)
    monkeypatch.setattr(pycolytics, "SUMMARY_STEP_SECONDS", 1e-9)  # every step took too long
    database = str(tmp_path / "events.db")
    config = pycolytics.load_config(environ={}, overrides={"database": database, "api_keys": KEY, "quiet": "yes"})
    client = webtest.TestApp(make_app(config))
    events = pycolytics.SUMMARY_STEP_ROWS + 3 * pycolytics.SUMMARY_MIN_ROWS - 7
    for start in range(0, events, 1000):
        post(client, "/v1.0/events", [event(user_id=f"u{n}") for n in range(start, min(events, start + 1000))])

    def summarised():
        with sqlite3.connect(database) as connection:
            return connection.execute("SELECT last_id FROM pycolytics_summary").fetchone()[0]

    wait_for(lambda: summarised() == events)
    whole = steps.index((pycolytics.SUMMARY_STEP_ROWS, pycolytics.SUMMARY_STEP_ROWS))
    assert {limit for limit, _ in steps[whole + 1:]} == {pycolytics.SUMMARY_MIN_ROWS}  # the rest, a few a step
    with sqlite3.connect(database) as connection:
        assert connection.execute("SELECT sum(events) FROM pycolytics_names WHERE field = 'platform'").fetchone() == (
            events,)
        assert connection.execute("SELECT count(*) FROM pycolytics_users").fetchone() == (events,)


def test_summarising_never_waits_for_a_write_lock_another_process_holds(tmp_path, make_app, monkeypatch):
    hold_back_the_writers_summaries(monkeypatch)
    database = str(tmp_path / "events.db")
    config = pycolytics.load_config(environ={}, overrides={"database": database, "api_keys": KEY, "quiet": "yes",
                                                           "busy_timeout": 30})
    app = make_app(config)
    post(webtest.TestApp(app), "/v1.0/events", [event()] * 3)
    monkeypatch.undo()
    store, connection = app.writer.store, app.writer.store.connect()
    blocker = sqlite3.connect(database, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # a backup, a notebook writing
    try:
        started = time.monotonic()
        with pytest.raises(pycolytics.SummaryPostponed):
            store.summarise(connection, 500, config)
        assert time.monotonic() - started < 1  # not the 30 s a commit would wait
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert connection.execute("PRAGMA busy_timeout").fetchone() == (30000,)  # commits still wait their turn
    assert store.summarise(connection, 500, config) == (3, 3)
    connection.close()


def test_the_dashboard_shows_the_reports_figures_with_relative_links(reports):
    client, rows = reports
    since, until = TODAY - datetime.timedelta(days=30), TODAY - datetime.timedelta(days=1)
    figures = oracle_report(rows, since, until, "my-game")
    page = client.get(f"/dashboard?since={since}&until={until}&application=my-game&steps=tutorial_start,tutorial_end"
                      "&of=level_start&field=level", headers=READER).text
    for name, label in (("events", "events"), ("users", "players"), ("new_users", "new players"), ("sessions", "sessions")):
        assert f"<b>{figures['totals'][name]:,}</b>{label}" in page
    assert page.count('<table class="retention">') == 1 and page.count("<tr>") >= len(figures["retention"])
    assert 'action="dashboard"' in page and f'href="v1.0/report?application=my-game&amp;since={since}&amp;until={until}' in page
    assert "format=csv" in page and not re.search(r'(href|action)="/', page)
    assert "(other)" in page and "tutorial_end" in page and "<th>p90</th>" in page


def test_a_database_that_cannot_be_read_is_a_503_not_a_500(reading, database, sqlite_only):
    os.rename(database, database + ".moved")
    try:
        answer = reading.get("/v1.0/report", headers=READER, status=503)
    finally:
        os.rename(database + ".moved", database)
    assert "could not be read" in answer.json["detail"] and answer.headers["Retry-After"]


def test_the_dashboard_filters_by_event_type_version_and_platform(reading):
    page = reading.get("/dashboard?event_type=death&platform=Linux", headers=READER).text
    assert "<b>100</b>events" in page and 'value="death"' in page and '<datalist id="versions">' in page
    page = reading.get("/dashboard?version=1.1&platform=Windows", headers=READER).text
    assert "<b>25</b>events" in page


HOSTILE_QUERIES = [
    "until=9999-12-31", "since=0001-01-01", "until=0001-01-05", "since=9999-12-31&until=9999-12-31",
    "since=2024-01-01&until=2025-06-01", "since=2024-02-30", "since=%ff%fe", "since=2024-05-01T00:00",
    "until=1969-12-31", "since=2025-01-02&until=2025-01-01", "application=%00", "version=" + "v" * 2000,
    "format=xml", "format=", "application=%3Cscript%3E", "event_type=%E2%80%AE", "&" * 5000, "a=1&" * 100,
    "since=+2024-05-01", "since=2024-05-01%00", "steps=" + ",".join("x" * 11), "steps=,,,", "field=%22x",
    "field=", "event_type=x&field=a%5C", "of=x&field=%0a", "since[]=2024", "%", "=&=&==", "format=csv&steps=a",
]


@pytest.mark.parametrize("path", ["/dashboard", "/v1.0/report", "/v1.0/report/funnel", "/v1.0/report/values"])
@pytest.mark.parametrize("query", HOSTILE_QUERIES)
def test_no_query_string_makes_the_report_fail(reading, path, query):
    answer = reading.get(f"{path}?{query}", headers=READER, expect_errors=True)
    assert answer.status_int == 200 or (400 <= answer.status_int < 500 and answer.json["detail"])


@pytest.mark.parametrize("query, words", [
    ("since=2024-01-01&until=2025-01-01", "at most 366 days"), ("until=9999-12-31", "until must be a day"),
    ("since=yesterday", "since must be a date"), ("format=xml", "format must be json or csv"),
])
def test_a_bad_report_query_is_a_400_that_says_why(reading, query, words):
    assert words in reading.get(f"/v1.0/report?{query}", headers=READER, status=400).json["detail"]


def test_a_year_is_the_longest_range(reading):
    assert len(reading.get("/v1.0/report?since=2024-01-01&until=2024-12-31", headers=READER).json["days"]) == 366
    reading.get("/v1.0/report?since=2024-01-01&until=2025-01-01", headers=READER, status=400)


def test_the_report_needs_a_read_key(reading):
    reading.get("/v1.0/report", status=401)
    reading.get("/v1.0/report/funnel?steps=a", headers={"Authorization": f"Bearer {KEY}"}, status=403)
    assert reading.get("/v1.0/report", headers=basic("reader-key")).json["totals"]["events"] == 300


def test_wrong_read_keys_are_throttled_per_address_and_logged_once(reading, caplog):
    guesser, other = {"REMOTE_ADDR": "127.0.0.2"}, {"REMOTE_ADDR": "127.0.0.3"}
    with caplog.at_level("WARNING", logger="pycolytics"):
        for _ in range(pycolytics.KEY_FAILURES):
            reading.get("/v1.0/report", headers=basic("guess"), extra_environ=guesser, status=401)
        refused = reading.get("/dashboard", headers=READER, extra_environ=guesser, status=429)
    assert int(refused.headers["Retry-After"]) >= 1 and "wrong read keys" in refused.json["detail"]
    assert reading.get("/v1.0/report", headers=READER, extra_environ=other).json["totals"]["events"] == 300
    assert [record.getMessage() for record in caplog.records].count(
        "a wrong read key from '127.0.0.2' (more from it this minute are counted, not logged)") == 1


def test_the_key_guard_forgets_old_windows_and_bounds_its_memory(monkeypatch):
    monkeypatch.setattr(pycolytics, "MAX_TRACKED_CLIENTS", 100)
    guard = pycolytics.KeyGuard("read")
    for n in range(1000):
        guard.failed(f"10.0.{n // 250}.{n % 250}", now=n // 200 * 60)
    assert len(guard._counts._counts) <= 100
    for _ in range(pycolytics.KEY_FAILURES):
        guard.failed("10.9.9.9", now=6000)
    with pytest.raises(pycolytics.HTTPError) as refused:
        guard.check("10.9.9.9", now=6030)
    assert refused.value.status == "429 Too Many Requests"
    guard.check("10.9.9.9", now=6060)  # a new window


def test_guessing_read_keys_from_many_addresses_holds_back_every_guess_for_the_rest_of_the_minute(reading, caplog):
    with caplog.at_level("WARNING", logger="pycolytics"):
        for n in range(pycolytics.KEY_FAILURES_IN_ALL):
            reading.get("/v1.0/report", headers=basic("guess"), extra_environ={"REMOTE_ADDR": f"10.1.{n // 250}.{n % 250}"},
                        status=401)
        refused = reading.get("/v1.0/report", headers=basic("guess"), extra_environ={"REMOTE_ADDR": "10.2.0.1"},
                              status=429)
    assert "from all addresses" in refused.json["detail"] and int(refused.headers["Retry-After"]) >= 1
    assert sum("every address waits" in record.getMessage() for record in caplog.records) == 1
    assert len(caplog.records) <= pycolytics.KEY_FAILURES_IN_ALL + 1  # one line per address, then one


def test_a_cached_report_is_read_again_once_an_event_arrives(reading):
    first = reading.get("/v1.0/report", headers=READER).json["totals"]["events"]
    assert reading.get("/v1.0/report", headers=READER).json["totals"]["events"] == first
    post(reading, "/v1.0/event", event())
    assert reading.get("/v1.0/report", headers=READER).json["totals"]["events"] == first + 1


def test_every_ranking_lumps_the_rest_as_other(reading):
    post(reading, "/v1.0/events", [event(application=f"app{n}", version=f"v{n}", platform=f"p{n}", event_type=f"t{n}")
                                   for n in range(30)])
    report = reading.get("/v1.0/report", headers=READER).json
    for name in ("event_types", "versions", "platforms"):
        assert len(report[name]) == 21 and report[name][-1]["name"] == "(other)"
        assert sum(row["events"] for row in report[name]) == report["totals"]["events"]
    page = reading.get("/dashboard", headers=READER).text
    applications = re.search(r'<select name="application">(.*?)</select>', page, re.S).group(1)
    assert applications.count("<option value=") == 21 and '<option value="space-game" selected>' in applications  # all, top 20


# -- Rate limits -------------------------------------------------------------------------------------


@pytest.fixture
def limited(settings, make_app):
    config = pycolytics.load_config(environ={}, overrides=dict(settings, rate_limit="3/minute"))
    app = make_app(config)
    yield webtest.TestApp(app, extra_environ={"REMOTE_ADDR": "203.0.113.7"})


def test_over_the_rate_limit_a_client_gets_429_with_retry_after_and_nothing_is_stored(limited, database):
    for _ in range(3):
        post(limited, "/v1.0/event", event())
    response = post(limited, "/v1.0/events", [event(), event()], status=429)
    assert 1 <= int(response.headers["Retry-After"]) <= 60
    assert "more than 3 requests per minute" in response.json["detail"]
    assert count(database) == 3


def test_the_rate_limit_counts_each_address_apart(limited, database):
    for _ in range(3):
        post(limited, "/v1.0/event", event())
    post(limited, "/v1.0/event", event(), extra_environ={"REMOTE_ADDR": "203.0.113.8"})
    assert count(database) == 4


def test_behind_a_trusted_proxy_the_forwarded_address_is_limited(limited, database):
    proxied = {"REMOTE_ADDR": "127.0.0.1"}
    for player in ("198.51.100.1", "198.51.100.2"):
        for _ in range(3):
            post(limited, "/v1.0/event", event(), extra_environ=proxied, headers={"X-Forwarded-For": player})
    post(limited, "/v1.0/event", event(), status=429, extra_environ=proxied,
         headers={"X-Forwarded-For": "198.51.100.1"})
    assert count(database) == 6


@pytest.mark.parametrize("peer, forwarded, sender", [
    ("203.0.113.7", None, "203.0.113.7"),
    ("203.0.113.7", "1.2.3.4", "203.0.113.7"),  # not a proxy of ours: its header could be forged
    ("127.0.0.1", "1.2.3.4", "1.2.3.4"),
    ("127.0.0.1", "6.6.6.6, 1.2.3.4", "1.2.3.4"),  # the client can only forge what comes before
    ("127.0.0.1", "1.2.3.4, 127.0.0.1", "1.2.3.4"),
    ("::1", "", "::1"),
])
def test_client_address_believes_only_trusted_proxies(peer, forwarded, sender):
    assert pycolytics.client_address(peer, forwarded, frozenset({"127.0.0.1", "::1"})) == sender


def test_the_rate_limiter_starts_afresh_each_window_and_bounds_its_memory(monkeypatch):
    limiter = pycolytics.RateLimiter((2, 60))
    limiter.check("a", now=0)
    limiter.check("a", now=1)
    with pytest.raises(pycolytics.HTTPError):
        limiter.check("a", now=59)
    limiter.check("a", now=60)
    monkeypatch.setattr(pycolytics, "MAX_TRACKED_CLIENTS", 100)
    for n in range(1000):
        limiter.check(f"10.0.{n // 256}.{n % 256}", now=61)
    assert len(limiter._counts._counts) <= 100


@pytest.mark.parametrize("text, parsed", [
    ("off", None), ("60/minute", (60, 60)), ("10 per second", (10, 1)), ("1000/hours", (1000, 3600)),
])
def test_rate_limit_settings_are_read(tmp_path, monkeypatch, text, parsed):
    monkeypatch.chdir(tmp_path)
    assert pycolytics.load_config(environ={"PYCOLYTICS_RATE_LIMIT": text}).rate_limit == parsed


def test_the_originals_rate_limit_variable_is_honoured(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert pycolytics.load_config(environ={"RATE_LIMIT": "60/minute"}).rate_limit == (60, 60)


# -- Keys ------------------------------------------------------------------------------------------


def test_any_configured_key_is_accepted(tmp_path, settings, database):
    config = pycolytics.load_config(environ={}, overrides=dict(settings, api_keys="first-key, second-key"))
    app = pycolytics.Pycolytics(config)
    client = webtest.TestApp(app)
    post(client, "/v1.0/events", [event(api_key="second-key"), event(api_key="first-key")])
    post(client, "/v1.0/event", event(api_key=KEY), status=401)
    assert count(database) == 2
    app.close()


def test_without_configured_keys_the_development_key_works_and_a_missing_key_counts_as_it(settings, database):
    config = pycolytics.load_config(environ={}, overrides=dict(settings, api_keys=""))
    assert config.dev_key_active
    app = pycolytics.Pycolytics(config)
    client = webtest.TestApp(app)
    post(client, "/v1.0/event", event(api_key=pycolytics.DEV_KEY))
    post(client, "/v1.0/event", event(api_key=...))
    post(client, "/v1.0/event", event(api_key="anything-else"), status=401)
    assert count(database) == 2
    app.close()


def test_keys_are_not_stored(client, database):
    post(client, "/v1.0/event", event())
    if is_postgres(database):
        with psycopg.connect(database) as connection:
            rows = connection.execute("SELECT count(*) FROM event WHERE event::text LIKE %s", (f"%{KEY}%",)).fetchone()
        assert rows == (0,) and count(database) == 1
    else:
        with open(database, "rb") as file:
            assert KEY.encode() not in file.read()


# -- Documentation -------------------------------------------------------------------------------


def test_docs_page_is_self_contained_html(client):
    page = client.get("/docs")
    assert page.content_type == "text/html"
    assert "/v1.0/events" in page.text and "422" in page.text
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=", page.text)


def test_openapi_describes_both_endpoints_and_the_limits(client):
    document = client.get("/openapi.json").json
    assert document["openapi"].startswith("3.")
    assert set(document["paths"]) == {"/v1.0/event", "/v1.0/events", "/v1.0/player/erase", "/v1.0/player/export"} | {
        f"/v1.0/report{view}" for view in pycolytics.REPORT_VIEWS}
    schema = document["components"]["schemas"]["Event"]
    assert set(schema["required"]) == set(pycolytics.EVENT_FIELDS)
    assert schema["properties"]["user_id"]["maxLength"] == 255
    assert document["paths"]["/v1.0/events"]["post"]["requestBody"]["content"]["application/json"]["schema"]["maxItems"] == 1000


def test_the_answers_table_is_one_table_on_docs_openapi_and_in_the_readme(client):
    statuses = [status for status, _ in pycolytics.EVENT_ANSWERS]
    docs = client.get("/docs").text
    assert re.findall(r"<tr><td>(\d{3})</td>", docs) == statuses
    assert list(client.get("/openapi.json").json["paths"]["/v1.0/event"]["post"]["responses"]) == statuses
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as readme:
        table = readme.read().split("| answer | when |", 1)[1].split("\n\n", 1)[0]
    assert re.findall(r"`(\d{3})`", table) == statuses


def test_index_points_to_the_docs(client):
    assert client.get("/").json["docs"] == "/docs"


# -- Storage ------------------------------------------------------------------------------------

# The table and indexes exactly as the original Pycolytics (SQLModel) created them.
ORIGINAL_SCHEMA = """
CREATE TABLE event (
    event_type VARCHAR NOT NULL, application VARCHAR NOT NULL, version VARCHAR NOT NULL,
    platform VARCHAR NOT NULL, user_id VARCHAR NOT NULL, session_id VARCHAR NOT NULL,
    value JSON NOT NULL, id INTEGER NOT NULL, time DATETIME NOT NULL, PRIMARY KEY (id)
);
CREATE INDEX ix_event_event_type ON event (event_type);
CREATE INDEX ix_event_application ON event (application);
CREATE INDEX ix_event_version ON event (version);
CREATE INDEX ix_event_platform ON event (platform);
CREATE INDEX ix_event_user_id ON event (user_id);
INSERT INTO event VALUES ('old', 'my-game', '0.9', 'Linux', 'u', 's', '{"a": 1}', 1, '2024-05-01 12:00:00.000000');
"""


def test_a_database_made_by_the_original_opens_and_keeps_working(config, database, sqlite_only, make_app):
    with sqlite3.connect(database) as connection:
        connection.executescript(ORIGINAL_SCHEMA)
    app = make_app(config)
    post(webtest.TestApp(app), "/v1.0/events", [event(event_type="new")])
    assert stored(database, "id, event_type, received_at IS NULL") == [(1, "old", 1), (2, "new", 0)]
    with sqlite3.connect(database) as connection:
        indexes = {row[0] for row in connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'event'")}
    assert indexes == {"ix_event_event_type", "ix_event_application", "ix_event_version", "ix_event_platform",
                       "ix_event_user_id", "ix_event_application_event_id"}


def test_a_new_database_has_the_original_columns_in_wal_mode(client, database, sqlite_only):
    post(client, "/v1.0/event", event())
    with sqlite3.connect(database) as connection:
        columns = [(row[1], row[2], row[3]) for row in connection.execute("PRAGMA table_info(event)")]
        mode = connection.execute("PRAGMA journal_mode").fetchone()[0]
    assert columns == [
        ("event_type", "VARCHAR", 1), ("application", "VARCHAR", 1), ("version", "VARCHAR", 1),
        ("platform", "VARCHAR", 1), ("user_id", "VARCHAR", 1), ("session_id", "VARCHAR", 1),
        ("value", "JSON", 1), ("id", "INTEGER", 1), ("time", "DATETIME", 1),
        ("received_at", "DATETIME", 0), ("event_id", "VARCHAR", 0),
    ]
    assert mode == "wal"


def test_a_file_that_is_not_a_pycolytics_database_is_refused(tmp_path):
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE event (name TEXT)")
    with pytest.raises(sqlite3.DatabaseError, match="lacks the columns"):
        pycolytics.connect(str(path))


def test_synchronous_setting_reaches_sqlite(tmp_path):
    connection = pycolytics.connect(str(tmp_path / "a.db"), "normal")
    assert connection.execute("PRAGMA synchronous").fetchone()[0] == 1
    connection.close()
    connection = pycolytics.connect(str(tmp_path / "b.db"))
    assert connection.execute("PRAGMA synchronous").fetchone()[0] == 2
    connection.close()


def test_concurrent_requests_in_threads_are_all_stored(app, database):
    def send(n):
        statuses = []
        for i in range(20):
            environ = webtest.TestRequest.blank(
                "/v1.0/events", method="POST", body=body([event(event_type=f"t{n}", user_id=str(i))] * 5)
            ).environ
            app(environ, lambda status, headers: statuses.append(status))
        return statuses

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        statuses = [status for result in pool.map(send, range(16)) for status in result]
    assert statuses == ["204 No Content"] * 320
    assert count(database) == 1600


# -- A 204 means stored, and health that recovers ------------------------------------------------


def healthz_once_settled(client, status="ok", seconds=20):
    """/healthz once it says `status`, or its last answer after `seconds`: answers may be a
    second old, and the writer probes a failed database every HEALTH_PROBE_SECONDS."""
    deadline = time.monotonic() + seconds
    while True:
        answer = client.get("/healthz", expect_errors=True).json
        if answer["status"] == status or time.monotonic() > deadline:
            return answer
        time.sleep(0.1)


def refuse_inserts(database, message="disk I/O"):
    """Make every insert into the event table fail, on either backend."""
    if is_postgres(database):
        with psycopg.connect(database, autocommit=True) as connection:
            connection.execute("CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS"
                               f" $$ BEGIN RAISE EXCEPTION '{message}'; END $$")
            connection.execute("CREATE TRIGGER refuse BEFORE INSERT ON event EXECUTE FUNCTION refuse()")
    else:
        with sqlite3.connect(database) as connection:
            connection.execute(f"CREATE TRIGGER refuse BEFORE INSERT ON event BEGIN SELECT RAISE(ABORT, '{message}'); END")


def allow_inserts(database):
    if is_postgres(database):
        with psycopg.connect(database, autocommit=True) as connection:
            connection.execute("DROP TRIGGER refuse ON event")
    else:
        with sqlite3.connect(database) as connection:
            connection.execute("DROP TRIGGER refuse")


def execute(database, statement):
    if is_postgres(database):
        with psycopg.connect(database, autocommit=True) as connection:
            connection.execute(statement)
    else:
        with sqlite3.connect(database) as connection:
            connection.execute(statement)


def test_two_applications_may_number_their_events_alike_and_each_keeps_them_once(client, database):
    post(client, "/v1.0/events", [event(application="space", event_id=str(n)) for n in (1, 2, 3)])
    post(client, "/v1.0/events", [event(application="farm", event_id=str(n)) for n in (1, 2, 3)])
    post(client, "/v1.0/events", [event(application="farm", event_id="2"), event(application="space", event_id="3")])
    assert stored(database, "application, event_id") == [
        ("space", "1"), ("space", "2"), ("space", "3"), ("farm", "1"), ("farm", "2"), ("farm", "3")]


def test_a_row_breaking_an_operators_own_constraint_is_503_and_its_batch_is_not_stored(client, database):
    post(client, "/v1.0/event", event(user_id="u1", session_id="s1"))
    execute(database, "CREATE UNIQUE INDEX operators_own ON event (user_id, session_id, event_type)")
    response = post(client, "/v1.0/events", [event(user_id="u2"), event(user_id="u1", session_id="s1")], status=503)
    assert response.headers["Retry-After"] and "send them again" in response.json["detail"]
    assert stored(database, "user_id") == [("u1",)]
    post(client, "/v1.0/events", [event(user_id="u2")])
    assert stored(database, "user_id") == [("u1",), ("u2",)]


def test_health_recovers_by_itself_once_the_database_takes_writes_again(client, database):
    refuse_inserts(database)
    post(client, "/v1.0/event", event(), status=503)
    assert "the last write failed" in client.get("/healthz", status=503).json["database"]
    allow_inserts(database)
    assert healthz_once_settled(client)["status"] == "ok"  # no event was sent meanwhile
    assert count(database) == 0


@pytest.fixture
def impatient(settings):
    """A server whose commits give up on a locked database after a quarter of a second."""
    return dict(settings, busy_timeout="0.25")


def get_over(connection, path):
    connection.request("GET", path)
    response = connection.getresponse()
    return response.status, response.getheader("Retry-After"), json.loads(response.read())


def test_a_live_server_recovers_from_a_lock_timeout_with_no_traffic(impatient, database, sqlite_only):
    with serving(impatient) as server:
        connection = http.client.HTTPConnection(*server.server_address, timeout=30)
        blocker = sqlite3.connect(database, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            assert post_over(connection, event()) == 503
            status, _, answer = get_over(connection, "/healthz")
            assert status == 503 and "locked" in answer["database"]
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        deadline = time.monotonic() + 20
        while get_over(connection, "/healthz")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert get_over(connection, "/healthz")[:1] == (200,)
    assert count(database) == 0


def test_a_flood_of_healthz_checks_the_database_once_a_second_at_most(client, monkeypatch):
    checks = []
    real = type(client.app.store).problem
    monkeypatch.setattr(type(client.app.store), "problem", lambda store: checks.append(1) or real(store))
    started = time.monotonic()
    for _ in range(300):
        assert client.get("/healthz").json["status"] == "ok"
    seconds = time.monotonic() - started
    assert 1 <= len(checks) <= 1 + seconds / pycolytics.HEALTH_CACHE_SECONDS


def test_a_commit_proves_health_without_a_check_of_its_own(client, monkeypatch):
    checks = []
    monkeypatch.setattr(type(client.app.store), "problem", lambda store: checks.append(1))
    post(client, "/v1.0/event", event())
    assert client.get("/healthz").json["status"] == "ok" and checks == []


@pytest.mark.parametrize("pragma, words", [
    ("max_page_count = {pages}", "database or disk is full"),
    ("query_only = 1", "attempt to write a readonly database"),
])
def test_a_failed_commit_reports_its_first_cause_not_the_failed_rollback(client, database, sqlite_only, pragma, words):
    post(client, "/v1.0/event", event())
    writer = client.app.writer._connection
    pages = writer.execute("PRAGMA page_count").fetchone()[0]
    writer.execute("PRAGMA " + pragma.format(pages=pages))
    post(client, "/v1.0/events", [event(value={"pad": "x" * 60000})] * 10, status=503)
    health = client.get("/healthz", status=503).json["database"]
    assert words in health and "rollback" not in health
    assert count(database) == 1


def test_the_transaction_helper_raises_the_first_error_when_the_rollback_fails_too():
    class Failing:
        in_transaction = True

        def execute(self, statement):
            if statement == "ROLLBACK":
                raise sqlite3.OperationalError("cannot rollback - no transaction is active")

    with pytest.raises(ValueError, match="the first cause"):
        with pycolytics.transaction(Failing()):
            raise ValueError("the first cause")


def test_a_deleted_database_gets_503_and_healthz_says_so_and_no_new_file_is_made(client, database, sqlite_only):
    post(client, "/v1.0/event", event())
    for suffix in ("", "-wal", "-shm"):
        os.remove(database + suffix)
    response = post(client, "/v1.0/events", [event(), event()], status=503)
    assert response.headers["Retry-After"] and "send them again" in response.json["detail"]
    answer = client.get("/healthz", status=503).json
    assert "was deleted" in answer["database"] or "is gone" in answer["database"]
    post(client, "/v1.0/event", event(), status=503)
    assert not os.path.exists(database)


def test_a_database_deleted_during_a_commit_is_answered_503(client, database, sqlite_only):
    post(client, "/v1.0/event", event(user_id="kept"))
    client.app.writer._connection.create_function("delete_the_database", 0, lambda: os.remove(database))
    execute(database, "CREATE TRIGGER deleting AFTER INSERT ON event BEGIN SELECT delete_the_database(); END")
    post(client, "/v1.0/event", event(user_id="lost"), status=503)
    assert "deleted" in client.get("/healthz", status=503).json["database"]
    assert not os.path.exists(database)


def test_a_database_put_back_while_the_server_runs_is_opened_again(client, database, sqlite_only, tmp_path):
    post(client, "/v1.0/events", [event(user_id="before")])
    with contextlib.closing(sqlite3.connect(database)) as source, \
            contextlib.closing(sqlite3.connect(tmp_path / "backup.db")) as copy:
        source.backup(copy)
    for suffix in ("", "-wal", "-shm"):
        os.remove(database + suffix)
    post(client, "/v1.0/event", event(user_id="refused"), status=503)
    os.replace(tmp_path / "backup.db", database)
    assert healthz_once_settled(client)["status"] == "ok"
    post(client, "/v1.0/event", event(user_id="after"))
    client.app.close()
    assert stored(database, "user_id") == [("before",), ("after",)]


def test_a_deleted_wal_file_loses_no_acknowledged_event(client, database, sqlite_only):
    post(client, "/v1.0/events", [event(user_id=str(n)) for n in range(3)])
    os.remove(database + "-wal")
    post(client, "/v1.0/event", event(user_id="3"))
    assert stored(database, "user_id") == [(str(n),) for n in range(4)]  # what a reader sees meanwhile
    client.app.close()
    assert stored(database, "user_id") == [(str(n),) for n in range(4)]


def test_a_database_put_back_beside_the_deleted_ones_wal_is_not_opened(client, database, sqlite_only, tmp_path):
    post(client, "/v1.0/event", event())
    with contextlib.closing(sqlite3.connect(database)) as source, \
            contextlib.closing(sqlite3.connect(tmp_path / "backup.db")) as copy:
        source.backup(copy)
    os.replace(tmp_path / "backup.db", database)  # its old -wal and -shm stay
    post(client, "/v1.0/event", event(user_id="refused"), status=503)
    assert "-wal" in client.get("/healthz", status=503).json["database"]
    client.app.close()
    for suffix in ("-wal", "-shm"):
        os.remove(database + suffix)
    assert stored(database, "user_id") == [("3f2a9c1e",)]  # the backup's event, not the refused one


def set_mtime(path, nanoseconds):
    os.utime(path, ns=(nanoseconds, nanoseconds))


def test_a_database_deleted_from_a_folder_unchanged_for_an_hour_gets_503(client, database, sqlite_only):
    folder = os.path.dirname(database)
    post(client, "/v1.0/event", event(user_id="before"))
    set_mtime(folder, time.time_ns() - 3600 * 10**9)
    post(client, "/v1.0/event", event(user_id="vouched for"))  # by the folder's mtime, from now on
    for suffix in ("", "-wal", "-shm"):
        os.remove(database + suffix)
    post(client, "/v1.0/event", event(user_id="refused"), status=503)
    assert "is gone" in client.get("/healthz", status=503).json["database"]
    assert not os.path.exists(database)


def test_a_database_whose_folder_is_moved_away_gets_503_until_it_is_back(tmp_path, make_app, caplog):
    (tmp_path / "data").mkdir()
    database = str(tmp_path / "data" / "events.db")
    client = webtest.TestApp(make_app(pycolytics.load_config(environ={}, overrides={
        "database": database, "api_keys": KEY, "quiet": "yes"})))
    post(client, "/v1.0/event", event(user_id="before"))
    os.rename(tmp_path / "data", tmp_path / "moved")
    post(client, "/v1.0/event", event(user_id="refused"), status=503)
    assert "is gone (deleted or moved" in healthz_once_settled(client, "unavailable")["database"]
    assert "the folder of the database file" in caplog.text and "was deleted or moved" in caplog.text
    os.rename(tmp_path / "moved", tmp_path / "data")
    assert healthz_once_settled(client)["status"] == "ok"
    post(client, "/v1.0/event", event(user_id="after"))
    assert stored(database, "user_id") == [("before",), ("after",)]


def replaced_behind_the_same_mtime(database):
    """Replace the database file as a change within one tick of the file system's clock
    would: its folder's mtime stays as it was."""
    folder = os.path.dirname(database)
    before = os.stat(folder).st_mtime_ns
    shutil.copyfile(database, database + ".copy")
    os.replace(database + ".copy", database)
    set_mtime(folder, before)


@pytest.mark.parametrize("age, whole_second", [(0.01, False), (1.0, True)],
                         ids=["10 ms ago", "a whole second, 1 s ago (as FAT keeps them)"])
def test_a_folder_changed_within_a_tick_of_the_check_does_not_vouch_for_the_database(tmp_path, age, whole_second):
    config = pycolytics.load_config(environ={}, overrides={"database": str(tmp_path / "events.db")})
    store = pycolytics.SQLiteStore(config)
    with contextlib.closing(store.connect()) as connection:
        moment = time.time_ns() - int(age * 10**9)
        set_mtime(tmp_path, moment - moment % 10**9 if whole_second else moment)
        assert store.detached(connection) is None
        replaced_behind_the_same_mtime(config.database)
        assert "was replaced" in store.detached(connection)


def test_a_database_reached_through_a_symbolic_link_is_checked_file_by_file(tmp_path):
    (tmp_path / "disk").mkdir()
    os.symlink(tmp_path / "disk" / "events.db", tmp_path / "events.db")
    config = pycolytics.load_config(environ={}, overrides={"database": str(tmp_path / "events.db")})
    store = pycolytics.SQLiteStore(config)
    with contextlib.closing(store.connect()) as connection:
        an_hour_ago = time.time_ns() - 3600 * 10**9
        set_mtime(tmp_path, an_hour_ago)
        assert store.detached(connection) is None
        replaced_behind_the_same_mtime(str(tmp_path / "disk" / "events.db"))
        assert os.stat(tmp_path).st_mtime_ns == an_hour_ago  # the link's folder says nothing...
        assert "was replaced" in store.detached(connection)  # ...and is not trusted to


def test_a_live_server_refuses_events_into_a_deleted_database_and_loses_none_it_acknowledged(tmp_path):
    acknowledged = []
    process, address, path, _ = start_server(tmp_path, "--quiet", "--database", "events.db")
    try:
        connection = http.client.HTTPConnection(*address, timeout=30)
        for n in range(3):
            if post_over(connection, event(event_id=f"kept-{n}", api_key=pycolytics.DEV_KEY)) == 204:
                acknowledged.append(f"kept-{n}")
        for suffix in ("", "-wal", "-shm"):
            os.remove(path + suffix)
        connection.request("POST", "/v1.0/event", body(event(event_id="lost", api_key=pycolytics.DEV_KEY)))
        response = connection.getresponse()
        assert response.status == 503
        answer = json.loads(response.read())
        assert response.getheader("Retry-After") and "send them again" in answer["detail"]
        status, _, health = get_over(connection, "/healthz")
        assert status == 503 and "deleted" in health["database"]
        assert not os.path.exists(path)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
    assert len(acknowledged) == 3
    process, address, path, _ = start_server(tmp_path, "--quiet", "--database", "events.db")
    try:
        connection = http.client.HTTPConnection(*address, timeout=30)
        assert post_over(connection, event(event_id="new", api_key=pycolytics.DEV_KEY)) == 204
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
    assert stored(path, "event_id") == [("new",)]  # every 204 of the server that had the file


@contextlib.contextmanager
def unwritable(path):
    """`path` (a file or a folder) that this process cannot write: chmod, or for root chattr +i."""
    if os.geteuid() != 0:
        mode = os.stat(path).st_mode
        os.chmod(path, 0o555 if os.path.isdir(path) else 0o444)
        try:
            yield
        finally:
            os.chmod(path, mode)
        return
    subprocess.run(["chattr", "+i", str(path)], check=True)
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def make_database(path):
    pycolytics.connect(str(path)).close()


@pytest.mark.parametrize("where, prepare, protect, words", [
    ("missing/events.db", None, None, ["the folder", "missing", "does not exist"]),
    ("folder", "folder", None, ["is a directory"]),
    ("events.db", "database", "events.db", ["events.db", "read (r) and write (w) permission"]),
    ("locked/events.db", "folder", "locked", ["locked", "write (w) and search (x) permission"]),
])
def test_the_server_refuses_to_start_on_a_database_it_cannot_write(tmp_path, where, prepare, protect, words):
    path = tmp_path / where
    if prepare == "folder":
        os.mkdir(path if where == "folder" else path.parent)
    elif prepare == "database":
        make_database(path)
    with unwritable(tmp_path / protect) if protect else contextlib.nullcontext():
        result = run_cli(tmp_path, "--port", "0", "--database", str(path))
    assert result.returncode == 2, result.stderr
    assert all(word in result.stderr for word in words), result.stderr
    assert "unable to open database file" not in result.stderr
    assert prepare == "database" or not os.path.isfile(path)


def test_an_older_database_whose_event_ids_were_unique_across_applications_is_migrated(config, database, sqlite_only,
                                                                                      caplog):
    with sqlite3.connect(database) as connection:
        connection.executescript(ORIGINAL_SCHEMA + """
            ALTER TABLE event ADD COLUMN received_at DATETIME;
            ALTER TABLE event ADD COLUMN event_id VARCHAR;
            CREATE UNIQUE INDEX ix_event_event_id ON event (event_id) WHERE event_id IS NOT NULL;
            UPDATE event SET event_id = '1';
        """)
    with caplog.at_level("INFO", "pycolytics"):
        app = pycolytics.create_app(config)
    try:
        post(webtest.TestApp(app), "/v1.0/events", [event(application="other", event_id="1"),
                                                    event(application="my-game", event_id="1")])
    finally:
        app.close()
    assert stored(database, "application, event_id") == [("my-game", "1"), ("other", "1")]
    with sqlite3.connect(database) as connection:
        indexes = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert "ix_event_application_event_id" in indexes and "ix_event_event_id" not in indexes
    assert sum("unique per application" in record.getMessage() for record in caplog.records) == 1


def test_retention_pruning_logs_one_line_per_pass_with_its_count(settings, database, caplog, make_app):
    config = pycolytics.load_config(environ={}, overrides=dict(settings, retention_days=30))
    app = make_app(config)
    post(webtest.TestApp(app), "/v1.0/events", [event(timestamp="2020-01-01")] * 700 + [event()])
    with caplog.at_level("INFO", "pycolytics"):
        app.writer.prune_soon()
        deadline = time.monotonic() + 20
        while not any("deleted" in record.getMessage() for record in caplog.records) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
    lines = [record.getMessage() for record in caplog.records if "retention_days" in record.getMessage()]
    assert lines == [lines[0]] and "deleted 700 events from before" in lines[0]
    assert count(database) == 1


def test_the_app_makes_the_store_metrics_and_writer_and_lends_them(app):
    assert app.writer.store is app.store and app.reports.store is app.store and app.players.store is app.store
    assert app.writer.metrics is app.metrics


# -- Configuration --------------------------------------------------------------------------------


def test_defaults_listen_on_localhost_8000(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = pycolytics.load_config(environ={})
    assert (config.host, config.port, config.database, config.synchronous) == ("127.0.0.1", 8000, "pycolytics.db", "full")
    assert config.dev_key_active


def test_precedence_is_command_line_then_environment_then_ini_then_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pycolytics.ini").write_text("[pycolytics]\nport = 8100\nhost = 0.0.0.0\ndatabase = ini.db\n")
    environ = {"PYCOLYTICS_PORT": "8200", "PYCOLYTICS_DATABASE": "env.db"}
    config = pycolytics.load_config(environ=environ, overrides={"port": "8300"})
    assert (config.port, config.database, config.host, config.synchronous) == (8300, "env.db", "0.0.0.0", "full")


def test_pycolytics_config_names_the_ini_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "elsewhere.ini").write_text("[pycolytics]\napi_keys =\n    one\n    two, three\n")
    config = pycolytics.load_config(environ={"PYCOLYTICS_CONFIG": str(tmp_path / "elsewhere.ini")})
    assert config.api_keys == ("one", "two", "three")


def test_the_originals_environment_variables_are_honoured(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    environ = {"SQLITE_FILE_PATH": "databases/database.db", "API_KEYS": '["k1", "k2"]'}
    config = pycolytics.load_config(environ=environ)
    assert (config.database, config.api_keys) == ("databases/database.db", ("k1", "k2"))
    assert pycolytics.load_config(environ={"SQLITE_FILE_NAME": "old.db"}).database == "old.db"
    newer = pycolytics.load_config(environ=dict(environ, PYCOLYTICS_API_KEYS="k3"))
    assert newer.api_keys == ("k3",)


def test_the_originals_dotenv_file_is_read_and_the_environment_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text(
        '# Name of the database file\nSQLITE_FILE_PATH="databases/database.db"\n'
        'API_KEYS=["from-dotenv"]\nRATE_LIMIT="60/minute"\n'
    )
    assert pycolytics.load_config(environ={}).api_keys == ("from-dotenv",)
    assert pycolytics.load_config(environ={}).database == "databases/database.db"
    assert pycolytics.load_config(environ={"API_KEYS": '["from-env"]'}).api_keys == ("from-env",)


@pytest.mark.parametrize("ini, environ, words", [
    ("[pycolytics]\nprot = 80\n", {}, ["unknown key 'prot'"]),
    ("[pycolytics]\nport = eighty\n", {}, ["port = 'eighty' is not valid"]),
    ("[pycolytics]\nport = 70000\n", {}, ["port", "0 to 65535"]),
    ("[pycolytics]\nsynchronous = sometimes\n", {}, ["synchronous", "full, normal"]),
    ("[pycolytics]\nthreads = 0\n", {}, ["threads", "at least 1"]),
    ("[server]\nport = 80\n", {}, ["unknown section [server]"]),
    ("port = 80\n", {}, ["cannot read"]),
    ("", {"PYCOLYTICS_PORTT": "1"}, ["PYCOLYTICS_PORTT"]),
    ("", {"API_KEYS": "k1,k2"}, ["API_KEYS must be a JSON list"]),
    ("", {"PYCOLYTICS_IDLE_TIMEOUT": "-1"}, ["idle_timeout", "PYCOLYTICS_IDLE_TIMEOUT"]),
    ("[pycolytics]\nrate_limit = lots\n", {}, ["rate_limit", "like 60/minute"]),
])
def test_a_bad_configuration_is_refused_with_a_message_naming_it(tmp_path, monkeypatch, ini, environ, words):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pycolytics.ini").write_text(ini)
    with pytest.raises(pycolytics.ConfigError) as error:
        pycolytics.load_config(environ=environ)
    for word in words:
        assert word in str(error.value)


def test_a_missing_config_file_is_refused(tmp_path):
    with pytest.raises(pycolytics.ConfigError, match="cannot read"):
        pycolytics.load_config(str(tmp_path / "absent.ini"), environ={})


def test_the_shipped_ini_documents_every_key_with_its_default():
    import configparser
    parser = configparser.ConfigParser(interpolation=None)
    with open(os.path.join(HERE, "pycolytics.ini"), encoding="utf-8") as file:
        text = file.read()
    parser.read_string(text)
    documented = dict(parser.items("pycolytics"))
    assert documented.pop("retention_days") == "400"  # a retention chosen, as a new install is asked to
    for name, default, *_ in pycolytics.SETTINGS:
        if name in documented:
            assert documented[name] == default, name
        else:
            assert re.search(rf"^# ?{name} = {re.escape(default)}$", text, re.M), name


# -- Configuration that cannot mislead, and the command line --------------------------------------

SECRET = "k3y-0f-my-g4me-f0r-testing"


@pytest.mark.parametrize("ini, words", [
    ("[pycolytics]\nmax_body_bytes = 1MB\n", ["max_body_bytes = '1MB'", "whole number", "without a unit"]),
    ("[pycolytics]\nport = abc\n", ["port = 'abc'", "from 0 to 65535"]),
    ("[pycolytics]\nthreads = 2.5\n", ["threads = '2.5'", "whole number of at least 1"]),
    ("[pycolytics]\nidle_timeout = 5s\n", ["idle_timeout = '5s'", "number of seconds"]),
    ("[pycolytics]\nrequest_timeout = nan\n", ["request_timeout = 'nan'", "number of seconds"]),
    ("[pycolytics]\nretention_days = forever\n", ["retention_days = 'forever'", "number of days"]),
    ("[pycolytics]\ntrusted_proxies = not-an-ip\n", ["trusted_proxies", "'not-an-ip'", "IP address", "network"]),
    ("[pycolytics]\ntrusted_proxies = 10.0.0.0/33\n", ["trusted_proxies", "'10.0.0.0/33'", "10.0.0.0/8"]),
    ("[pycolytics]\ntrusted_proxies = 10.0.0.1 10.0.0.2\n", ["trusted_proxies", "'10.0.0.1 10.0.0.2'"]),
    (f"[pycolytics]\napi_keys = {SECRET} other\n", ["api_keys is not valid", "'k3y-'", "holds a space", "commas"]),
    (f"[pycolytics]\nread_keys = {SECRET}\x07\n", ["read_keys is not valid", "control character"]),
    (f"[app:space]\napi_keys = {SECRET}\tx\n", ["[app:space] api_keys is not valid", "holds a space"]),
    (f"[pycolytics]\napi_keys = {SECRET}\nread_keys = {SECRET}\n",
     ["'k3y-'", "in read_keys", "in api_keys", "dashboard"]),
    (f"[app:space]\napi_keys = {SECRET}\n[app:farm]\napi_keys = one, {SECRET}\n",
     ["[app:space] api_keys", "[app:farm] api_keys", "one place"]),
    (f"[pycolytics]\napi_keys = {SECRET}\n[app:space]\napi_keys = {SECRET}\n", ["[app:space] api_keys", "and in api_keys"]),
    (f"[app:space]\napi_keys = {SECRET}\n[pycolytics]\nread_keys = {SECRET}\n", ["[app:space] api_keys", "read_keys"]),
])
def test_a_bad_value_is_refused_in_plain_words_naming_key_value_and_what_is_accepted(tmp_path, ini, words):
    (tmp_path / "bad.ini").write_text(ini)
    with pytest.raises(pycolytics.ConfigError) as error:
        pycolytics.load_config(str(tmp_path / "bad.ini"), environ={})
    message = str(error.value)
    for word in words:
        assert word in message
    assert str(tmp_path / "bad.ini") in message
    assert "invalid literal" not in message and "could not convert" not in message
    assert SECRET not in message  # a message ends up in logs: at most a glimpse of a key


def test_a_bad_value_stops_the_server_with_status_2_and_creates_nothing(tmp_path):
    (tmp_path / "pycolytics.ini").write_text("[pycolytics]\nmax_body_bytes = 1MB\n")
    result = run_cli(tmp_path, "--port", "0")
    assert result.returncode == 2
    assert "bad configuration" in result.stderr and "max_body_bytes = '1MB'" in result.stderr
    assert os.listdir(tmp_path) == ["pycolytics.ini"]


def test_inline_comments_are_stripped_as_the_readme_writes_them(tmp_path):
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as file:
        example = re.search(r"```ini\n(\[app:.*?)```", file.read(), re.S).group(1)
    assert " ; " in example  # the README's example has the comment this test is about
    (tmp_path / "pycolytics.ini").write_text(example + "[pycolytics]\nport = 9000  # the test port\n")
    config = pycolytics.load_config(str(tmp_path / "pycolytics.ini"), environ={})
    (application, settings), = config.apps.items()
    assert len(settings["api_keys"]) == 1 and ";" not in settings["api_keys"][0]
    assert config.port == 9000


@pytest.mark.parametrize("trusted, peer, forwarded, sender", [
    ("10.0.0.0/8", "10.1.2.3", "203.0.113.9", "203.0.113.9"),
    ("10.0.0.0/8", "192.168.1.1", "203.0.113.9", "192.168.1.1"),
    ("10.0.0.0/8", "::ffff:10.1.2.3", "203.0.113.9", "203.0.113.9"),
    ("10.0.0.0/8", "10.0.0.1", "198.51.100.7, 10.0.0.2", "198.51.100.7"),
    ("10.0.0.0/8", "10.0.0.1", "198.51.100.7, 11.0.0.2", "11.0.0.2"),
    ("fd00::/8, 127.0.0.1", "fd00::5", "198.51.100.7", "198.51.100.7"),
    ("fd00::/8, 127.0.0.1", "127.0.0.1", "198.51.100.7", "198.51.100.7"),
    ("0:0:0:0:0:0:0:1", "::1", "198.51.100.7", "198.51.100.7"),
    ("10.0.0.7", "10.0.0.70", "198.51.100.7", "10.0.0.70"),
])
def test_trusted_proxies_are_addresses_and_networks(trusted, peer, forwarded, sender):
    config = pycolytics.load_config(environ={"PYCOLYTICS_TRUSTED_PROXIES": trusted}, dotenv=None)
    assert pycolytics.client_address(peer, forwarded, config.trusted_proxies) == sender


def test_a_reload_warns_about_every_restart_only_change_and_compares_with_what_is_in_force(tmp_path, notifications):
    certificate, key = make_certificate(tmp_path)
    listener, path = notifications
    ini = tmp_path / "pycolytics.ini"
    ini.write_text(f"[pycolytics]\ndatabase = first.db\napi_keys = {KEY}\n")
    process, address, _, _ = start_server(tmp_path, "--quiet", environ=dict(os.environ, NOTIFY_SOCKET=path))
    try:
        assert listener.recv(100) == b"READY=1"
        ini.write_text(f"[pycolytics]\ndatabase = second.db\nthreads = 3\ncertfile = {certificate}\n"
                       f"keyfile = {key}\napi_keys = {KEY}\n")
        for _ in range(2):  # the second reload compares with the configuration in force, not the first reload's
            process.send_signal(signal.SIGHUP)
            assert listener.recv(100).startswith(b"RELOADING=1")
            assert listener.recv(100) == b"READY=1"
        connection = http.client.HTTPConnection(*address, timeout=10)
        assert post_over(connection, event()) == 204  # still plain HTTP, still the first database
        connection.close()
    finally:
        process.send_signal(signal.SIGTERM)
        _, errors = process.communicate(timeout=15)
    assert process.returncode == 0
    assert errors.count("database changed to 'second.db'; that takes a restart, the server keeps 'first.db'") == 2
    assert errors.count("threads changed to 3; that takes a restart, the server keeps 8") == 2
    assert errors.count("switch to HTTPS; that takes a restart, the server keeps serving plain HTTP") == 2
    assert count(str(tmp_path / "first.db")) == 1 and not (tmp_path / "second.db").exists()


def test_an_encrypted_private_key_is_refused_without_asking_for_a_pass_phrase(tmp_path):
    certificate, key = make_certificate(tmp_path)
    subprocess.run(["openssl", "pkey", "-in", key, "-out", "locked.pem", "-aes256", "-passout", "pass:secret"],
                   cwd=tmp_path, check=True, capture_output=True)
    (tmp_path / "pycolytics.ini").write_text(f"[pycolytics]\ncertfile = {certificate}\nkeyfile = locked.pem\n")
    result = subprocess.run([sys.executable, os.path.join(HERE, "pycolytics.py"), "--port", "0"], cwd=tmp_path,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "keyfile locked.pem is encrypted" in result.stderr and "openssl pkey" in result.stderr
    assert "pass phrase" not in result.stderr.lower()


def test_gunicorn_with_create_app_stops_at_once_on_a_bad_setting_and_serves_a_good_one(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = probe.getsockname()
    command = [sys.executable, "-m", "gunicorn", "-w", "1", "-b", f"{address[0]}:{address[1]}", "pycolytics:create_app()"]
    (tmp_path / "bad.ini").write_text("[pycolytics]\nmax_body_bytes = 1MB\n")
    environ = dict(os.environ, PYCOLYTICS_CONFIG=str(tmp_path / "bad.ini"), PYCOLYTICS_DATABASE=str(tmp_path / "g.db"))
    result = subprocess.run(command, cwd=HERE, env=environ, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "max_body_bytes = '1MB'" in result.stderr
    assert not (tmp_path / "g.db").exists()
    (tmp_path / "good.ini").write_text(f"[pycolytics]\napi_keys = {KEY}\n")
    environ["PYCOLYTICS_CONFIG"] = str(tmp_path / "good.ini")
    process = subprocess.Popen(command, cwd=HERE, env=environ, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until_serving(address) == 204
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)
    assert count(str(tmp_path / "g.db")) == 1


@pytest.fixture
def seeded(client, database):
    """The database holds seed()'s three events, of 2024-01, 2024-02 and 2024-03."""
    seed(client)
    return database


@pytest.mark.parametrize("arguments, status, words, left", [
    (["prune", "--before", "2024-02-15", "--database", "{db}", "--yes"], 0, ["deleted 2 events"], 1),
    (["--database", "{db}", "prune", "--before", "2024-02-15", "--dry-run"], 0, ["2 events are from before"], 3),
    (["prune", "--before", "2024-02-15", "--database", "{db}"], 2, ["2 events", "pass --yes"], 3),
    (["prune", "--before", "last week", "--database", "{db}", "--yes"], 2, ["prune: --before 'last week' is not a time"], 3),
    (["prune", "--before", "2030-01-01", "--database", "typo.db", "--yes"], 2, ["there is no database", "typo.db"], 3),
    (["--database", "typo.db", "export"], 2, ["there is no database", "typo.db"], 3),
    (["--database", "typo.db", "backup", "copy.db"], 2, ["there is no database"], 3),
    (["copy", "--database", "typo.db", "--to", "postgresql://127.0.0.1/x"], 2, ["there is no database"], 3),
    (["export", "--database", "{db}", "--until", "2024-01-15", "--output", "out.csv"], 0, ["exported 1 events"], 3),
    (["export", "--database", "{db}", "--output", "existing.csv"], 2, ["existing.csv exists", "--force"], 3),
    (["export", "--database", "{db}", "--output", "existing.csv", "--force"], 0, ["exported 3 events"], 3),
])
def test_the_command_line_takes_options_anywhere_and_never_creates_or_loses_by_surprise(
        tmp_path, seeded, arguments, status, words, left):
    (tmp_path / "existing.csv").write_text("precious\n")
    result = run_cli(tmp_path, *(argument.replace("{db}", seeded) for argument in arguments))
    assert result.returncode == status, result.stderr
    for word in words:
        assert word in result.stderr
    assert "bad configuration" not in result.stderr and "Traceback" not in result.stderr
    assert count(seeded) == left
    assert not (tmp_path / "typo.db").exists() and not (tmp_path / "copy.db").exists()
    kept = "existing.csv" not in arguments or "--force" not in arguments
    assert ((tmp_path / "existing.csv").read_text() == "precious\n") == kept


def answer_on_a_terminal(arguments, answer, cwd):
    """Run the command line on a pseudo-terminal, answer its question, return (status, output)."""
    import pty
    import select

    terminal, other_end = pty.openpty()
    process = subprocess.Popen([sys.executable, os.path.join(HERE, "pycolytics.py"), *arguments], cwd=cwd,
                               stdin=other_end, stdout=other_end, stderr=other_end, start_new_session=True)
    os.close(other_end)
    output, deadline = b"", time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            if not select.select([terminal], [], [], 1)[0]:
                continue
            try:
                chunk = os.read(terminal, 4096)
            except OSError:  # every writer has gone
                break
            if not chunk:
                break
            output += chunk
            if output.endswith(b"[y/N] "):
                os.write(terminal, answer + b"\n")
    finally:
        os.close(terminal)
    return process.wait(30), output.decode()


@pytest.mark.parametrize("answer, status, left", [(b"n", 1, 3), (b"y", 0, 1)])
def test_prune_on_a_terminal_asks_first_and_deletes_only_on_yes(tmp_path, seeded, answer, status, left):
    code, output = answer_on_a_terminal(["prune", "--before", "2024-02-15", "--database", seeded], answer, tmp_path)
    assert "Delete 2 events from before 2024-02-15" in output
    assert code == status
    assert count(seeded) == left


def test_backup_refuses_to_overwrite_without_force(tmp_path, seeded, sqlite_only):
    (tmp_path / "copy.db").write_text("precious")
    result = run_cli(tmp_path, "backup", "copy.db", "--database", seeded)
    assert result.returncode == 2 and "copy.db exists; pass --force" in result.stderr
    assert (tmp_path / "copy.db").read_text() == "precious"
    result = run_cli(tmp_path, "backup", "copy.db", "--database", seeded, "--force")
    assert result.returncode == 0, result.stderr
    assert count(str(tmp_path / "copy.db")) == 3


def test_copy_to_a_url_that_is_not_postgresql_is_an_argument_error(tmp_path, seeded, sqlite_only):
    result = run_cli(tmp_path, "copy", "--to", "other.db", "--database", seeded)
    assert result.returncode == 2 and "copy: --to 'other.db' is not a postgresql:// URL" in result.stderr
    assert "bad configuration" not in result.stderr and not (tmp_path / "other.db").exists()


def test_every_command_has_a_description_and_the_global_options(capsys):
    for name, (_, _, description, _) in pycolytics.COMMANDS.items():
        with pytest.raises(SystemExit):
            pycolytics.main([name, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert description.split(".")[0] in text, name
        assert "--database FILE_OR_URL" in text and "--config FILE" in text, name


def test_export_csv_neutralises_formula_cells_and_jsonl_keeps_them_exact(client, database, tmp_path):
    dangerous = ["=HYPERLINK(\"http://x\")", "+1", "-2", "@SUM(A1)", "\tx", "\rx"]
    post(client, "/v1.0/events", [event(user_id=text, event_type="plain") for text in dangerous])
    result = run_cli(tmp_path, "--database", database, "export", "--output", "out.csv")
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "out.csv", encoding="utf-8", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [row["user_id"] for row in rows] == ["'" + text for text in dangerous]
    assert {row["event_type"] for row in rows} == {"plain"} and json.loads(rows[0]["value"]) == {"level": 3}
    result = run_cli(tmp_path, "--database", database, "export", "--format", "jsonl")
    assert [json.loads(line)["user_id"] for line in result.stdout.splitlines()] == dangerous


def test_export_into_a_pipe_closed_early_ends_quietly_with_status_0(client, database, tmp_path):
    post(client, "/v1.0/events", [event(user_id=f"player-{n}") for n in range(1000)])
    process = subprocess.Popen([sys.executable, os.path.join(HERE, "pycolytics.py"), "--database", database, "export"],
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout.readline().startswith(b"id,time")
    process.stdout.close()  # as `| head -1` does: far more than a pipe's buffer is still to come
    _, errors = process.communicate(timeout=60)
    assert process.returncode == 0, errors
    assert b"Broken pipe" not in errors and b"ERROR" not in errors and b"Exception" not in errors


def test_a_new_database_is_created_whole_and_only_an_old_one_is_upgraded(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pycolytics")
    pycolytics.connect(str(tmp_path / "new.db")).close()
    assert "upgraded" not in caplog.text
    with sqlite3.connect(tmp_path / "old.db") as old:
        old.executescript(pycolytics.SCHEMA)  # the original's table, without the added columns
    old.close()
    pycolytics.connect(str(tmp_path / "old.db")).close()
    assert "upgraded the database: added the column event.received_at" in caplog.text



def test_a_json_syntax_error_names_its_place_once(client):
    response = client.post("/v1.0/event", b'{"event_type": "tab\x01"}', expect_errors=True)
    assert " at at " not in response.text
    if response.status_int == 400:
        assert "Invalid control character at line 1 column" in response.json["detail"]


# -- The WSGI callable ----------------------------------------------------------------------------


def test_the_module_application_reads_its_config_from_the_environment(tmp_path, monkeypatch, database):
    (tmp_path / "deploy.ini").write_text(f"[pycolytics]\ndatabase = {database}\napi_keys = {KEY}\n")
    monkeypatch.setenv("PYCOLYTICS_CONFIG", str(tmp_path / "deploy.ini"))
    wsgi = pycolytics._LazyApplication()
    try:
        post(webtest.TestApp(wsgi), "/v1.0/event", event())
    finally:
        wsgi._app.close()
    assert count(database) == 1


def test_importing_the_module_opens_and_reads_nothing(tmp_path):
    script = "import pycolytics, threading, sys; print(threading.active_count(), 'sqlite3' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=dict(os.environ, PYTHONPATH=HERE),
                            capture_output=True, text=True, check=True)
    assert result.stdout.split()[0] == "1"
    assert os.listdir(tmp_path) == []


# -- The built-in server, over real sockets --------------------------------------------------------


def built_in_server(app, config):
    """The built-in server of `app` on a free port of 127.0.0.1, with `config`'s limits and certificate."""
    return pycolytics.Server(app, pycolytics.server_limits(config), pycolytics.listening_socket("127.0.0.1", 0),
                             tls=pycolytics.tls_context(config))


@contextlib.contextmanager
def serving(settings, wrap=None, **changes):
    """A built-in server on a free port with these settings changed, stopped when the block ends."""
    config = pycolytics.load_config(environ={}, overrides=dict(settings, **changes))
    app = pycolytics.create_app(config)
    server = built_in_server(wrap(app) if wrap else app, config)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        thread.join(20)
        app.close()
        assert not thread.is_alive(), "the server did not stop"


@pytest.fixture
def server(settings, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with serving(settings) as server:
        yield server


def exchange(server, raw, read_until_close=True):
    with socket.create_connection(server.server_address, timeout=10) as sock:
        sock.sendall(raw)
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
            if not read_until_close and b"\r\n\r\n" in b"".join(chunks):
                break
        return b"".join(chunks)


def test_the_godot_addons_request_byte_for_byte_is_stored(server, database):
    payload = ("[" + GODOT_EVENT + "," + GODOT_QUIRKS + "]").encode()
    host, port = server.server_address
    raw = (
        f"POST /v1.0/events HTTP/1.1\r\nAccept-Encoding: gzip, deflate\r\nHost: {host}:{port}\r\n"
        f"Content-Length: {len(payload)}\r\nUser-Agent: GodotEngine/4.3.stable.official.77dcf97d8 (Linux)\r\n"
        "Accept: */*\r\nConnection: close\r\n\r\n"
    ).encode() + payload
    answer = exchange(server, raw)
    assert answer.startswith(b"HTTP/1.1 204 No Content\r\n")
    assert [row[0] for row in stored(database)] == ["startup", "death"]


def test_keep_alive_serves_many_requests_on_one_connection(server, database):
    connection = http.client.HTTPConnection(*server.server_address, timeout=10)
    for n in range(20):
        connection.request("POST", "/v1.0/event", body(event(event_type=f"k{n}")), {"Content-Type": "application/json"})
        response = connection.getresponse()
        assert (response.status, response.read()) == (204, b"")
    connection.request("POST", "/v1.0/event", b"{", {})
    response = connection.getresponse()
    assert response.status == 400 and "not valid JSON" in json.loads(response.read())["detail"]
    connection.close()
    assert count(database) == 20


def test_http_1_0_clients_are_served_and_closed(server, database):
    payload = body(event())
    answer = exchange(server, b"POST /v1.0/event HTTP/1.0\r\nContent-Length: %d\r\n\r\n%s" % (len(payload), payload))
    assert answer.startswith(b"HTTP/1.1 204") and b"Connection: close" in answer
    assert count(database) == 1


def test_pipelined_requests_are_answered_in_order(server, database):
    one = body(event(event_type="p1"))
    two = body(event(event_type="p2"))
    raw = (b"POST /v1.0/event HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s" % (len(one), one)
           + b"POST /v1.0/event HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(two), two))
    answer = exchange(server, raw)
    assert answer.count(b"HTTP/1.1 204") == 2
    assert [row[0] for row in stored(database)] == ["p1", "p2"]


@contextlib.contextmanager
def database_locked(database):
    """Another program holds the SQLite database's write lock: commits wait until the block ends."""
    blocker = sqlite3.connect(database, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()


def test_a_request_sent_while_the_one_before_is_answered_is_answered_after_it(settings, database, sqlite_only):
    with serving(settings, busy_timeout=30) as server:
        with socket.create_connection(server.server_address, timeout=20) as sock:
            with database_locked(database):
                sock.sendall(one_event_request("first", close=False))
                time.sleep(0.3)  # the first waits for the database now
                before = time.process_time()
                sock.sendall(one_event_request("second"))
                time.sleep(0.5)
                waiting = time.process_time() - before
            answers = read_all(sock)
    assert re.findall(rb"HTTP/1\.1 (\d{3})", answers) == [b"204", b"204"]
    assert waiting < 0.25  # seconds of CPU: the loop sleeps while the second waits (no busy polling)
    assert [row[0] for row in stored(database)] == ["first", "second"]


def test_what_a_client_sends_while_its_request_is_answered_stays_unread_till_then(settings, database, sqlite_only):
    flood = b"POST /v1.0/events HTTP/1.1\r\nHost: t\r\nContent-Length: 99999999\r\n\r\n" + b"[" * (1 << 20)
    with serving(settings, busy_timeout=30) as server:
        with socket.create_connection(server.server_address, timeout=20) as sock:
            with database_locked(database):
                sock.sendall(one_event_request("first", close=False))
                time.sleep(0.3)  # the first waits for the database now
                sock.setblocking(False)
                taken, until = 0, time.monotonic() + 2
                while time.monotonic() < until and taken < 64 * len(flood):
                    try:
                        taken += sock.send(flood)
                    except BlockingIOError:
                        time.sleep(0.01)
                sock.settimeout(20)
            answers = read_all(sock)
            assert normal_client_is_served(server.server_address)
    assert taken < 24 * len(flood)  # what the kernel's buffers hold; a server reading on would take all 64 MiB
    assert re.findall(rb"HTTP/1\.1 (\d{3})", answers) == [b"204", b"413"]
    assert [row[0] for row in stored(database)] == ["first", "normal"]


def test_clients_that_half_close_or_reset_while_answered_leave_the_server_serving(settings, database, sqlite_only):
    """Both make the socket readable while its request waits for the database: the half-closed
    one still gets its answer, and neither is left counted as busy (the stop would wait for it)."""
    with serving(settings, busy_timeout=30) as server:
        half = socket.create_connection(server.server_address, timeout=20)
        reset = socket.create_connection(server.server_address, timeout=20)
        with database_locked(database):
            half.sendall(one_event_request("half", close=False))
            reset.sendall(one_event_request("reset", close=False) + one_event_request("unread"))
            time.sleep(0.3)  # both wait for the database now
            half.shutdown(socket.SHUT_WR)
            reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            reset.close()
            time.sleep(0.3)
        with half:
            assert re.findall(rb"HTTP/1\.1 (\d{3})", read_all(half)) == [b"204"]
        assert normal_client_is_served(server.server_address)
        started = time.monotonic()
    assert time.monotonic() - started < 5
    assert sorted(row[0] for row in stored(database)) == ["half", "normal", "reset"]


def test_answers_waiting_for_a_client_that_does_not_read_hold_up_no_one_and_arrive_whole(settings, database, caplog):
    """18 MB of pipelined answers: far more than the kernel's buffers take, so the loop sends
    each answer as the client makes room, and meanwhile serves everyone else."""
    docs = b"GET /docs HTTP/1.1\r\nHost: t\r\n\r\n"
    with serving(settings) as server:
        one = exchange(server, docs[:-2] + b"Connection: close\r\n\r\n")
        with socket.create_connection(server.server_address, timeout=20) as greedy:
            greedy.sendall(docs * 1999 + docs[:-2] + b"Connection: close\r\n\r\n")
            time.sleep(0.5)  # its answers fill the buffers; it reads none yet
            assert normal_client_is_served(server.server_address)
            answers = read_all(greedy)
    kept_alive = len(one) + len("keep-alive") - len("close")  # the others say Connection: keep-alive
    assert len(answers) == 1999 * kept_alive + len(one) and answers.count(b"HTTP/1.1 200 OK") == 2000
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert count(database) == 1


def test_an_answer_read_too_slowly_is_given_up_after_request_timeout(settings, database):
    """A client that reads an answer a trickle at a time holds its slot request_timeout at most
    from when the server had to wait for it, however steadily it reads (else one byte every few
    seconds would keep a slot for ever)."""
    reading = threading.Event()

    def trickle(sock):
        with contextlib.suppress(OSError):
            while reading.is_set() and sock.recv(256):  # about 2.5 kB a second: an answer (9 kB) takes 4 s
                time.sleep(0.1)

    with serving(settings, request_timeout=1, max_connections=1) as server:
        with socket.socket() as slow:
            slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
            slow.connect(server.server_address)
            slow.settimeout(10)
            slow.sendall(b"GET /docs HTTP/1.1\r\nHost: t\r\n\r\n" * 2000)  # 18 MB of answers: over any buffer
            reading.set()
            reader = threading.Thread(target=trickle, args=(slow,))
            reader.start()
            try:
                time.sleep(0.5)  # the buffers are full: the server waits for the slow reader now
                assert normal_client_is_served(server.server_address, timeout=8)  # its slot was given up
            finally:
                reading.clear()
                reader.join(10)
    assert count(database) == 1


def test_answers_committed_together_each_reach_their_client_without_a_stall(settings, database):
    """Many keep-alive clients at once: the writer thread hands each commit's answers to the
    loop with one wake-up; an answer whose wake-up got lost would wait for the loop's 1 s timeout."""
    slowest, statuses = [], collections.Counter()

    def client(n):
        connection = http.client.HTTPConnection(*server.server_address, timeout=30)
        for i in range(40):
            started = time.monotonic()
            statuses[post_over(connection, event(user_id=f"{n}-{i}"))] += 1
            slowest.append(time.monotonic() - started)
        connection.close()

    with serving(settings) as server:
        threads = [threading.Thread(target=client, args=(n,)) for n in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert statuses == {204: 480}
    assert count(database) == 480
    assert max(slowest) < 0.9  # seconds: no answer waited for the loop's timeout


def test_expect_100_continue_is_honoured(server, database):
    payload = body(event())
    with socket.create_connection(server.server_address, timeout=10) as sock:
        sock.sendall(b"POST /v1.0/event HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nConnection: close\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(payload))
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(payload)
        assert sock.recv(1000).startswith(b"HTTP/1.1 204")
    assert count(database) == 1


@pytest.mark.parametrize("raw, status", [
    (b"POST /v1.0/event HTTP/1.1\r\nHost: t\r\nContent-Length: 99999999\r\n\r\n{", b"413"),
    (b"POST /v1.0/event HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", b"411"),
    (b"POST /v1.0/event HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\nhello", b"400"),
    (b"POST /v1.0/event HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", b"400"),
    (b"POST /v1.0/event HTTP/1.1\r\nHost: t\r\nContent-Length: -5\r\n\r\n", b"400"),
    (b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: t\r\n\r\n", b"414"),
    (b"GET / HTTP/1.1\r\nHost: t\r\n" + b"X-Big: " + b"b" * 9000 + b"\r\n\r\n", b"431"),
    (b"GET / HTTP/1.1\r\nHost: t\r\n" + b"X-Many: 1\r\n" * 101 + b"\r\n", b"431"),
    (b"GET / HTTP/2.0\r\n\r\n", b"505"),
    (b"NONSENSE\r\n\r\n", b"400"),
    (b"GET / HTTP/1.1\r\nHost: t\r\nno colon here\r\n\r\n", b"400"),
], ids=lambda value: value[:24].decode("latin-1") if isinstance(value, bytes) else None)
def test_bad_framing_is_refused_and_the_server_keeps_serving(server, database, raw, status):
    answer = exchange(server, raw)
    assert answer.split(b" ")[1] == status
    assert b'"detail"' in answer
    follow_up = body(event())
    good = exchange(server, b"POST /v1.0/event HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
                    % (len(follow_up), follow_up))
    assert good.startswith(b"HTTP/1.1 204")
    assert count(database) == 1


@pytest.mark.parametrize("origins, origin, allowed", [
    ("https://game.example", b"https://game.example", b"Access-Control-Allow-Origin: https://game.example\r\n"),
    ("https://game.example", b"https://elsewhere.example", None),
    ("*", b"https://elsewhere.example", b"Access-Control-Allow-Origin: *\r\n"),
])
def test_the_servers_own_refusals_are_readable_by_the_pages_that_may_post(settings, origins, origin, allowed):
    """A browser game whose batch is too large, or whose request dawdles, can read why (413, 408):
    the server's own refusals carry the same CORS headers as the application's answers."""
    with serving(settings, cors_origins=origins, request_timeout=1) as server:
        too_large = exchange(server, b"POST /v1.0/events HTTP/1.1\r\nHost: t\r\nOrigin: %s\r\n"
                                     b"Content-Length: 99999999\r\n\r\n[" % origin)
        with socket.create_connection(server.server_address, timeout=10) as sock:
            sock.sendall(b"POST /v1.0/event HTTP/1.1\r\nHost: t\r\nOrigin: %s\r\nContent-Length: 50\r\n\r\n{" % origin)
            too_slow = read_all(sock)
    assert too_large.startswith(b"HTTP/1.1 413") and too_slow.startswith(b"HTTP/1.1 408")
    for answer in (too_large, too_slow):
        head = answer.split(b"\r\n\r\n")[0] + b"\r\n"
        assert (b"Access-Control-Allow-Origin" in head) == (allowed is not None)
        assert allowed is None or allowed in head
        assert b'"detail"' in answer


def test_the_framing_limits_are_settings(settings):
    with serving(settings, max_request_line=100, max_header_fields=3) as server:
        assert exchange(server, b"GET /" + b"a" * 120 + b" HTTP/1.1\r\nHost: t\r\n\r\n").startswith(b"HTTP/1.1 414")
        assert exchange(server, b"GET / HTTP/1.1\r\nHost: t\r\n" + b"X: 1\r\n" * 4 + b"\r\n").startswith(b"HTTP/1.1 431")
        assert exchange(server, b"GET / HTTP/1.1\r\nHost: t\r\n" + b"X: 1\r\n" * 3 + b"Connection: close\r\n\r\n"
                        ).startswith(b"HTTP/1.1 431")
        assert exchange(server, b"GET / HTTP/1.1\r\nHost: t\r\nX: 1\r\nConnection: close\r\n\r\n").startswith(b"HTTP/1.1 200")


def test_many_concurrent_clients_are_all_stored_exactly_once(server, database):
    def client(n):
        connection = http.client.HTTPConnection(*server.server_address, timeout=30)
        statuses = []
        for i in range(25):
            connection.request("POST", "/v1.0/events", body([event(user_id=f"{n}-{i}-{k}") for k in range(4)]))
            response = connection.getresponse()
            response.read()
            statuses.append(response.status)
        connection.close()
        return statuses

    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        statuses = [status for result in pool.map(client, range(24)) for status in result]
    assert statuses == [204] * 600
    assert count(database) == 2400
    assert len({row[0] for row in stored(database, "user_id")}) == 2400


def test_silent_and_trickling_connections_do_not_delay_other_clients(tmp_path, settings, database):
    with serving(settings, threads=2, idle_timeout=1, request_timeout=2) as server:
        talk_past(server)
    assert count(database) == 10


def talk_past(server):
    """Ten normal requests while 200 silent and 20 trickling connections hold their slots."""
    silent = [socket.create_connection(server.server_address) for _ in range(200)]
    tricklers = [socket.create_connection(server.server_address) for _ in range(20)]
    trickling = threading.Event()

    def trickle():
        request = b"POST /v1.0/event HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n" + b"{" * 100
        for byte in range(len(request)):
            for sock in tricklers:
                try:
                    sock.send(request[byte:byte + 1])
                except OSError:
                    return
            if trickling.wait(0.05):
                return

    trickler = threading.Thread(target=trickle)
    trickler.start()
    try:
        payload = body(event())
        for _ in range(10):
            answer = exchange(server, b"POST /v1.0/event HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
                              % (len(payload), payload))
            assert answer.startswith(b"HTTP/1.1 204")
        tricklers[0].settimeout(10)
        assert b"408 Request Timeout" in tricklers[0].recv(1000)  # told, then closed
        silent[0].settimeout(10)
        assert silent[0].recv(1000) == b""  # closed without a word: it never asked anything
    finally:
        trickling.set()
        trickler.join(10)
        for sock in silent + tricklers:
            sock.close()


# -- Hostile clients against a live server -------------------------------------------------------
#
# Each attack runs against the built-in server on 127.0.0.1, and each test then checks the two
# promises that matter: the server is still alive, and a normal client is served meanwhile.


def one_event_request(event_type="normal", path="/v1.0/event", close=True):
    payload = body(event(event_type=event_type))
    return (b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n%s\r\n%s"
            % (path.encode(), len(payload), b"Connection: close\r\n" if close else b"", payload))


def normal_client_is_served(address, event_type="normal", timeout=10, source=None):
    """A well-behaved client posts one event on a new connection; True if it got 204."""
    with socket.create_connection(address, timeout=timeout, source_address=source) as sock:
        sock.sendall(one_event_request(event_type))
        return read_all(sock).startswith(b"HTTP/1.1 204")


def read_all(sock, answers=None):
    """What the server sends until it closes (or until `answers` answers have arrived)."""
    chunks = []
    with contextlib.suppress(socket.timeout, ConnectionError):
        while True:
            data = sock.recv(1 << 20)
            if not data:
                break
            chunks.append(data)
            if answers is not None and b"".join(chunks).count(b"HTTP/1.1 ") >= answers:
                break
    return b"".join(chunks)


def start_configured_server(tmp_path, ini="", **popen):
    """pycolytics.py in a process of its own, with KEY as its key and `ini` added; (process, address)."""
    (tmp_path / "pycolytics.ini").write_text(f"[pycolytics]\napi_keys = {KEY}\n{ini}")
    process = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "pycolytics.py"), "--port", "0", "--config", "pycolytics.ini"],
        cwd=tmp_path, stderr=subprocess.PIPE, text=True, **popen,
    )
    for line in process.stderr:
        found = re.search(r"listening on http://([\d.]+):(\d+)", line)
        if found:
            return process, (found.group(1), int(found.group(2)))
    process.wait(10)
    raise AssertionError("the server did not start")


@contextlib.contextmanager
def stopped_at_the_end(process):
    try:
        yield process
    finally:
        process.kill()
        process.wait(10)
        process.stderr.close()


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as stat:
        user, system = stat.read().rsplit(")", 1)[1].split()[11:13]
    return (int(user) + int(system)) / os.sysconf("SC_CLK_TCK")


def test_a_thousand_pipelined_requests_answered_at_once_are_all_answered_in_order(server, database):
    empty = b"POST /v1.0/events HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n[]"
    unauthorized = (b"POST /v1.0/event HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s"
                    % (len(body(event(api_key="wrong"))), body(event(api_key="wrong"))))
    broken = b"POST /v1.0/event HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\n\r\n{"
    with socket.create_connection(server.server_address, timeout=20) as sock:
        sock.sendall((empty + unauthorized + broken) * 334)
        answers = read_all(sock, answers=1002)
    statuses = re.findall(rb"HTTP/1\.1 (\d{3})", answers)
    assert statuses == [b"204", b"401", b"400"] * 334
    assert normal_client_is_served(server.server_address)
    assert [row[0] for row in stored(database)] == ["normal"]


def test_an_error_while_serving_one_connection_closes_it_and_the_loop_goes_on(settings, database):
    class Exploding:
        """An application whose loop hook fails for one path, as a bug would."""

        def __init__(self, app):
            self.app = app
            self.loop_hooks = types.SimpleNamespace(take=self.take, turn_ended=app.loop_hooks.turn_ended,
                                                    server_answered=app.loop_hooks.server_answered,
                                                    server_trouble=app.loop_hooks.server_trouble)

        def __call__(self, environ, start_response):
            return self.app(environ, start_response)

        def take(self, environ, respond):
            if environ["PATH_INFO"] == "/boom":
                raise RuntimeError("a bug")
            return self.app.loop_hooks.take(environ, respond)

    with serving(settings, wrap=Exploding) as server:
        for _ in range(3):
            with socket.create_connection(server.server_address, timeout=10) as sock:
                sock.sendall(b"GET /boom HTTP/1.1\r\nHost: t\r\n\r\n")
                assert read_all(sock) == b""  # closed without an answer
        assert normal_client_is_served(server.server_address)
    assert count(database) == 1


def test_a_middleware_in_between_turns_the_loop_hook_off_and_everything_still_works(settings, database):
    def middleware(app):
        def call(environ, start_response):
            return app(environ, start_response)
        return call

    with serving(settings, wrap=middleware) as server:
        assert normal_client_is_served(server.server_address)
        docs = exchange(server, b"GET /docs HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        assert docs.startswith(b"HTTP/1.1 200") and b"<html" in docs
    assert count(database) == 1


def test_a_query_string_or_percent_encoding_never_sends_events_to_a_worker_thread(settings, database, sqlite_only):
    with serving(settings, threads=1, busy_timeout=20) as server:
        blocker = sqlite3.connect(database, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # the writer now waits for the lock
        try:
            posts = [socket.create_connection(server.server_address, timeout=30) for _ in range(3)]
            for sock, path in zip(posts, ["/v1.0/event?source=web", "/v1.0/%65vent", "/v1.0/event?x=%00"]):
                sock.sendall(one_event_request(path=path))
            time.sleep(0.5)  # the posts wait for the database now; were one in the only worker thread...
            with socket.create_connection(server.server_address, timeout=10) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                health = read_all(sock)  # ...this would wait for the lock too, and time out
            assert health.startswith((b"HTTP/1.1 200", b"HTTP/1.1 503"))
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert [read_all(sock)[:12] for sock in posts] == [b"HTTP/1.1 204"] * 3
        for sock in posts:
            sock.close()
    assert count(database) == 3


def test_a_broken_stderr_does_not_stop_the_server(tmp_path):
    process, address = start_configured_server(tmp_path)  # access log on: every request writes a line
    with stopped_at_the_end(process):
        process.stderr.close()  # as when `| tee` dies: every write to stderr now fails
        for n in range(20):
            assert normal_client_is_served(address, f"e{n}")
        assert process.poll() is None


def test_a_stderr_nobody_reads_does_not_block_the_server(tmp_path):
    process, address = start_configured_server(tmp_path)  # nobody reads its stderr from here on
    with stopped_at_the_end(process):
        request = one_event_request(close=False)
        with socket.create_connection(address, timeout=20) as sock:  # 3,000 log lines: far over a pipe's 64 KiB
            for _ in range(30):
                sock.sendall(request * 100)
                assert read_all(sock, answers=100).count(b"HTTP/1.1 204") == 100


def test_tls_connections_reset_right_after_connect_do_not_stop_the_server(tmp_path, settings, database):
    certificate, key = make_certificate(tmp_path)
    import ssl

    with serving(settings, certfile=certificate, keyfile=key) as server:
        for _ in range(30):
            sock = socket.create_connection(server.server_address)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # a reset, before any handshake
        context = ssl.create_default_context(cafile=certificate)
        connection = http.client.HTTPSConnection(*server.server_address, context=context, timeout=10)
        connection.request("POST", "/v1.0/event", body(event()))
        assert connection.getresponse().status == 204
        connection.close()
    assert count(database) == 1


def test_blank_lines_cannot_keep_a_connection_open_past_request_timeout(settings):
    with serving(settings, request_timeout=1, idle_timeout=1) as server:
        with socket.create_connection(server.server_address, timeout=10) as sock:
            closed = False
            for _ in range(8):  # one blank line every 0.4 s: each one used to re-arm the deadline
                try:
                    sock.sendall(b"\r\n")
                except OSError:
                    closed = True
                    break
                time.sleep(0.4)
            closed = closed or read_all(sock) == b""
        assert closed
        with socket.create_connection(server.server_address, timeout=10) as sock:
            sock.sendall(b"\r\n" * (pycolytics.MAX_BLANK_LINES + 1) + b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            answer = read_all(sock)
        assert answer.startswith(b"HTTP/1.1 400") and b"blank lines" in answer
        assert normal_client_is_served(server.server_address)


def test_one_address_cannot_take_more_than_its_share_of_connections(settings, database):
    with serving(settings, max_connections_per_address=5) as server:
        attackers = [socket.create_connection(server.server_address, source_address=("127.0.0.2", 0))
                     for _ in range(5)]
        try:
            with socket.create_connection(server.server_address, timeout=10,
                                          source_address=("127.0.0.2", 0)) as sixth:
                answer = read_all(sixth)
            assert answer.startswith(b"HTTP/1.1 503") and b"Retry-After: 5\r\n" in answer
            assert b"Access-Control-Allow-Origin: *" in answer  # a browser game may read why
            assert "max_connections_per_address = 5" in json.loads(answer.split(b"\r\n\r\n", 1)[1])["detail"]
            assert normal_client_is_served(server.server_address, source=("127.0.0.3", 0))
            attackers.pop().close()  # a slot of its own frees up again
            time.sleep(0.2)
            assert normal_client_is_served(server.server_address, "again", source=("127.0.0.2", 0))
        finally:
            for sock in attackers:
                sock.close()
    assert count(database) == 2


def test_when_every_slot_is_taken_the_longest_waiting_connection_makes_room(settings, database):
    with serving(settings, max_connections=10, idle_timeout=60, request_timeout=60) as server:
        silent = [socket.create_connection(server.server_address, timeout=10, source_address=(f"127.0.1.{n}", 0))
                  for n in range(10)]
        try:
            time.sleep(0.2)
            assert normal_client_is_served(server.server_address)
            assert read_all(silent[0]) == b""  # the oldest silent connection was closed for it
        finally:
            for sock in silent:
                sock.close()
    assert count(database) == 1


def test_when_slow_requests_hold_every_slot_the_oldest_makes_room_with_a_408(settings, database):
    with serving(settings, max_connections=4, request_timeout=60) as server:
        holders = [socket.create_connection(server.server_address, timeout=20, source_address=(f"127.0.5.{n}", 0))
                   for n in range(4)]
        try:
            for sock in holders:
                sock.sendall(b"POST /v1.0/event HTTP/1.1\r\nHost: t\r\n")  # and never the rest
            assert normal_client_is_served(server.server_address, timeout=20)  # not after request_timeout
            assert b"408 Request Timeout" in read_all(holders[0])
        finally:
            for sock in holders:
                sock.close()
    assert count(database) == 1


def test_events_waiting_for_the_database_are_bounded_in_bytes_too(settings, database, sqlite_only):
    batch = [event(value={"blob": "x" * 60_000}, user_id=str(n)) for n in range(2)]
    compressed = gzip.compress(body(batch))  # a kilobyte on the wire, 120 kB of values once read
    request = (b"POST /v1.0/events HTTP/1.1\r\nHost: t\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s"
               % (len(compressed), compressed))
    with serving(settings, max_buffered_bytes=300_000, busy_timeout=30) as server:
        blocker = sqlite3.connect(database, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # the writer waits: everything posted now queues
        try:
            posts = []
            for _ in range(5):
                posts.append(socket.create_connection(server.server_address, timeout=20))
                posts[-1].sendall(request)
                time.sleep(0.3)
            refused = [read_all(sock, answers=1) for sock in posts[3:]]  # answered before the lock goes
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        stored_ones = [read_all(sock, answers=1) for sock in posts[:3]]
        for sock in posts:
            sock.close()
    assert all(answer.startswith(b"HTTP/1.1 503") and b"Retry-After: " in answer for answer in refused)
    assert [answer[:12] for answer in stored_ones] == [b"HTTP/1.1 204"] * 3
    assert count(database) == 6


def test_a_newcomer_is_never_closed_unread_to_make_room_for_the_next(settings, database):
    with serving(settings, max_connections=2, request_timeout=30) as server:
        with socket.create_connection(server.server_address, timeout=10) as holder:
            holder.sendall(b"POST /v1.0/event HTTP/1.1\r\nHost: t\r\n")  # half a head: it holds a slot
            time.sleep(0.2)
            first = socket.create_connection(server.server_address, timeout=10)
            time.sleep(0.2)  # the server has accepted it, and has nothing of it to read yet
            second = socket.create_connection(server.server_address, timeout=10)
            with first, second:
                first.sendall(one_event_request("first"))
                second.sendall(one_event_request("second"))
                answers = [read_all(first), read_all(second)]
    assert [answer[:12] for answer in answers] == [b"HTTP/1.1 204"] * 2
    assert sorted(row[0] for row in stored(database)) == ["first", "second"]


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as status:
        return int(re.search(r"VmRSS:\s+(\d+)", status.read()).group(1))


def test_bodies_over_the_buffer_budget_get_503_and_memory_stays_bounded(tmp_path):
    process, address = start_configured_server(tmp_path, "max_buffered_bytes = 8388608\nquiet = yes\n")
    with stopped_at_the_end(process):
        before = rss_kib(process.pid)
        head = b"POST /v1.0/events HTTP/1.1\r\nHost: t\r\nContent-Length: 1048576\r\n\r\n"
        hogs = []
        for n in range(40):  # 40 MiB announced, 8 MiB allowed: the rest are refused before they are read
            sock = socket.create_connection(address, timeout=10, source_address=(f"127.0.2.{n}", 0))
            with contextlib.suppress(OSError):
                sock.sendall(head + b"[" + b" " * 1_040_000)
            hogs.append(sock)
        assert normal_client_is_served(address)  # small bodies are still taken meanwhile
        grown = rss_kib(process.pid) - before
        answers = []
        for sock in hogs:
            sock.settimeout(0.5)
            answers.append(read_all(sock, answers=1))
            sock.close()
        refused = [answer for answer in answers if answer.startswith(b"HTTP/1.1 503")]
        assert len(refused) == 32 and all(b"Retry-After: " in answer for answer in refused)
        assert grown < 24 * 1024, f"RSS grew by {grown} KiB while 40 bodies were announced"
        assert process.poll() is None


def test_out_of_file_descriptors_the_server_pauses_accepting_and_recovers(tmp_path):
    import resource

    def few_descriptors():
        resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))

    process, address = start_configured_server(tmp_path, "quiet = yes\n", preexec_fn=few_descriptors)
    with stopped_at_the_end(process):
        crowd = [socket.create_connection(address, timeout=10, source_address=(f"127.0.3.{n}", 0))
                 for n in range(100)]
        time.sleep(0.5)
        spent = cpu_seconds(process.pid)
        time.sleep(2)
        spent = cpu_seconds(process.pid) - spent
        assert spent < 0.5, f"the loop spun: {spent:.2f} s of CPU in 2 s"  # it used to take a whole core
        for sock in crowd:
            sock.close()
        deadline = time.monotonic() + 15
        while not normal_client_is_served(address):  # it recovers by itself once descriptors are free
            assert time.monotonic() < deadline, "the server did not recover"
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
        log = process.stderr.read()
        assert 1 <= log.count("cannot accept connections") <= 5, log[:2000]


@pytest.mark.parametrize("raw, words", [
    (b"GET / HTTP/1.1\r\nHost: t\nX-Smuggled: 1\r\n\r\n", "CRLF"),
    (b"GET / HTTP/1.1\r\nHost: t\r\nX-Smuggled: a\rb\r\n\r\n", "CRLF"),
    (b"GET / HTTP/1.1\r\nHost: t\r\nX-Nul: a\x00b\r\n\r\n", "control"),
    (b"GET / HTTP/1.1\r\nHost: t\r\nX-Escape: \x1b[31m\r\n\r\n", "control"),
    (b"GET / HTTP/1.1\r\nHost: t\r\nBad Name: 1\r\n\r\n", "malformed header"),
    (b"GET / HTTP/1.1\r\nHost: t\r\n Folded: 1\r\n\r\n", "malformed header"),
    (b"GET / HTTP/1.1\r\n\r\n", "Host"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "Host"),
    (b"GET\x01 / HTTP/1.1\r\nHost: t\r\n\r\n", "control"),
    (b"G(T / HTTP/1.1\r\nHost: t\r\n\r\n", "request line"),
    (b"GET ftp://host/ HTTP/1.1\r\nHost: t\r\n\r\n", "request target"),
    (b"GET * HTTP/1.1\r\nHost: t\r\n\r\n", "request target"),
], ids=["bare-LF", "bare-CR", "NUL", "ESC", "space-in-name", "obs-fold", "no-Host", "two-Hosts",
        "control-in-method", "bad-method", "ftp-target", "asterisk-not-OPTIONS"])
def test_framing_as_strict_as_rfc_9112_asks(server, database, raw, words):
    answer = exchange(server, raw)
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert words in json.loads(answer.split(b"\r\n\r\n", 1)[1])["detail"]
    assert normal_client_is_served(server.server_address)
    assert count(database) == 1


def test_an_http_1_0_client_is_never_sent_100_continue(server, database):
    payload = body(event())
    with socket.create_connection(server.server_address, timeout=10) as sock:
        sock.sendall(b"POST /v1.0/event HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(payload))
        sock.settimeout(0.5)
        with pytest.raises(socket.timeout):
            sock.recv(100)  # RFC 9110: a 1.0 client would take "100 Continue" for its answer
        sock.settimeout(10)
        sock.sendall(payload)
        assert read_all(sock).startswith(b"HTTP/1.1 204")
    assert count(database) == 1


def test_absolute_form_targets_are_served_as_their_path(server, database):
    docs = exchange(server, b"GET http://collector.example/docs HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert docs.startswith(b"HTTP/1.1 200") and b"<html" in docs
    answer = exchange(server, one_event_request(path="http://collector.example/v1.0/event?from=proxy"))
    assert answer.startswith(b"HTTP/1.1 204")
    assert count(database) == 1


def test_options_asterisk_is_answered_by_the_server(server):
    answer = exchange(server, b"OPTIONS * HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\nAllow: GET, HEAD, POST, OPTIONS\r\n" in answer and b"\r\nContent-Length: 0\r\n" in answer


def test_answers_the_server_gives_itself_are_counted_in_metrics(server):
    for raw in (b"GET / HTTP/1.1\r\n\r\n", b"GET / HTTP/1.1\r\nHost: t\r\n" + b"X: 1\r\n" * 101 + b"\r\n",
                b"OPTIONS * HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"):
        exchange(server, raw)
    metrics = exchange(server, b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").decode()
    assert 'pycolytics_requests_total{status="400"} 1' in metrics
    assert 'pycolytics_requests_total{status="431"} 1' in metrics
    assert 'pycolytics_requests_total{status="200"} 1' in metrics  # OPTIONS *; /metrics counts itself after


def test_the_access_log_escapes_control_characters_and_names_the_forwarded_client(settings):
    with serving(settings, quiet="no") as server:
        lines = []
        server.log = types.SimpleNamespace(write=lines.append)
        exchange(server, b"GET /\x9b31m\xff HTTP/1.1\r\nHost: t\r\nX-Forwarded-For: 203.0.113.9\r\n"
                         b"Connection: close\r\n\r\n")
        exchange(server, b"GET /docs HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert len(lines) == 2
    assert lines[0].startswith("203.0.113.9 - - [")  # 127.0.0.1 is a trusted proxy by default
    assert '"GET /\\x9b31m\xff HTTP/1.1" 404' in lines[0]
    assert all(line.count("\n") == 1 and "\x9b" not in line for line in lines)


def test_healthz_reports_the_servers_own_trouble(client):
    client.app.loop_hooks.server_trouble("out of file descriptors")  # as the built-in server says it
    answer = client.get("/healthz", status=503)
    assert answer.json["status"] == "unavailable" and "file descriptors" in answer.json["server"]
    client.app.loop_hooks.server_trouble(None)
    assert client.get("/healthz").json["status"] == "ok"


# -- PEP 3333, checked by wsgiref itself ---------------------------------------------------------

UNUSUAL_REQUESTS = [
    b"GET / HTTP/1.1\r\nHost: t\r\n\r\n",
    b"HEAD /docs HTTP/1.1\r\nHost: t\r\n\r\n",
    b"GET /openapi.json?x=1&y=%20 HTTP/1.1\r\nHost: t\r\n\r\n",
    b"GET http://t/docs HTTP/1.1\r\nHost: t\r\n\r\n",
    b"GET /%64ocs HTTP/1.1\r\nHost: t\r\n\r\n",
    b"GET /nowhere HTTP/1.1\r\nHost: t\r\n\r\n",
    b"DELETE /docs HTTP/1.1\r\nHost: t\r\n\r\n",
    b"OPTIONS /v1.0/events HTTP/1.1\r\nHost: t\r\nOrigin: https://game.example\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n",
    b"GET /dashboard HTTP/1.1\r\nHost: t\r\n\r\n",
]


def post_request(path, document, headers=b""):
    payload = body(document)
    return b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n%s\r\n%s" % (path, len(payload), headers, payload)


class Validated:
    """The application behind wsgiref's PEP 3333 checker; any warning it gives fails the request.

    With `hooked`, the loop hook is offered too, and the environ it gets is checked the same way.
    """

    def __init__(self, app, hooked=False):
        self.app = app
        self.checked = wsgiref.validate.validator(app)
        if hooked:
            self.loop_hooks = types.SimpleNamespace(take=self._take, turn_ended=app.loop_hooks.turn_ended,
                                                    server_answered=app.loop_hooks.server_answered,
                                                    server_trouble=app.loop_hooks.server_trouble)

    def __call__(self, environ, start_response):
        with warnings.catch_warnings():
            warnings.simplefilter("error", wsgiref.validate.WSGIWarning)
            chunks = self.checked(environ, start_response)
            try:
                return [b"".join(chunks)]
            finally:
                chunks.close()

    def _take(self, environ, respond):
        with warnings.catch_warnings():
            warnings.simplefilter("error", wsgiref.validate.WSGIWarning)
            wsgiref.validate.check_environ(environ)
        return self.app.loop_hooks.take(environ, respond)


@pytest.mark.parametrize("hooked", [False, True], ids=["plain-wsgi", "loop-hook"])
def test_the_built_in_server_passes_wsgirefs_validator(settings, database, hooked):
    requests = UNUSUAL_REQUESTS + [
        post_request(b"/v1.0/event?source=web", event()),
        post_request(b"/v1.0/events", [event(), event()], b"Content-Type: application/json\r\n"),
        post_request(b"/v1.0/event", event(api_key="wrong")),
    ]
    with serving(settings, wrap=functools.partial(Validated, hooked=hooked)) as server:
        with socket.create_connection(server.server_address, timeout=20) as sock:
            sock.sendall(b"".join(requests) + b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            answers = read_all(sock)
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) [^\r\n]*\r\nDate: ", answers)
    assert statuses == [b"200", b"200", b"200", b"200", b"200", b"404", b"405", b"204", b"200", b"200", b"403",
                        b"204", b"204", b"401", b"200"]
    assert count(database) == 3


def test_the_application_passes_wsgirefs_validator_under_wsgiref_simple_server(app, database):
    import wsgiref.simple_server

    class Quiet(wsgiref.simple_server.WSGIRequestHandler):
        def log_message(self, *args):
            pass

    httpd = wsgiref.simple_server.make_server("127.0.0.1", 0, Validated(app), handler_class=Quiet)
    thread = threading.Thread(target=httpd.serve_forever)
    thread.start()
    try:
        connection = http.client.HTTPConnection(*httpd.server_address, timeout=10)
        for method, path, payload, status in [
            ("GET", "/docs", None, 200), ("HEAD", "/openapi.json", None, 200), ("GET", "/x?y", None, 404),
            ("POST", "/v1.0/event?source=web", body(event()), 204), ("POST", "/v1.0/events", b"{", 400),
            ("OPTIONS", "/v1.0/event", None, 204), ("GET", "/healthz", None, 200),
        ]:
            connection.request(method, path, payload)
            response = connection.getresponse()
            response.read()
            assert response.status == status, (method, path)
            connection.close()
    finally:
        httpd.shutdown()
        thread.join(10)
        httpd.server_close()
    assert count(database) == 1


# One table of requests, each asked of the WSGI callable (as gunicorn would) and of the built-in
# server over a socket (through the loop hooks): the same status, headers and body, and the same
# rows in each one's database afterwards.
_SAME_ANSWER_HEADERS = ("content-type", "allow", "retry-after", "www-authenticate", "etag", "cache-control",
                        "access-control-allow-origin", "access-control-allow-methods", "access-control-allow-headers",
                        "access-control-expose-headers", "pycolytics-next-after-id")
_ETAG = f'"{binascii.crc32(pycolytics.CLIENT_JS.encode()):08x}"'
_WRITER = {"Authorization": f"Bearer {KEY}"}
# Events at fixed times (today's, so that the default range shows them): session lengths alike
_TODAY = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
_dated = functools.partial(event, timestamp=_TODAY + "T06:00:00Z")
SAME_ANSWER_REQUESTS = [
    ("POST", "/v1.0/event", {}, body(_dated())),
    ("POST", "/v1.0/events", {"Content-Type": "application/json"}, body([_dated(user_id="a"), _dated(user_id="b")])),
    ("POST", "/v1.0/events", {"Content-Encoding": "gzip"}, gzip.compress(body([_dated(user_id="gz")]))),
    ("POST", "/v1.0/event", {}, b"{"),
    ("POST", "/v1.0/event", {}, body(_dated(api_key="wrong-key-0123456789"))),
    ("POST", "/v1.0/events", {}, body([_dated(), _dated(user_id=3)])),
    ("POST", "/v1.0/event", {"Content-Encoding": "br"}, body(_dated())),
    ("POST", "/v1.0/event", {}, body(_dated(value={"pad": "x" * 5000}))),
    ("POST", "/v1.0/event", {}, b""),
    ("GET", "/nowhere", {}, None),
    ("DELETE", "/v1.0/event", {}, None),
    ("OPTIONS", "/v1.0/events", {"Origin": "https://game.example", "Access-Control-Request-Method": "POST"}, None),
    ("GET", "/v1.0/client.js", {}, None),
    ("GET", "/v1.0/client.js", {"If-None-Match": _ETAG}, None),
    ("HEAD", "/docs", {}, None),
    ("GET", "/openapi.json", {}, None),
    ("GET", "/healthz", {}, None),
    ("GET", "/v1.0/report", {}, None),
    ("GET", "/v1.0/report", _WRITER, None),
    ("GET", "/v1.0/report?since=2024-13-01", READER, None),
    ("GET", "/v1.0/report?application=my-game", READER, None),
    ("GET", "/v1.0/report/values?application=my-game&event_type=level_started&field=level", READER, None),
    ("GET", "/v1.0/report/stickiness?application=my-game&format=csv", READER, None),
    ("GET", "/dashboard?application=my-game", READER, None),
    ("POST", "/v1.0/player/erase", READER, body({"user_id": "a"})),
    ("POST", "/v1.0/player/erase", ADMIN, body({"user": "a"})),
    ("POST", "/v1.0/player/erase", ADMIN, body({"user_id": "a", "application": "my-game"})),
    ("POST", "/v1.0/player/erase", ADMIN, body({"user_id": "a"})),
]


def wsgi_answer(app, method, path, headers, payload, host="127.0.0.1"):
    """(status, {header: value}, body) of one request to the WSGI callable, as if sent to `host`."""
    environ = {"REQUEST_METHOD": method, "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "80", "REMOTE_ADDR": "127.0.0.1",
               "SERVER_PROTOCOL": "HTTP/1.1", "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(payload or b""),
               "wsgi.errors": io.StringIO(), "HTTP_HOST": host}
    environ["PATH_INFO"], _, environ["QUERY_STRING"] = path.partition("?")
    if payload is not None:
        environ["CONTENT_LENGTH"] = str(len(payload))
    for name, value in headers.items():
        key = name.upper().replace("-", "_")
        environ[key if key == "CONTENT_TYPE" else "HTTP_" + key] = value
    answer = []
    data = b"".join(app(environ, lambda status, listed, exc_info=None: answer.append((status, listed))))
    status, listed = answer[0]
    return int(status.split()[0]), {name.lower(): value for name, value in listed}, data


def server_answer(address, method, path, headers, payload):
    """(status, {header: value}, body) of one request to the built-in server, on a new connection."""
    connection = http.client.HTTPConnection(*address, timeout=20)
    try:
        connection.request(method, path, payload, headers)
        response = connection.getresponse()
        return response.status, {name.lower(): value for name, value in response.getheaders()}, response.read()
    finally:
        connection.close()


def test_the_wsgi_callable_and_the_built_in_server_give_the_same_answers(tmp_path, monkeypatch, make_app, sqlite_only):
    monkeypatch.chdir(tmp_path)
    settings = {"api_keys": KEY, "quiet": "yes", "read_keys": "reader-key", "admin_keys": "admin-key-for-testing",
                "max_body_bytes": "4096", "cors_origins": "https://game.example"}
    wsgi_database, server_database = str(tmp_path / "wsgi.db"), str(tmp_path / "server.db")
    app = make_app(pycolytics.load_config(environ={}, overrides=dict(settings, database=wsgi_database)))
    statuses = []
    with serving(dict(settings, database=server_database)) as server:
        for method, path, headers, payload in SAME_ANSWER_REQUESTS:
            direct = wsgi_answer(app, method, path, headers, payload, "%s:%d" % server.server_address)
            statuses.append(direct[0])
            served = server_answer(server.server_address, method, path, headers, payload)
            kept = [(answer[0], {name: answer[1][name] for name in _SAME_ANSWER_HEADERS if name in answer[1]},
                     re.sub(rb"drawn in \d+ ms", b"drawn in - ms", answer[2])) for answer in (direct, served)]
            assert kept[0] == kept[1], (method, path)
    assert statuses == [204, 204, 204, 400, 401, 422, 415, 413, 400, 404, 405, 204, 200, 304, 200, 200, 200, 401, 403,
                        400, 200, 200, 200, 200, 403, 422, 200, 200]
    columns = "event_type, application, version, platform, user_id, session_id, value"
    assert stored(wsgi_database, columns) == stored(server_database, columns)
    assert [row[4] for row in stored(server_database, columns)] == ["3f2a9c1e", "b", "gz"]


# -- HTTP framing, fuzzed against a live server --------------------------------------------------

_HEAD_PARTS = st.sampled_from([
    b"GET", b"POST", b"HEAD", b"OPTIONS", b"PUT", b"G\x00T", b" ", b"/", b"/v1.0/event", b"/v1.0/events",
    b"http://h/v1.0/event", b"*", b"?a=%00", b"%2e%2e", b" HTTP/1.1", b" HTTP/1.0", b" HTTP/2", b"\r\n", b"\n",
    b"\r", b"Host: t", b"Host:", b"Content-Length: 2", b"Content-Length: 99999999", b"Content-Length: -1",
    b"Content-Length: 2, 2", b"Transfer-Encoding: chunked", b"Expect: 100-continue", b"Connection: close",
    b"Connection: keep-alive", b"Content-Encoding: gzip", b"X-Forwarded-For: 1.2.3.4", b":", b"\t", b"\xff",
    b"[]", b"{}", b"\r\n\r\n",
])


@hypothesis.settings(max_examples=150, deadline=None, suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(parts=st.lists(st.one_of(_HEAD_PARTS, st.binary(max_size=20)), max_size=40),
                  cuts=st.lists(st.integers(0, 400), max_size=4))
def test_any_bytes_get_a_well_formed_answer_or_a_close_and_never_a_5xx(fuzzed_server, parts, cuts):
    data = b"".join(parts)
    with socket.create_connection(fuzzed_server.server_address, timeout=10) as sock:
        start = 0
        for cut in sorted(cuts) + [len(data)]:  # the same bytes, split where hypothesis says
            with contextlib.suppress(OSError):
                sock.sendall(data[start:cut])
            start = max(start, cut)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
        answers = read_all(sock)
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) [A-Z]", answers)
    assert len(statuses) == answers.count(b"HTTP/1.1 ")
    assert [status for status in statuses if status[:1] not in b"124"] == []
    assert normal_client_is_served(fuzzed_server.server_address)


@pytest.fixture(scope="module")
def fuzzed_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzzed")
    settings = {"database": str(folder / "events.db"), "api_keys": KEY, "quiet": "yes", "request_timeout": "2"}
    with serving(settings) as server:
        yield server


# -- The command line and signals ---------------------------------------------------------------


def start_server(tmp_path, *arguments, environ=None):
    process = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "pycolytics.py"), "--port", "0", *arguments],
        cwd=tmp_path, stderr=subprocess.PIPE, text=True, env=environ or dict(os.environ),
    )
    lines = []
    for line in process.stderr:
        lines.append(line)
        found = re.search(r"listening on http://([\d.]+):(\d+) \(database: (.*)\)", line)
        if found:
            return process, (found.group(1), int(found.group(2))), found.group(3), lines
    process.wait(10)
    raise AssertionError("the server did not start:\n" + "".join(lines))


def test_the_readme_start_command_works_with_defaults(tmp_path):
    process, address, path, lines = start_server(tmp_path)
    try:
        assert path == str(tmp_path / "pycolytics.db")
        assert any("development key" in line for line in lines)
        connection = http.client.HTTPConnection(*address, timeout=10)
        connection.request("POST", "/v1.0/event", body(event(api_key=pycolytics.DEV_KEY)))
        assert connection.getresponse().status == 204
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
    assert count(path) == 1


def documented_commands():
    """Every `python3 pycolytics.py ...` that README.md and docs/ tell a reader to type, as words
    (up to the end of its code span or line; synopses with [optional] parts and COMMAND left out)."""
    found = []
    for name in ["README.md"] + sorted(f"docs/{page}" for page in os.listdir(os.path.join(HERE, "docs"))):
        with open(os.path.join(HERE, name), encoding="utf-8") as file:
            for text in re.findall(r"python3 pycolytics\.py([^`\n]*)", file.read()):
                text = re.split(r"[,;]| or | with ", text)[0]
                if "[" not in text and "COMMAND" not in text:
                    found.append((name, shlex.split(text)))
    return found


def test_every_command_in_the_readme_and_docs_is_one_the_command_line_takes():
    commands = documented_commands()
    assert len({" ".join(words) for _, words in commands}) >= 10
    assert {word for _, words in commands for word in words if word in pycolytics.COMMANDS} == set(pycolytics.COMMANDS)
    for page, words in commands:
        try:
            pycolytics._parser().parse_args(words)
        except SystemExit as exit:  # --help exits 0 after printing; a wrong command or option exits 2
            assert exit.code == 0, f"{page}: python3 pycolytics.py {' '.join(words)}"


def test_sigterm_finishes_acknowledged_requests_and_exits_0(tmp_path):
    process, address, path, _ = start_server(tmp_path, "--quiet", "--database", "events.db")
    acknowledged = []
    stop = threading.Event()

    def client(n):
        i = 0
        while not stop.is_set():
            try:
                connection = http.client.HTTPConnection(*address, timeout=10)
                connection.request("POST", "/v1.0/events", body([event(user_id=f"{n}-{i}", api_key=pycolytics.DEV_KEY)] * 3))
                if connection.getresponse().status == 204:
                    acknowledged.append(3)
                connection.close()
            except OSError:
                return
            i += 1

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    time.sleep(1)
    process.send_signal(signal.SIGTERM)
    assert process.wait(15) == 0
    stop.set()
    for thread in threads:
        thread.join(15)
    assert sum(acknowledged) > 0
    assert count(path) >= sum(acknowledged)
    assert count(path) % 3 == 0  # batches are whole


def test_two_server_processes_share_one_database_without_errors(tmp_path):
    one = start_server(tmp_path, "--quiet", "--database", "shared.db")
    two = start_server(tmp_path, "--quiet", "--database", "shared.db")
    try:
        def client(n):
            address = (one if n % 2 else two)[1]
            connection = http.client.HTTPConnection(*address, timeout=60)
            statuses = []
            for i in range(20):
                connection.request("POST", "/v1.0/events", body([event(user_id=f"{n}-{i}", api_key=pycolytics.DEV_KEY)] * 5))
                response = connection.getresponse()
                response.read()
                statuses.append(response.status)
            return statuses

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            statuses = [status for result in pool.map(client, range(16)) for status in result]
    finally:
        for process, *_ in (one, two):
            process.send_signal(signal.SIGTERM)
            assert process.wait(15) == 0
    assert statuses == [204] * 320
    assert count(str(tmp_path / "shared.db")) == 1600


def test_help_explains_the_options():
    result = subprocess.run([sys.executable, os.path.join(HERE, "pycolytics.py"), "--help"],
                            capture_output=True, text=True, check=True)
    for word in ("--config", "--host", "--port", "PYCOLYTICS_", "pycolytics.ini"):
        assert word in result.stdout


def test_a_bad_configuration_stops_start_up_with_exit_2(tmp_path):
    (tmp_path / "pycolytics.ini").write_text("[pycolytics]\nport = x\n")
    result = subprocess.run([sys.executable, os.path.join(HERE, "pycolytics.py")], cwd=tmp_path,
                            capture_output=True, text=True, timeout=20)
    assert result.returncode == 2
    assert "port = 'x' is not valid" in result.stderr


# -- Every core: several worker processes -------------------------------------------------------------


def children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as file:
        return [int(child) for child in file.read().split()]


def test_a_configuration_that_still_says_workers_starts_one_process_and_says_why(tmp_path):
    (tmp_path / "pycolytics.ini").write_text(f"[pycolytics]\nworkers = 2\napi_keys = {KEY}\n")
    process, address, database, lines = start_server(tmp_path, "--quiet", "--database", "events.db")
    try:
        assert normal_client_is_served(address)
        assert children(process.pid) == []
        assert any("workers = 2: no longer used" in line for line in lines)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0


# -- Behind nginx, and under a path prefix ---------------------------------------------------------


def mounted(prefix, app):
    """A WSGI dispatcher, as uwsgi's `mount` or werkzeug's DispatcherMiddleware: `app` under `prefix`."""

    def dispatch(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path != prefix and not path.startswith(prefix + "/"):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"outside the mount"]
        environ["SCRIPT_NAME"] = environ.get("SCRIPT_NAME", "") + prefix
        environ["PATH_INFO"] = path[len(prefix):]
        return app(environ, start_response)

    return dispatch


def links(response):
    """Every URL a page names: href and action in HTML, the curl example, path-like strings and servers in JSON."""
    if response.content_type == "text/html":
        text = response.text
        found = re.findall(r'(?:href|action)="([^"]*)"', text) + re.findall(r"curl -i (\S+)", text)
        return [html.unescape(link) for link in found]
    document = response.json
    found = [value for value in document.values() if isinstance(value, str) and value.startswith("/")]
    for server in document.get("servers", []):
        found += [server["url"] + path for path in document["paths"]]
    return found


def test_every_page_and_link_resolves_under_a_wsgi_mount(tmp_path, monkeypatch, make_app):
    from urllib.parse import urljoin, urlsplit

    monkeypatch.chdir(tmp_path)
    config = pycolytics.load_config(environ={}, overrides={"database": "events.db", "api_keys": KEY,
                                                           "read_keys": "reader-key", "quiet": "yes"})
    app = make_app(config)
    client = webtest.TestApp(mounted("/analytics", app))
    client.authorization = ("Basic", ("viewer", "reader-key"))
    seen, waiting = set(), ["http://localhost:80/analytics", "http://localhost:80/analytics/"]
    while waiting:
        assert len(seen) < 50, seen  # the pages name a handful of addresses, not an endless chain
        url = waiting.pop()
        if url in seen:
            continue
        seen.add(url)
        parts = urlsplit(url)
        assert (parts.netloc, parts.path.startswith("/analytics")) == ("localhost:80", True), url
        if parts.path in ("/analytics/v1.0/event", "/analytics/v1.0/events"):
            payload = [event()] if parts.path.endswith("/events") else event()
            response = client.post(parts.path, body(payload), status="*")
            assert response.status_int == 204, (url, response.text)
            continue
        if parts.path.startswith("/analytics/v1.0/player/"):  # reached, and off: no admin_keys here
            response = client.post(parts.path, body({"user_id": "u1"}), status="*")
            assert response.status_int == 403 and "admin_keys" in response.json["detail"], url
            continue
        response = client.get(parts.path + ("?" + parts.query if parts.query else ""), status="*")
        if parts.path.startswith(("/analytics/v1.0/report/funnel", "/analytics/v1.0/report/values")) and not parts.query:
            assert response.status_int == 400 and response.json["detail"], url  # it needs its steps or field
            continue
        assert response.status_int == 200, (url, response.text[:200])
        if not response.content_type.startswith(("text/html", "application/json")):
            continue  # the CSV download
        waiting += [urljoin(url, link) for link in links(response)]
        if "<form" in response.text:
            waiting.append(urljoin(url, re.search(r'action="([^"]*)"', response.text).group(1)) + "?application=my-game")
    assert {urlsplit(url).path for url in seen} >= {
        "/analytics", "/analytics/", "/analytics/docs", "/analytics/openapi.json", "/analytics/dashboard",
        "/analytics/v1.0/event", "/analytics/v1.0/events"}
    assert "http://localhost:80/analytics/dashboard?application=my-game" in seen
    assert count(str(tmp_path / "events.db")) == 2  # each endpoint once


@pytest.mark.parametrize("peer, headers, address", [
    ("127.0.0.1", {}, "http://localhost:80"),
    ("127.0.0.1", {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "games.example:8443",
                   "X-Forwarded-Prefix": "/analytics/"}, "https://games.example:8443/analytics"),
    ("127.0.0.1", {"X-Forwarded-Proto": "http, https", "X-Forwarded-Host": "a.example, b.example"},
     "https://b.example"),
    ("203.0.113.9", {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil.example",
                     "X-Forwarded-Prefix": "/phish"}, "http://localhost:80"),
    ("127.0.0.1", {"X-Forwarded-Proto": "gopher", "X-Forwarded-Prefix": "/a b<script>"}, "http://localhost:80"),
    ("127.0.0.1", {"X-Forwarded-Host": 'x"><script>alert(1)</script>'}, "http://localhost"),
    ("203.0.113.9", {"Host": 'x"><script>alert(1)</script>'}, "http://localhost"),
])
def test_forwarded_scheme_host_and_prefix_are_believed_only_from_a_trusted_proxy(client, peer, headers, address):
    environ = {"REMOTE_ADDR": peer}
    document = client.get("/openapi.json", headers=headers, extra_environ=environ).json
    docs = client.get("/docs", headers=headers, extra_environ=environ).text
    assert document["servers"] == [{"url": address}]
    assert f"curl -i {address}/v1.0/event " in docs
    assert "<script>" not in docs


def test_the_application_mounted_by_gunicorns_script_name_links_under_it(client):
    environ = {"SCRIPT_NAME": "/games/stats", "REMOTE_ADDR": "203.0.113.9"}
    assert client.get("/", extra_environ=environ).json["docs"] == "/games/stats/docs"
    assert client.get("/openapi.json", extra_environ=environ).json["servers"] == [
        {"url": "http://localhost:80/games/stats"}]
    assert client.get("/v1.0/evnet", extra_environ=environ, status=404).json["detail"] == (
        "no such endpoint: /games/stats/v1.0/evnet; events go to /games/stats/v1.0/event or /games/stats/v1.0/events")


NGINX_CERTIFICATE = "/etc/letsencrypt/live/analytics.example.com/fullchain.pem"
NGINX_KEY = "/etc/letsencrypt/live/analytics.example.com/privkey.pem"
PLAYERS = (f"127.0.1.{n}" for n in itertools.count(2))  # each test's own address: its own rate limit


def readme_nginx_configurations():
    """docs/deployment.md's nginx blocks by the file each names in its first line, exactly as written there."""
    with open(os.path.join(HERE, "docs", "deployment.md")) as readme:
        blocks = re.findall(r"```nginx\n(.*?)```", readme.read(), re.S)
    return {block.split("\n", 1)[0].lstrip("# "): block for block in blocks}


def replaced(text, old, new):
    assert text.count(old) == 1, f"the README's configuration no longer says {old!r} once"
    return text.replace(old, new)


def free_ports(count):
    """`count` different free ports of 127.0.0.1. Each probe is held until all are chosen: ports
    probed one after another may come out the same, and nginx then serves two of its configurations
    on one port as virtual hosts of each other (the prefix's requests got the root's 404s)."""
    with contextlib.ExitStack() as probes:
        sockets = [probes.enter_context(socket.socket()) for _ in range(count)]
        for probe in sockets:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in sockets]


def nginx_command():
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install nginx (Debian's package, by .ci/run) for the tests behind nginx")
        pytest.skip("nginx is not installed")
    return found


def wait_for_port(port, process, log):
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"exited with {process.returncode}:\n" + log.read_text()[-3000:])
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.05)
    raise AssertionError("did not listen within 20 s:\n" + log.read_text()[-3000:])


def stop(process):
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


def start_upstream(kind, folder, port):
    """The built-in server or gunicorn on 127.0.0.1:port, logging to folder/upstream.log."""
    (folder / "pycolytics.ini").write_text(
        f"[pycolytics]\napi_keys = {KEY}\nread_keys = reader-key\nrate_limit = 5/day\n"
        f"database = {folder / 'events.db'}\n")
    log = folder / "upstream.log"
    if kind == "pycolytics":
        command = [sys.executable, os.path.join(HERE, "pycolytics.py"), "--config", "pycolytics.ini", "--port", str(port)]
    else:  # one worker: each worker would keep its own count for the rate limit
        command = [sys.executable, "-m", "gunicorn", "-w", "1", "-k", "gthread", "--threads", "4",
                   "-b", f"127.0.0.1:{port}", "--chdir", HERE, "pycolytics:application"]
    with open(log, "w") as output:
        process = subprocess.Popen(command, cwd=folder, stdout=output, stderr=subprocess.STDOUT,
                                   env=dict(os.environ, PYCOLYTICS_CONFIG=str(folder / "pycolytics.ini")))
    wait_for_port(port, process, log)
    return process


def start_nginx(folder, upstream_port, certificate, key, ports):
    """Debian's nginx with docs/deployment.md's configurations, on `ports` of its own: {name: address}."""
    configurations = readme_nginx_configurations()
    ports = dict(zip(("root", "prefix", "https"), ports))
    (folder / "snippets").mkdir()
    (folder / "snippets" / "pycolytics.conf").write_text(configurations["/etc/nginx/snippets/pycolytics.conf"])
    root = replaced(configurations["/etc/nginx/conf.d/pycolytics.conf"], "server 127.0.0.1:8000;",
                    f"server 127.0.0.1:{upstream_port};")
    root = replaced(root, "listen 80;", f"listen 127.0.0.1:{ports['root']};")
    prefix = configurations["/etc/nginx/sites-enabled/www.example.com, with Pycolytics at /analytics/"]
    prefix = replaced(prefix, "listen 80;", f"listen 127.0.0.1:{ports['prefix']};")
    https = replaced(configurations["/etc/nginx/conf.d/pycolytics-https.conf"], "listen 443 ssl;",
                     f"listen 127.0.0.1:{ports['https']} ssl;")
    https = replaced(replaced(https, NGINX_CERTIFICATE, certificate), NGINX_KEY, key)
    temporary = "".join(f"    {kind}_temp_path {folder / kind};\n" for kind in ("client_body", "proxy", "fastcgi",
                                                                                 "uwsgi", "scgi"))
    (folder / "nginx.conf").write_text(
        ("user root;\n" if os.geteuid() == 0 else "")  # workers must reach this test's private folder
        + f"daemon off;\npid {folder / 'nginx.pid'};\nworker_processes 1;\nevents {{ worker_connections 256; }}\n"
        f"http {{\n    access_log {folder / 'access.log'};\n{temporary}{root}\n{prefix}\n{https}\n}}\n")
    log = folder / "error.log"
    process = subprocess.Popen([nginx_command(), "-p", str(folder), "-c", str(folder / "nginx.conf"), "-e", str(log)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        for port in ports.values():
            wait_for_port(port, process, log)
    except BaseException:
        stop(process)
        raise
    return process, {"root": f"http://127.0.0.1:{ports['root']}",
                     "prefix": f"http://127.0.0.1:{ports['prefix']}/analytics",
                     "https": f"https://127.0.0.1:{ports['https']}"}


class BehindNginx:
    def __init__(self, kind, folder, upstream_port, addresses, certificate):
        self.kind, self.folder, self.upstream_port = kind, folder, upstream_port
        self.addresses, self.certificate = addresses, certificate

    def request(self, url, method="GET", payload=None, headers=(), player=None):
        """(status, headers, body) of one request from `player`'s address (127.0.0.1 by default)."""
        import ssl
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        source = (player or "127.0.0.1", 0)
        if parts.scheme == "https":
            context = ssl.create_default_context(cafile=self.certificate)
            connection = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=30, context=context,
                                                     source_address=source)
        else:
            connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30, source_address=source)
        try:
            target = parts.path + ("?" + parts.query if parts.query else "")
            connection.request(method, target, payload, dict(headers))
            response = connection.getresponse()
            return response.status, response, response.read()
        finally:
            connection.close()

    def stored(self, event_type):
        with sqlite3.connect(self.folder / "events.db") as connection:
            return connection.execute("SELECT count(*) FROM event WHERE event_type = ?", (event_type,)).fetchone()[0]


@pytest.fixture(scope="module", params=["pycolytics", "gunicorn"])
def behind_nginx(request, tmp_path_factory):
    """The README's nginx configurations in front of the built-in server, or of gunicorn."""
    nginx_command()
    folder = tmp_path_factory.mktemp(f"nginx-{request.param}")
    certificate, key = make_certificate(folder)
    upstream_port, *ports = free_ports(4)  # the upstream's and nginx's, all different
    upstream = start_upstream(request.param, folder, upstream_port)
    try:
        nginx, addresses = start_nginx(folder, upstream_port, certificate, key, ports)
        try:
            yield BehindNginx(request.param, folder, upstream_port, addresses, certificate)
        finally:
            stop(nginx)
    finally:
        stop(upstream)


MOUNTS = ["root", "prefix", "https"]


@pytest.mark.parametrize("mount", MOUNTS)
def test_events_batches_and_gzip_bodies_are_stored_through_nginx(behind_nginx, mount):
    address, player, kind = behind_nginx.addresses[mount], next(PLAYERS), f"through-{mount}"
    answers = [
        behind_nginx.request(address + "/v1.0/event", "POST", body(event(event_type=kind)), player=player)[0],
        behind_nginx.request(address + "/v1.0/events", "POST", body([event(event_type=kind)] * 500),
                             player=player)[0],
        behind_nginx.request(address + "/v1.0/events", "POST", gzip.compress(body([event(event_type=kind)] * 20)),
                             {"Content-Encoding": "gzip"}, player=player)[0],
    ]
    assert answers == [204, 204, 204]
    assert behind_nginx.stored(kind) == 521


@pytest.mark.parametrize("mount", MOUNTS)
def test_nginx_refuses_a_body_over_its_limit_with_json_and_stores_nothing(behind_nginx, mount):
    kind = f"too-large-{mount}"
    payload = body([event(event_type=kind, value={"padding": "x" * 1000})] * 1000)
    assert len(payload) > 1024 * 1024
    status, response, answer = behind_nginx.request(behind_nginx.addresses[mount] + "/v1.0/events", "POST", payload,
                                                     player=next(PLAYERS))
    assert (status, response.getheader("Content-Type")) == (413, "application/json")
    assert response.getheader("Access-Control-Allow-Origin") == "*"
    assert "over 1 MiB" in json.loads(answer)["detail"]
    assert behind_nginx.stored(kind) == 0


def test_nginx_sends_the_prefix_without_its_slash_to_the_prefix_with_it(behind_nginx):
    status, response, _ = behind_nginx.request(behind_nginx.addresses["prefix"])
    assert (status, response.getheader("Location")) == (301, behind_nginx.addresses["prefix"] + "/")


def test_the_players_address_reaches_the_rate_limiter_through_nginx(behind_nginx):
    address, player, neighbour = behind_nginx.addresses["prefix"], next(PLAYERS), next(PLAYERS)

    def send(who, headers=()):
        return behind_nginx.request(address + "/v1.0/event", "POST", body(event(event_type="limited")), headers,
                                    player=who)[0]

    assert [send(player) for _ in range(5)] == [204] * 5
    assert send(player) == 429
    assert send(player, {"X-Forwarded-For": "198.51.100.7"}) == 429  # nginx appends the real address
    assert send(neighbour) == 204


@pytest.mark.parametrize("behind_nginx", ["pycolytics"], indirect=True)
def test_the_built_in_servers_access_log_names_the_player_behind_nginx(behind_nginx):
    player = next(PLAYERS)
    status = behind_nginx.request(behind_nginx.addresses["prefix"] + "/v1.0/event", "POST",
                                  body(event(event_type="logged")), player=player)[0]
    assert status == 204
    line = f'{player} - - ['
    deadline = time.monotonic() + 10  # the log is written by a thread of its own
    while line not in (behind_nginx.folder / "upstream.log").read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    logged = [text for text in (behind_nginx.folder / "upstream.log").read_text().splitlines() if text.startswith(line)]
    assert len(logged) == 1 and '"POST /v1.0/event HTTP/1.1" 204' in logged[0]


@pytest.mark.parametrize("mount", MOUNTS)
def test_the_docs_dashboard_and_every_address_they_write_work_through_nginx(behind_nginx, mount):
    from urllib.parse import urljoin

    address, player = behind_nginx.addresses[mount], next(PLAYERS)
    status, _, index = behind_nginx.request(address + "/")
    assert status == 200
    status, _, docs = behind_nginx.request(urljoin(address + "/", json.loads(index)["docs"]))
    assert status == 200
    docs_url = address + "/docs"
    status, _, document = behind_nginx.request(urljoin(docs_url, re.search(rb'href="([^"]+)"', docs).group(1).decode()))
    assert status == 200
    assert json.loads(document)["servers"] == [{"url": address}]
    example = re.search(rb"curl -i (\S+)", docs).group(1).decode()
    assert example == address + "/v1.0/event"
    assert behind_nginx.request(example, "POST", body(event(event_type=f"from-docs-{mount}")), player=player)[0] == 204

    reader = {"Authorization": "Basic " + base64.b64encode(b"viewer:reader-key").decode()}
    status, _, page = behind_nginx.request(urljoin(address + "/", json.loads(index)["dashboard"]), headers=reader)
    assert status == 200
    form = urljoin(address + "/dashboard", re.search(rb'action="([^"]+)"', page).group(1).decode())
    status, _, page = behind_nginx.request(form + "?application=my-game", headers=reader)
    assert status == 200 and b'<option value="my-game" selected>' in page


def upstream_connections(port):
    """{client port: TCP state} of the connections to 127.0.0.1:port, open (01) or recently closed (06)."""
    found = {}
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            local, remote, state = line.split()[1:4]
            if state in ("01", "06") and local == f"0100007F:{port:04X}":
                found[remote] = state
    return found


def test_nginx_keeps_its_connections_to_the_upstream_open(behind_nginx):
    before = upstream_connections(behind_nginx.upstream_port)
    for _ in range(20):
        assert behind_nginx.request(behind_nginx.addresses["root"] + "/openapi.json")[0] == 200
    after = upstream_connections(behind_nginx.upstream_port)
    # Without keep-alive: 20, one per request. A few more than one is allowed: an upstream may
    # close a connection that idled (gunicorn after 2 s) on a machine that stalls for that long.
    assert len(after.keys() - before.keys()) < 10, after
    assert "01" in after.values()


# -- Operations: systemd, reload, HTTPS --------------------------------------------------------------


@pytest.fixture
def notifications(tmp_path):
    """A socket standing in for systemd's NOTIFY_SOCKET."""
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(15)
    yield sock, path
    sock.close()


def post_over(connection, payload, path="/v1.0/event"):
    connection.request("POST", path, body(payload))
    response = connection.getresponse()
    response.read()
    return response.status


def test_sighup_reloads_keys_on_open_connections_and_keeps_the_old_config_when_the_new_is_bad(tmp_path, notifications):
    listener, path = notifications
    ini = tmp_path / "pycolytics.ini"
    ini.write_text("[pycolytics]\napi_keys = old-key\n")
    process, address, database, _ = start_server(tmp_path, "--quiet", environ=dict(os.environ, NOTIFY_SOCKET=path))
    try:
        assert listener.recv(100) == b"READY=1"
        connection = http.client.HTTPConnection(*address, timeout=10)
        assert post_over(connection, event(api_key="old-key")) == 204

        ini.write_text("[pycolytics]\napi_keys = new-key\n")
        process.send_signal(signal.SIGHUP)
        assert listener.recv(100).startswith(b"RELOADING=1\nMONOTONIC_USEC=")
        assert listener.recv(100) == b"READY=1"
        assert post_over(connection, event(api_key="new-key")) == 204  # the same connection
        assert post_over(connection, event(api_key="old-key")) == 401

        ini.write_text("[pycolytics]\napi_keys = newer-key\nmax_body_bytes = lots\n")
        process.send_signal(signal.SIGHUP)
        assert listener.recv(100).startswith(b"RELOADING=1")
        assert listener.recv(100) == b"READY=1"
        assert post_over(connection, event(api_key="new-key")) == 204
        assert post_over(connection, event(api_key="newer-key")) == 401
        connection.close()
    finally:
        process.send_signal(signal.SIGTERM)
        _, errors = process.communicate(timeout=15)
    assert process.returncode == 0
    assert listener.recv(100) == b"STOPPING=1"
    assert "reload failed; the configuration in force stays" in errors and "max_body_bytes" in errors
    assert "old-key" not in errors and "new-key" not in errors  # keys are never logged
    assert count(database) == 3


def make_certificate(folder):
    if not shutil.which("openssl"):
        pytest.skip("openssl is needed to make a test certificate")
    certificate, key = str(folder / "cert.pem"), str(folder / "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", key, "-out", certificate, "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    return certificate, key


def test_https_serves_events_with_keep_alive_and_survives_plain_http_on_its_port(tmp_path, settings, database):
    import ssl
    certificate, key = make_certificate(tmp_path)
    config = pycolytics.load_config(environ={}, overrides=dict(settings, certfile=certificate, keyfile=key))
    app = pycolytics.create_app(config)
    server = built_in_server(app, config)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        assert server.url.startswith("https://")
        try:
            plain = exchange(server, b"POST /v1.0/event HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}")
        except ConnectionResetError:
            plain = b""
        assert b"204" not in plain
        context = ssl.create_default_context(cafile=certificate)
        connection = http.client.HTTPSConnection(*server.server_address, timeout=10, context=context)
        statuses = [post_over(connection, event(event_type=f"tls{n}")) for n in range(5)]
        statuses.append(post_over(connection, [event()] * 300, "/v1.0/events"))  # many TLS records
        connection.close()
    finally:
        server.shutdown()
        thread.join(10)
        app.close()
    assert statuses == [204] * 6
    assert count(database) == 305


def test_a_certificate_that_cannot_be_loaded_stops_start_up(tmp_path):
    (tmp_path / "pycolytics.ini").write_text("[pycolytics]\ncertfile = missing.pem\nkeyfile = missing.key\n")
    result = subprocess.run([sys.executable, os.path.join(HERE, "pycolytics.py"), "--port", "0"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=20)
    assert result.returncode == 2
    assert "cannot load certfile missing.pem" in result.stderr


# -- Hostile input, generated ------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
# Client times: Unix seconds and ISO 8601 text, mostly from 1970 to 9999, some not, some not times at all.
valid_times = (
    st.integers(min_value=0, max_value=253402300000) | st.floats(min_value=0, max_value=2.5e11)
    | st.datetimes(min_value=datetime.datetime(1970, 1, 2), max_value=datetime.datetime(9999, 12, 30), timezones=st.sampled_from(
        [None, datetime.timezone.utc, datetime.timezone(datetime.timedelta(hours=-5, minutes=-30))])).map(datetime.datetime.isoformat)
)
client_times = st.one_of(valid_times, valid_times, valid_times, st.integers(max_value=-1) | st.text(max_size=30) | st.booleans())
valid_events = st.fixed_dictionaries(
    dict({name: st.text(max_size=40) for name in pycolytics.EVENT_FIELDS}, api_key=st.just(KEY)),
    optional={"value": st.dictionaries(st.text(max_size=8), json_values, max_size=5), "extra": json_values,
              # event_id made unique per example by the test; a NUL may still make it wrong
              "timestamp": client_times, "sent_at": client_times, "event_id": st.text(max_size=60)},
)
# A valid event with one field made wrong: missing, null, not a string, too long, or a wrong key.
spoiled_events = st.tuples(
    valid_events, st.sampled_from(pycolytics.EVENT_FIELDS + ("value", "api_key", "timestamp", "sent_at", "event_id")),
    st.none() | st.integers() | st.text(min_size=256, max_size=300) | json_values | st.just(...),
).map(lambda spoil: {name: value for name, value in dict(spoil[0], **{spoil[1]: spoil[2]}).items() if value is not ...})


def unique_event_ids(batch):
    """`batch` with every string event_id made unique to this example (and still at most 100 long
    when it was at most 60), so that no earlier example's row makes a stored event a duplicate."""
    prefix = os.urandom(6).hex()
    return [dict(event, event_id=f"{prefix}-{index}-{event['event_id']}")
            if isinstance(event, dict) and isinstance(event.get("event_id"), str) else event
            for index, event in enumerate(batch)]


def assert_refusal_says_why(response):
    """A refusal's detail: a non-empty list of problems for a 422, a sentence otherwise."""
    detail = response.json["detail"]
    if response.status_int == 422:
        assert isinstance(detail, list) and detail and all(problem["msg"] and problem["loc"] for problem in detail)
    else:
        assert isinstance(detail, str) and detail
generated_events = st.one_of(valid_events, valid_events, valid_events, spoiled_events)


def finite(document):
    if isinstance(document, float):
        return document if math.isfinite(document) else None
    if isinstance(document, dict):
        return {key: finite(value) for key, value in document.items()}
    if isinstance(document, list):
        return [finite(value) for value in document]
    return document


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def shared(request, tmp_path_factory):
    """One application for many generated examples (hypothesis runs each test body many times)."""
    with contextlib.ExitStack() as stack:
        if request.param == "sqlite":
            database = str(tmp_path_factory.mktemp("generated") / "events.db")
        else:
            database = stack.enter_context(postgres_schema())
        app = pycolytics.create_app(pycolytics.load_config(environ={}, overrides={"database": database, "api_keys": KEY}))
        yield webtest.TestApp(app), database
        app.close()


def same_json(document):
    """`document` with every number as a Decimal: PostgreSQL's jsonb keeps numbers as numeric."""
    if isinstance(document, bool) or document is None or isinstance(document, str):
        return document
    if isinstance(document, (int, float)):
        return decimal.Decimal(repr(document)) if isinstance(document, float) else decimal.Decimal(document)
    if isinstance(document, dict):
        return {key: same_json(value) for key, value in document.items()}
    return [same_json(value) for value in document]


@hypothesis.settings(max_examples=300, deadline=None, suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(batch=st.lists(generated_events, max_size=6))
def test_generated_batches_are_stored_exactly_when_acknowledged(shared, batch):
    client, database = shared
    batch = unique_event_ids(batch)
    before = count(database)
    response = client.post("/v1.0/events", json.dumps(batch).encode(), expect_errors=True)
    hypothesis.event(f"answered {response.status_int}")
    assert response.status_int in (204, 401, 422), response.text
    rows = stored(database, "event_type, application, version, platform, user_id, session_id, value, "
                            "event_id, time, received_at")[before:]
    if response.status_int != 204:
        assert_refusal_says_why(response)
        assert rows == []
        return
    hypothesis.event(f"stored with {sum('timestamp' in event for event in batch)} client times")
    assert [row[7] for row in rows] == [event.get("event_id") for event in batch]
    assert all("1970-01-01" <= when <= received for *_, when, received in rows)
    if not is_postgres(database):  # PostgreSQL's jsonb holds nothing else
        with sqlite3.connect(database) as connection:
            assert connection.execute("SELECT count(*) FROM event WHERE NOT json_valid(value)").fetchone() == (0,)
    expected = [tuple(event[name] for name in pycolytics.EVENT_FIELDS) for event in batch]
    assert [row[:6] for row in rows] == expected
    assert [same_json(json.loads(row[6])) for row in rows] == [same_json(finite(event.get("value", {}))) for event in batch]


@hypothesis.settings(max_examples=300, deadline=None, suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(raw=st.binary(max_size=400) | st.text(max_size=200).map(str.encode)
       | st.lists(json_values, max_size=3).map(lambda value: json.dumps(value).encode()))
def test_any_body_gets_a_4xx_or_204_and_never_a_server_error(shared, raw):
    client, database = shared
    before = count(database)
    response = client.post("/v1.0/events", raw, expect_errors=True)
    assert response.status_int in (204, 400, 401, 422)
    if response.status_int != 204:
        assert_refusal_says_why(response)
        assert count(database) == before
    else:
        assert response.body == b""


# -- Hostile bodies: linear time, no recursion ----------------------------------------------------

ANSWER_IN_A_CHILD = """
import json, logging, sys, webtest, pycolytics
logging.basicConfig(stream=sys.stderr)
database, key, path, encoding = sys.argv[1:]
app = pycolytics.create_app(pycolytics.load_config(environ={}, overrides={"database": database, "api_keys": key}))
headers = {"Content-Encoding": encoding} if encoding else {}
response = webtest.TestApp(app).post(path, sys.stdin.buffer.read(), headers=headers, expect_errors=True)
app.close()
print(json.dumps({"status": response.status_int, "detail": response.json["detail"] if response.body else None}))
"""


def answer_in_a_child(database, path, payload, encoding="", timeout=60, **environ):
    """The application's answer to one request, asked in a process of its own that must answer
    within `timeout` seconds: a body that freezes the application cannot freeze the test run
    (a regular expression holds the GIL, so no thread could be waited for)."""
    result = subprocess.run([sys.executable, "-c", ANSWER_IN_A_CHILD, database, KEY, path, encoding], input=payload,
                            capture_output=True, timeout=timeout, env=dict(os.environ, PYTHONPATH=HERE, **environ))
    assert "Traceback" not in result.stderr.decode(errors="replace")
    return json.loads(result.stdout)


def test_a_godot_string_of_escaped_quotes_is_refused_in_linear_time(client, database):
    # "\"\"\"... never closed. The fallback's regex once tried it again from every quote: 8 s
    # for 64 kB, about half an hour for this megabyte, before any key was looked at.
    post(client, "/v1.0/event", event(event_type="before"))
    payload = gzip.compress(b'"' + b'\\"' * (2**19 - 1))
    assert len(payload) < 2048
    answer = answer_in_a_child(database, "/v1.0/events", payload, "gzip")
    assert answer == {"status": 400, "detail": "the request body is not valid JSON: "
                                               "Unterminated string starting at line 1 column 1"}
    assert stored(database, "event_type") == [("before",)]


@pytest.mark.parametrize("depth", [900, 990, 2500, 10000])
def test_a_non_finite_number_nested_deep_is_refused_without_a_traceback(client, database, caplog, depth):
    # 1e999 parses as inf; the value was once rebuilt by recursion: a 500, and a 3,000-line
    # traceback in the log for every such request. How deep json.loads itself goes depends on
    # the Python (about 1,000 levels before 3.12, more after): deeper than that is a 400.
    nested = b'{"a":' * depth + b"1e999" + b"}" * depth
    caplog.set_level(logging.DEBUG, logger="pycolytics")
    for key, status, words in (("wrong", 401, "invalid or missing api_key"), (KEY, 422, "'value' nests")):
        payload = b'{"api_key":"' + key.encode() + b'","value":' + nested + b"}"
        response = client.post("/v1.0/event", payload, expect_errors=True)
        answer = (response.status_int, json.dumps(response.json["detail"]))
        assert answer[0] in (status, 400)
        assert (words if answer[0] == status else "nests arrays or objects too deeply") in answer[1]
    assert caplog.records == []
    assert count(database) == 0


@pytest.mark.parametrize("payload", [
    b"[" * 100000, b'{"a":' * 100000,
    b"[nan," + b"[" * 100000,  # too deep for the second try, after Godot's quirks are mended
    b'["\x1b",' + b'{"a":' * 100000,  # a raw control character: the second try too
], ids=["arrays", "objects", "arrays after nan", "objects after a raw escape"])
def test_nesting_deeper_than_the_parser_goes_is_a_400_that_says_so(client, database, payload):
    response = post(client, "/v1.0/events", payload, status=400)
    assert response.json["detail"] == "the request body nests arrays or objects too deeply"
    assert count(database) == 0


def test_an_unterminated_string_is_reported_in_plain_words(client):
    response = post(client, "/v1.0/event", b'{"event_type": "startup', status=400)
    assert response.json["detail"] == ("the request body is not valid JSON: "
                                       "Unterminated string starting at line 1 column 16")


def godot_event(**changes):
    """One event as the addon writes it, with some fields' JSON text changed."""
    fields = dict(event_type='"startup"', application='"My Game"', version='""', platform='"Linux"',
                  user_id='"1a2b3c4d"', session_id='"s1"', value="{}", api_key=json.dumps(KEY))
    fields.update(changes)
    return godot_json(**fields)


# Godot's JSON.stringify escapes only \b \f \n \r \t \v (and " and \); the rest it writes raw.
RAW_CONTROLS = "".join(chr(code) for code in range(1, 32) if chr(code) not in "\b\f\n\r\t\v")


@pytest.mark.parametrize("speed", ["1.5", "nan"])
def test_control_characters_godot_leaves_raw_in_strings_are_stored_escaped(client, database, speed):
    name = "Esc\x1bape " + RAW_CONTROLS
    payload = godot_event(user_id=f'"{name}"', value=f'{{"name":"{name}","speed":{speed}}}')
    post(client, "/v1.0/events", f"[{payload}]".encode())
    (user_id, value), = stored(database, "user_id, value")
    assert user_id == name
    assert value == json.dumps({"name": name, "speed": None if speed == "nan" else 1.5}, separators=(",", ":"))
    assert "\x1b" not in value and "\\u001b" in value


def test_godot_words_are_mended_only_outside_strings(client, database):
    # Escaped quotes and backslashes decide where strings end; nan, inf and \v inside strings stay text.
    value = r'{"a":"nan\"inf\\","b":nan,"c":"\\","d":-inf,"e":"\\\"nan\v","f":[inf,"-inf",-nan],"g":"\\v"}'
    post(client, "/v1.0/events", f"[{godot_event(value=value)}]".encode())
    assert json.loads(stored(database, "value")[0][0]) == {
        "a": 'nan"inf\\', "b": None, "c": "\\", "d": None, "e": '\\"nan\x0b', "f": [None, "-inf", None], "g": "\\v",
    }


@pytest.mark.parametrize("payload", [
    b"[nanx]", b"[infinity]", b'["a" nan]', b"[1nan]", b'["\\"]nan', b"[nan]\\", b'{"a":nan\\"}',
])
def test_words_that_only_contain_godot_quirks_are_still_not_json(client, payload):
    assert "not valid JSON" in post(client, "/v1.0/events", payload, status=400).json["detail"]


def test_integers_over_4300_digits_are_refused_where_the_interpreter_would_convert_them(client, database):
    # With the interpreter's own limit lifted, the module checks every integer's length itself.
    post(client, "/v1.0/event", event(event_type="before"))
    for digits, status in ((4300, 204), (4301, 400)):
        payload = json.dumps(event(value={"n": 1})).replace('"n": 1', '"n": -' + "7" * digits).encode()
        answer = answer_in_a_child(database, "/v1.0/event", payload, PYTHONINTMAXSTRDIGITS="0")
        assert answer["status"] == status
    assert "over 4300 digits" in answer["detail"]
    assert count(database) == 2


@pytest.mark.parametrize("events, listed", [(100, 100), (101, 100), (1000, 100)])
def test_a_refusal_lists_at_most_100_problems_and_says_where_it_stopped(client, database, events, listed):
    # Every field wrong in a thousand events would be 11,000 problems: a 1.2 MB answer to 1 kB of gzip.
    batch = godot_batch(*[godot_event(user_id="5")] * events)
    detail = post(client, "/v1.0/events", batch, status=422).json["detail"]
    assert [problem["loc"] for problem in detail[:listed]] == [["body", index, "user_id"] for index in range(listed)]
    notes = detail[listed:]
    assert notes == ([] if events == listed else [{
        "loc": ["body"], "type": "too_many_problems",
        "msg": "at most 100 problems are listed and this list stops at event 99: fix these and send again"}])
    assert count(database) == 0


def test_a_forbidden_batch_names_at_most_100_events(per_game, database):
    batch = [event(application="farm-game", api_key="space-key")] * 150
    detail = post(per_game, "/v1.0/events", batch, status=403).json["detail"]
    assert detail.count("this api_key is for application 'space-game'") == 100
    assert "event 99: " in detail and "event 100: " not in detail and detail.endswith("; and 50 more events")
    assert count(database) == 0

# -- Every validation limit, at the limit and one past it ------------------------------------------


def padded(document, size):
    """`document` as JSON text followed by spaces, `size` bytes in all."""
    text = document.encode()
    return text + b" " * (size - len(text))


def value_of_bytes(size, character="x"):
    """A value whose compact JSON is `size` bytes of UTF-8, made of `character` and, if need be, one x."""
    room = size - len('{"b":""}')
    count, rest = divmod(room, len(character.encode()))
    return '{"b":"' + character * count + "x" * rest + '"}'


def godot_batch(*events):
    return ("[" + ",".join(events) + "]").encode()


LIMITS = [
    # (what, the batch at the limit, events in it, the batch one past, headers, status, words)
    *[(f"{field} of 255 characters", godot_batch(godot_event(**{field: json.dumps("é" * 255)})), 1,
       godot_batch(godot_event(**{field: json.dumps("é" * 256)})), {}, 422,
       f"'{field}' is longer than 255 characters") for field in pycolytics.EVENT_FIELDS],
    # Each with a bracket to spare: a value with no more brackets than the limit skips the walk.
    ("value 32 objects deep", godot_batch(godot_event(value='{"b":[],"a":' + '{"a":' * 30 + "{}" + "}" * 31)), 1,
     godot_batch(godot_event(value='{"b":[],"a":' + '{"a":' * 31 + "{}" + "}" * 32)), {}, 422,
     "'value' nests objects and arrays more than 32"),
    ("value 32 deep in arrays", godot_batch(godot_event(value='{"b":{},"a":' + "[" * 31 + "]" * 31 + "}")), 1,
     godot_batch(godot_event(value='{"b":{},"a":' + "[" * 32 + "]" * 32 + "}")), {}, 422, "more than 32 deep"),
    ("value of 65536 bytes", godot_batch(godot_event(value=value_of_bytes(65536))), 1,
     godot_batch(godot_event(value=value_of_bytes(65537))), {}, 422, "'value' is 65537 bytes as JSON; at most 65536"),
    ("value of 65536 bytes in two-byte characters", godot_batch(godot_event(value=value_of_bytes(65536, "é"))), 1,
     godot_batch(godot_event(value=value_of_bytes(65537, "é"))), {}, 422, "'value' is 65537 bytes"),
    ("1000 events", godot_batch(*[godot_event()] * 1000), 1000,
     godot_batch(*[godot_event()] * 1001), {}, 422, "a batch holds at most 1000 events and this one has 1001"),
    ("event_id of 100 characters", godot_batch(godot_event(event_id=json.dumps("é" * 100))), 1,
     godot_batch(godot_event(event_id=json.dumps("é" * 101))), {}, 422, "'event_id' must be a string of 1 to 100"),
    ("timestamp text of 64 characters",
     godot_batch(godot_event(timestamp='"2024-05-01T12:00:00.' + "1" * 43 + 'Z"')), 1,
     godot_batch(godot_event(timestamp='"2024-05-01T12:00:00.' + "1" * 44 + 'Z"')), {}, 422, "'timestamp' must be ISO 8601"),
    ("integer of 4300 digits", godot_batch(godot_event(value='{"n":' + "7" * 4300 + "}")), 1,
     godot_batch(godot_event(value='{"n":' + "7" * 4301 + "}")), {}, 400, "an integer of over 4300 digits"),
    ("body of 1048576 bytes", padded("[" + godot_event() + "]", 1048576), 1,
     padded("[" + godot_event() + "]", 1048577), {}, 413, "at most 1048576 are accepted"),
    ("body of 1048576 bytes once decompressed", gzip.compress(padded("[" + godot_event() + "]", 1048576)), 1,
     gzip.compress(padded("[" + godot_event() + "]", 1048577)), {"Content-Encoding": "gzip"}, 413,
     "decompresses to over 1048576 bytes"),
]


@pytest.mark.parametrize("what, at_limit, events, past_limit, headers, status, words", LIMITS,
                         ids=[case[0] for case in LIMITS])
def test_a_godot_batch_at_a_limit_is_stored_and_one_past_it_is_refused(client, database, what, at_limit, events,
                                                                        past_limit, headers, status, words):
    post(client, "/v1.0/events", at_limit, headers=headers)
    assert count(database) == events
    response = post(client, "/v1.0/events", past_limit, status=status, headers=headers)
    assert response.json["detail"] and words in json.dumps(response.json["detail"], ensure_ascii=False)
    assert count(database) == events


def test_a_literal_1e999_written_by_hand_is_stored_as_null(client, database):
    payload = godot_batch(godot_event(value='{"big":1e999,"small":-1e999,"fine":1.5,"deep":[[1E400]]}'))
    post(client, "/v1.0/events", payload)
    (text,), = stored(database, "value")
    assert json.loads(text) == {"big": None, "small": None, "fine": 1.5, "deep": [[None]]}
    assert "Infinity" not in text


def test_a_nul_in_event_id_is_refused_naming_it_and_nothing_is_stored(client, database):
    batch = godot_batch(godot_event(event_id='"fine"'), godot_event(event_id='"a\\u0000b"'))
    detail = post(client, "/v1.0/events", batch, status=422).json["detail"]
    assert [(problem["loc"], problem["type"]) for problem in detail] == [(["body", 1, "event_id"], "nul")]
    assert "NUL" in detail[0]["msg"]
    assert count(database) == 0



# -- The API fuzzed from its OpenAPI document (schemathesis) -------------------------------------------


@pytest.fixture
def api_schema(settings, make_app):
    # With a read key and an admin key set, so that the report and player endpoints answer as
    # documented (401 without a key), not 403 for a feature that is off.
    app = make_app(pycolytics.load_config(environ={}, overrides=dict(
        settings, read_keys="fuzzing-reader-key", admin_keys="fuzzing-admin-key")))
    schema = schemathesis.openapi.from_wsgi("/openapi.json", app)
    # A body over max_body_bytes is answered 413 (documented in the OpenAPI responses) before its
    # events are read, whether or not they match the schema: a generated batch can be both over
    # maxItems and over 1 MiB. And after five wrong read keys in a minute an address gets 429
    # (documented) whatever it asks. Both checks get these added to their own defaults, nothing else.
    for check in (schema.config.checks.negative_data_rejection, schema.config.checks.positive_data_acceptance):
        check.expected_statuses = check.expected_statuses + ["413", "429"]
    return schema


fuzzed = schemathesis.pytest.from_fixture("api_schema")


@fuzzed.parametrize()
@hypothesis.settings(max_examples=60, deadline=None, suppress_health_check=list(hypothesis.HealthCheck))
def test_the_api_fuzzed_from_its_openapi_document_never_fails(case):
    case.call_and_validate()


# -- Crashes and several processes --------------------------------------------------------------------


def test_every_acknowledged_event_survives_sigkill_at_a_random_moment(tmp_path, database):
    rng = random.Random(7)
    acknowledged = set()
    for crash in range(4):
        process, address, _, _ = start_server(tmp_path, "--quiet", "--database", database)
        stop = threading.Event()

        def client(n):
            connection = http.client.HTTPConnection(*address, timeout=10)
            for i in itertools.count():
                ids = [f"{crash}-{n}-{i}-{k}" for k in range(3)]
                try:
                    status = post_over(connection, [event(user_id=user, api_key=pycolytics.DEV_KEY) for user in ids],
                                       "/v1.0/events")
                except (OSError, http.client.HTTPException):
                    return
                if status == 204:
                    acknowledged.update(ids)
                if stop.is_set():
                    return

        threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        time.sleep(rng.uniform(0.3, 1.2))
        process.kill()
        process.wait(10)
        stop.set()
        for thread in threads:
            thread.join(15)
    if not is_postgres(database):
        with sqlite3.connect(database) as connection:
            assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    users = [row[0] for row in stored(database, "user_id")]
    assert len(acknowledged) > 0
    assert acknowledged <= set(users)
    assert len(users) == len(set(users))
    batches = collections.Counter(user.rsplit("-", 1)[0] for user in users)
    assert set(batches.values()) == {3}  # a batch is stored whole or not at all


def wait_until_serving(address, deadline=20):
    start = time.monotonic()
    while True:
        try:
            return post_over(http.client.HTTPConnection(*address, timeout=5), event(event_type="ready"))
        except OSError:
            if time.monotonic() - start > deadline:
                raise
            time.sleep(0.05)


@pytest.mark.parametrize("worker_class", ["sync", "gthread"])
def test_gunicorn_workers_share_one_database_without_errors(tmp_path, worker_class):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = probe.getsockname()
    database = str(tmp_path / "gunicorn.db")
    process = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-w", "2", "-k", worker_class, "--threads", "4",
         "-b", f"{address[0]}:{address[1]}", "pycolytics:application"],
        cwd=HERE, env=dict(os.environ, PYCOLYTICS_DATABASE=database, PYCOLYTICS_API_KEYS=KEY),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert wait_until_serving(address) == 204

        def client(n):
            statuses = []
            for i in range(15):
                connection = http.client.HTTPConnection(*address, timeout=60)
                statuses.append(post_over(connection, [event(user_id=f"{n}-{i}-{k}") for k in range(5)], "/v1.0/events"))
                connection.close()
            return statuses

        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            statuses = [status for result in pool.map(client, range(12)) for status in result]
    finally:
        process.send_signal(signal.SIGTERM)
        _, errors = process.communicate(timeout=30)
    assert statuses == [204] * 180
    assert count(database) == 1 + 900
    assert "locked" not in errors and "Traceback" not in errors


# -- PostgreSQL: several collectors, lost connections, moving an SQLite database -----------------------


def test_sqlite_users_never_load_the_postgresql_driver(tmp_path):
    script = ("import sys, pycolytics; config = pycolytics.load_config(environ={}, overrides={'database': 'x.db'}); "
              "pycolytics.create_app(config).close(); print('psycopg' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=dict(os.environ, PYTHONPATH=HERE),
                            capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_without_psycopg_a_postgresql_database_stops_start_up_saying_what_to_install(tmp_path):
    script = ("import sys; sys.modules['psycopg'] = None; import pycolytics; "
              "sys.exit(pycolytics.main(['--database', 'postgresql://127.0.0.1/test', '--port', '0']))")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=dict(os.environ, PYTHONPATH=HERE),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert 'pip install "psycopg[binary]"' in result.stderr


def test_two_collectors_store_every_acknowledged_event_once_and_share_event_ids(tmp_path, postgres_url):
    environ = dict(os.environ, PYCOLYTICS_DATABASE=postgres_url, PYCOLYTICS_API_KEYS=KEY)
    collectors = [start_server(tmp_path, "--quiet", environ=environ) for _ in range(2)]
    try:
        def client(n):
            statuses = []
            connections = [http.client.HTTPConnection(*collector[1], timeout=30) for collector in collectors]
            for i in range(20):
                fresh = [event(user_id=f"{n}-{i}-{k}", event_id=f"{n}-{i}-{k}") for k in range(4)]
                # the same batch to both collectors, as a client that retries elsewhere would
                statuses.append(post_over(connections[i % 2], fresh, "/v1.0/events"))
                statuses.append(post_over(connections[(i + 1) % 2], fresh, "/v1.0/events"))
            return statuses

        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            statuses = [status for result in pool.map(client, range(12)) for status in result]
    finally:
        for process, *_ in collectors:
            process.send_signal(signal.SIGTERM)
            assert process.wait(15) == 0
    assert statuses == [204] * 480
    users = [row[0] for row in stored(postgres_url, "user_id")]
    assert len(users) == 12 * 20 * 4 == len(set(users))


def test_lost_database_connections_under_load_recover_by_themselves_and_lose_nothing_acknowledged(
        tmp_path, postgres_url):
    environ = dict(os.environ, PYCOLYTICS_DATABASE=postgres_url, PYCOLYTICS_API_KEYS=KEY)
    process, address, _, _ = start_server(tmp_path, "--quiet", environ=environ)
    acknowledged, statuses, stop = set(), [], threading.Event()

    def client(n):
        connection = http.client.HTTPConnection(*address, timeout=30)
        for i in itertools.count():
            if stop.is_set():
                return
            users = [f"{n}-{i}-{k}" for k in range(3)]
            status = post_over(connection, [event(user_id=user) for user in users], "/v1.0/events")
            statuses.append(status)
            if status == 204:
                acknowledged.update(users)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)
        cut_at = len(statuses)
        cut = cut_connections(postgres_url)
        time.sleep(2.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
    after = statuses[cut_at:]
    assert cut >= 1
    # a 503 only if a commit itself was cut; every other group goes on afresh
    assert after and after[-1] == 204 and set(after) <= {204, 503}
    assert acknowledged <= {row[0] for row in stored(postgres_url, "user_id")}


def cut_connections(url):
    """Terminate the connections of this test's collectors (named after its schema), and none other."""
    name = re.search(r"application_name=(\w+)", url).group(1)
    with psycopg.connect(POSTGRES_SERVER, autocommit=True) as admin:
        return admin.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                             " WHERE application_name = %s AND pid <> pg_backend_pid()", (name,)).fetchone()[0]


def test_copy_moves_an_sqlite_database_into_postgresql_once_and_resumes(tmp_path, postgres_url):
    source = str(tmp_path / "old.db")
    with sqlite3.connect(source) as connection:
        connection.executescript(ORIGINAL_SCHEMA)  # a database made by the original Pycolytics
    app = pycolytics.create_app(pycolytics.load_config(environ={}, overrides={"database": source, "api_keys": KEY}))
    post(webtest.TestApp(app), "/v1.0/events", [event(user_id=f"u{n}", value={"n": n}) for n in range(30)])
    app.close()
    copy = [sys.executable, os.path.join(HERE, "pycolytics.py"), "--database", source, "copy", "--to", postgres_url]
    first = subprocess.run(copy, capture_output=True, text=True, timeout=60)
    again = subprocess.run(copy, capture_output=True, text=True, timeout=60)
    assert first.returncode == again.returncode == 0, first.stderr + again.stderr
    assert "copied 31 events" in first.stderr and "copied 0 events" in again.stderr
    app = pycolytics.create_app(pycolytics.load_config(environ={}, overrides={"database": source, "api_keys": KEY}))
    post(webtest.TestApp(app), "/v1.0/event", event(user_id="late"))
    app.close()
    assert "copied 1 events" in subprocess.run(copy, capture_output=True, text=True, timeout=60).stderr
    copied, original = (
        [(user, json.loads(value), when) for user, value, when in stored(where, "user_id, value, time")]
        for where in (postgres_url, source)
    )
    assert copied == original and len(copied) == 32


# -- PostgreSQL: a group in one statement, or row by row ----------------------------------------------

# Batches whose rows test how they travel: as one JSON text (the group insert) or as parameters.
TRICKY_BATCHES = [
    [
        event(event_type="é漢字😀", event_id="a", value={
            "a": [{"b": {"c": ['"q"', "\\", "\x1f\t\n", "\u2028"]}}], "f": 1.5e-07, "g": 1e300,
            "big": int("9" * 4000), "t": True, "n": None, "😀": "",
        }),
        event(user_id='say "hi" \\ and \\\\ back', value={}),  # no event_id: NULL
        event(event_type="duplicate within the group", event_id="a"),
        event(platform="\x01\x1f\x7f\u2028\u2029", event_id='é😀"\\'),
        event(event_id="b", timestamp="2026-01-02T03:04:05.123456Z", value={"nested": [[[[{}]]]]}),
    ],
    [
        event(event_type="duplicate of a stored row", event_id="b"),
        event(event_id="c"),
        event(event_type="duplicate within the group", event_id="c"),
        event(application="another-game", event_id="a"),  # another game's "a": stored
        event(version="", session_id="\\u0041 stays six characters"),
    ],
]
NEW_ROWS = [4, 3]
EVERY_COLUMN = "event_type, application, version, platform, user_id, session_id, value, time, received_at, event_id"


def rows_of(config, document):
    """The rows the event loop would hand the writer for `document`, received at a fixed time."""
    validator = pycolytics.Validator(config, pycolytics.Keyring(config))
    raw = body(document)
    received = datetime.datetime(2026, 11, 28, 12, 0, 0, 123456, tzinfo=datetime.timezone.utc)
    return validator.rows(pycolytics.parse_json(raw), True, raw, received)


def insert_tricky_batches(url):
    """Insert TRICKY_BATCHES as the writer does; the new rows counted, and every column as PostgreSQL's text."""
    config = pycolytics.load_config(environ={}, overrides={"database": url, "api_keys": KEY, "quiet": "yes"})
    store = pycolytics.store_for(config)
    connection = store.connect()
    try:
        counted = [store.insert(connection, rows_of(config, batch)) for batch in TRICKY_BATCHES]
        text = re.sub(r"\b(time|received_at|value)\b", lambda found: POSTGRES_TEXT[found.group(1)], EVERY_COLUMN)
        return counted, connection.execute(f"SELECT {text} FROM event ORDER BY id").fetchall()
    finally:
        connection.close()


def test_sqlite_stores_groups_of_every_size_as_executemany_would(tmp_path):
    """SQLiteStore.insert sends a group as INSERTs of many rows each: groups of every size around
    the statements' sizes, with event_ids repeated within a group and across groups, end as the
    same rows in the same order as one executemany of the single-row INSERT would leave them."""
    config = pycolytics.load_config(environ={}, overrides={
        "database": str(tmp_path / "events.db"), "api_keys": KEY, "quiet": "yes"})
    store = pycolytics.store_for(config)
    chunk = pycolytics.INSERT_CHUNK_ROWS
    sizes = [0, 1, 2, 3, chunk - 1, chunk, chunk + 1, 2 * chunk - 1, 2 * chunk, 2 * chunk + 37]
    groups = [rows_of(config, [event(user_id=f"u{size}-{n}", event_id=f"e{size * n % 50}" if n % 3 else None)
                               for n in range(size)]) for size in sizes]
    groups += [rows_of(config, batch) for batch in TRICKY_BATCHES]
    connection = store.connect()
    reference = pycolytics.connect(str(tmp_path / "reference.db"))
    try:
        counted = [store.insert(connection, rows) for rows in groups]
        expected = []
        for rows in groups:
            changes = reference.total_changes
            with pycolytics.transaction(reference):
                reference.executemany(pycolytics.INSERT, rows)
            expected.append(reference.total_changes - changes)
        columns = f"SELECT {EVERY_COLUMN}, typeof(value), typeof(event_id) FROM event ORDER BY id"
        assert counted == expected and sum(counted) > 0
        assert connection.execute(columns).fetchall() == reference.execute(columns).fetchall()
    finally:
        connection.close()
        reference.close()


def test_postgresql_stores_a_group_sent_as_one_json_text_exactly_as_row_by_row(monkeypatch):
    with postgres_schema() as as_one_text, postgres_schema() as row_by_row:
        counted, rows = insert_tricky_batches(as_one_text)
        monkeypatch.setattr(pycolytics, "MAX_JSON_GROUP_CHARS", 0)  # every group too big: row by row
        counted_one_by_one, rows_one_by_one = insert_tricky_batches(row_by_row)
    assert counted == counted_one_by_one == NEW_ROWS
    assert rows == rows_one_by_one
    assert [row[0] for row in rows] == ["é漢字😀", "level_started", "level_started", "level_started",
                                        "level_started", "level_started", "level_started"]
    assert [row[-1] for row in rows] == ["a", None, 'é😀"\\', "b", "c", "a", None]
    assert json.loads(rows[0][6])["big"] == int("9" * 4000)


@pytest.mark.parametrize("largest_group", [pycolytics.MAX_JSON_GROUP_CHARS, 0], ids=["one-text", "row-by-row"])
def test_postgresql_group_inserts_count_only_new_rows_and_keep_the_first_of_an_event_id(
        monkeypatch, postgres_url, largest_group):
    monkeypatch.setattr(pycolytics, "MAX_JSON_GROUP_CHARS", largest_group)
    counted, rows = insert_tricky_batches(postgres_url)
    assert counted == NEW_ROWS
    kept = [(row[0], row[1], row[-1]) for row in rows if row[-1] is not None]
    assert kept == [("é漢字😀", "my-game", "a"), ("level_started", "my-game", 'é😀"\\'), ("level_started", "my-game", "b"),
                    ("level_started", "my-game", "c"), ("level_started", "another-game", "a")]
    assert [row[7] for row in rows][3] == "2026-01-02 03:04:05.123456"
    assert {row[8] for row in rows} == {"2026-11-28 12:00:00.123456"}


@pytest.mark.parametrize("size", [6, 100], ids=["one statement", "in chunks"])
def test_an_sqlite_group_with_one_row_the_database_refuses_stores_none_of_it(tmp_path, size):
    config = pycolytics.load_config(environ={}, overrides={"database": str(tmp_path / "events.db"), "api_keys": KEY})
    store = pycolytics.store_for(config)
    with contextlib.closing(store.connect()) as connection:  # a rule an operator added: the last row breaks it
        connection.execute("CREATE TRIGGER no_refused BEFORE INSERT ON event WHEN NEW.event_type = 'refused'"
                           " BEGIN SELECT RAISE(ABORT, 'refused'); END")
        rows = rows_of(config, [event(event_id=str(n)) for n in range(size - 1)] + [event(event_type="refused")])
        with pytest.raises(sqlite3.IntegrityError, match="refused"):
            store.insert(connection, rows)
        assert count(config.database) == 0
        assert store.insert(connection, rows[:-1]) == size - 1  # the connection still takes the rest
    assert count(config.database) == size - 1


@pytest.mark.parametrize("largest_group", [pycolytics.MAX_JSON_GROUP_CHARS, 0], ids=["one-text", "row-by-row"])
def test_a_postgresql_group_with_one_row_the_database_refuses_stores_none_of_it(monkeypatch, postgres_url,
                                                                                largest_group):
    monkeypatch.setattr(pycolytics, "MAX_JSON_GROUP_CHARS", largest_group)
    config = pycolytics.load_config(environ={}, overrides={"database": postgres_url, "api_keys": KEY, "quiet": "yes"})
    store = pycolytics.store_for(config)
    connection = store.connect()
    try:  # a constraint an operator added: the last row of the group breaks it
        connection.execute("ALTER TABLE event ADD CONSTRAINT no_refused CHECK (event_type <> 'refused')")
        rows = rows_of(config, [event(event_id=str(n)) for n in range(5)] + [event(event_type="refused")])
        with pytest.raises(psycopg.errors.CheckViolation):
            store.insert(connection, rows)
        assert store.insert(connection, rows[:-1]) == 5  # the connection still takes the rest
    finally:
        connection.close()
    assert count(postgres_url) == 5


def test_a_postgresql_group_within_the_limit_never_goes_row_by_row(monkeypatch, postgres_url):
    monkeypatch.setattr(pycolytics, "POSTGRES_INSERT", "not a statement")
    assert insert_tricky_batches(postgres_url)[0] == NEW_ROWS


# -- PostgreSQL that never hangs, and high availability ------------------------------------------------


@pytest.fixture
def postgres_client(tmp_path, monkeypatch, postgres_url):
    """A collector on this test's schema whose database waits end after one second."""
    monkeypatch.chdir(tmp_path)
    config = pycolytics.load_config(environ={}, overrides={
        "database": postgres_url, "api_keys": KEY, "quiet": "yes", "busy_timeout": "1"})
    app = pycolytics.create_app(config)
    yield webtest.TestApp(app)
    app.close()


def within(seconds, function, *arguments, **keywords):
    """function(...)'s result, or a failure if it has none after `seconds`: a hang, not a slow machine."""
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        return pool.submit(function, *arguments, **keywords).result(timeout=seconds)
    finally:
        pool.shutdown(wait=False)


@contextlib.contextmanager
def table_locked(url):
    """The event table held as a non-concurrent CREATE INDEX or an ALTER TABLE holds it."""
    with psycopg.connect(url) as locker:
        locker.execute("LOCK TABLE event IN ACCESS EXCLUSIVE MODE")
        yield
        locker.rollback()


def test_an_idle_connection_the_server_dropped_costs_no_batch(postgres_client, postgres_url):
    post(postgres_client, "/v1.0/event", event(user_id="before"))
    assert cut_connections(postgres_url) >= 1  # a database restart, a pooler, an idle timeout
    post(postgres_client, "/v1.0/events", [event(user_id="after"), event(user_id="after too")])
    assert [row[0] for row in stored(postgres_url, "user_id")] == ["before", "after", "after too"]


def test_a_locked_table_gives_503_after_busy_timeout_and_healthz_answers_at_once(postgres_client, postgres_url):
    post(postgres_client, "/v1.0/event", event(user_id="before"))
    with table_locked(postgres_url):
        health = healthz_once_settled(postgres_client, "unavailable")  # the commit above proves health for a second
        refused = within(20, post, postgres_client, "/v1.0/events", [event(user_id="locked out")] * 2, status=503)
        after = within(20, postgres_client.get, "/healthz", status=503)
    assert health["database"] == "the event table is locked by another session"
    assert "the event table is locked" in after.json["database"] and "statement" not in after.text  # driver words
    assert refused.json["detail"] == "the database could not store the events; send them again shortly"
    assert refused.headers["Retry-After"]
    post(postgres_client, "/v1.0/event", event(user_id="after"))
    assert postgres_client.get("/healthz").json["status"] == "ok"
    assert [row[0] for row in stored(postgres_url, "user_id")] == ["before", "after"]


def test_healthz_says_in_general_words_that_the_database_is_unreachable(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    config = pycolytics.load_config(environ={}, overrides={"database": f"postgresql://127.0.0.1:{port}/secret_db"})
    store = pycolytics.PostgresStore(config)
    assert within(20, store.problem) == "the database cannot be reached"
    assert f"{port}" in caplog.text and "secret_db" not in store.problem()


def test_sessions_commit_synchronously_whatever_the_server_default(postgres_url):
    config = pycolytics.load_config(environ={}, overrides={
        "database": postgres_url + "&options=-csynchronous_commit%3Doff", "busy_timeout": "3"})
    store = pycolytics.PostgresStore(config)
    with store.connect() as connection:
        settings = connection.execute("SELECT current_setting('synchronous_commit'), current_setting('lock_timeout'),"
                                      " current_setting('statement_timeout')").fetchone()
    assert settings == ("on", "3s", "4s")


def test_rows_imported_with_their_ids_give_503_never_a_204_for_events_not_stored(postgres_client, postgres_url, caplog):
    post(postgres_client, "/v1.0/event", event(user_id="first"))
    with psycopg.connect(postgres_url) as connection:  # a data-only restore: ids set, the sequence behind
        connection.execute(
            "INSERT INTO event (id, event_type, application, version, platform, user_id, session_id, value, time)"
            " SELECT n, 'imported', 'my-game', '1', 'Linux', 'imported', 's', '{}', now() FROM generate_series(2, 21) n")
    for n in range(3):
        post(postgres_client, "/v1.0/events", [event(user_id=f"new-{n}", event_id=f"new-{n}")] * 2, status=503)
    assert count(postgres_url) == 21 and "new-0" not in {row[0] for row in stored(postgres_url, "user_id")}
    assert "event_pkey" in caplog.text


def test_the_same_event_id_in_two_applications_is_two_events(postgres_client, postgres_url):
    post(postgres_client, "/v1.0/events", [event(application="game-a", event_id="e-1"),
                                           event(application="game-b", event_id="e-1"),
                                           event(application="game-a", event_id="e-1")])
    assert stored(postgres_url, "application, event_id") == [("game-a", "e-1"), ("game-b", "e-1")]


class FreezingProxy:
    """A TCP proxy to the PostgreSQL server that can stop forwarding while its sockets stay
    open: a hung server, a stuck NAT or proxy; TCP goes on acknowledging, nothing answers."""

    def __init__(self, upstream):
        self.upstream = upstream
        self.frozen = threading.Event()
        self.closing = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.threads = [threading.Thread(target=self._accept)]
        self.threads[0].start()

    def _accept(self):
        while not self.closing.is_set():
            try:
                client, _ = self.listener.accept()
            except socket.timeout:
                continue
            server = socket.create_connection(self.upstream, timeout=10)
            for source, sink in ((client, server), (server, client)):
                source.settimeout(0.1)
                thread = threading.Thread(target=self._pump, args=(source, sink))
                thread.start()
                self.threads.append(thread)

    def _pump(self, source, sink):
        with source:
            while not self.closing.is_set():
                if self.frozen.is_set():
                    time.sleep(0.05)
                    continue
                try:
                    data = source.recv(65536)
                except socket.timeout:
                    continue
                except OSError:
                    data = b""
                if not data:
                    with contextlib.suppress(OSError):
                        sink.shutdown(socket.SHUT_WR)
                    return
                with contextlib.suppress(OSError):
                    sink.sendall(data)

    def close(self):
        self.closing.set()
        for thread in self.threads:
            thread.join(10)
        self.listener.close()


def test_a_database_that_stops_answering_mid_request_gives_503_not_a_hang(tmp_path, monkeypatch, postgres_url):
    server = urllib.parse.urlsplit(POSTGRES_SERVER)
    proxy = FreezingProxy((server.hostname, server.port or 5432))
    monkeypatch.chdir(tmp_path)
    url = urllib.parse.urlsplit(postgres_url)._replace(netloc=f"127.0.0.1:{proxy.port}").geturl()
    config = pycolytics.load_config(environ={}, overrides={
        "database": url, "api_keys": KEY, "quiet": "yes", "busy_timeout": "1"})
    app = pycolytics.create_app(config)
    client = webtest.TestApp(app)
    try:
        post(client, "/v1.0/event", event(user_id="before"))
        proxy.frozen.set()
        # within busy_timeout and the writer's grace, the commit is given up on and its connection cut
        refused = within(1 + pycolytics.WRITE_GRACE + 2, post, client, "/v1.0/event", event(user_id="unanswered"),
                         status=503)
        proxy.frozen.clear()
        within(10, wait_for, lambda: client.app.writer.state() == "waiting for events")
        post(client, "/v1.0/event", event(user_id="after"))
    finally:
        proxy.close()  # first: it frees a writer that would be stuck on it
        app.close()
    assert refused.json["detail"] in ("the database could not store the events; send them again shortly",
                                      "the database did not commit within busy_timeout = 1 s; send the events again shortly")
    assert [row[0] for row in stored(postgres_url, "user_id")] == ["before", "after"]


def sqlite_events(path, users):
    app = pycolytics.create_app(pycolytics.load_config(environ={}, overrides={"database": str(path), "api_keys": KEY}))
    post(webtest.TestApp(app), "/v1.0/events", [event(user_id=user) for user in users])
    app.close()


def copy_into(url, path):
    command = [sys.executable, os.path.join(HERE, "pycolytics.py"), "--database", str(path), "copy", "--to", url]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return int(re.search(r"copied (\d+) events", result.stderr).group(1))


def test_copy_takes_a_second_collectors_database_found_at_the_same_path(tmp_path, postgres_url):
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    for machine, users in (("first", ["a1", "a2"]), ("second", ["b1", "b2", "b3"])):
        sqlite_events(tmp_path / machine / "pycolytics.db", users)
    path = tmp_path / "pycolytics.db"  # /var/lib/pycolytics/pycolytics.db on each machine
    copies = []
    for machine in ("first", "second"):
        shutil.copy(tmp_path / machine / "pycolytics.db", path)
        copies.append(copy_into(postgres_url, path))
    assert copies == [2, 3]
    assert sorted(row[0] for row in stored(postgres_url, "user_id")) == ["a1", "a2", "b1", "b2", "b3"]


def test_a_moved_database_resumes_its_copy_and_no_event_is_copied_twice(tmp_path, postgres_url):
    sqlite_events(tmp_path / "old.db", ["u1", "u2"])
    assert copy_into(postgres_url, tmp_path / "old.db") == 2
    os.rename(tmp_path / "old.db", tmp_path / "moved.db")
    sqlite_events(tmp_path / "moved.db", ["u3"])
    shutil.copy(tmp_path / "moved.db", tmp_path / "backup.db")
    assert [copy_into(postgres_url, tmp_path / name) for name in ("moved.db", "backup.db", "moved.db")] == [1, 0, 0]
    assert [row[0] for row in stored(postgres_url, "user_id")] == ["u1", "u2", "u3"]


def test_serving_a_database_never_gives_it_a_copy_identity(tmp_path):
    sqlite_events(tmp_path / "events.db", ["u1"])
    with sqlite3.connect(tmp_path / "events.db") as connection:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "pycolytics_identity" not in tables


# PostgreSQL's server programs, for the tests that make clusters of their own.
POSTGRES_BIN = os.environ.get("PYCOLYTICS_TEST_POSTGRES_BIN", "/usr/lib/postgresql/15/bin")


def required(program):
    """The path of `program`; without it the test is skipped, or fails in CI (which installs it)."""
    found = shutil.which(program)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must install {program} (.ci/run does)")
        pytest.skip(f"{program} is not installed")
    return found


def as_postgres(command, **keywords):
    """Run a PostgreSQL server program; initdb refuses root, so root runs it as the postgres user."""
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    return subprocess.run(prefix + command, capture_output=True, text=True, timeout=120, check=True, **keywords)


def start_cluster(directory, port, settings):
    with open(os.path.join(directory, "postgresql.conf"), "a") as conf:
        conf.write(f"\nport = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = ''\n{settings}\n")
    as_postgres([os.path.join(POSTGRES_BIN, "pg_ctl"), "-D", directory, "-l", directory + ".log", "-w", "-t", "60",
                 "start"])


def stop_cluster(directory):
    if os.path.exists(os.path.join(directory, "postmaster.pid")):
        subprocess.run(["runuser", "-u", "postgres", "--"] * (os.geteuid() == 0) +
                       [os.path.join(POSTGRES_BIN, "pg_ctl"), "-D", directory, "-m", "immediate", "-w", "stop"],
                       capture_output=True, timeout=60)


@contextlib.contextmanager
def clusters_directory():
    required(os.path.join(POSTGRES_BIN, "initdb"))
    if psycopg is None:
        pytest.fail("psycopg is needed (requirements-dev.txt)") if os.environ.get("CI") else pytest.skip("no psycopg")
    base = tempfile.mkdtemp(prefix="pycolytics-ha-")  # not tmp_path: the postgres user must enter it
    if os.geteuid() == 0:
        shutil.chown(base, "postgres", "postgres")
    try:
        yield base
    finally:
        for name in os.listdir(base):
            stop_cluster(os.path.join(base, name))
        shutil.rmtree(base, ignore_errors=True)


def init_cluster(directory):
    as_postgres([os.path.join(POSTGRES_BIN, "initdb"), "-D", directory, "-U", "postgres", "--auth=trust",
                 "--no-sync", "-E", "UTF8"])


@pytest.fixture
def replicated():
    """A primary and a synchronous streaming standby of its own, on free ports: (primary, standby)
    as (data directory, port)."""
    with clusters_directory() as base:
        primary, standby = os.path.join(base, "primary"), os.path.join(base, "standby")
        ports = free_ports(2)
        init_cluster(primary)
        # every commit waits until the standby has it on disk: what a promotion keeps
        start_cluster(primary, ports[0], "synchronous_standby_names = '*'")
        as_postgres([os.path.join(POSTGRES_BIN, "pg_basebackup"), "-h", "127.0.0.1", "-p", str(ports[0]),
                     "-U", "postgres", "-D", standby, "-R", "-X", "stream", "--checkpoint=fast"])
        # once promoted it stands alone: waiting for a standby of its own would block every commit
        start_cluster(standby, ports[1], "synchronous_standby_names = ''")
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{ports[0]}/postgres", autocommit=True) as connection:
            for _ in range(300):
                if connection.execute("SELECT 1 FROM pg_stat_replication WHERE sync_state = 'sync'").fetchone():
                    break
                time.sleep(0.1)
            else:
                raise AssertionError("the standby did not become synchronous within 30 s")
        yield (primary, ports[0]), (standby, ports[1])


def test_a_commit_waiting_for_a_missing_synchronous_standby_gives_503_not_a_hang(tmp_path, monkeypatch):
    with clusters_directory() as base:
        primary, (port,) = os.path.join(base, "primary"), free_ports(1)
        init_cluster(primary)
        start_cluster(primary, port, "")
        url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        monkeypatch.chdir(tmp_path)
        config = pycolytics.load_config(environ={}, overrides={
            "database": url, "api_keys": KEY, "quiet": "yes", "busy_timeout": "1"})
        app = pycolytics.create_app(config)
        client = webtest.TestApp(app)
        try:
            post(client, "/v1.0/event", event(user_id="replicated"))
            with psycopg.connect(url, autocommit=True) as admin:  # its synchronous standby is gone
                admin.execute("ALTER SYSTEM SET synchronous_standby_names = 'gone'")
                admin.execute("SELECT pg_reload_conf()")
            # The reload reaches each process in its own time; the one that makes commits wait for a
            # standby (the checkpointer) too: a commit at once could still go through.
            def in_force():
                with psycopg.connect(url, autocommit=True) as check:
                    return check.execute("SHOW synchronous_standby_names").fetchone() == ("gone",)

            wait_for(in_force)
            time.sleep(1)
            refused = within(1 + pycolytics.WRITE_GRACE + 2, post, client, "/v1.0/event", event(user_id="unreplicated"),
                             status=503)
        finally:
            app.close()
    assert refused.json["detail"] in ("the database could not store the events; send them again shortly",
                                      "the database did not commit within busy_timeout = 1 s; send the events again shortly")


def start_collector(tmp_path, environ):
    """A collector process whose log is read all along (a full pipe would block its writer)."""
    process, address, _, lines = start_server(tmp_path, "--quiet", environ=environ)
    reader = threading.Thread(target=lines.extend, args=(process.stderr,), daemon=True)
    reader.start()
    return process, address, lines


class Load:
    """Clients posting batches of 3 events, each with a user_id of its own, until stopped."""

    def __init__(self, addresses, clients=6):
        self.addresses = addresses
        self.answers = []  # (monotonic time sent, time answered, collector, status or error, users)
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(n,)) for n in range(clients)]

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exception):
        self.stopping.set()
        for thread in self.threads:
            thread.join(60)
        assert not any(thread.is_alive() for thread in self.threads), "a client hung"

    def _client(self, n):
        for i in itertools.count():
            if self.stopping.is_set():
                return
            address = self.addresses[(n + i) % len(self.addresses)]
            users = [f"{n}-{i}-{k}" for k in range(3)]
            sent = time.monotonic()
            try:
                connection = http.client.HTTPConnection(*address, timeout=30)
                status = post_over(connection, [event(user_id=user) for user in users], "/v1.0/events")
                connection.close()
            except (OSError, http.client.HTTPException) as error:
                status = type(error).__name__
            self.answers.append((sent, time.monotonic(), address, status, users))

    def acknowledged(self):
        return {user for *_, status, users in self.answers if status == 204 for user in users}

    def wait_for(self, condition, seconds=60):
        deadline = time.monotonic() + seconds
        while not condition():
            assert time.monotonic() < deadline, "the load never reached the expected state"
            time.sleep(0.05)


def test_failover_to_a_promoted_standby_loses_no_acknowledged_event_and_needs_no_restart(tmp_path, replicated):
    (primary, primary_port), (standby, standby_port) = replicated
    url = (f"postgresql://postgres@127.0.0.1:{primary_port},127.0.0.1:{standby_port}/postgres"
           "?target_session_attrs=read-write")
    environ = dict(os.environ, PYCOLYTICS_DATABASE=url, PYCOLYTICS_API_KEYS=KEY, PYCOLYTICS_BUSY_TIMEOUT="2")
    collectors = [start_collector(tmp_path, environ) for _ in range(2)]
    try:
        with Load([address for _, address, _ in collectors]) as load:
            load.wait_for(lambda: len(load.answers) >= 60)
            stopped = time.monotonic()
            as_postgres([os.path.join(POSTGRES_BIN, "pg_ctl"), "-D", primary, "-m", "immediate", "-w", "stop"])
            load.wait_for(lambda: any(at > stopped and status == 503 for _, at, _, status, _ in load.answers))
            as_postgres([os.path.join(POSTGRES_BIN, "pg_ctl"), "-D", standby, "-w", "promote"])
            promoted = time.monotonic()
            # both collectors recover by themselves
            load.wait_for(lambda: {address for sent, _, address, status, _ in load.answers
                                   if sent > promoted and status == 204} == {a for _, a, _ in collectors})
            recovered = time.monotonic()
            load.wait_for(lambda: len(load.answers) > 0 and load.answers[-1][0] > recovered + 0.5)
    finally:
        for process, _, _ in collectors:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(30)
    statuses = collections.Counter(status for *_, status, _ in load.answers)
    with psycopg.connect(f"postgresql://postgres@127.0.0.1:{standby_port}/postgres") as connection:
        users = [row[0] for row in connection.execute("SELECT user_id FROM event")]
    sent = {user for *_, users_sent in load.answers for user in users_sent}
    acknowledged = load.acknowledged()
    refused = [answer for answer in load.answers if answer[3] == 503]
    first_204 = min(at for _, at, _, status, _ in load.answers if status == 204 and at > promoted)
    print(f"\nfailover: {len(load.answers)} requests, {dict(statuses)}; primary stopped at 0 s, standby promoted at "
          f"+{promoted - stopped:.2f} s, first 204 after it at +{first_204 - stopped:.2f} s; {len(refused)} requests "
          f"({3 * len(refused)} events) refused with 503; {len(acknowledged - set(users))} acknowledged events lost")
    assert set(statuses) == {204, 503}  # never a hang, never a dropped connection
    assert acknowledged <= set(users)  # every 204 is in the new primary
    assert len(users) == len(set(users)) and set(users) <= sent  # none twice
    assert all(process.returncode == 0 for process, _, _ in collectors)


def balancer_ready(port):
    try:
        return post_over(http.client.HTTPConnection("127.0.0.1", port, timeout=10), event(user_id="ready")) == 204
    except OSError:
        return False


def test_behind_haproxy_a_stopped_collector_costs_only_its_requests_in_flight(tmp_path, postgres_url):
    haproxy = required("haproxy")
    environ = dict(os.environ, PYCOLYTICS_DATABASE=postgres_url, PYCOLYTICS_API_KEYS=KEY)
    collectors = [start_collector(tmp_path, environ) for _ in range(2)]
    port, = free_ports(1)
    servers = "".join(f"    server c{n} {host}:{number} check\n" for n, (_, (host, number), _) in enumerate(collectors))
    (tmp_path / "haproxy.cfg").write_text(
        "global\n    maxconn 256\n"
        "defaults\n    mode http\n    timeout connect 2s\n    timeout client 30s\n    timeout server 30s\n"
        "    retries 3\n    option redispatch\n"
        f"frontend players\n    bind 127.0.0.1:{port}\n    default_backend collectors\n"
        "backend collectors\n    balance roundrobin\n    option http-server-close\n"
        "    option httpchk GET /healthz\n    http-check expect status 200\n"
        "    default-server inter 500ms fall 2 rise 2\n" + servers)
    balancer = subprocess.Popen([haproxy, "-db", "-f", str(tmp_path / "haproxy.cfg")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not balancer_ready(port):
            assert time.monotonic() < deadline and balancer.poll() is None, "haproxy did not start"
            time.sleep(0.1)
        with Load([("127.0.0.1", port)]) as load:
            load.wait_for(lambda: len(load.answers) >= 100)
            crashed = collectors[0][0]
            crashed.kill()  # no goodbye: what a balancer is for
            crashed.wait(30)
            lost = time.monotonic()  # requests sent before this were in flight, or may have been
            load.wait_for(lambda: len([answer for answer in load.answers if answer[0] > lost]) >= 200)
    finally:
        balancer.terminate()
        balancer.wait(30)
        for process, _, _ in collectors:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(30)
    failed = [answer for answer in load.answers if answer[3] != 204]
    print(f"\nhaproxy: {len(load.answers)} requests, one collector killed: {len(failed)} failed "
          f"({collections.Counter(answer[3] for answer in failed)})")
    # only requests sent before the collector was gone failed: those in flight on it
    assert all(answer[0] < lost for answer in failed)
    assert all(answer[3] == 204 for answer in load.answers if answer[0] > lost)
    assert load.acknowledged() <= {row[0] for row in stored(postgres_url, "user_id")}


# -- Promises at their exact edges (mutation-tested) -------------------------------------------------
# bench/mutate.py puts one small bug at a time into the code that carries a promise and runs the
# tests that map to it; the tests here kill mutants the others let live, so each asserts the exact
# value where the promise is exact. Fast on purpose: they run once per mutant.


@pytest.mark.parametrize("synchronous, in_force", [("off", 0), ("normal", 1), ("full", 2), ("extra", 3)])
def test_the_running_writer_commits_with_the_synchronous_setting_in_force(settings, sqlite_only, synchronous, in_force):
    app = pycolytics.create_app(pycolytics.load_config(environ={}, overrides=dict(settings, synchronous=synchronous)))
    try:
        post(webtest.TestApp(app), "/v1.0/event", event())
        wait_for(lambda: not app.writer._summary_behind)  # its summarising step (no fsync of its own) is over
        # the writer's own connection, the one that commits every event, not a new one made here
        assert app.writer._connection.execute("PRAGMA synchronous").fetchone()[0] == in_force
    finally:
        app.close()


def writer_row(user_id, value="{}"):
    moment = "2024-05-01 12:00:00.000000"
    return ("level_started", "my-game", "1.0", "Linux", user_id, "s1", value, moment, moment, None)


def new_writer(settings, **changes):
    """A writer of its own, not started: what is submitted waits in its queue until start()."""
    config = pycolytics.load_config(environ={}, overrides=dict(settings, **changes))
    return pycolytics.Writer(config, pycolytics.store_for(config), pycolytics.Metrics())


def test_a_full_writer_queue_refuses_exactly_past_max_pending_events_and_stores_nothing_refused(settings, database):
    writer = new_writer(settings, max_pending_events=5)
    outcomes = []
    writer.submit([writer_row("a1"), writer_row("a2"), writer_row("a3")], outcomes.append)  # not started: it queues
    with pytest.raises(pycolytics.HTTPError) as refused:
        writer.submit([writer_row("b1"), writer_row("b2"), writer_row("b3")], outcomes.append)
    assert dict(refused.value.headers)["Retry-After"] == "1" and "busy" in refused.value.detail
    writer.submit([writer_row("c1"), writer_row("c2")], outcomes.append)  # exactly max_pending_events queued
    with pytest.raises(pycolytics.HTTPError):
        writer.submit([writer_row("d1")], outcomes.append)
    writer.start()
    writer.close()
    assert outcomes == [None, None]
    assert [row[0] for row in stored(database, "user_id")] == ["a1", "a2", "a3", "c1", "c2"]
    with pytest.raises(pycolytics.HTTPError) as closed:
        writer.submit([writer_row("e1")], outcomes.append)
    assert dict(closed.value.headers)["Retry-After"] == "5"


def test_one_batch_larger_than_max_pending_events_is_still_taken_by_an_idle_writer(settings, database):
    writer = new_writer(settings, max_pending_events=2, max_buffered_bytes=4)
    outcomes = []
    writer.submit([writer_row("a1", '"ab"'), writer_row("a2", '"ab"'), writer_row("a3", '"ab"')], outcomes.append)
    writer.start()
    writer.close()
    assert outcomes == [None] and count(database) == 3


def test_the_writer_queue_holds_exactly_max_buffered_bytes_of_values(settings, database):
    writer = new_writer(settings, max_buffered_bytes=8)
    outcomes = []
    writer.submit([writer_row("a1", '"ab"')], outcomes.append)  # 4 bytes of value
    writer.submit([writer_row("a2", '"cd"')], outcomes.append)  # 8: exactly the bound
    with pytest.raises(pycolytics.HTTPError) as refused:
        writer.submit([writer_row("a3", '"e"')], outcomes.append)
    assert dict(refused.value.headers)["Retry-After"] == "1"
    writer.start()
    writer.close()
    assert outcomes == [None, None] and [row[0] for row in stored(database, "user_id")] == ["a1", "a2"]


def test_a_database_failure_answers_503_with_retry_after_5_and_stores_nothing(tmp_path, settings, sqlite_only):
    config = pycolytics.load_config(environ={}, overrides=dict(settings, database=str(tmp_path / "events.db")))
    app = pycolytics.create_app(config)
    client = webtest.TestApp(app)
    try:
        post(client, "/v1.0/event", event())
        with sqlite3.connect(config.database) as connection:
            connection.execute("CREATE TRIGGER refuse BEFORE INSERT ON event BEGIN SELECT RAISE(ABORT, 'full'); END")
        response = post(client, "/v1.0/events", [event(), event()], status=503)
        assert response.headers["Retry-After"] == "5"
        assert client.get("/healthz", status=503)
    finally:
        app.close()
    assert count(config.database) == 1


@pytest.mark.parametrize("limit, now, wait", [
    ((3, 60), 135.5, 45), ((3, 60), 179.2, 1), ((3, 60), 120.0, 60), ((2, 1), 10.25, 1), ((1, 3600), 18001.5, 3599),
])
def test_retry_after_is_exactly_the_whole_seconds_to_the_next_window(limit, now, wait):
    limiter = pycolytics.RateLimiter(limit)
    for _ in range(limit[0]):
        limiter.check("203.0.113.7", now)  # exactly the limit: every one taken
    with pytest.raises(pycolytics.HTTPError) as refused:
        limiter.check("203.0.113.7", now)
    assert dict(refused.value.headers)["Retry-After"] == str(wait)
    assert f"send again in {wait} s" in refused.value.detail
    limiter.check("203.0.113.7", now + wait)  # and then it is the next window


def test_a_429_answers_the_retry_after_its_detail_states(limited, database):
    for _ in range(3):
        post(limited, "/v1.0/event", event())
    response = post(limited, "/v1.0/event", event(), status=429)
    assert f"send again in {response.headers['Retry-After']} s" in response.json["detail"]
    assert response.headers["Access-Control-Expose-Headers"] == "Retry-After"
    assert count(database) == 3


def test_sigterm_answers_exactly_what_it_committed(tmp_path):
    process, address, path, _ = start_server(tmp_path, "--quiet", "--database", "events.db")
    answered, stop = [], threading.Event()

    def client(n):
        for i in itertools.count():
            if stop.is_set():
                return
            try:
                connection = http.client.HTTPConnection(*address, timeout=30)
                connection.request("POST", "/v1.0/events",
                                   body([event(user_id=f"{n}-{i}-{k}", api_key=pycolytics.DEV_KEY) for k in range(3)]))
                status = connection.getresponse().status
                connection.close()
            except OSError:  # refused or closed before an answer: nothing was acknowledged
                return
            answered.append(status)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    time.sleep(1)
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0
    stop.set()
    for thread in threads:
        thread.join(30)
    assert answered.count(204) > 0
    # every committed batch was answered 204 before the process ended: not one more, not one less
    assert count(path) == 3 * answered.count(204)


def users_exported(tmp_path, database, *options):
    result = run_cli(tmp_path, "--database", database, "export", "--format", "jsonl", *options)
    assert result.returncode == 0, result.stderr
    return [json.loads(line)["user_id"] for line in result.stdout.splitlines()]


def test_export_until_is_exclusive_so_months_split_every_event_once(client, database, tmp_path):
    post(client, "/v1.0/events", [
        event(user_id="last-of-january", timestamp="2024-01-31T23:59:59.999999Z"),
        event(user_id="date-alone", timestamp="2024-02-01"),
        event(user_id="midnight", timestamp="2024-02-01T00:00:00Z"),
        event(user_id="end-of-february", timestamp="2024-02-29T23:59:59Z"),
        event(user_id="march", timestamp="2024-03-01"),
    ])
    # a date alone is stored at midnight exactly, so it sits on the boundary of a monthly export
    assert stored(database, "user_id, time")[1] == ("date-alone", "2024-02-01 00:00:00.000000")
    assert users_exported(tmp_path, database, "--until", "2024-02-01") == ["last-of-january"]
    february = users_exported(tmp_path, database, "--since", "2024-02-01", "--until", "2024-03-01")
    assert february == ["date-alone", "midnight", "end-of-february"]
    # Unix seconds name the same instant: 1706745600 is 2024-02-01T00:00:00Z
    assert users_exported(tmp_path, database, "--since", "1706745600", "--until", "1709251200") == february


def test_prune_before_deletes_only_what_is_strictly_earlier(client, database, tmp_path):
    post(client, "/v1.0/events", [event(user_id="old", timestamp="2024-01-31T23:59:59.999999Z"),
                                  event(user_id="boundary", timestamp="2024-02-01")])
    result = run_cli(tmp_path, "--database", database, "prune", "--before", "2024-02-01", "--yes")
    assert result.returncode == 0, result.stderr
    assert stored(database, "user_id") == [("boundary",)]


def test_export_csv_makes_only_formula_starts_inert(client, database, tmp_path):
    post(client, "/v1.0/events", [event(user_id=text) for text in ("=1+1", "+1", "-1", "@x", "a=b", "1-2")])
    result = run_cli(tmp_path, "--database", database, "export")
    assert result.returncode == 0, result.stderr
    assert [row["user_id"] for row in csv.DictReader(io.StringIO(result.stdout))] == [
        "'=1+1", "'+1", "'-1", "'@x", "a=b", "1-2"]


# Each rendered name holds markup and a quote (the value field may not: a & instead), short enough
# that no ranking shortens it.
HOSTILE = {"application": '<i>app"</i>', "event_type": '<i>type"</i>', "version": '<i>ver"</i>',
           "platform": '<i>os"</i>', "user_id": '<i>user"</i>', "value": '<i>val"</i>', "field": '<i>f&</i>'}


@pytest.fixture
def hostile_dashboard(settings, database):
    app = pycolytics.create_app(pycolytics.load_config(environ={}, overrides=dict(settings, read_keys="reader-key")))
    client = webtest.TestApp(app)
    names = {name: HOSTILE[name] for name in ("application", "event_type", "version", "platform", "user_id")}
    post(client, "/v1.0/events", [event(**names, value={HOSTILE["field"]: HOSTILE["value"]}),
                                  event(event_type="plain", value={HOSTILE["field"]: 7})])
    query = urllib.parse.urlencode({"application": HOSTILE["application"], "of": HOSTILE["event_type"],
                                    "field": HOSTILE["field"], "steps": HOSTILE["event_type"] + ",plain"})
    page = client.get("/dashboard?" + query, headers=basic("reader-key")).text
    yield page
    app.close()


@pytest.mark.parametrize("field", sorted(HOSTILE))
def test_the_dashboard_escapes_every_rendered_field(hostile_dashboard, field):
    name = HOSTILE[field]
    if field != "user_id":  # users are counted, never named
        assert html.escape(name, quote=True) in hostile_dashboard
    assert name not in hostile_dashboard and "<i>" not in hostile_dashboard


def live_post(server, payload, path="/v1.0/events"):
    """(status, detail or None) of one request over a real socket."""
    head = f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    answer = exchange(server, head.encode() + payload)
    status = int(answer.split(b" ", 2)[1])
    text = answer.split(b"\r\n\r\n", 1)[1]
    return status, json.loads(text)["detail"] if text else None


def spaced(document, size):
    """`document` as JSON followed by spaces: exactly `size` bytes."""
    text = body(document)
    assert len(text) <= size
    return text + b" " * (size - len(text))


def short_event(**changes):
    return event(**dict(dict(event_type="start", application="game", version="1.0", user_id="u1"), **changes))


LIVE_LIMITS = [
    # (setting, its value, a body at the limit, the body one past it, status, words)
    ("max_body_bytes", 600, spaced([event()], 600), spaced([event()], 601), 413, "at most 600"),
    ("max_batch_events", 3, body([event()] * 3), body([event()] * 4), 422, "at most 3 events and this one has 4"),
    ("max_string_length", 6, body([short_event(platform="x" * 6)]), body([short_event(platform="x" * 7)]), 422,
     "'platform' is longer than 6 characters"),
    ("max_value_depth", 4, body([event(value={"a": [[[]]]})]), body([event(value={"a": [[[[]]]]})]), 422,
     "more than 4 deep"),
    ("max_value_bytes", 20, body([event(value={"a": "x" * 12})]), body([event(value={"a": "x" * 13})]), 422,
     "21 bytes as JSON; at most 20"),
]


@pytest.mark.parametrize("setting, limit, at_limit, past_limit, status, words", LIVE_LIMITS,
                         ids=[case[0] for case in LIVE_LIMITS])
def test_a_live_server_stores_a_body_at_each_limit_and_refuses_one_past_it(settings, database, tmp_path, monkeypatch,
                                                                           setting, limit, at_limit, past_limit,
                                                                           status, words):
    monkeypatch.chdir(tmp_path)
    with serving(settings, **{setting: limit}) as server:
        assert live_post(server, at_limit) == (204, None)
        stored_at_limit = count(database)
        assert stored_at_limit >= 1
        refused, detail = live_post(server, past_limit)
    assert refused == status and words in json.dumps(detail)
    assert count(database) == stored_at_limit


def test_the_dashboards_funnel_gives_each_steps_share_of_the_first(reading):
    today = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    steps = [("u1", "tutorial_start", 3), ("u1", "tutorial_end", 2), ("u2", "tutorial_start", 3),
             ("u3", "tutorial_start", 3), ("u4", "tutorial_start", 3)]
    post(reading, "/v1.0/events", [event(user_id=user, event_type=kind, timestamp=(today - datetime.timedelta(
        minutes=minutes)).isoformat()) for user, kind, minutes in steps])
    page = reading.get("/dashboard?application=my-game&steps=tutorial_start,tutorial_end", headers=basic("reader-key")).text
    assert "4 (100%)</text>" in page and "1 (25%)</text>" in page


def test_a_nul_in_a_key_of_the_value_is_refused_naming_it_and_nothing_is_stored(client, database):
    batch = [event(value={"fine": "yes"}), event(value={"nested": [{"a\u0000b": 1}]})]
    detail = post(client, "/v1.0/events", batch, status=422).json["detail"]
    assert [(problem["loc"], problem["type"]) for problem in detail] == [(["body", 1, "value"], "nul")]
    assert count(database) == 0


def test_the_rate_limiter_never_tracks_more_than_max_tracked_clients(monkeypatch):
    monkeypatch.setattr(pycolytics, "MAX_TRACKED_CLIENTS", 3)
    limiter = pycolytics.RateLimiter((2, 60))
    for n in range(10):
        limiter.check(f"198.51.100.{n}", now=n * 60)  # a new window each time: the old ones can go
        assert len(limiter._counts._counts) <= 3


def raw_request(head, body_bytes=b"", blank_lines=0):
    return b"\r\n" * blank_lines + head.encode() + f"Content-Length: {len(body_bytes)}\r\n\r\n".encode() + body_bytes


EVENT_HEAD = "POST /v1.0/events {version}\r\nHost: test\r\nConnection: close\r\n{extra}"
FRAMING_EDGES = [
    # (what, settings, request, status)
    ("8 blank lines before the request", {}, raw_request(EVENT_HEAD.format(version="HTTP/1.1", extra=""),
                                                         body([event()]), 8), 204),
    ("9 blank lines before the request", {}, raw_request(EVENT_HEAD.format(version="HTTP/1.1", extra=""),
                                                         body([event()]), 9), 400),
    ("a header line of max_header_field bytes", {"max_header_field": 100},
     raw_request(EVENT_HEAD.format(version="HTTP/1.1", extra="X-Pad: " + "a" * 93 + "\r\n"), body([event()])), 204),
    ("a header line one byte longer", {"max_header_field": 100},
     raw_request(EVENT_HEAD.format(version="HTTP/1.1", extra="X-Pad: " + "a" * 94 + "\r\n"), body([event()])), 431),
    ("a version that is not HTTP", {}, raw_request(EVENT_HEAD.format(version="XTTP/1.1", extra=""),
                                                   body([event()])), 400),
    ("a body larger than one recv", {}, raw_request(EVENT_HEAD.format(version="HTTP/1.1", extra=""),
                                                    spaced([event()], 200_000)), 204),
]


@pytest.mark.parametrize("what, changes, raw, status", FRAMING_EDGES, ids=[case[0] for case in FRAMING_EDGES])
def test_framing_limits_of_a_live_server_hold_at_their_exact_edge(settings, database, tmp_path, monkeypatch,
                                                                   what, changes, raw, status):
    monkeypatch.chdir(tmp_path)
    with serving(settings, **changes) as server:
        answer = exchange(server, raw)
    assert answer.startswith(f"HTTP/1.1 {status} ".encode()), answer[:200]
    assert count(database) == (1 if status == 204 else 0)


def test_a_header_line_is_held_to_each_servers_own_max_header_field(settings, database, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = raw_request(EVENT_HEAD.format(version="HTTP/1.1", extra="X-Pad: " + "a" * 73 + "\r\n"), body([event()]))
    with serving(settings, max_header_field=100) as server:
        assert exchange(server, raw).startswith(b"HTTP/1.1 204 ")  # an 80-byte line
    with serving(settings, max_header_field=79) as server:
        assert exchange(server, raw).startswith(b"HTTP/1.1 431 ")
    assert count(database) == 1


@pytest.mark.parametrize("name, lowest, below, highest, above", [
    ("port", "0", "-1", "65535", "65536"),
    ("max_batch_events", "1", "0", None, None),
    ("request_timeout", "0.001", "0.0009", "1000000", "1000001"),
    ("retention_days", "0", "-1", "999999", "1000000"),
])
def test_a_setting_at_either_end_of_its_range_is_taken_and_one_past_it_is_refused(tmp_path, name, lowest, below,
                                                                                  highest, above):
    for taken in filter(None, (lowest, highest)):
        config = pycolytics.load_config(environ={}, overrides={"database": str(tmp_path / "e.db"), name: taken})
        assert getattr(config, name) == float(taken)
    for refused in filter(None, (below, above)):
        with pytest.raises(pycolytics.ConfigError, match=name):
            pycolytics.load_config(environ={}, overrides={"database": str(tmp_path / "e.db"), name: refused})


def wsgi_post(app, payload, **environ):
    """(status, body) of one POST straight to the WSGI callable, with an environ made here."""
    request = {"REQUEST_METHOD": "POST", "PATH_INFO": "/v1.0/events", "SERVER_NAME": "test", "SERVER_PORT": "80",
               "REMOTE_ADDR": "127.0.0.1", "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(payload),
               "wsgi.errors": io.StringIO(), "SERVER_PROTOCOL": "HTTP/1.1", **environ}
    answer = []
    data = b"".join(app(request, lambda status, headers, exc_info=None: answer.append(status)))
    return int(answer[0].split()[0]), data


@pytest.mark.parametrize("payload, environ, status", [
    (body([event()]), {"CONTENT_LENGTH": "500"}, 400),  # shorter than announced
    (spaced([event()], 600), {"wsgi.input_terminated": True}, 204),  # a server that ends the input itself
    (spaced([event()], 601), {"wsgi.input_terminated": True}, 413),
])
def test_a_wsgi_body_is_read_to_its_exact_length_and_no_further(settings, database, payload, environ, status):
    app = pycolytics.create_app(pycolytics.load_config(environ={}, overrides=dict(settings, max_body_bytes=600)))
    try:
        assert wsgi_post(app, payload, **environ)[0] == status
    finally:
        app.close()
    assert count(database) == (1 if status == 204 else 0)


@pytest.mark.parametrize("words, meaning", [(("1", "yes", "true", "on", " Yes "), True),
                                            (("0", "no", "false", "off", "OFF"), False)])
def test_a_yes_or_no_setting_reads_every_word_it_documents(tmp_path, words, meaning):
    for word in words:
        config = pycolytics.load_config(environ={}, overrides={"database": str(tmp_path / "e.db"), "quiet": word})
        assert config.quiet is meaning


def test_a_writer_commit_that_never_comes_is_answered_503_with_retry_after_5(settings, database):
    writer = new_writer(settings, busy_timeout=0.2)  # never started: nothing will commit
    started = time.monotonic()
    with pytest.raises(pycolytics.HTTPError) as refused:
        writer.write([writer_row("a1")])
    assert dict(refused.value.headers)["Retry-After"] == "5" and "did not answer in time" in refused.value.detail
    assert time.monotonic() - started < pycolytics.WRITE_GRACE + 2
    writer.start()  # what was answered 503 is not committed later
    writer.close()
    assert count(database) == 0


def test_the_originals_dotenv_may_space_its_equals_sign_and_quote_its_value_either_way(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("SQLITE_FILE_PATH = 'databases/one.db'\nAPI_KEYS= [\"spaced\"] \n")
    config = pycolytics.load_config(environ={})
    assert config.database == "databases/one.db" and config.api_keys == ("spaced",)


@pytest.mark.parametrize("origins", ["example.com", "https://example.com/page", "ftp://example.com"])
def test_a_cors_origin_setting_that_is_not_an_origin_is_refused_naming_it(tmp_path, origins):
    with pytest.raises(pycolytics.ConfigError, match="cors_origins.*is not an origin"):
        pycolytics.load_config(environ={}, overrides={"database": str(tmp_path / "e.db"), "cors_origins": origins})


def test_two_lost_postgresql_connections_within_a_second_cost_no_batch(postgres_client, postgres_url):
    post(postgres_client, "/v1.0/event", event(user_id="first"))
    for user in ("second", "third"):  # the second loss comes within the reconnect's one-second pause
        assert cut_connections(postgres_url) >= 1
        post(postgres_client, "/v1.0/event", event(user_id=user))
    assert [row[0] for row in stored(postgres_url, "user_id")] == ["first", "second", "third"]


def test_a_postgresql_commit_lost_after_it_was_sent_is_a_503_and_never_stored_twice(postgres_client, postgres_url,
                                                                                    monkeypatch):
    post(postgres_client, "/v1.0/event", event(user_id="before"))
    # the COMMIT reaches the server, then the connection dies before its answer comes back
    monkeypatch.setattr(pycolytics, "POSTGRES_COMMIT", pycolytics.POSTGRES_COMMIT
                        + "; SELECT pg_terminate_backend(pg_backend_pid())")
    post(postgres_client, "/v1.0/event", event(user_id="unknown outcome"), status=503)
    assert [row[0] for row in stored(postgres_url, "user_id")] == ["before", "unknown outcome"]


def test_after_a_refused_postgresql_insert_the_next_batch_is_stored(postgres_client, postgres_url):
    post(postgres_client, "/v1.0/event", event(user_id="before"))
    with psycopg.connect(postgres_url, autocommit=True) as connection:
        connection.execute("CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN IF NEW.user_id = 'bad' THEN"
                           " RAISE EXCEPTION 'refused'; END IF; RETURN NEW; END $$ LANGUAGE plpgsql")
        connection.execute("CREATE TRIGGER refuse BEFORE INSERT ON event FOR EACH ROW EXECUTE FUNCTION refuse()")
    post(postgres_client, "/v1.0/events", [event(user_id="ok"), event(user_id="bad")], status=503)
    post(postgres_client, "/v1.0/events", [event(user_id="after")])
    assert [row[0] for row in stored(postgres_url, "user_id")] == ["before", "after"]


def test_a_postgresql_schema_that_keeps_clashing_stops_the_connection_after_three_attempts(postgres_url, monkeypatch):
    with psycopg.connect(postgres_url, autocommit=True) as connection:
        connection.execute("CREATE TABLE clash ()")
    monkeypatch.setattr(pycolytics, "POSTGRES_SCHEMA", pycolytics.POSTGRES_SCHEMA + ("CREATE TABLE clash ()",))
    store = pycolytics.PostgresStore(pycolytics.load_config(environ={}, overrides={"database": postgres_url}))
    with pytest.raises(psycopg.errors.DuplicateTable):
        store.connect()


# -- Nothing a reader, a slow client or a stuck commit does stalls the collector (issue 25) -----------------

ENDLESS = "WITH RECURSIVE endless(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM endless) SELECT count(*) FROM endless"


def slow_reports(monkeypatch, seconds=None):
    """Reports that run a query without end (on SQLite, or pg_sleep on PostgreSQL): only report_timeout stops them."""
    def endless(reader):
        sql = ENDLESS if reader.dialect is pycolytics.SQLITE else "SELECT pg_sleep(600)"
        reader.connection.execute(sql).fetchall()

    monkeypatch.setattr(pycolytics, "build_report", endless)


def timed_post(address):
    started = time.monotonic()
    assert normal_client_is_served(address, timeout=10)
    return time.monotonic() - started


def test_reports_run_off_the_loop_so_events_metrics_and_options_stay_fast_while_they_read(settings, database,
                                                                                          monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    slow_reports(monkeypatch)
    with serving(dict(settings, read_keys="reader-key"), report_timeout=4) as server:
        address = server.server_address
        quiet = sorted(timed_post(address) for _ in range(10))
        readers = [socket.create_connection(address, timeout=30) for _ in range(6)]
        for sock in readers:  # more than report_threads: two read, four wait their turn
            sock.sendall(b"GET /v1.0/report HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer reader-key\r\n\r\n")
        time.sleep(0.5)
        busy = sorted(timed_post(address) for _ in range(20))
        exchange_start = time.monotonic()
        assert exchange(server, b"OPTIONS * HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").startswith(b"HTTP/1.1 200")
        assert exchange(server, b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").startswith(b"HTTP/1.1 200")
        assert time.monotonic() - exchange_start < 1
        answers = [read_all(sock, answers=1) for sock in readers]
        for sock in readers:
            sock.close()
    assert busy[len(busy) // 2] < max(0.25, 5 * quiet[len(quiet) // 2]) and busy[-1] < 2  # median, and the slowest
    assert all(answer.startswith(b"HTTP/1.1 503") and b"report_timeout = 4 s" in answer for answer in answers)
    assert count(database) == 30


def test_a_report_that_runs_past_report_timeout_is_stopped_with_a_503_that_says_so(settings, database, monkeypatch,
                                                                                 make_app):
    slow_reports(monkeypatch)
    config = pycolytics.load_config(environ={}, overrides=dict(settings, read_keys="reader-key", report_timeout=0.5))
    client = webtest.TestApp(make_app(config))
    started = time.monotonic()
    answer = client.get("/v1.0/report", headers=READER, status=503)
    assert time.monotonic() - started < 5 and "report_timeout = 0.5 s" in answer.json["detail"]
    assert answer.headers["Retry-After"] == "5"
    post(client, "/v1.0/event", event())  # the database is fine, and its connections too
    monkeypatch.undo()
    assert client.get("/v1.0/report", headers=READER).json["totals"]["events"] == 1


def test_more_reports_at_once_than_the_read_pool_holds_get_503_at_once(settings, database, monkeypatch, make_app):
    gate = threading.Event()
    monkeypatch.setattr(pycolytics, "build_report", lambda reader: gate.wait(30) and ({}, {}))
    config = pycolytics.load_config(environ={}, overrides=dict(settings, read_keys="reader-key", report_threads=1))
    app = make_app(config)
    answers, held = [], pycolytics.READS_WAITING + 1
    for _ in range(held):  # one reads, the others wait in line
        app.loop_hooks.take({"REQUEST_METHOD": "GET", "PATH_INFO": "/dashboard", "HTTP_AUTHORIZATION": READER[
            "Authorization"], "QUERY_STRING": "", "REMOTE_ADDR": "127.0.0.1"}, lambda *answer: answers.append(answer))
    refused = []
    app.loop_hooks.take({"REQUEST_METHOD": "GET", "PATH_INFO": "/v1.0/report", "HTTP_AUTHORIZATION": READER[
        "Authorization"], "QUERY_STRING": "", "REMOTE_ADDR": "127.0.0.1"}, lambda *answer: refused.append(answer))
    assert refused and refused[0][0].startswith("503") and b"reports are being read or waiting" in refused[0][2]
    gate.set()
    wait_for(lambda: len(answers) == held)


def blocking_inserts(monkeypatch, seconds):
    """The first SQLite insert takes `seconds` first (a disk that hangs, then goes on), outside
    SQLite, where nothing can interrupt it; then it stores its rows."""
    real, calls = pycolytics.SQLiteStore.insert, []

    def insert(store, connection, rows):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(seconds)
        return real(store, connection, rows)

    monkeypatch.setattr(pycolytics.SQLiteStore, "insert", insert)


def test_a_commit_stuck_past_busy_timeout_is_answered_503_in_bounded_time_and_what_queued_meanwhile_is_dropped(
        settings, sqlite_only, database, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    blocking_inserts(monkeypatch, 6)
    with serving(settings, busy_timeout=1) as server:
        address = server.server_address
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            first = pool.submit(timed_answer, address, "first")
            time.sleep(0.5)  # the first commit is stuck; these queue behind it
            queued = [pool.submit(timed_answer, address, f"queued-{n}") for n in range(3)]
            time.sleep(1)
            state = json.loads(exchange(server, b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                               .split(b"\r\n\r\n", 1)[1])
            answers = [first.result()] + [future.result() for future in queued]
        assert state["writer"].startswith("committing for ")
        assert all(status == 503 and seconds < 1 + pycolytics.WRITE_GRACE + 1.5 for status, seconds in answers)
        wait_for(lambda: server.app.writer.state() == "waiting for events", timeout=10)
        assert timed_answer(address, "after")[0] == 204  # once it ended, the writer takes events again
    events = [event_type for event_type, in stored(database, "event_type")]
    assert "after" in events and not any(event_type.startswith("queued") for event_type in events)
    assert "given up on, ended in the end" in caplog.text  # the first: stored after all, and the log says so


def timed_answer(address, event_type):
    started = time.monotonic()
    with socket.create_connection(address, timeout=30) as sock:
        sock.sendall(one_event_request(event_type))
        answer = read_all(sock)
    return int(answer[9:12]), time.monotonic() - started


def test_a_gzip_body_of_several_members_is_stored_whole_and_bytes_after_a_stream_are_refused(client, database):
    batches = [[event(user_id=f"m{n}")] for n in range(3)]
    members = b"".join(gzip.compress(json.dumps(batch).encode()) for batch in batches)
    post(client, "/v1.0/events", members, headers={"Content-Encoding": "gzip"}, status=400)  # three arrays: not JSON
    one = json.dumps([event(user_id=f"m{n}") for n in range(3)]).encode()
    halves = gzip.compress(one[:40]) + gzip.compress(one[40:])
    post(client, "/v1.0/events", halves, headers={"Content-Encoding": "gzip"})
    assert [user for user, in stored(database, "user_id")] == ["m0", "m1", "m2"]
    for encoding, data in (("gzip", gzip.compress(one) + b"trailing"), ("deflate", zlib.compress(one) + b"x"),
                           ("gzip", gzip.compress(one) + gzip.compress(b"[]")[:8])):
        answer = post(client, "/v1.0/events", data, headers={"Content-Encoding": encoding}, status=400)
        assert "after its end" in answer.json["detail"] or "cut short" in answer.json["detail"]
    assert count(database) == 3


def test_a_slow_reader_pipelining_answers_gets_request_timeout_in_all_not_per_answer(settings, database, tmp_path,
                                                                                   monkeypatch):
    """Connections that pipeline more pages than the kernel's buffers hold and drain them now and
    then, a burst before each request_timeout would pass: answer after answer completes, yet every
    connection is closed once request_timeout has passed since the first answer it did not take."""
    monkeypatch.chdir(tmp_path)
    with serving(settings, request_timeout=2, max_connections=4) as server:
        address = server.server_address
        slow = [socket.create_connection(address, timeout=10) for _ in range(4)]
        for sock in slow:
            sock.sendall(b"GET /docs HTTP/1.1\r\nHost: t\r\n\r\n" * 3000)
        wait_for(lambda: len(server._stalled) == 4, timeout=10)
        started, read = time.monotonic(), 0
        while server._connections and time.monotonic() - started < 12:
            time.sleep(1.2)
            for sock in slow:
                sock.settimeout(0.01)
                with contextlib.suppress(OSError):
                    for _ in range(64):
                        read += len(sock.recv(1 << 20))
        assert not server._connections and time.monotonic() - started < 2 + 2.5  # request_timeout, the sweep's second
        assert read > 4 * 1024 * 1024  # they did read: answers kept completing
        for sock in slow:
            sock.close()
        assert normal_client_is_served(address)


def test_slow_readers_holding_every_slot_make_room_for_a_newcomer(settings, database, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with serving(settings, request_timeout=60, max_connections=3) as server:
        address = server.server_address
        slow = []
        for _ in range(3):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(address)
            sock.sendall(b"GET /docs HTTP/1.1\r\nHost: t\r\n\r\n" * 100)
            slow.append(sock)
        time.sleep(pycolytics.GRACE_SECONDS + 0.5)
        started = time.monotonic()
        assert normal_client_is_served(address, timeout=10) and time.monotonic() - started < 5
        for sock in slow:
            sock.close()


def test_summaries_with_a_table_dropped_by_hand_are_made_again_at_start_and_say_so(tmp_path, make_app, caplog):
    database = str(tmp_path / "events.db")
    config = pycolytics.load_config(environ={}, overrides={"database": database, "api_keys": KEY, "quiet": "yes",
                                                           "read_keys": "reader-key"})
    app = make_app(config)
    rows = history(seed=13)
    post_history(webtest.TestApp(app), rows)
    app.close()
    with sqlite3.connect(database) as connection:
        for name, _, _ in pycolytics.SUMMARY_TABLES[1:]:  # all but one, as the old README told operators
            connection.execute(f"DROP TABLE {name}")
    with caplog.at_level("WARNING", logger="pycolytics"):
        client = webtest.TestApp(make_app(config))
    assert "incomplete" in caplog.text
    assert_reports_match(client, rows)
    with sqlite3.connect(database) as connection:
        wait_for(lambda: connection.execute("SELECT last_id FROM pycolytics_summary").fetchone() == (len(rows),))
    assert_reports_match(client, rows)


def test_rebuild_summaries_makes_them_again_while_the_server_runs(tmp_path, make_app):
    database = str(tmp_path / "events.db")
    config = pycolytics.load_config(environ={}, overrides={"database": database, "api_keys": KEY, "quiet": "yes",
                                                           "read_keys": "reader-key"})
    client = webtest.TestApp(make_app(config))
    rows = history(seed=14)
    post_history(client, rows)
    with sqlite3.connect(database) as connection:  # deleted by hand: the summaries still count them
        gone = connection.execute("SELECT id FROM event WHERE id % 7 = 0").fetchall()
        connection.execute("DELETE FROM event WHERE id % 7 = 0")
    rows = [row for n, row in enumerate(rows, 1) if n % 7]
    assert pycolytics.main(["--database", database, "--quiet", "rebuild-summaries"]) == 0
    assert_reports_match(client, rows)
    with sqlite3.connect(database) as connection:
        assert connection.execute("SELECT last_id FROM pycolytics_summary").fetchone() == connection.execute(
            "SELECT max(id) FROM event").fetchone() and gone


def test_a_head_request_gets_no_body_whichever_way_it_comes(client, settings, tmp_path, monkeypatch):
    head, get = client.head("/docs"), client.get("/docs")
    assert head.body == b"" and head.headers["Content-Length"] == get.headers["Content-Length"]
    monkeypatch.chdir(tmp_path)
    with serving(settings) as server:
        answer = exchange(server, b"HEAD /openapi.json HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"\r\n\r\n")


def test_a_report_filter_may_be_as_long_as_a_stored_string(settings, make_app):
    config = pycolytics.load_config(environ={}, overrides=dict(settings, read_keys="reader-key", max_string_length=2000))
    client = webtest.TestApp(make_app(config))
    name = "g" * 1500
    post(client, "/v1.0/event", event(application=name))
    assert client.get(f"/v1.0/report?application={name}", headers=READER).json["totals"]["events"] == 1
    client.get(f"/v1.0/report?application={'g' * 2001}", headers=READER, status=400)
