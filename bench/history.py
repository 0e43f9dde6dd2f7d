#!/usr/bin/env python3
"""A year of a made-up game, written straight into an SQLite database: for the report benchmarks.

    python3 bench/history.py FILE [--events 10000000] [--players 1000000] [--days 365] [--seed 1]

Players arrive over the year (more towards its end), come back on later days with a falling
chance, and play sessions of a few minutes: session_start, levels started and then completed
or failed (value.level, rising as they progress), now and then a purchase (value.price,
value.currency, value.item), session_end. Versions follow releases every 30 days; each player
keeps one platform. Events go in in time order, as a collector stores them, up to yesterday.
The total is about --events (players x their events); it prints how many it wrote.
"""

import argparse
import datetime
import json
import os
import random
import sqlite3
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pycolytics  # noqa: E402

PLATFORMS = ("Windows", "Android", "iOS", "Linux", "Web")
CURRENCIES = ("USD", "EUR", "GBP")
ITEMS = ("gems_small", "gems_large", "no_ads", "starter_pack", "skin")


def player_events(rng, number, days, today, per_player):
    """The events of one player, as (time text, event_type, version, platform, user, session, value)."""
    arrival = int(days * rng.random() ** 0.7)  # more players late in the year, as a game grows
    platform = PLATFORMS[number % len(PLATFORMS)]
    user = f"p{number:07d}"
    level, day, visits, left = 1, arrival, 0, per_player
    while day < days and left > 0:
        start = today - datetime.timedelta(days=days - day) + datetime.timedelta(seconds=rng.randrange(80000))
        session = f"{user}-{visits}"
        version = f"1.{day // 30}"
        moment = start
        plays = [("session_start", {})]
        for _ in range(rng.randint(1, 2)):
            plays.append(("level_start", {"level": level}))
            if rng.random() < 0.6:
                plays.append(("level_complete", {"level": level}))
                level += 1
            else:
                plays.append(("level_fail", {"level": level}))
        if rng.random() < 0.03:
            plays.append(("purchase", {"price": rng.choice((0.99, 4.99, 9.99)), "currency": rng.choice(CURRENCIES),
                                       "item": rng.choice(ITEMS)}))
        plays.append(("session_end", {}))
        for kind, value in plays:
            yield moment, kind, version, platform, user, session, value
            moment += datetime.timedelta(seconds=rng.randint(5, 120))
        left -= len(plays)
        visits += 1
        if rng.random() < 0.45:
            break  # most players do not come back
        day += 1 + int(rng.expovariate(1 / 6))


def fill(path, events, players, days, seed=1):
    rng = random.Random(seed)
    today = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None, hour=0, minute=0, second=0,
                                                                   microsecond=0)
    per_player = max(1, 2 * events // players)  # a cap; most players stop long before it
    rows = []
    for number in range(players):
        for moment, kind, version, platform, user, session, value in player_events(rng, number, days, today,
                                                                                  per_player):
            rows.append((moment.strftime(pycolytics.TIME_FORMAT), kind, version, platform, user, session,
                         json.dumps(value, separators=(",", ":"))))
    rows.sort()
    connection = pycolytics.connect(path, synchronous="off")
    connection.execute("PRAGMA journal_mode=OFF")
    connection.execute("BEGIN")
    connection.executemany(
        "INSERT INTO event (time, event_type, version, platform, user_id, session_id, value, application,"
        " received_at) VALUES (?, ?, ?, ?, ?, ?, ?, 'my-game', ?1)", rows)
    connection.execute("COMMIT")
    connection.close()
    return len(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file")
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--players", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--seed", type=int, default=1)
    arguments = parser.parse_args(argv)
    if os.path.exists(arguments.file):
        sys.exit(f"{arguments.file} exists")
    written = fill(arguments.file, arguments.events, arguments.players, arguments.days, arguments.seed)
    print(f"{written} events from {arguments.players} players over {arguments.days} days in {arguments.file}")


if __name__ == "__main__":
    main()
