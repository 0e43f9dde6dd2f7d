"""Mutation testing of the code that carries pycolytics.py's promises, with the standard library only.

Each mutant is one small, realistic bug put into a copy of pycolytics.py: a comparison flipped
(`>` to `>=`, `==` to `!=`, `in` to `not in`), `and` swapped for `or`, a `not` dropped, a number
changed by one, a returned value replaced by None, a statement deleted. The tests that map to the
mutated function run against it (`pytest -x -q`, SQLite unless the function is PostgreSQL's); a
mutant they fail on is killed, one they pass with survived. Sampling is deterministic (a seed and a
cap per function), so two runs of the same code give the same mutants and the same figures.

    python3 bench/mutate.py                      # every group, --max 12 mutants per function
    python3 bench/mutate.py --group validation   # one group
    python3 bench/mutate.py --list               # the mutants, without running anything

To stay fast, one parent process imports pytest, the tests and their plugins once, then forks a
child per mutant: the child writes nothing shared, loads the mutated module in place of the real
one and runs its tests; the parent kills the child's process group after --timeout seconds (a
mutant that hangs counts as killed, as a test run that hangs is a failing one).

Survivors are written to --survivors (bench/mutation-survivors.md): a survivor already listed there
keeps its verdict ("killed by <test>" or "equivalent: <reason>"), so the file is the record of why
each one does not count, and the figure printed at the end is killed / (total - equivalent).
"""

import argparse
import ast
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# Files a test reads beside pycolytics.py (its subprocesses run the mutated copy from there too).
COPIED = ("pycolytics.py", "test_pycolytics.py", "pycolytics.ini", "README.md")

SQLITE = "not postgresql"
# Each group: the functions that carry one kind of promise, and the fast tests that check it.
GROUPS = {
    "validation": (
        ["Validator.rows", "Validator._fast_row", "Validator._problems", "Validator._value_text",
         "_finite_json", "Validator._listed_problems", "_client_time", "_client_fields", "_nests_deeper",
         "_holds_nul"],
        f"(stored or batch or refused or godot or client or time or sent_at or event_id or integer or backslash"
        f" or digits or limit or nul or 1e999 or nest or finite or problems) and {SQLITE} and not generated"
        " and not browser and not gunicorn and not linear and not workers",
    ),
    "keys": (
        ["Keyring.applications", "Validator._refusal"],
        f"(key or origin or games) and {SQLITE} and not keygen and not browser and not nginx",
    ),
    "storage": (
        ["connect", "SQLiteStore.insert", "_chunks", "Writer.submit", "Writer.write", "Writer._run",
         "Writer._commit"],
        f"((stored or batch or database or synchronous or pending or writer or sigterm) and {SQLITE}"
        " and not generated and not browser and not gunicorn and not copy and not sigkill and not two_)"
        # the writer's retry after a connection lost before the commit: PostgreSQL's alone
        " or within_a_second",
    ),
    "framing": (
        ["_parse_head", "_split_target", "Server._whole_request", "Server._reserve", "read_body", "decompress"],
        f"(framing or keep_alive or pipelined or expect or http_1_0 or absolute or body or compressed or bomb or encoding"
        f" or chunked) and {SQLITE} and not generated and not browser and not nginx and not fuzzed",
    ),
    "configuration": (
        ["_number", "_flag", "_synchronous", "_parse", "load_config", "_read_ini", "_one_place", "_proxies",
         "_origins", "_rate", "_read_dotenv"],
        "(config or setting or precedence or originals or inline or trusted or bad_value or defaults)"
        " and not gunicorn and not browser and not nginx and not start_up and not stops and not reload"
        " and not encrypted and not module_application",
    ),
    "export": (
        ["export", "prune", "_moment", "_inert", "SQLiteStore.prune"],
        f"(export or prune or command_line) and {SQLITE}",
    ),
    "dashboard": (
        ["_escape", "_dashboard_html", "_options", "_ranking_svg", "_legend", "_retention_table",
         "_funnel_section", "_values_section", "Dashboard.authorize"],
        f"(dashboard or read_key) and {SQLITE} and not real_browser and not nginx and not mount",
    ),
    "retry": (
        ["_retry_after", "RateLimiter.check", "RateLimiter._count"],
        f"(rate or retry_after or throttle) and {SQLITE} and not browser and not nginx",
    ),
    "summaries": (
        ["summarise", "_presence", "_had_session", "_had_user", "_span_moved", "forget_days_before",
         "_summaries_hold", "_summary_reader", "_present", "_SummaryReader.daily", "_SummaryReader._users",
         "_SummaryReader._lengths", "_SummaryReader.newcomers", "_SummaryReader.rankings",
         "_SummaryReader._present", "_shorter_than", "SQLiteStore.forget", "Writer._prune"],
        f"(report or summar or retention_days or edges or synchronous) and {SQLITE} and not browser and not nginx"
        " and not fuzz",
    ),
    "connections": (  # the event loop's own bookkeeping of a connection, from accept to close
        ["Server._read", "Server._advance", "Server._flush", "Server._watch", "Server._close", "Server._respond",
         "Server._take_wake_ups", "Server._turn_away", "Server._welcome"],
        f"(answered or pipelined or stall or unread or connections or slow or linger or keep_alive or idle"
        f" or slot or room or share) and {SQLITE} and not browser and not nginx and not gunicorn and not workers"
        " and not generated",
    ),
    "workers": (  # worker processes and their database writer: the tests run live servers, so few mutants
        ["_messages", "RemoteWriter.submit", "RemoteWriter._read_answers", "RemoteWriter._lost",
         "RemoteWriter._overdue", "RemoteWriter.health", "_take_rows", "_reload_writer", "Scoreboard.crowded",
         "Scoreboard.writer_problem", "Server._accept", "Supervisor._supervise", "Supervisor._reap"],
        f"(worker or writer or garbled or burst) and {SQLITE} and not browser and not nginx and not gunicorn",
    ),
    "postgresql": (
        ["PostgresStore.insert", "PostgresStore.prune", "PostgresStore._create_schema"],
        "postgresql and (stored or batch or event_id or prune or schema or group) and not generated and not copy",
    ),
}

