#!/usr/bin/env python3
"""One group of rows into SQLite, three ways: executemany of the one-row INSERT (what
SQLiteStore.insert did until issue 14's second round), INSERTs of up to 64 rows each (what it
does now), and one INSERT ... SELECT FROM json_each(?) that takes the whole group as one JSON text.

    python3 bench/group_insert.py                   # groups of 100 and 1600 rows, 2 s per cell
    python3 bench/group_insert.py --seconds 5

Issue 14 asked whether handing SQLite a group as one argument costs less than binding every
parameter. Each way writes into a database of its own, with Pycolytics' schema and pragmas and
synchronous=OFF (so no fsync hides the CPU), first alone, then beside a thread that parses and
re-encodes batches as the event loop does (the two share the GIL). CPU is the writer thread's own.
Before timing, both ways store the same tricky rows (unicode, quotes, backslashes, control
characters, a 4300-digit integer, duplicate event_ids within a group and against stored rows),
and the databases are compared row by row: a way that stored anything else is not timed.
"""

import argparse
import itertools
import json
import os
import platform
import sqlite3
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import pycolytics  # noqa: E402

COLUMNS = "event_type, application, version, platform, user_id, session_id, value, time, received_at, event_id"
JSON_EACH_INSERT = (
    f"INSERT INTO event ({COLUMNS}) SELECT "
    + ", ".join(f"json_extract(value, '$[{n}]')" for n in range(10))
    + " FROM json_each(?) WHERE true ON CONFLICT (application, event_id) WHERE event_id IS NOT NULL DO NOTHING"
)
NOW = "2026-11-28 12:00:00.000000"
VALUE = '{"level":3,"score":12345,"weapon":"bow"}'
SESSION = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"


def executemany(connection, rows):
    connection.executemany(pycolytics.INSERT, rows)


def json_each(connection, rows):
    connection.execute(JSON_EACH_INSERT, (pycolytics._compact_json(rows),))


def multi_row(connection, rows):
    for start, size in pycolytics._chunks(len(rows)):
        connection.execute(pycolytics._insert_rows(size), list(itertools.chain.from_iterable(rows[start:start + size])))


WAYS = {"executemany": executemany, "multi-row": multi_row, "json_each": json_each}


def tricky_groups():
    strange = ["é漢字😀", 'say "hi"', "back\\slash\\\\", "\x01\x1f\t\n\r\x7f", "\u2028\u2029", ""]
    values = [VALUE, "{}", '{"n":' + "9" * 4300 + "}", '{"a":[{"b":{"c":["\\"q\\"","\\\\","\\u001f"]}}],"f":1.5e-07}',
              '{"😀":"\\n","x":null,"t":true}']
    first = [(text, "app", "1", "Linux", f"u{n}", "s", values[n % len(values)], NOW, NOW, event_id)
             for n, (text, event_id) in enumerate(zip(strange, ["a", None, "a", "b", None, "é😀"]))]
    second = [("again", "app", "1", "Linux", "u", "s", VALUE, "2026-11-28 12:00:01.000000", NOW, event_id)
              for event_id in ["b", "c", None, "c", "a"]]
    second.append(("other app", "app2", "1", "Linux", "u", "s", "{}", NOW, NOW, "a"))  # "a" again, another app
    return [first, second]


def insert(connection, way, rows):
    changes = connection.total_changes
    with pycolytics.transaction(connection):
        WAYS[way](connection, rows)
    return connection.total_changes - changes


def same_rows(folder):
    """Both ways store the tricky groups alike, and count the same new rows; raises if not."""
    stored, counts = {}, {}
    for way in WAYS:
        connection = pycolytics.connect(os.path.join(folder, f"tricky-{way}.db"), "off")
        counts[way] = [insert(connection, way, group) for group in tricky_groups()]
        stored[way] = connection.execute("SELECT *, typeof(value), typeof(event_id) FROM event ORDER BY id").fetchall()
        connection.close()
    for way in WAYS:
        if stored[way] != stored["executemany"] or counts[way] != counts["executemany"]:
            raise SystemExit(f"{way} and executemany stored different rows:\n{stored}\n{counts}")
    return len(stored["executemany"])


def rows_for(size, group):
    return [("level_started", "my-game", "1.0.2", "Linux", f"{group:06x}{n:04x}", SESSION, VALUE, NOW, NOW, None)
            for n in range(size)]


def event_loop_work(stop, done):
    """What the event loop does per batch of 100, holding the GIL most of the time."""
    body = json.dumps([{"event_type": "level_started", "application": "my-game", "version": "1.0.2",
                        "platform": "Linux", "user_id": "3f2a9c1e", "session_id": SESSION,
                        "value": {"level": 3, "score": 12345, "weapon": "bow"}}] * 100).encode()
    while not stop.is_set():
        [pycolytics._compact_json(event["value"]) for event in pycolytics.parse_json(body)]
        done[0] += 100


def measure(folder, way, size, seconds, contended):
    path = os.path.join(folder, f"{way}-{size}-{contended}.db")
    connection = pycolytics.connect(path, "off")
    stop, parsed = threading.Event(), [0]
    loop = threading.Thread(target=event_loop_work, args=(stop, parsed))
    if contended:
        loop.start()
    written, started, cpu = 0, time.perf_counter(), time.thread_time()
    while time.perf_counter() - started < seconds:
        written += insert(connection, way, rows_for(size, written))
    cpu, elapsed = time.thread_time() - cpu, time.perf_counter() - started
    stop.set()
    if contended:
        loop.join()
    stored = connection.execute("SELECT count(*) FROM event").fetchone()[0]
    connection.close()
    if stored != written:
        raise SystemExit(f"{way}: {written} rows counted as new but {stored} stored")
    return written / elapsed, cpu / written * 1e6, parsed[0] / elapsed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=2.0, help="length of each cell (default 2)")
    arguments = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pycolytics-group-") as folder:
        checked = same_rows(folder)
        print(f"Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}: every way stored the same "
              f"{checked} tricky rows")
        print()
        print("| rows per group | event loop beside | way | rows/s | writer CPU per row | event loop's events/s |")
        print("|---:|---|---|---:|---:|---:|")
        for size in (100, 1600):
            for contended in (False, True):
                for way in WAYS:
                    rate, micros, parsed = measure(folder, way, size, arguments.seconds, contended)
                    shown = f"{parsed:,.0f}" if contended else ""
                    beside = "yes" if contended else "no"
                    print(f"| {size} | {beside} | {way} | {rate:,.0f} | {micros:.2f} µs | {shown} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
