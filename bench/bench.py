#!/usr/bin/env python3
"""Pycolytics benchmark kit: pycolytics and its baselines, measured in one run, as one table.

    python3 bench/bench.py                      # every cell, 5 s each, 10 M-row growth cell
    python3 bench/bench.py --seconds 3 --big-rows 0   # quicker, without the growth cell
    python3 bench/bench.py --original ~/pycolytics --original-python ~/pycolytics/.venv/bin/python

Everything listens on 127.0.0.1 and each load is bounded in time. Load comes from wrk when it
is installed (Debian package `wrk`: much lighter than any Python client), else from a
standard-library client in several processes. After every pycolytics cell the database is
checked against what was acknowledged: every 204'd event is stored, and at most the requests
still in flight when the load stopped are stored on top. Ratios compare numbers taken minutes
apart on the same machine; the machines are shared and noisy, so compare ratios, not runs.
"""

import argparse
import datetime
import http.client
import json
import multiprocessing
import os
import platform
import random
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
import pycolytics  # noqa: E402  (the schema and pragmas of the raw SQLite baseline)

KEY = "bench-key-0123456789"
EVENT = {
    "event_type": "level_started", "application": "my-game", "version": "1.0.2", "platform": "Linux",
    "user_id": "3f2a9c1e", "session_id": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    "value": {"level": 3, "score": 12345, "weapon": "bow"}, "api_key": KEY,
}


def single_body():
    return json.dumps(EVENT).encode()


def batch_body(size):
    return json.dumps([EVENT] * size).encode()


# -- processes under test -------------------------------------------------------------------------


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post_once(port, path, body, timeout=2.0):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", path, body)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def wait_for_204(port, deadline=30.0):
    """Seconds until the server at `port` answers an event with 204."""
    start = time.monotonic()
    while time.monotonic() - start < deadline:
        try:
            if post_once(port, "/v1.0/event", single_body()) == 204:
                return time.monotonic() - start
        except OSError:
            time.sleep(0.002)
    raise RuntimeError(f"nothing answered 204 on port {port} within {deadline} s")


def rss_kib(pid, field="VmRSS"):
    """Resident memory of a process and its children (gunicorn's workers), in KiB."""
    total = 0
    for each in [pid] + children(pid):
        try:
            with open(f"/proc/{each}/status") as status:
                total += int(re.search(rf"{field}:\s+(\d+)", status.read()).group(1))
        except (OSError, AttributeError):
            pass
    return total


def workers_memory(pid, started_as):
    """A note on the memory of a server with workers: RSS of each process, and their PSS together
    (which counts the pages a fork shares once, so it is what they cost the machine)."""
    pids = [pid] + children(pid)  # on SQLite, the database writer is the first child
    pss = 0
    for each in pids:
        try:
            with open(f"/proc/{each}/smaps_rollup") as rollup:
                pss += int(re.search(r"Pss:\s+(\d+)", rollup.read()).group(1))
        except (OSError, AttributeError):
            pass
    each_rss = ", ".join(f"{rss_kib_one(child) / 1024:.1f}" for child in pids[1:])
    return (f"idle with workers = 2, started as {started_as}, after the first 204: "
            f"the parent {rss_kib_one(pid) / 1024:.1f} MiB RSS, the database writer and the workers "
            f"{each_rss} MiB each; all {len(pids)} together {pss / 1024:.1f} MiB PSS")


def rss_kib_one(pid, field="VmRSS"):
    try:
        with open(f"/proc/{pid}/status") as status:
            return int(re.search(rf"{field}:\s+(\d+)", status.read()).group(1))
    except (OSError, AttributeError):
        return 0


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as file:
            return [int(child) for child in file.read().split()]
    except OSError:
        return []