COMPARISONS = {ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Eq: ast.NotEq,
               ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is}


def functions(tree):
    """{qualified name: def node} of the module's functions and methods."""
    found = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            found[node.name] = node
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    found[f"{node.name}.{item.name}"] = item
    return found


def _is_docstring(statement, body):
    return statement is body[0] and isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant)


def sites(function):
    """(description, apply, undo) for every mutation of one function, in source order."""
    found = []
    for node in ast.walk(function):
        if isinstance(node, ast.Compare):
            for position, op in enumerate(node.ops):
                if type(op) in COMPARISONS:
                    found.append((node, "compare", position))
        elif isinstance(node, ast.BoolOp):
            found.append((node, "boolop", None))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            found.append((node, "not", None))
        elif isinstance(node, ast.Constant) and type(node.value) in (int, bool):
            found.append((node, "constant", None))
        elif isinstance(node, ast.Return) and node.value is not None and not (
                isinstance(node.value, ast.Constant) and node.value.value is None):
            found.append((node, "return", None))
        for field in ("body", "orelse", "finalbody"):
            body = getattr(node, field, None)
            if isinstance(body, list):
                for index, statement in enumerate(body):
                    if isinstance(statement, (ast.Expr, ast.Assign, ast.AugAssign, ast.Raise, ast.If, ast.Return)) \
                            and not _is_docstring(statement, body):
                        found.append((node, "delete", (field, index)))
    found.sort(key=lambda site: (getattr(site[0], "lineno", 0), getattr(site[0], "col_offset", 0), site[1]))
    return found


def _replace_child(parent, old, new):
    for field, value in ast.iter_fields(parent):
        if value is old:
            setattr(parent, field, new)
            return
        if isinstance(value, list):
            for index, item in enumerate(value):
                if item is old:
                    value[index] = new
                    return


def _parent_of(root, target):
    for node in ast.walk(root):
        for child in ast.iter_child_nodes(node):
            if child is target:
                return node
    return None


