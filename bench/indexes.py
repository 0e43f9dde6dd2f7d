#!/usr/bin/env python3
"""Which indexes a new Pycolytics database should get: insert cost against query speed.

    python3 bench/indexes.py [--rows 1000000] [--seconds 3]

For each candidate set of indexes: a database filled with --rows realistic events (a year of
them, three games, six event types, random users), then the insert rate of raw executemany
in commits of 100 rows with Pycolytics' pragmas (synchronous=FULL), then the time of the
queries people run on such data. Prints one table; everything runs in one process, one
candidate after the other, on the same machine.
"""

import argparse
import os
import shutil
import sqlite3
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
import pycolytics  # noqa: E402
from bench import fill, raw_sqlite  # noqa: E402

ORIGINAL = [f"CREATE INDEX ix_event_{column} ON event ({column})"
            for column in ("event_type", "application", "version", "platform", "user_id")]
CANDIDATES = {
    "none": [],
    "time (pycolytics)": ["CREATE INDEX ix_event_time ON event (time)"],
    "application, time": ["CREATE INDEX ix_event_application_time ON event (application, time)"],
    "the original's five": ORIGINAL,
    "the original's five + time": ORIGINAL + ["CREATE INDEX ix_event_time ON event (time)"],
}
QUERIES = {
    "events per day, last 7 days":
        "SELECT date(time), count(*) FROM event WHERE time >= datetime('now', '-7 days') GROUP BY 1",
    "one game's daily users, last 30 days":
        "SELECT date(time), count(DISTINCT user_id) FROM event WHERE application = 'game-1'"
        " AND time >= datetime('now', '-30 days') GROUP BY 1",
    "event types on one day":
        "SELECT event_type, count(*) FROM event WHERE time >= datetime('now', '-2 days')"
        " AND time < datetime('now', '-1 days') GROUP BY 1",
    "one user's events":
        "SELECT count(*) FROM event WHERE user_id = (SELECT user_id FROM event WHERE id = 1000)",
    "events per day, all time": "SELECT date(time), count(*) FROM event GROUP BY 1",
}


def timed(connection, sql):
    start = time.perf_counter()
    connection.execute(sql).fetchall()
    return (time.perf_counter() - start) * 1000


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=3)
    arguments = parser.parse_args(argv)
    folder = tempfile.mkdtemp(prefix="pycolytics-indexes-")
    template = os.path.join(folder, "template.db")
    print(f"filling {arguments.rows:,} rows", file=sys.stderr, flush=True)
    fill(template, arguments.rows)
    results = []
    try:
        for name, indexes in CANDIDATES.items():
            path = os.path.join(folder, "candidate.db")
            shutil.copyfile(template, path)
            with sqlite3.connect(path) as connection:
                connection.execute("DROP INDEX IF EXISTS ix_event_time")
                for statement in indexes:
                    connection.execute(statement)
            empty_path = os.path.join(folder, "empty.db")
            with sqlite3.connect(empty_path) as connection:
                connection.execute(pycolytics.SCHEMA.split(";")[0])
                for statement in indexes:
                    connection.execute(statement)
            with sqlite3.connect(path) as connection:
                # a query's time, best of three; before the insert test adds rows of today
                query_ms = {label: min(timed(connection, sql) for _ in range(3)) for label, sql in QUERIES.items()}
            empty_rate = raw_sqlite(empty_path, "full", 100, arguments.seconds)
            full_rate = raw_sqlite(path, "full", 100, arguments.seconds)
            results.append((name, empty_rate, full_rate, query_ms))
            print(f"  {name}: {empty_rate:,.0f} / {full_rate:,.0f} rows/s", file=sys.stderr, flush=True)
            for leftover in (path, empty_path):
                for suffix in ("", "-wal", "-shm"):
                    if os.path.exists(leftover + suffix):
                        os.remove(leftover + suffix)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    print(f"Indexes of a new database: {arguments.rows:,} rows, SQLite {sqlite3.sqlite_version}, "
          f"synchronous=FULL, commits of 100 rows, {time.strftime('%Y-%m-%d')}")
    print()
    print("| indexes | insert, empty (rows/s) | insert, full (rows/s) | " + " | ".join(QUERIES) + " |")
    print("|---|---:|---:|" + "---:|" * len(QUERIES))
    for name, empty_rate, full_rate, query_ms in results:
        cells = " | ".join(f"{query_ms[label]:,.1f} ms" for label in QUERIES)
        print(f"| {name} | {empty_rate:,.0f} | {full_rate:,.0f} | {cells} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
