#!/usr/bin/env python3
"""How long the report API and the dashboard take on a large SQLite database, the first time.

    python3 bench/report.py [--events 2000000] [--players 50000] [--days 365] [--database FILE] [--live]

Fills (once; an existing --database is reused) a database with --events events over --days days
up to yesterday from --players players: each arrives on a random day and plays on random later
days, in sessions of a few minutes, ten event types, three versions, three platforms. Then brings
its summaries up to date as the server's writer does, in steps of 2,000 events (timed, once).
Then times, each with a new Dashboard (an empty cache, as after a restart; the OS page cache is
warm) the report for the last 30 days and for a year, a funnel and a value breakdown of 30 days,
and the dashboard page of 30 days. With --live, the two reports are timed a second time read from
the events, as without summaries, in the same run: the ratio is the summaries' gain.
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


def summarise(path):
    connection = pycolytics.connect(path, synchronous="normal")
    started, summarised = time.monotonic(), 0
    while True:
        with pycolytics.transaction(connection):
            step = pycolytics.summarise(connection)
        summarised += step
        if step < pycolytics.SUMMARY_STEP_ROWS:
            break
    connection.close()
    if summarised:
        print(f"summarised {summarised:,} events in {time.monotonic() - started:.0f} s", flush=True)


def timed(label, call):
    started = time.monotonic()
    call()
    seconds = time.monotonic() - started
    print(f"{label:<40} {seconds:6.2f} s", flush=True)
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=2_000_000)
    parser.add_argument("--players", type=int, default=50_000)
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--database", default=os.path.join(tempfile.gettempdir(), "pycolytics-report-bench.db"))
    parser.add_argument("--live", action="store_true", help="also time the reports read from the events")
    arguments = parser.parse_args()
    if not os.path.exists(arguments.database):
        started = time.monotonic()
        fill(arguments.database, arguments.events, arguments.players, arguments.days)
        print(f"filled {arguments.database} with {arguments.events:,} events in {time.monotonic() - started:.0f} s")
    summarise(arguments.database)
    config = pycolytics.load_config(environ={}, overrides={"database": arguments.database, "read_keys": "bench"})
    store = pycolytics.SQLiteStore(config)
    today = datetime.datetime.now(datetime.timezone.utc).date()
    auth = {"HTTP_AUTHORIZATION": "Bearer bench", "REMOTE_ADDR": "127.0.0.1", "PATH_INFO": "/v1.0/report"}
    summarised = {}
    for days in (30, arguments.days):
        since = max(today - datetime.timedelta(days=days), today - datetime.timedelta(days=365))
        query = f"since={since}&until={today - datetime.timedelta(days=1)}"
        summarised[days] = timed(f"report, {days} days", lambda: pycolytics.Dashboard(config, store).answer(
            dict(auth, QUERY_STRING=query)))
    if arguments.live:
        with_summaries, pycolytics.MAX_LIVE_TAIL = pycolytics.MAX_LIVE_TAIL, -1  # every event is "not summarised"
        for days in (30, arguments.days):
            since = max(today - datetime.timedelta(days=days), today - datetime.timedelta(days=365))
            query = f"since={since}&until={today - datetime.timedelta(days=1)}"
            live = timed(f"report, {days} days, from the events", lambda: pycolytics.Dashboard(config, store).answer(
                dict(auth, QUERY_STRING=query)))
            print(f"{'':<40} summaries {live / summarised[days]:.1f}x faster", flush=True)
        pycolytics.MAX_LIVE_TAIL = with_summaries
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