def mutate(tree, function, site):
    """Apply one mutation to `tree` in place; return (description, undo)."""
    node, kind, detail = site
    line = getattr(node, "lineno", function.lineno)
    if kind == "compare":
        old = node.ops[detail]
        node.ops[detail] = COMPARISONS[type(old)]()
        return f"line {line}: {type(old).__name__} -> {type(node.ops[detail]).__name__}", \
            lambda: node.ops.__setitem__(detail, old)
    if kind == "boolop":
        old = node.op
        node.op = ast.Or() if isinstance(old, ast.And) else ast.And()
        return f"line {line}: {type(old).__name__} -> {type(node.op).__name__}", lambda: setattr(node, "op", old)
    if kind == "not":
        parent = _parent_of(function, node)
        _replace_child(parent, node, node.operand)
        return f"line {line}: not dropped", lambda: _replace_child(parent, node.operand, node)
    if kind == "constant":
        old = node.value
        node.value = (not old) if type(old) is bool else old + 1
        return f"line {line}: {old!r} -> {node.value!r}", lambda: setattr(node, "value", old)
    if kind == "return":
        old = node.value
        node.value = ast.Constant(None)
        return f"line {line}: returns None", lambda: setattr(node, "value", old)
    field, index = detail
    body = getattr(node, field)
    old = body[index]
    body[index] = ast.copy_location(ast.Pass(), old)
    return f"line {old.lineno}: statement deleted", lambda: body.__setitem__(index, old)


def _spliced(lines, function):
    """The module's text with only `function` rewritten from its tree: comments elsewhere stay."""
    first = min([function.lineno] + [decorator.lineno for decorator in function.decorator_list]) - 1
    text = textwrap.indent(ast.unparse(function), " " * function.col_offset)
    return "".join(lines[:first]) + text + "\n" + "".join(lines[function.end_lineno:])


def mutants(source, group_names, cap, seed):
    """[(group, function, key, description, mutated source)] sampled deterministically."""
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    defs = functions(tree)
    chosen = []
    for group in group_names:
        for name in GROUPS[group][0]:
            function = defs.get(name)
            if function is None:  # renamed or gone since the map was written: say so, go on
                print(f"warning: {group}: pycolytics.py has no function {name}", file=sys.stderr)
                continue
            found = sites(function)
            picks = sorted(random.Random(f"{seed}:{name}").sample(range(len(found)), min(cap, len(found))))
            for pick in picks:
                site = found[pick]
                node, kind, detail = site
                changed = getattr(node, detail[0])[detail[1]] if kind == "delete" else node
                before = ast.unparse(changed).splitlines()[0][:70]
                description, undo = mutate(tree, function, site)
                # The key names the function, the change and the code it changed, not a line
                # number: other work moves lines, and a survivor's verdict must follow it.
                key = f"{name}: {site[1]} #{pick} `{before}`"
                chosen.append((group, name, key, description, _spliced(lines, function)))
                undo()
    return chosen


