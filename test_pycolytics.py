"""Tests for pycolytics.py: the WSGI application under WebTest, the built-in server over real sockets."""

import base64
import collections
import concurrent.futures
import contextlib
import csv
import datetime
import decimal
import functools
import gzip
import http.client
import io
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
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


POSTGRES_SERVER = "postgresql://127.0.0.1:5432/test"


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
    yield f"{POSTGRES_SERVER}?options=-csearch_path%3D{schema}"
    with psycopg.connect(POSTGRES_SERVER, autocommit=True) as connection:
        connection.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path):
    """Every test of the API, storage and hardening runs on both backends."""
    if request.param == "sqlite":
        return str(tmp_path / "events.db")
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def sqlite_only(database):
    """For tests about SQLite files themselves: their PostgreSQL run is skipped."""
    if is_postgres(database):
        pytest.skip("about SQLite files only")


@pytest.fixture
def settings(database):
    return {"database": database, "api_keys": KEY, "quiet": "yes"}


@pytest.fixture
def config(tmp_path, monkeypatch, settings):
    monkeypatch.chdir(tmp_path)
    return pycolytics.load_config(environ={}, overrides=settings)


@pytest.fixture
def app(config):
    app = pycolytics.create_app(config)
    yield app
    app.close()


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


@pytest.mark.parametrize("path, payload, status, words", BAD_REQUESTS, ids=[f"{case[2]}-{n}" for n, case in enumerate(BAD_REQUESTS)])
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


def test_a_body_over_the_limit_is_refused_before_it_is_read(tmp_path, settings, database):
    app = pycolytics.create_app(pycolytics.load_config(environ={}, overrides=dict(settings, max_body_bytes=100)))
    client = webtest.TestApp(app)
    response = post(client, "/v1.0/events", [event()] * 3, status=413)
    assert "at most 100" in response.json["detail"]
    assert count(database) == 0
    app.close()


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


def test_a_database_without_the_added_columns_is_upgraded_in_place(config, database, sqlite_only):
    with sqlite3.connect(database) as connection:
        connection.executescript(ORIGINAL_SCHEMA)
        connection.executemany("INSERT INTO event VALUES ('old', 'g', '1', 'L', 'u', 's', '{}', ?, '2024-05-01 12:00:00')",
                               [(n,) for n in range(2, 1002)])
    app = pycolytics.create_app(config)
    post(webtest.TestApp(app), "/v1.0/events", [event(event_id="e-1"), event(event_id="e-1")])
    app.close()
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


def test_listed_origins_are_echoed_and_others_refused(settings, database):
    config = pycolytics.load_config(environ={}, overrides=dict(settings, cors_origins="https://a.example, http://localhost:8060"))
    app = pycolytics.create_app(config)
    client = webtest.TestApp(app)
    response = post(client, "/v1.0/event", event(), headers={"Origin": "http://localhost:8060"})
    assert response.headers["Access-Control-Allow-Origin"] == "http://localhost:8060"
    refused = post(client, "/v1.0/event", event(), status=403, headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in refused.headers
    assert "pages from https://evil.example may not send events" in refused.json["detail"]
    post(client, "/v1.0/event", event())  # no Origin: a game, a script, curl
    app.close()
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


def test_a_429_lets_a_pages_script_read_its_retry_after(settings):
    app = pycolytics.create_app(pycolytics.load_config(environ={}, overrides=dict(settings, rate_limit="1/minute")))
    client = webtest.TestApp(app)
    post(client, "/v1.0/event", event())
    refused = post(client, "/v1.0/event", event(), status=429, headers={"Origin": "https://games.example"})
    app.close()
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
                self._closed = not data
                self._received.notify_all()
            if not data:
                os.close(self._answers)
                return

    def call(self, method, session=None, timeout=60, **params):
        number = next(self._numbers)
        message = {"id": number, "method": method, "params": params, **({"sessionId": session} if session else {})}
        data = json.dumps(message).encode() + b"\0"
        while data:
            data = data[os.write(self._commands, data):]
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

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        yield "http://%s:%d/" % server.server_address
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
def sqlite_app(tmp_path):
    """The collector's application on an SQLite file of the test's own, at tmp_path / events.db."""
    app = pycolytics.create_app(pycolytics.load_config(
        environ={}, overrides={"database": str(tmp_path / "events.db"), "api_keys": KEY, "quiet": "yes"}))
    yield app
    app.close()


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
        status, headers, answer = pycolytics._error_parts(refusals[len(posts) - 1])
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
    (pycolytics.ServiceUnavailable("busy", 1), 1),
    (pycolytics.TooManyRequests("over the rate limit", 3), 3),
])
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
            game_page(url + "/v1.0/client.js", url, apiKey=KEY, maxQueue=5) as page:
        devtools = browsers()
        _, session = devtools.open(page)
        queued, stats = devtools.evaluate(session, """[...Array(8).keys()].forEach(n => Pycolytics.track("full", {n}));
            [JSON.parse(localStorage.getItem("pycolytics:web-game:queue")).map(event => event.value.n),
             Pycolytics.stats()]""")
        devtools.wait(session, "Pycolytics.stats().queued === 0")
        _, session = devtools.open(page)
        dropped = devtools.evaluate(session, "Pycolytics.stats().dropped")
    assert queued == [3, 4, 5, 6, 7] and (stats["queued"], stats["dropped"], dropped) == (5, 3, 3)
    with sqlite3.connect(tmp_path / "events.db") as connection:
        values = connection.execute("SELECT value FROM event ORDER BY id").fetchall()
    assert values == [(f'{{"n":{n}}}',) for n in range(3, 8)]
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


