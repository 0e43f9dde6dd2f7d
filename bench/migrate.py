#!/usr/bin/env python3
"""How long the start-up migration to an event_id unique per application takes.

    python3 bench/migrate.py [--rows 1000000]

Builds a database as the Pycolytics before it made (an index on event_id alone), with --rows
events that all carry an event_id (the worst case: every row enters the new index), then
times pycolytics.connect() on it, which replaces that index by one on (application, event_id),
and once more on the migrated database.
"""

import argparse
import os
import sqlite3
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pycolytics  # noqa: E402


def older_database(path, rows):
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.executescript(pycolytics.SCHEMA + "".join(
        f"ALTER TABLE event ADD COLUMN {name} {kind};" for name, kind in pycolytics.ADDED_COLUMNS))
    connection.execute("CREATE UNIQUE INDEX ix_event_event_id ON event (event_id) WHERE event_id IS NOT NULL")
    chunk = 100_000
    for first in range(0, rows, chunk):
        connection.execute("BEGIN")
        connection.executemany(
            "INSERT INTO event (event_type, application, version, platform, user_id, session_id, value, time,"
            " received_at, event_id) VALUES ('level_won', ?, '1.0', 'Linux', ?, ?, '{}', ?, ?, ?)",
            ((f"game-{n % 3}", f"u{n}", f"s{n}", "2024-05-01 12:00:00.000000", "2024-05-01 12:00:00.000000",
              f"{os.urandom(8).hex()}-{n}") for n in range(first, min(rows, first + chunk))))
        connection.execute("COMMIT")
    connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    connection.close()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="events in the database (default 1000000)")
    arguments = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "older.db")
        older_database(path, arguments.rows)
        size = os.path.getsize(path)
        for label in ("migrating", "migrated"):
            started = time.perf_counter()
            pycolytics.connect(path).close()
            print(f"{label:10} {arguments.rows:,} rows ({size / 2**20:.0f} MiB): connect() took "
                  f"{time.perf_counter() - started:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