def run_one(workdir, mutated, items, timeout):
    """(killed, the test that failed) for `mutated` against `items`; a hang counts as killed."""
    from _pytest.runner import runtestprotocol  # pytest-forked runs items the same way

    with open(os.path.join(workdir, "pycolytics.py"), "w", encoding="utf-8") as file:
        file.write(mutated)
    reading, writing = os.pipe()
    child = os.fork()
    if child == 0:
        status = 3
        try:
            os.close(reading)
            os.setpgid(0, 0)
            import pycolytics  # the module the tests hold: its contents become the mutant's
            for name in [name for name in pycolytics.__dict__ if not name.startswith("__")]:
                del pycolytics.__dict__[name]
            exec(compile(mutated, pycolytics.__file__, "exec"), pycolytics.__dict__)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            status = 0
            for item in items:
                if any(report.failed for report in runtestprotocol(item, log=False, nextitem=None)):
                    os.write(writing, item.nodeid.encode())
                    status = 1
                    break
        except BaseException:
            status = 3
        finally:
            os._exit(status)
    os.close(writing)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            done, status = os.waitpid(child, os.WNOHANG)
            if done:
                killer = os.read(reading, 4096).decode()
                return os.waitstatus_to_exitcode(status) != 0, killer or "(the mutated module does not load)"
            time.sleep(0.02)
        try:
            os.killpg(child, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(child, 0)
        return True, "(timeout)"
    finally:
        os.close(reading)


class Runner:
    """A pytest plugin: the tests are collected once, then each mutant runs its group's items in a fork."""

    def __init__(self, arguments, source, chosen, verdicts, workdir):
        self.arguments, self.source, self.chosen, self.verdicts, self.workdir = (
            arguments, source, chosen, verdicts, workdir)

    def pytest_runtestloop(self, session):
        from _pytest.mark.expression import Expression
        from _pytest.mark import KeywordMatcher

        arguments = self.arguments
        groups = arguments.group or list(GROUPS)
        selected = {}
        for group in groups:
            expression = Expression.compile(GROUPS[group][1])
            selected[group] = [item for item in session.items
                               if expression.evaluate(KeywordMatcher.from_item(item))]
            if not selected[group]:
                raise SystemExit(f"no test matches group {group}: -k {GROUPS[group][1]!r}")
        started = time.monotonic()
        # The unmutated code must pass each group's selection, or every verdict would be void.
        budget = {}
        for group in groups:
            began = time.monotonic()
            failed, test = run_one(self.workdir, self.source, selected[group], arguments.timeout)
            # A mutant may take twice what the real code took, and 10 s more, before it counts as hung.
            budget[group] = min(arguments.timeout, 2 * (time.monotonic() - began) + 10)
            if failed:
                raise SystemExit(f"the tests of group {group} fail on the unmutated code: {test}")
            print(f"group {group}: its {len(selected[group])} tests pass on the unmutated code"
                  f" ({time.monotonic() - started:.0f} s)", flush=True)
        results, survivors, killers = {}, [], {}
        for number, (group, name, key, description, mutated) in enumerate(self.chosen, 1):
            # The test that killed this function's last mutant goes first: it often kills the next.
            first = killers.get(name)
            items = sorted(selected[group], key=lambda item: item.nodeid != first)
            killed, test = run_one(self.workdir, mutated, items, budget[group])
            if killed and test.startswith(os.path.basename("test_pycolytics.py")):
                killers[name] = test
            results.setdefault(group, []).append(killed)
            if not killed or self.verdicts.get(key, "").startswith("killed by"):
                survivors.append((group, key, description, killed))
            print(f"[{number}/{len(self.chosen)}] {'killed  ' if killed else 'SURVIVED'} {group}: {description}"
                  f" ({name}){' by ' + test if killed else ''}", flush=True)
        outcome = {"results": results, "survivors": survivors, "seconds": time.monotonic() - started}
        if arguments.results:  # one job of several: the parent reports
            with open(arguments.results, "w", encoding="utf-8") as file:
                json.dump(outcome, file)
        else:
            report([outcome], self.verdicts, arguments)
        return True


def read_verdicts(path):
    """{mutant key: verdict} from an earlier survivors file."""
    verdicts = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as file:
            for line in file:
                match = re.match(r"- (.+?) \| .*? \| (.+)$", line.rstrip("\n"))
                if match:
                    verdicts[match.group(1)] = match.group(2)
    return verdicts


def report(outcomes, verdicts, arguments):
    """Print the figures and write the survivors' file from the outcomes of one job or several."""
    results, survivors = {}, []
    for outcome in outcomes:
        results.update(outcome["results"])
        survivors += [tuple(survivor) for survivor in outcome["survivors"]]
    seconds = max(outcome["seconds"] for outcome in outcomes)
    equivalent = sum(1 for _, key, _, _ in survivors if verdicts.get(key, "").startswith("equivalent"))
    total = sum(len(kills) for kills in results.values())
    killed = sum(sum(kills) for kills in results.values())
    lines = [f"{group}: {sum(kills)} / {len(kills)} killed" for group, kills in results.items()]
    share = 100 * killed / max(1, total - equivalent)
    figures = (f"{killed} of {total} mutants killed, {equivalent} equivalent: {share:.1f} % of the"
               f" non-equivalent ones killed, in {seconds / 60:.0f} min"
               f" (--max {arguments.max} --seed {arguments.seed} --jobs {arguments.jobs})")
    print("\n".join(lines + [figures]), flush=True)
    with open(arguments.survivors, "w", encoding="utf-8") as file:
        file.write("# Mutants the fast test selection did not kill\n\n")
        file.write("Written by `bench/mutate.py`; the verdict after the last `|` is kept from run to run.\n")
        file.write("A survivor is either killed by a test added since (named) or equivalent (the reason).\n\n")
        file.write("\n".join(f"- {line}" for line in lines + [figures]) + "\n\n")
        for group, key, description, killed in survivors:
            verdict = verdicts.get(key, "TODO")
            if not killed and verdict.startswith("killed by"):
                verdict = f"TODO: survives again (was {verdict})"
            file.write(f"- {key} | {group}, {description} | {verdict}\n")


def run_jobs(arguments):
    """Split the groups between --jobs processes (most of a mutant's time is waiting), then report."""
    groups = arguments.group or list(GROUPS)
    shares = [groups[job::arguments.jobs] for job in range(arguments.jobs)]
    folder = tempfile.mkdtemp(prefix="pycolytics-mutation-jobs-")
    try:
        processes = []
        for job, share in enumerate(share for share in shares if share):
            command = [sys.executable, os.path.abspath(__file__), "--max", str(arguments.max), "--seed", arguments.seed,
                       "--timeout", str(arguments.timeout), "--survivors", arguments.survivors,
                       "--results", os.path.join(folder, f"{job}.json")]
            for group in share:
                command += ["--group", group]
            processes.append(subprocess.Popen(command))
        if [process.wait() for process in processes].count(0) < len(processes):  # every job waited for
            raise SystemExit("a job failed: see its output above")
        outcomes = []
        for name in sorted(os.listdir(folder)):
            with open(os.path.join(folder, name), encoding="utf-8") as file:
                outcomes.append(json.load(file))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    report(outcomes, read_verdicts(arguments.survivors), arguments)
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--group", action="append", choices=sorted(GROUPS), help="only these groups")
    parser.add_argument("--max", type=int, default=12, help="mutants per function at most (default 12)")
    parser.add_argument("--seed", default="pycolytics", help="seed of the sampling (default pycolytics)")
    parser.add_argument("--timeout", type=float, default=120, help="seconds per mutant at most (default 120; else twice what the real code's tests take, +10 s)")
    parser.add_argument("--survivors", default=os.path.join(HERE, "mutation-survivors.md"))
    parser.add_argument("--jobs", type=int, default=1, help="processes sharing the groups (default 1)")
    parser.add_argument("--results", help=argparse.SUPPRESS)  # where a job of --jobs writes its outcome
    parser.add_argument("--list", action="store_true", help="list the mutants and stop")
    arguments = parser.parse_args(argv)
    groups = arguments.group or list(GROUPS)
    with open(os.path.join(ROOT, "pycolytics.py"), encoding="utf-8") as file:
        source = file.read()
    chosen = mutants(source, groups, arguments.max, arguments.seed)
    if arguments.list:
        for group, _, key, description, _ in chosen:
            print(f"{group:14} {description:40} {key}")
        print(f"{len(chosen)} mutants")
        return 0
    if arguments.jobs > 1:
        return run_jobs(arguments)
    verdicts = read_verdicts(arguments.survivors)
    # On tmpfs when there is one: every test database commits with fsync, which a busy disk makes slow.
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    workdir = tempfile.mkdtemp(prefix="pycolytics-mutants-", dir=shm)
    try:
        for name in COPIED:
            shutil.copy(os.path.join(ROOT, name), workdir)
        os.chdir(workdir)
        sys.path.insert(0, workdir)
        import pytest

        runner = Runner(arguments, source, chosen, verdicts, workdir)
        status = pytest.main(["-q", "-s", "-p", "no:cacheprovider", "--basetemp", os.path.join(workdir, "tmp"),
                              "test_pycolytics.py"], plugins=[runner])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if status in (0, 5) else status


if __name__ == "__main__":
    sys.exit(main())