# -- Keys per game ---------------------------------------------------------------------------------------

PER_GAME = """[pycolytics]
api_keys = global-key
[app:space-game]
api_keys = space-key
cors_origins = https://space.example
[app:farm-game]
api_keys = farm-key, farm-key-2
"""


@pytest.fixture
def per_game(tmp_path, database):
    (tmp_path / "games.ini").write_text(PER_GAME)
    config = pycolytics.load_config(str(tmp_path / "games.ini"), environ={}, overrides={"database": database})
    app = pycolytics.create_app(config)
    yield webtest.TestApp(app)
    app.close()


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
    assert client.get("/healthz").json["status"] == "ok"


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
    assert result.returncode == 1 and not (tmp_path / "absent.db").exists()


def test_prune_deletes_old_events_only(client, database, tmp_path):
    seed(client)
    for _ in range(2):
        post(client, "/v1.0/events", [event(timestamp=f"2023-06-{day:02d}") for day in range(1, 29)] * 20)
    result = run_cli(tmp_path, "--database", database, "prune", "--before", "2024-01-15")
    assert result.returncode == 0, result.stderr
    assert "deleted 1121 events" in result.stderr
    assert [row[0] for row in stored(database, "time")] == ["2024-02-01 10:00:00.000000", "2024-03-01 10:00:00.000000"]


def test_retention_days_prunes_in_the_running_server(settings, database):
    config = pycolytics.load_config(environ={}, overrides=dict(settings, retention_days=30))
    app = pycolytics.create_app(config)
    client = webtest.TestApp(app)
    post(client, "/v1.0/events", [event(timestamp="2020-01-01")] * 600)
    post(client, "/v1.0/events", [event(timestamp="2020-01-01")] * 600 + [event()])
    app.writer.prune_soon()
    deadline = time.monotonic() + 20
    while count(database) > 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert count(database) == 1
    assert app.writer.pruned == 1200
    assert "pycolytics_events_pruned_total 1200" in client.get("/metrics").text
    app.close()


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
def reading(settings, database):
    config = pycolytics.load_config(environ={}, overrides=dict(settings, read_keys="reader-key"))
    app = pycolytics.create_app(config)
    client = webtest.TestApp(app)
    seed_recent(client)
    yield client
    app.close()


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


def basic(key):
    return {"Authorization": "Basic " + base64.b64encode(f"anyone:{key}".encode()).decode()}


def test_the_dashboard_is_off_without_read_keys(client):
    assert "set read_keys" in client.get("/dashboard", status=403).json["detail"]


@pytest.mark.parametrize("headers", [{}, basic("wrong"), basic(KEY), {"Authorization": f"Bearer {KEY}"},
                                     {"Authorization": "Basic !!!"}, {"Authorization": "Digest x"}])
def test_the_dashboard_needs_a_read_key_and_write_keys_do_not_open_it(reading, headers):
    response = reading.get("/dashboard", headers=headers, status=401)
    assert response.headers["WWW-Authenticate"].startswith("Basic realm=")
    assert "reader-key" not in response.text


@pytest.mark.parametrize("headers", [basic("reader-key"), {"Authorization": "Bearer reader-key"}])
def test_the_dashboard_draws_its_charts_as_inline_svg(reading, headers):
    page = reading.get("/dashboard", headers=headers)
    assert page.content_type == "text/html" and "default-src 'none'" in page.headers["Content-Security-Policy"]
    assert page.text.count("<svg") == 5 and page.text.count('<rect class="bar"') >= 30
    assert "<b>300</b>events" in page.text and "daily users, on average" in page.text
    assert not re.search(r"<script|<link|https?://", page.text)


