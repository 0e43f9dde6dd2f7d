#!/usr/bin/env python3
"""The report API and the dashboard on a big database, against a live server: time, memory, ingestion.

    python3 bench/history.py /tmp/h10m.db          # once: a year of 10 M events from 1 M players
    python3 bench/report.py /tmp/h10m.db [--seconds 10] [--connections 16]

1. Summaries. A server starts on the database. If its summaries are not made yet (as in a new
   database from history.py), it times how long the server takes to make them while serving,
   asks for a year's report every 20 s meanwhile, and records the server's peak RSS.
2. First answers after a start. A new server; every view of the report API for the last 30 days
   and for the last 365, and the dashboard of 30 days, each asked once: seconds, status, bytes,
   and the server's peak RSS during that request (VmHWM, reset before each one).
3. Ingestion while reports run. Single events posted for --seconds over --connections kept-alive
   connections (wrk when installed, else a Python client), first alone, then while one client
   asks for the year's views round and round: events per second, latency, and their ratio.

It writes into the database: the summaries, and the events of step 3 (application "bench-ingest",
so that the reports of "my-game" do not change). report_timeout is 120 s, so that a slow view
shows how slow it is instead of a 503.
"""

import argparse
import datetime
import http.client
import json
import os
import sqlite3
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench  # noqa: E402  (its server starter, memory probe and load generator)

READ_KEY = "bench-reader-0123456789"
VIEWS = (("report", ""), ("funnel", "&steps=session_start,level_start,level_complete,purchase"),
         ("values", "&event_type=level_fail&field=level"), ("retention", ""), ("revenue", ""),
         ("progression", ""), ("stickiness", ""), ("versions", ""))


def peak_rss_mib(pid):
    return bench.rss_kib_one(pid, "VmHWM") / 1024


def reset_peak(pid):
    """Make VmHWM start again from the current RSS (Linux: clear_refs 5); False if not allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as file:
            file.write("5")
        return True
    except OSError:
        return False


def get(port, path, timeout=600):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        started = time.monotonic()
        connection.request("GET", path, headers={"Authorization": f"Bearer {READ_KEY}"})
        answer = connection.getresponse()
        body = answer.read()
        return answer.status, len(body), time.monotonic() - started
    finally:
        connection.close()


def start(database):
    return bench.start_pycolytics(database, synchronous="normal", environ={
        "PYCOLYTICS_READ_KEYS": READ_KEY, "PYCOLYTICS_REPORT_TIMEOUT": "120"})


def view_path(view, extra, until, days):
    since = until - datetime.timedelta(days=days - 1)
    path = "/v1.0/report" + ("" if view == "report" else "/" + view)
    return f"{path}?application=my-game&since={since}&until={until}{extra}"


def summaries_behind(database):
    """Events not summarised yet (None while the summary tables do not exist)."""
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as connection:
        try:
            last_id, = connection.execute("SELECT last_id FROM pycolytics_summary").fetchone()
        except sqlite3.OperationalError:
            return None
        top, = connection.execute("SELECT max(id) FROM event").fetchone()
    return top - last_id if last_id >= 0 else top


def build_summaries(database, until):
    service = start(database)
    try:
        behind = summaries_behind(database)
        if behind is not None and behind < 1000:
            print("1. the summaries are made already")
            return
        started, asked, reports = time.monotonic(), 0.0, []
        while True:
            behind = summaries_behind(database)
            if behind is not None and behind < 1000:
                break
            if time.monotonic() - asked > 20:
                asked = time.monotonic()
                status, _, seconds = get(service.port, view_path("report", "", until, 365))
                reports.append(f"{status} in {seconds:.1f} s")
            time.sleep(0.5)
        print(f"1. summaries made by a serving server in {time.monotonic() - started:.0f} s, peak RSS "
              f"{peak_rss_mib(service.process.pid):.0f} MiB; a year's report meanwhile: {', '.join(reports)}")
    finally:
        service.stop()


def first_answers(database, until):
    today = datetime.datetime.now(datetime.timezone.utc).date()
    service = start(database)
    pid = service.process.pid
    print(f"2. first answers after a start (the server at {bench.rss_kib_one(pid) / 1024:.0f} MiB RSS after its first 204)")
    print(f"   {'view':<14}{'30 days':>22}{'365 days':>22}   (up to today, {today}; 'report ending': up to {until})")
    highest = 0.0
    try:
        # the default range ends today; the last row ends the report at the history's last day, before the
        # application's newest (today's events of the starts): its event types' players are read from the events
        for view, extra in VIEWS + (("dashboard", ""), ("report ending", "")):
            cells = []
            for days in (30, 365) if view != "dashboard" else (30,):
                ending = until if view == "report ending" else today
                path = (f"/dashboard?application=my-game&since={today - datetime.timedelta(days=29)}&until={today}"
                        if view == "dashboard" else view_path(view.split()[0], extra, ending, days))
                reset = reset_peak(pid)
                status, size, seconds = get(service.port, path)
                highest = max(highest, peak_rss_mib(pid))
                peak = f", {peak_rss_mib(pid):.0f} MiB" if reset else ""
                cells.append(f"{seconds:6.2f} s {status}{peak}")
            print(f"   {view:<14}" + "".join(f"{cell:>22}" for cell in cells), flush=True)
        print(f"   the server's peak RSS over all of them: {highest:.0f} MiB")
    finally:
        service.stop()


def ingestion(database, until, seconds, connections):
    today = datetime.datetime.now(datetime.timezone.utc).date()
    service = start(database)
    body = json.dumps(dict(bench.EVENT, application="bench-ingest")).encode()
    try:
        alone = bench.run_load(service.port, "/v1.0/event", body, connections, seconds)
        stop, answered = threading.Event(), []

        def reader():
            while not stop.is_set():
                for view, extra in VIEWS:
                    if stop.is_set():
                        break
                    answered.append(get(service.port, view_path(view, extra, today, 365)))

        thread = threading.Thread(target=reader)
        thread.start()
        during = bench.run_load(service.port, "/v1.0/event", body, connections, seconds)
        stop.set()
        thread.join()
        print(f"3. single events over {connections} connections, {seconds} s each, peak RSS "
              f"{peak_rss_mib(service.process.pid):.0f} MiB")
        for label, load in (("alone", alone), ("with year reports", during)):
            print(f"   {label:<18} {load['rate']:8.0f} events/s  p50 {load['p50']:.2f} ms  p99 {load['p99']:.2f} ms"
                  f"  non-2xx {load['requests'] - load['ok']}")
        statuses = sorted({status for status, _, _ in answered})
        print(f"   ratio {during['rate'] / alone['rate']:.2f}; {len(answered)} year views answered meanwhile "
              f"(statuses {statuses}, {sum(s for _, _, s in answered):.1f} s of reading)")
    finally:
        service.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("database")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=16)
    arguments = parser.parse_args()
    with sqlite3.connect(f"file:{arguments.database}?mode=ro", uri=True) as connection:
        # not bench.EVENT's level_started, which each start posts (to wait for the server's first 204)
        events, last = connection.execute("SELECT count(*), max(time) FROM event WHERE application = 'my-game'"
                                          " AND event_type != 'level_started'").fetchone()
    until = datetime.date.fromisoformat(last[:10])
    print(f"{events:,} events of my-game up to {until} in {arguments.database}; Python {sys.version.split()[0]}, "
          f"SQLite {sqlite3.sqlite_version}, {os.cpu_count()} cores")
    build_summaries(arguments.database, until)
    first_answers(arguments.database, until)
    ingestion(arguments.database, until, arguments.seconds, arguments.connections)


if __name__ == "__main__":
    main()