class Service:
    """A server process under test; stopped with SIGTERM (SIGKILL if it hangs)."""

    def __init__(self, command, port, environ=None, cwd=ROOT):
        self.port = port
        started = time.monotonic()
        self.process = subprocess.Popen(command, cwd=cwd, env=dict(os.environ, **(environ or {})),
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.first_204 = wait_for_204(port)
        self.startup = time.monotonic() - started

    def stop(self):
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def start_pycolytics(database, synchronous="full", interpreter_options=(), program=None, environ=None, cwd=ROOT):
    port = free_port()
    command = [sys.executable, *interpreter_options, *(program or [os.path.join(ROOT, "pycolytics.py")]),
               "--port", str(port), "--database", database, "--quiet"]
    # an empty ini: the repository's pycolytics.ini has keys an older pycolytics.py (an A/B run's) refuses
    environ = dict(environ or {}, PYCOLYTICS_API_KEYS=KEY, PYCOLYTICS_SYNCHRONOUS=synchronous, PYCOLYTICS_CONFIG=os.devnull)
    return Service(command, port, environ, cwd=cwd)


def start_compiled(folder, database, environ=None):
    """Pycolytics as the systemd unit runs it: python3 -S -m pycolytics, from compiled bytecode."""
    installed = os.path.join(folder, "opt")
    os.makedirs(installed, exist_ok=True)
    shutil.copy(os.path.join(ROOT, "pycolytics.py"), installed)
    subprocess.run([sys.executable, "-m", "compileall", "-q", installed], check=True,
                   env={name: value for name, value in os.environ.items() if name != "PYTHONDONTWRITEBYTECODE"})
    # started elsewhere than in the repository, whose pycolytics.py would come first on sys.path
    return start_pycolytics(database, interpreter_options=["-S"], program=["-m", "pycolytics"],
                            environ=dict(environ or {}, PYTHONPATH=installed), cwd=folder)


def start_gunicorn(database, workers=2):
    port = free_port()
    command = [sys.executable, "-m", "gunicorn", "-w", str(workers), "-k", "gthread", "--threads", "16",
               "-b", f"127.0.0.1:{port}", "--log-level", "warning", "pycolytics:application"]
    return Service(command, port, {"PYCOLYTICS_API_KEYS": KEY, "PYCOLYTICS_DATABASE": database})


def start_original(folder, python, database):
    port = free_port()
    command = [python, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    environ = {"SQLITE_FILE_PATH": database, "API_KEYS": json.dumps([KEY]), "RATE_LIMIT": "1000000/second"}
    return Service(command, port, environ, cwd=folder)


def start_noop():
    port = free_port()
    return Service([sys.executable, os.path.abspath(__file__), "--noop-server", str(port)], port)


def noop_server(port):
    """The ceiling for any standard-library Python server: http.server answering 204, storing nothing."""
    import http.server

    class DoNothing(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(204)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()

        def log_message(self, *arguments):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), DoNothing)
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server.serve_forever()


# -- load -----------------------------------------------------------------------------------------


def run_load(port, path, body, connections, seconds, close=False, delay_ms=None):
    """Drive load; return requests answered, 2xx among them, errors, rate and latency percentiles (ms)."""
    if shutil.which("wrk"):
        return run_wrk(port, path, body, connections, seconds, close, delay_ms)
    return run_python_load(port, path, body, connections, seconds, close, delay_ms)


def run_wrk(port, path, body, connections, seconds, close, delay_ms):
    script = ["wrk.method = 'POST'", f"wrk.path = '{path}'", f"wrk.body = {lua_string(body)}"]
    if close:
        script.append("wrk.headers['Connection'] = 'close'")
    if delay_ms:
        script.append(f"function delay() return {delay_ms:.3f} end")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as file:
        file.write("\n".join(script) + "\n")
    try:
        output = subprocess.run(
            ["wrk", "-t2", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency", "-s", file.name, f"http://127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=seconds + 60,
        ).stdout
    finally:
        os.unlink(file.name)
    found = re.search(r"(\d+) requests in ([\d.]+)(m?s)", output)
    requests, elapsed = int(found.group(1)), float(found.group(2)) * (60 if found.group(3) == "m" else 1)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    percentiles = {int(p): to_ms(value) for p, value in re.findall(r"^\s+(50|99)%\s+([\d.]+\w+)", output, re.M)}
    return {
        "requests": requests, "ok": requests - (int(non_2xx.group(1)) if non_2xx else 0),
        "errors": sum(map(int, errors.groups())) if errors else 0, "rate": requests / elapsed,
        "p50": percentiles.get(50), "p99": percentiles.get(99),
    }


def lua_string(body):
    return "'" + body.decode().replace("\\", "\\\\").replace("'", "\\'") + "'"


def to_ms(text):
    number, unit = re.match(r"([\d.]+)(\w+)", text).groups()
    return float(number) * {"us": 0.001, "ms": 1, "s": 1000, "m": 60000}[unit]


def _python_client(arguments):
    port, path, body, seconds, close, delay_ms = arguments
    latencies, ok, errors = [], 0, 0
    end = time.monotonic() + seconds
    connection = None
    while time.monotonic() < end:
        try:
            if connection is None:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            start = time.monotonic()
            connection.request("POST", path, body, {"Connection": "close"} if close else {})
            response = connection.getresponse()
            response.read()
            latencies.append((time.monotonic() - start) * 1000)
            ok += 200 <= response.status < 300
            if close or response.will_close:
                connection.close()
                connection = None
        except OSError:
            errors += 1
            connection = None
        if delay_ms:
            time.sleep(delay_ms / 1000)
    return latencies, ok, errors


def run_python_load(port, path, body, connections, seconds, close, delay_ms):
    with multiprocessing.Pool(connections) as pool:
        results = pool.map(_python_client, [(port, path, body, seconds, close, delay_ms)] * connections)
    latencies = sorted(latency for result in results for latency in result[0])
    pick = lambda share: latencies[min(len(latencies) - 1, int(share * len(latencies)))] if latencies else None  # noqa: E731
    return {
        "requests": len(latencies), "ok": sum(result[1] for result in results),
        "errors": sum(result[2] for result in results), "rate": len(latencies) / seconds,
        "p50": pick(0.5), "p99": pick(0.99),
    }


VERIFIED = []  # one entry per load on pycolytics: did the database hold what was acknowledged?


def count_rows(database):
    if database.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(database) as connection:
            return connection.execute("SELECT count(*) FROM event").fetchone()[0]
    with sqlite3.connect(database) as connection:
        return connection.execute("SELECT count(*) FROM event").fetchone()[0]


def measured_together(services, database, path, body, events, connections, seconds):
    """The same load split over several collectors of one database at once; rates add up."""
    import concurrent.futures

    before = count_rows(database)
    share = max(1, connections // len(services))
    with concurrent.futures.ThreadPoolExecutor(len(services)) as pool:
        results = list(pool.map(lambda service: run_load(service.port, path, body, share, seconds), services))
    time.sleep(0.5)
    stored = count_rows(database) - before
    acknowledged = sum(result["ok"] for result in results) * events
    rate = sum(result["ok"] / (result["requests"] / result["rate"]) for result in results if result["requests"])
    verified = acknowledged <= stored <= acknowledged + connections * events
    VERIFIED.append(verified)
    if not verified:
        print(f"  !! {path}: {acknowledged} events acknowledged but {stored} stored", file=sys.stderr)
    return {"events": rate * events, "verified": verified}


def postgres_schema(url):
    """A fresh schema in the PostgreSQL database at `url`, and the URL that writes into it."""
    import psycopg

    schema = "bench_" + os.urandom(4).hex()
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(f"CREATE SCHEMA {schema}")
    separator = "&" if "?" in url else "?"
    return schema, f"{url}{separator}options=-csearch_path%3D{schema}"


def drop_schema(url, schema):
    import psycopg

    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(f"DROP SCHEMA {schema} CASCADE")


def measured(service, database, path, body, events, connections, seconds, close=False, delay_ms=None):
    """Run a load on a pycolytics service and check the database against the acknowledgements."""
    before = count_rows(database)
    result = run_load(service.port, path, body, connections, seconds, close, delay_ms)
    time.sleep(0.5)  # requests still in flight when the load stopped may yet commit
    stored = count_rows(database) - before
    acknowledged = result["ok"] * events
    result["events"] = acknowledged / (result["requests"] / result["rate"]) if result["requests"] else 0
    result["verified"] = acknowledged <= stored <= acknowledged + connections * events
    VERIFIED.append(result["verified"])
    if not result["verified"]:
        print(f"  !! {path}: {acknowledged} events acknowledged but {stored} stored", file=sys.stderr)
    return result


# -- the storage ceiling ----------------------------------------------------------------------------


def raw_sqlite(database, synchronous, rows_per_transaction, seconds):
    """Rows per second that plain executemany of pre-built rows reaches, same schema and pragmas."""
    connection = pycolytics.connect(database, synchronous)
    value = json.dumps(EVENT["value"], separators=(",", ":"))
    rows = [(EVENT["event_type"], EVENT["application"], EVENT["version"], EVENT["platform"], f"{n:08x}",
             EVENT["session_id"], value) for n in range(rows_per_transaction)]
    written, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        now = time.strftime("%Y-%m-%d %H:%M:%S.000000", time.gmtime())
        received = (now, now, None)  # as in pycolytics: time, received_at, no event_id
        connection.execute("BEGIN IMMEDIATE")
        connection.executemany(pycolytics.INSERT, [row + received for row in rows])
        connection.execute("COMMIT")
        written += len(rows)
    rate = written / (time.perf_counter() - start)
    connection.close()
    return rate


def fill(database, rows):
    """A database holding `rows` realistic events: a few apps and types, random users, rising times."""
    connection = pycolytics.connect(database, "off")
    random.seed(1)
    start = time.time() - 365 * 86400
    step = 365 * 86400 / rows
    kinds = ["startup", "shutdown", "level_started", "level_won", "death", "purchase"]
    chunk = 100_000
    for first in range(0, rows, chunk):
        batch = []
        for n in range(first, min(rows, first + chunk)):
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(start + n * step)) + ".000000"
            user = f"{random.getrandbits(32):08x}"
            batch.append((kinds[n % 6], f"game-{n % 3}", f"1.{n % 7}", "Linux", user, user + "s",
                          '{"level":3,"score":12345}', when, when, None))
        connection.execute("BEGIN")
        connection.executemany(pycolytics.INSERT, batch)
        connection.execute("COMMIT")
    connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    connection.close()


# -- the run ------------------------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=5, help="length of each load in whole seconds (default 5)")
    parser.add_argument("--connections", type=int, default=16, help="concurrent clients (default 16)")
    parser.add_argument("--big-rows", type=int, default=10_000_000, help="rows in the growth cell's database (0 skips it)")
    parser.add_argument("--original", metavar="DIR", help="the original Pycolytics' folder, to measure it too")
    parser.add_argument("--original-python", metavar="PYTHON", help="the Python of the original's virtualenv")
    parser.add_argument("--postgres", metavar="URL", help="also measure collectors writing into this PostgreSQL "
                        "database (a schema of their own, dropped after), e.g. postgresql://127.0.0.1:5432/test")
    parser.add_argument("--report-database", metavar="FILE", help="also time the first report of 30 days and of a "
                        "year after a start, on a database made by bench/report.py")
    parser.add_argument("--noop-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    arguments = parser.parse_args(argv)
    if arguments.noop_server:
        return noop_server(arguments.noop_server)

    seconds, connections = arguments.seconds, arguments.connections
    folder = tempfile.mkdtemp(prefix="pycolytics-bench-")
    rows = []  # (cell, pycolytics, baseline name, baseline, ratio, target)
    notes = []

    def cell(name, ours, baseline_name="", baseline=None, target=None, unit="req/s"):
        ratio = ours / baseline if baseline else None
        rows.append((name, ours, unit, baseline_name, baseline, ratio, target))
        shown = f"{ratio:.0%}" if ratio is not None else ""
        print(f"  {name}: {ours:,.0f} {unit} {baseline_name} {baseline or '':} {shown}", file=sys.stderr, flush=True)

    try:
        database = os.path.join(folder, "events.db")
        print("starting the do-nothing server and pycolytics", file=sys.stderr)
        noop = start_noop()
        ours = start_pycolytics(database)
        notes.append(f"start to first 204 on a new database: {ours.first_204:.3f} s (process start included: {ours.startup:.3f} s)")
        notes.append(f"idle RSS after the first 204: {rss_kib(ours.process.pid) / 1024:.1f} MiB "
                     f"(a bare `{os.path.basename(sys.executable)} -c pass` here: {bare_interpreter_rss() / 1024:.1f} MiB)")

        # The same without site-packages' start-up hooks (.pth files), which pycolytics never needs.
        plain = start_pycolytics(os.path.join(folder, "plain.db"), interpreter_options=["-S"])
        notes.append(f"idle RSS started as `python3 -S pycolytics.py`: {rss_kib(plain.process.pid) / 1024:.1f} MiB "
                     f"(a bare `python3 -S -c pass`: {bare_interpreter_rss('-S') / 1024:.1f} MiB)")
        plain.stop()
        compiled = start_compiled(folder, os.path.join(folder, "compiled.db"))
        notes.append(f"idle RSS started as the systemd unit does, `python3 -S -m pycolytics` from compiled bytecode: "
                     f"{rss_kib(compiled.process.pid) / 1024:.1f} MiB (target <= 20 MB)")
        compiled.stop()
        compiled = start_compiled(folder, os.path.join(folder, "compiled2.db"), environ={"PYCOLYTICS_WORKERS": "2"})
        time.sleep(0.5)  # the second worker may still be starting
        notes.append(workers_memory(compiled.process.pid, "the systemd unit does (`python3 -S -m pycolytics`)"))
        compiled.stop()

        single, batch100, batch12 = single_body(), batch_body(100), batch_body(12)
        base = keep_alive_base = run_load(noop.port, "/v1.0/event", single, connections, seconds)
        mine = measured(ours, database, "/v1.0/event", single, 1, connections, seconds)
        cell("single event, keep-alive", mine["rate"], "do-nothing http.server", base["rate"], 1.00)
        peak = mine
        sqlite_single = mine["rate"]

        base = run_load(noop.port, "/v1.0/event", single, connections, seconds, close=True)
        mine = measured(ours, database, "/v1.0/event", single, 1, connections, seconds, close=True)
        cell("single event, new connection each", mine["rate"], "do-nothing http.server", base["rate"], 0.70)
        one_worker = {"single": sqlite_single, "close": mine["rate"]}

        half = peak["rate"] / 2
        paced = measured(ours, database, "/v1.0/event", single, 1, connections, seconds,
                         delay_ms=connections / half * 1000)
        notes.append(f"latency at half the peak rate ({paced['rate']:,.0f} of {peak['rate']:,.0f} req/s, keep-alive): "
                     f"p50 {paced['p50']:.2f} ms, p99 {paced['p99']:.2f} ms (target p99 <= 5 ms)")

        mine = measured(ours, database, "/v1.0/events", batch100, 100, connections, seconds)
        raw_database = os.path.join(folder, "raw.db")
        raw = raw_sqlite(raw_database, "full", 100, seconds)
        raw_big = raw_sqlite(os.path.join(folder, "raw1000.db"), "full", 1000, seconds)
        cell("batches of 100, keep-alive", mine["events"], "raw SQLite, 100 rows/commit", raw, 0.50, "events/s")
        cell("  the same against bigger commits", mine["events"], "raw SQLite, 1000 rows/commit", raw_big, 0.60,
             "events/s")
        empty_rate = mine["events"]
        notes.append(f"peak RSS under the batch load: {rss_kib(ours.process.pid, 'VmHWM') / 1024:.1f} MiB (target <= 64 MiB)")

        mine = measured(ours, database, "/v1.0/events", batch12, 12, connections, seconds, close=True)
        cell("batches of 12, new connection each (Godot)", mine["events"], "", None, None, "events/s")
        one_worker.update(batch=empty_rate, godot=mine["events"])
        ours.stop()

        two_database = os.path.join(folder, "two.db")
        two = start_pycolytics(two_database, environ={"PYCOLYTICS_WORKERS": "2"})
        time.sleep(0.5)  # the second worker may still be starting
        notes.append(workers_memory(two.process.pid, "a script (`python3 pycolytics.py`)"))
        mine = measured(two, two_database, "/v1.0/event", single, 1, connections, seconds)
        cell("workers = 2: single event, keep-alive", mine["rate"], "do-nothing http.server", keep_alive_base["rate"],
             1.00)
        cell("  the same against one worker", mine["rate"], "one worker", one_worker["single"], 1.00)
        half = mine["rate"] / 2
        paced = measured(two, two_database, "/v1.0/event", single, 1, connections, seconds,
                         delay_ms=connections / half * 1000)
        notes.append(f"workers = 2, latency at half their peak rate ({paced['rate']:,.0f} of {mine['rate']:,.0f} "
                     f"req/s, keep-alive): p50 {paced['p50']:.2f} ms, p99 {paced['p99']:.2f} ms (target p99 <= 5 ms)")
        mine = measured(two, two_database, "/v1.0/event", single, 1, connections, seconds, close=True)
        cell("workers = 2: single event, new connection each", mine["rate"], "one worker", one_worker["close"])
        mine = measured(two, two_database, "/v1.0/events", batch100, 100, connections, seconds)
        cell("workers = 2: batches of 100, keep-alive", mine["events"], "raw SQLite, 1000 rows/commit", raw_big,
             0.60, "events/s")
        cell("  the same against one worker", mine["events"], "one worker", one_worker["batch"], None, "events/s")
        mine = measured(two, two_database, "/v1.0/events", batch12, 12, connections, seconds, close=True)
        cell("workers = 2: batches of 12, new connection each (Godot)", mine["events"], "one worker",
             one_worker["godot"], None, "events/s")
        two.stop()
        noop.stop()

        if have_module("gunicorn"):
            gunicorn_database = os.path.join(folder, "gunicorn.db")
            service = start_gunicorn(gunicorn_database)
            mine = measured(service, gunicorn_database, "/v1.0/event", single, 1, connections, seconds)
            cell("gunicorn, 2 gthread workers: single event, keep-alive", mine["rate"])
            mine = measured(service, gunicorn_database, "/v1.0/events", batch100, 100, connections, seconds)
            cell("gunicorn, 2 gthread workers: batches of 100", mine["events"], "raw SQLite, 100 rows/commit", raw, None, "events/s")
            service.stop()
        else:
            notes.append("gunicorn is not installed: its cells were skipped (pip install gunicorn)")

        if arguments.original:
            original_database = os.path.join(folder, "original.db")
            python = arguments.original_python or sys.executable
            service = start_original(arguments.original, python, original_database)
            mine = measured(service, original_database, "/v1.0/event", single, 1, connections, seconds)
            cell("original Pycolytics: single event, keep-alive", mine["rate"])
            mine = measured(service, original_database, "/v1.0/events", batch100, 100, connections, seconds)
            cell("original Pycolytics: batches of 100", mine["events"], "", None, None, "events/s")
            notes.append(f"original Pycolytics p99 at its peak, single events: {mine['p99']:.1f} ms")
            service.stop()

        if arguments.postgres:
            schema, url = postgres_schema(arguments.postgres)
            try:
                one = start_pycolytics(url)
                mine = measured(one, url, "/v1.0/event", single, 1, connections, seconds)
                cell("PostgreSQL, one collector: single event, keep-alive", mine["rate"], "the same into SQLite",
                     sqlite_single, None)
                mine = measured(one, url, "/v1.0/events", batch100, 100, connections, seconds)
                cell("PostgreSQL, one collector: batches of 100", mine["events"], "the same into SQLite",
                     empty_rate, None, "events/s")
                two = start_pycolytics(url)
                both = measured_together([one, two], url, "/v1.0/events", batch100, 100, connections, seconds)
                cell("PostgreSQL, two collectors: batches of 100", both["events"], "one collector",
                     mine["events"], None, "events/s")
                two.stop()
                one.stop()
            finally:
                drop_schema(arguments.postgres, schema)

        if arguments.big_rows:
            big = os.path.join(folder, "big.db")
            print(f"filling a database with {arguments.big_rows:,} rows", file=sys.stderr, flush=True)
            started = time.monotonic()
            fill(big, arguments.big_rows)
            notes.append(f"the growth cell's database: {arguments.big_rows:,} rows, "
                         f"{os.path.getsize(big) / 2**30:.2f} GiB, filled in {time.monotonic() - started:.0f} s")
            service = start_pycolytics(big)
            mine = measured(service, big, "/v1.0/events", batch100, 100, connections, seconds)
            service.stop()
            cell(f"batches of 100 into {arguments.big_rows:,} rows", mine["events"], "the same into an empty database",
                 empty_rate, 0.70, "events/s")
        if arguments.report_database:
            notes.extend(report_times(arguments.report_database))
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    print_table(rows, notes, connections, seconds)
    return 0


def have_module(name):
    return subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True).returncode == 0


def bare_interpreter_rss(*options):
    probe = "import re; print(re.search(r'VmRSS:\\s+(\\d+)', open('/proc/self/status').read()).group(1))"
    return int(subprocess.run([sys.executable, *options, "-c", probe], capture_output=True, text=True).stdout)


def report_times(database):
    """The first report of the last 30 days and of a year, each from a server just started on `database`."""
    with sqlite3.connect(database) as connection:
        events, last = connection.execute("SELECT count(*), max(time) FROM event").fetchone()
    until = datetime.date.fromisoformat(last[:10])
    notes = []
    for days, target in ((30, 1), (365, 3)):
        service = start_pycolytics(database, environ={"PYCOLYTICS_READ_KEYS": "bench-reader"})
        try:
            connection = http.client.HTTPConnection("127.0.0.1", service.port, timeout=600)
            started = time.monotonic()
            connection.request("GET", f"/v1.0/report?since={until - datetime.timedelta(days=days - 1)}&until={until}",
                               headers={"Authorization": "Bearer bench-reader"})
            answer = connection.getresponse()
            answer.read()
            took = time.monotonic() - started
        finally:
            service.stop()
        notes.append(f"the report of {days} days on {events:,} events ({os.path.basename(database)}), the first request "
                     f"after a start: {took:.2f} s, status {answer.status} (target <= {target} s)")
    return notes


def print_table(rows, notes, connections, seconds):
    print(f"Pycolytics {pycolytics.__version__} benchmark, {time.strftime('%Y-%m-%d')}, "
          f"Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}, {os.cpu_count()} cores, "
          f"{connections} connections, {seconds:g} s per load, load from {'wrk' if shutil.which('wrk') else 'Python clients'}")
    print()
    print("| cell | pycolytics | baseline | baseline value | ratio | target |")
    print("|---|---:|---|---:|---:|---:|")
    for name, ours, unit, baseline_name, baseline, ratio, target in rows:
        shown_baseline = f"{baseline:,.0f} {unit}" if baseline else ""
        shown_ratio = f"{ratio:.0%}" if ratio is not None else ""
        shown_target = (f">= {target:.0%} {'met' if ratio >= target else 'MISSED'}") if target else ""
        print(f"| {name} | {ours:,.0f} {unit} | {baseline_name} | {shown_baseline} | {shown_ratio} | {shown_target} |")
    print()
    for note in notes:
        print(f"- {note}")
    if all(VERIFIED):
        print(f"- every pycolytics load ({len(VERIFIED)}): the database held every acknowledged event")
    else:
        print(f"- {VERIFIED.count(False)} of {len(VERIFIED)} loads: the database did NOT hold what was acknowledged")


if __name__ == "__main__":
    sys.exit(main())