def test_the_dashboard_filters_by_application_and_dates(reading):
    page = reading.get("/dashboard?application=farm-game", headers=basic("reader-key"))
    assert "<b>100</b>events" in page.text and '<option value="space-game">' in page.text
    today = datetime.datetime.now(datetime.timezone.utc).date()
    page = reading.get(f"/dashboard?since={today}&until={today}", headers=basic("reader-key"))
    assert page.text.count('<rect class="bar"') >= 1
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
    server = pycolytics.Server(app, config, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    url = "http://viewer:reader-key@%s:%d/dashboard" % server.server_address
    headless = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,1000"]
    try:
        dom = subprocess.run(headless + ["--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
        shot = tmp_path / "dashboard.png"
        subprocess.run(headless + [f"--screenshot={shot}", url], capture_output=True, timeout=120)
    finally:
        server.shutdown()
        thread.join(10)
        app.close()
    assert dom.count("<svg") == 5 and dom.count("<polyline") == 2 and "Events per day" in dom
    assert png_colours(shot) > 40
    if os.environ.get("SCREENSHOT_TO"):
        shutil.copyfile(shot, os.environ["SCREENSHOT_TO"])


# -- Rate limits -------------------------------------------------------------------------------------


@pytest.fixture
def limited(settings):
    config = pycolytics.load_config(environ={}, overrides=dict(settings, rate_limit="3/minute"))
    app = pycolytics.create_app(config)
    yield webtest.TestApp(app, extra_environ={"REMOTE_ADDR": "203.0.113.7"})
    app.close()


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
    with pytest.raises(pycolytics.TooManyRequests):
        limiter.check("a", now=59)
    limiter.check("a", now=60)
    monkeypatch.setattr(pycolytics, "MAX_TRACKED_CLIENTS", 100)
    for n in range(1000):
        limiter.check(f"10.0.{n // 256}.{n % 256}", now=61)
    assert len(limiter._windows) <= 100


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
    assert set(document["paths"]) == {"/v1.0/event", "/v1.0/events"}
    schema = document["components"]["schemas"]["Event"]
    assert set(schema["required"]) == set(pycolytics.EVENT_FIELDS)
    assert schema["properties"]["user_id"]["maxLength"] == 255
    assert document["paths"]["/v1.0/events"]["post"]["requestBody"]["content"]["application/json"]["schema"]["maxItems"] == 1000


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


def test_a_database_made_by_the_original_opens_and_keeps_working(config, database, sqlite_only):
    with sqlite3.connect(database) as connection:
        connection.executescript(ORIGINAL_SCHEMA)
    app = pycolytics.create_app(config)
    post(webtest.TestApp(app), "/v1.0/events", [event(event_type="new")])
    app.close()
    assert stored(database, "id, event_type, received_at IS NULL") == [(1, "old", 1), (2, "new", 0)]
    with sqlite3.connect(database) as connection:
        indexes = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert indexes == {"ix_event_event_type", "ix_event_application", "ix_event_version", "ix_event_platform",
                       "ix_event_user_id", "ix_event_event_id"}


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
    for name, default in pycolytics.DEFAULTS.items():
        if name in documented:
            assert documented[name] == default, name
        else:
            assert re.search(rf"^# ?{name} = {re.escape(default)}$", text, re.M), name


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


@pytest.fixture
def server(config, app):
    server = pycolytics.Server(app, config, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    yield server
    server.shutdown()
    thread.join(10)
    assert not thread.is_alive()


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
    raw = (b"POST /v1.0/event HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(one), one)
           + b"POST /v1.0/event HTTP/1.1\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(two), two))
    answer = exchange(server, raw)
    assert answer.count(b"HTTP/1.1 204") == 2
    assert [row[0] for row in stored(database)] == ["p1", "p2"]


def test_expect_100_continue_is_honoured(server, database):
    payload = body(event())
    with socket.create_connection(server.server_address, timeout=10) as sock:
        sock.sendall(b"POST /v1.0/event HTTP/1.1\r\nExpect: 100-continue\r\nConnection: close\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(payload))
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(payload)
        assert sock.recv(1000).startswith(b"HTTP/1.1 204")
    assert count(database) == 1


@pytest.mark.parametrize("raw, status", [
    (b"POST /v1.0/event HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n{", b"413"),
    (b"POST /v1.0/event HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", b"411"),
    (b"POST /v1.0/event HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\nhello", b"400"),
    (b"POST /v1.0/event HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", b"400"),
    (b"POST /v1.0/event HTTP/1.1\r\nContent-Length: -5\r\n\r\n", b"400"),
    (b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\n\r\n", b"414"),
    (b"GET / HTTP/1.1\r\n" + b"X-Big: " + b"b" * 9000 + b"\r\n\r\n", b"431"),
    (b"GET / HTTP/1.1\r\n" + b"X-Many: 1\r\n" * 101 + b"\r\n", b"431"),
    (b"GET / HTTP/2.0\r\n\r\n", b"505"),
    (b"NONSENSE\r\n\r\n", b"400"),
    (b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", b"400"),
], ids=lambda value: value[:24].decode("latin-1") if isinstance(value, bytes) else None)
def test_bad_framing_is_refused_and_the_server_keeps_serving(server, database, raw, status):
    answer = exchange(server, raw)
    assert answer.split(b" ")[1] == status
    assert b'"detail"' in answer
    follow_up = body(event())
    good = exchange(server, b"POST /v1.0/event HTTP/1.1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
                    % (len(follow_up), follow_up))
    assert good.startswith(b"HTTP/1.1 204")
    assert count(database) == 1


def test_the_framing_limits_are_settings(settings):
    config = pycolytics.load_config(environ={}, overrides=dict(settings, max_request_line=100, max_header_fields=3))
    app = pycolytics.create_app(config)
    server = pycolytics.Server(app, config, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        assert exchange(server, b"GET /" + b"a" * 120 + b" HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 414")
        assert exchange(server, b"GET / HTTP/1.1\r\n" + b"X: 1\r\n" * 4 + b"\r\n").startswith(b"HTTP/1.1 431")
        assert exchange(server, b"GET / HTTP/1.1\r\n" + b"X: 1\r\n" * 3 + b"Connection: close\r\n\r\n"
                        ).startswith(b"HTTP/1.1 431")
        assert exchange(server, b"GET / HTTP/1.1\r\nX: 1\r\nConnection: close\r\n\r\n").startswith(b"HTTP/1.1 200")
    finally:
        server.shutdown()
        thread.join(10)
        app.close()


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


def test_silent_and_trickling_connections_do_not_delay_other_clients(tmp_path, settings):
    config = pycolytics.load_config(environ={}, overrides=dict(settings, threads=2, idle_timeout=1, request_timeout=2))
    app = pycolytics.create_app(config)
    server = pycolytics.Server(app, config, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    silent = [socket.create_connection(server.server_address) for _ in range(200)]
    tricklers = [socket.create_connection(server.server_address) for _ in range(20)]
    trickling = threading.Event()

    def trickle():
        request = b"POST /v1.0/event HTTP/1.1\r\nContent-Length: 100\r\n\r\n" + b"{" * 100
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
            answer = exchange(server, b"POST /v1.0/event HTTP/1.1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
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
        server.shutdown()
        thread.join(10)
        app.close()
    assert count(config.database) == 10


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
    server = pycolytics.Server(app, config, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        assert server.url.startswith("https://")
        try:
            plain = exchange(server, b"POST /v1.0/event HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}")
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
    assert result.returncode == 1
    assert "cannot load certfile missing.pem" in result.stderr


# -- Hostile input, generated ------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
valid_events = st.fixed_dictionaries(
    dict({name: st.text(max_size=40) for name in pycolytics.EVENT_FIELDS}, api_key=st.just(KEY)),
    optional={"value": st.dictionaries(st.text(max_size=8), json_values, max_size=5), "extra": json_values},
)
# A valid event with one field made wrong: missing, null, not a string, too long, or a wrong key.
spoiled_events = st.tuples(
    valid_events, st.sampled_from(pycolytics.EVENT_FIELDS + ("value", "api_key")),
    st.none() | st.integers() | st.text(min_size=256, max_size=300) | json_values | st.just(...),
).map(lambda spoil: {name: value for name, value in dict(spoil[0], **{spoil[1]: spoil[2]}).items() if value is not ...})
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
    before = count(database)
    response = client.post("/v1.0/events", json.dumps(batch).encode(), expect_errors=True)
    hypothesis.event(f"answered {response.status_int}")
    assert response.status_int in (204, 401, 422), response.text
    rows = stored(database)[before:]
    if response.status_int != 204:
        assert rows == []
        return
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
    assert "detail" in response.json if response.status_int != 204 else response.body == b""
    if response.status_int != 204:
        assert count(database) == before


# -- The API fuzzed from its OpenAPI document (schemathesis) -------------------------------------------


@pytest.fixture
def api_schema(app):
    return schemathesis.openapi.from_wsgi("/openapi.json", app)


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


def test_a_lost_database_connection_gives_503_then_recovers_and_loses_nothing_acknowledged(tmp_path, postgres_url):
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
        with psycopg.connect(POSTGRES_SERVER, autocommit=True) as admin:
            cut = admin.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                                " WHERE application_name = 'pycolytics'").fetchone()[0]
        time.sleep(2.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
    after = statuses[cut_at:]
    assert cut >= 1
    assert 503 in after and after[-1] == 204 and set(after) <= {204, 503}
    assert acknowledged <= {row[0] for row in stored(postgres_url, "user_id")}


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
