#!/usr/bin/env python3
"""How long the report API and the dashboard take on a large SQLite database, the first time.

    python3 bench/report.py [--events 2000000] [--players 50000] [--days 365] [--database FILE]

Fills (once; an existing --database is reused) a database with --events events over --days days
up to yesterday from --players players: each arrives on a random day and plays on random later
days, in sessions of a few hours, ten event types, three versions, three platforms. Then times,
each with a new Dashboard (an empty cache, as after a restart; the OS page cache is warm) the
report for the last 30 days and for a year, a funnel and a value breakdown of 30 days, and the
dashboard page of 30 days.
"""

import argparse
import datetime
import json
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pycolytics  # noqa: E402

TYPES = ["session_start", "level_start", "level_end", "death", "purchase", "tutorial_start", "tutorial_step",
         "tutorial_end", "settings", "session_end"]
# Events of one session: a few minutes of play.
SESSION_EVENTS = 20


def fill(path, events, players, days, seed=1):
    rng = random.Random(seed)
    today = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None, hour=0, minute=0, second=0, microsecond=0)
    arrival = [rng.randrange(days) for _ in range(players)]
    connection = pycolytics.connect(path, synchronous="off")
    rows = []
    for session in range(events // SESSION_EVENTS):
        player = int(players * rng.random() ** 2)  # some players play much more than others
        day = rng.randint(arrival[player], days - 1)
        start = today - datetime.timedelta(days=days - day, seconds=-rng.randrange(80000))
        for n in range(SESSION_EVENTS):
            moment = start + datetime.timedelta(seconds=n * rng.randint(5, 60))
            rows.append((TYPES[n % len(TYPES)], "my-game", f"1.{player % 3}", ("Linux", "Windows", "Web")[player % 3],
                         f"p{player}", f"s{session}", json.dumps({"level": rng.randint(1, 40)}),
                         moment.strftime(pycolytics.TIME_FORMAT), None, None))
    rows.sort(key=lambda row: row[7])  # stored as they happen, as a collector stores them
    for start in range(0, len(rows), 100_000):
        connection.execute("BEGIN")
        connection.executemany(pycolytics.INSERT, rows[start:start + 100_000])
        connection.execute("COMMIT")
    connection.close()


def timed(label, call):
    started = time.monotonic()
    call()
    print(f"{label:<40} {time.monotonic() - started:6.2f} s", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=2_000_000)
    parser.add_argument("--players", type=int, default=50_000)
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--database", default=os.path.join(tempfile.gettempdir(), "pycolytics-report-bench.db"))
    arguments = parser.parse_args()
    if not os.path.exists(arguments.database):
        started = time.monotonic()
        fill(arguments.database, arguments.events, arguments.players, arguments.days)
        print(f"filled {arguments.database} with {arguments.events:,} events in {time.monotonic() - started:.0f} s")
    config = pycolytics.load_config(environ={}, overrides={"database": arguments.database, "read_keys": "bench"})
    store = pycolytics.SQLiteStore(config)
    today = datetime.datetime.now(datetime.timezone.utc).date()
    auth = {"HTTP_AUTHORIZATION": "Bearer bench", "REMOTE_ADDR": "127.0.0.1", "PATH_INFO": "/v1.0/report"}
    for days in (30, arguments.days):
        since = max(today - datetime.timedelta(days=days), today - datetime.timedelta(days=365))
        query = f"since={since}&until={today - datetime.timedelta(days=1)}"
        timed(f"report, {days} days", lambda: pycolytics.Dashboard(config, store).answer(dict(auth, QUERY_STRING=query)))
    query = f"since={today - datetime.timedelta(days=30)}"
    timed("funnel of 3 steps, 30 days", lambda: pycolytics.Dashboard(config, store).answer(dict(
        auth, PATH_INFO="/v1.0/report/funnel", QUERY_STRING=query + "&steps=tutorial_start,tutorial_step,tutorial_end")))
    timed("values of level, 30 days", lambda: pycolytics.Dashboard(config, store).answer(dict(
        auth, PATH_INFO="/v1.0/report/values", QUERY_STRING=query + "&event_type=death&field=level")))
    timed("dashboard page, 30 days", lambda: pycolytics.Dashboard(config, store).page(dict(auth, QUERY_STRING=query)))
    dashboard = pycolytics.Dashboard(config, store)
    dashboard.page(dict(auth, QUERY_STRING=query))
    timed("dashboard page, 30 days, again (cached)", lambda: dashboard.page(dict(auth, QUERY_STRING=query)))


if __name__ == "__main__":
    main()
