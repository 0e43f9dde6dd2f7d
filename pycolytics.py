#!/usr/bin/env python3
"""Pycolytics: a tiny, self-hosted collector of analytics events for games and apps.

Clients POST JSON events over HTTP; Pycolytics checks their API key, validates them and
stores them in an SQLite database that you later open with pandas, Jupyter or any SQLite
browser. It speaks the API of the original Pycolytics (v1.0), so its Godot addon works
unchanged.

Run it:          python3 pycolytics.py [--config FILE] [--host HOST] [--port PORT]
Look after it:   python3 pycolytics.py keygen | export | prune | backup | copy   (--help says how)
Under gunicorn:  PYCOLYTICS_CONFIG=/etc/pycolytics.ini gunicorn pycolytics:application

One file, standard library only, Python 3.9 or newer; a postgresql:// database (several
collectors, one database) also needs psycopg 3, imported only then. Importing this module
does nothing: no file is read, no database opened and no socket bound until a server
starts or the WSGI callable `application` answers its first request.
"""

__version__ = "2.0.0"
__all__ = ["Config", "ConfigError", "Pycolytics", "Server", "application", "create_app", "load_config", "main"]

import argparse
import collections
import configparser
import contextlib
import copy as copy_module
import datetime
import errno
import functools
import io
import itertools
import json
import logging
import math
import operator
import os
import queue
import re
import selectors
import signal
import socket
import sqlite3
import sys
import threading
import time
from wsgiref.handlers import format_date_time
from wsgiref.util import is_hop_by_hop

# hmac.compare_digest is this function, but importing hmac loads OpenSSL: 3.5 MB of memory
# (a fifth of the idle footprint) for one comparison.
from _operator import _compare_digest as compare_digest

log = logging.getLogger("pycolytics")

###############################################################################
# Limits and constants
###############################################################################

API_VERSION = "1.0.0"

# The original's development key. Accepted only while no key is configured anywhere, so the
# README's curl example works out of the box; start-up warns loudly when it is.
DEV_KEY = "I-am-an-unsecure-dev-key-REPLACE_ME"

EVENT_FIELDS = ("event_type", "application", "version", "platform", "user_id", "session_id")

# How long a refused connection is drained before it is closed; see Server._refuse.
LINGER_SECONDS = 2

# How many bytes one recv() asks for; larger buffers would cost an mmap() per call.
RECV_BYTES = 64 * 1024

# Client addresses the rate limiter remembers at most: about 100 bytes each, so a flood of
# addresses costs a few MB before the limiter forgets them all and starts counting afresh.
MAX_TRACKED_CLIENTS = 50_000

# /healthz answers 503 when the database's disk has less free space than this, and when
# the write lock cannot be had within HEALTH_TIMEOUT seconds.
MIN_FREE_DISK = 16 * 2**20
HEALTH_TIMEOUT = 2

# Characters in a client-made event_id at most: room for a UUID, a ULID or a hash.
MAX_EVENT_ID = 100

# Digits in one integer of a request body at most. Python 3.11+ refuses to convert longer
# ones (a quadratic-time conversion); older Pythons would spend seconds on one number.
MAX_INTEGER_DIGITS = 4300

# What an [app:NAME] section may set, for that application's events only.
APP_SETTINGS = ("api_keys", "cors_origins")

# Settings that only a restart changes; a reload (SIGHUP) says so when they differ.
RESTART_SETTINGS = ("database", "host", "port", "threads", "synchronous", "busy_timeout")

###############################################################################
# Errors
###############################################################################


class HTTPError(Exception):
    """An answer to a request that went wrong; `status` says how, `detail` says what to fix."""

    status = "500 Internal Server Error"

    def __init__(self, detail, headers=()):
        super().__init__(detail)
        self.detail = detail
        self.headers = list(headers)


class BadRequest(HTTPError):
    status = "400 Bad Request"


class Unauthorized(HTTPError):
    status = "401 Unauthorized"


class Forbidden(HTTPError):
    status = "403 Forbidden"


class NotFound(HTTPError):
    status = "404 Not Found"


class MethodNotAllowed(HTTPError):
    status = "405 Method Not Allowed"


class LengthRequired(HTTPError):
    status = "411 Length Required"


class PayloadTooLarge(HTTPError):
    status = "413 Payload Too Large"


class URITooLong(HTTPError):
    status = "414 URI Too Long"


class UnsupportedMediaType(HTTPError):
    status = "415 Unsupported Media Type"


class UnprocessableEntity(HTTPError):
    status = "422 Unprocessable Entity"


class TooManyRequests(HTTPError):
    status = "429 Too Many Requests"

    def __init__(self, detail, retry_after):
        super().__init__(detail, [("Retry-After", str(retry_after))])


class HeaderFieldsTooLarge(HTTPError):
    status = "431 Request Header Fields Too Large"


class RequestTimeout(HTTPError):
    status = "408 Request Timeout"


class ServiceUnavailable(HTTPError):
    status = "503 Service Unavailable"

    def __init__(self, detail, retry_after=1):
        super().__init__(detail, [("Retry-After", str(retry_after))])


class VersionNotSupported(HTTPError):
    status = "505 HTTP Version Not Supported"


class ConfigError(Exception):
    """A configuration that cannot work; the message names the key and where it came from."""


###############################################################################
# Configuration
###############################################################################


def _text(value):
    return value.strip()


def _keys(value):
    return tuple(key for line in value.splitlines() for key in (part.strip() for part in line.split(",")) if key)


def _port(value):
    port = int(value)
    if not 0 <= port <= 65535:
        raise ValueError("a port is a number from 0 to 65535")
    return port


def _count(value):
    number = int(value)
    if number < 1:
        raise ValueError("must be a whole number of at least 1")
    return number


def _seconds(value):
    number = float(value)
    if not number > 0 or math.isinf(number):
        raise ValueError("must be a positive number of seconds")
    return number


def _days(value):
    days = float(value)
    if not 0 <= days < 1e6:
        raise ValueError("must be a number of days, or 0 to keep events forever")
    return days


def _flag(value):
    word = value.strip().lower()
    if word in ("1", "yes", "true", "on"):
        return True
    if word in ("0", "no", "false", "off"):
        return False
    raise ValueError("must be yes or no")


def _synchronous(value):
    word = value.strip().lower()
    if word not in ("full", "normal", "off", "extra"):
        raise ValueError("must be full, normal, off or extra")
    return word


def _addresses(value):
    return frozenset(_keys(value))


def _origins(value):
    """ANY_ORIGIN for "*", else the set of origins (scheme://host[:port]) named."""
    origins = _keys(value)
    if "*" in origins:
        return ANY_ORIGIN
    for origin in origins:
        if not re.fullmatch(r"https?://[^/\s]+", origin):
            raise ValueError(f"{origin!r} is not an origin like https://example.com or http://localhost:8060")
    return frozenset(origins)


ANY_ORIGIN = "*"


_PERIODS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}


def _rate(value):
    """None for "off", else (requests, seconds) from "60/minute" or "60 per minute"."""
    text = value.strip().lower()
    if text in ("off", "none", "no", ""):
        return None
    found = re.fullmatch(r"(\d+)\s*(?:/|per)\s*(second|minute|hour|day)s?", text)
    if not found or int(found.group(1)) < 1:
        raise ValueError("must be off, or a number of requests per second, minute, hour or day, like 60/minute")
    return int(found.group(1)), _PERIODS[found.group(2)]


class Setting(collections.namedtuple("Setting", "name default parse description")):
    """One ini key: its default (as the ini would write it), the function that parses and checks
    a value (raising ValueError with what is accepted), and one line about it."""

    __slots__ = ()


# Every ini key, in the order pycolytics.ini documents them (it shows each with its default).
SETTINGS = (
    Setting("database", "pycolytics.db", _text, "the SQLite database file, or a postgresql:// URL"),
    Setting("api_keys", "", _keys, "the keys clients send in each event's api_key"),
    Setting("host", "127.0.0.1", _text, "the address the built-in server listens on"),
    Setting("port", "8000", _port, "the port the built-in server listens on"),
    Setting("synchronous", "full", _synchronous, "what a power cut may lose (also PostgreSQL's synchronous_commit)"),
    Setting("quiet", "no", _flag, "no log line per request"),
    Setting("threads", "8", _count, "worker threads of the built-in server for requests that may wait"),
    Setting("max_connections", "512", _count, "open connections at most; the longest idle makes room"),
    Setting("max_connections_per_address", "64", _count, "open connections from one client address at most (503)"),
    Setting("idle_timeout", "5", _seconds, "seconds a kept-alive connection may sit idle"),
    Setting("request_timeout", "10", _seconds, "seconds a client has to send a whole request"),
    # HTTP framing limits of the built-in server, as gunicorn's defaults (and 64 KiB for a
    # whole head, which a hundred full-size headers would exceed): no client of an event
    # collector comes near them, and they bound what one connection can pin.
    Setting("max_request_line", "4094", _count, "bytes in the request line (414)"),
    Setting("max_header_fields", "100", _count, "header fields in one request (431)"),
    Setting("max_header_field", "8190", _count, "bytes in one header field (431)"),
    Setting("max_head_bytes", "65536", _count, "bytes in a whole request head (431)"),
    Setting("max_body_bytes", "1048576", _count, "bytes in one request body (413)"),
    Setting("max_buffered_bytes", "33554432", _count, "bytes of request bodies held at once, all together (503)"),
    Setting("max_batch_events", "1000", _count, "events in one batch (422)"),
    Setting("max_string_length", "255", _count, "characters in each string field of an event (422)"),
    Setting("max_value_bytes", "65536", _count, "bytes of one event's value as compact JSON (422)"),
    Setting("max_value_depth", "32", _count, "nesting of objects and arrays in one event's value (422)"),
    Setting("max_pending_events", "100000", _count, "events waiting for the database at most (then 503)"),
    Setting("busy_timeout", "30", _seconds, "seconds a write waits for another process holding the database"),
    Setting("rate_limit", "off", _rate, "requests to the event endpoints per client address, like 60/minute"),
    Setting("trusted_proxies", "127.0.0.1, ::1", _addresses, "reverse proxies whose X-Forwarded-For is believed"),
    Setting("certfile", "", _text, "the PEM certificate chain for HTTPS"),
    Setting("keyfile", "", _text, "the PEM private key for HTTPS"),
    Setting("cors_origins", "*", _origins, "the web pages (origins) that may post events"),
    Setting("retention_days", "0", _days, "delete events older than this many days (0 keeps them)"),
    Setting("read_keys", "", _keys, "the keys that open the dashboard"),
)
SETTINGS_BY_NAME = {setting.name: setting for setting in SETTINGS}


class Config:
    """The settings in force, parsed and checked; attributes are named after the ini keys."""

    def __init__(self, raw, apps=None):
        """`raw` maps each ini key to (text, where it came from); `apps` each [app:NAME] to its raw keys."""
        self.sources = {}
        self.apps = {}
        for application, settings in (apps or {}).items():
            self.apps[application] = {}
            for name, (text, source) in settings.items():
                try:
                    self.apps[application][name] = SETTINGS_BY_NAME[name].parse(text)
                except ValueError as error:
                    raise ConfigError(f"{source}: [app:{application}] {name} = {text!r} is not valid: {error}") from None
        for name, _, parse, _ in SETTINGS:
            text, source = raw[name]
            try:
                setattr(self, name, parse(text))
            except ValueError as error:
                raise ConfigError(f"{source}: {name} = {text!r} is not valid: {error}") from None
            self.sources[name] = source
        if not self.database:
            raise ConfigError(f"{self.sources['database']}: database must name a file")
        if bool(self.certfile) != bool(self.keyfile):
            raise ConfigError("HTTPS needs both certfile and keyfile (or neither, for plain HTTP)")

    @property
    def dev_key_active(self):
        return not self.api_keys and not any(app.get("api_keys") for app in self.apps.values())


def _read_ini(path, raw, apps):
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8") as file:
            parser.read_file(file)
    except (OSError, UnicodeDecodeError, configparser.Error) as error:
        raise ConfigError(f"cannot read the configuration file {path}: {error}") from None
    for section in parser.sections():
        if section.startswith("app:") and section[4:].strip():
            application = section[4:].strip()
            apps[application] = {}
            for name, value in parser.items(section):
                if name not in APP_SETTINGS:
                    raise ConfigError(f"{path}: unknown key {name!r} in [{section}]; known keys: {', '.join(APP_SETTINGS)}")
                apps[application][name] = (value, path)
        elif section != "pycolytics":
            raise ConfigError(f"{path}: unknown section [{section}]; settings go in [pycolytics] and [app:NAME]")
    if parser.has_section("pycolytics"):
        for name, value in parser.items("pycolytics"):
            if name not in SETTINGS_BY_NAME:
                raise ConfigError(f"{path}: unknown key {name!r} in [pycolytics]; known keys: {', '.join(SETTINGS_BY_NAME)}")
            raw[name] = (value, path)


def _read_dotenv(path):
    """The variables of an original Pycolytics `.env` file (NAME=value lines, values maybe quoted)."""
    variables = {}
    with open(path, encoding="utf-8") as file:
        for line in file:
            name, sep, value = line.strip().partition("=")
            if sep and not name.startswith("#"):
                value = value.strip()
                if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                    value = value[1:-1]
                variables[name.strip()] = value
    return variables


def _original_variables(environ, dotenv_path):
    """Settings from the original Pycolytics' variables: its `.env` file, then the environment."""
    variables = {}
    if dotenv_path and os.path.isfile(dotenv_path):
        try:
            variables.update(_read_dotenv(dotenv_path))
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"cannot read {dotenv_path}: {error}") from None
        variables = {name: (value, dotenv_path) for name, value in variables.items()}
    for name in ("SQLITE_FILE_NAME", "SQLITE_FILE_PATH", "API_KEYS", "RATE_LIMIT"):
        if name in environ:
            variables[name] = (environ[name], f"environment variable {name}")
    settings = {}
    # SQLITE_FILE_PATH replaced SQLITE_FILE_NAME in the original; both named the whole path.
    for name in ("SQLITE_FILE_NAME", "SQLITE_FILE_PATH"):
        if name in variables:
            settings["database"] = variables[name]
    if "RATE_LIMIT" in variables:
        settings["rate_limit"] = variables["RATE_LIMIT"]
    if "API_KEYS" in variables:
        text, source = variables["API_KEYS"]
        try:
            keys = json.loads(text)
        except ValueError:
            keys = None
        if not isinstance(keys, list) or not all(isinstance(key, str) for key in keys):
            raise ConfigError(f'{source}: API_KEYS must be a JSON list of strings, like ["key-one", "key-two"]')
        settings["api_keys"] = ("\n".join(keys), source)
    return settings


def load_config(path=None, environ=None, overrides=None, dotenv=".env"):
    """Settings from, weakest first: defaults, the ini file, the environment, `overrides`.

    The ini file is `path`, else $PYCOLYTICS_CONFIG, else ./pycolytics.ini when it exists.
    The environment is PYCOLYTICS_<KEY> for any key, and the original Pycolytics' variables
    (SQLITE_FILE_PATH, SQLITE_FILE_NAME, API_KEYS, also read from its `.env` file).
    """
    environ = os.environ if environ is None else environ
    raw = {setting.name: (setting.default, "default") for setting in SETTINGS}
    apps = {}
    path = path or environ.get("PYCOLYTICS_CONFIG")
    if path:
        _read_ini(path, raw, apps)
    elif os.path.isfile("pycolytics.ini"):
        _read_ini("pycolytics.ini", raw, apps)
    raw.update(_original_variables(environ, dotenv))
    for variable, value in environ.items():
        if variable.startswith("PYCOLYTICS_") and variable != "PYCOLYTICS_CONFIG":
            name = variable[len("PYCOLYTICS_"):].lower()
            if name not in SETTINGS_BY_NAME:
                raise ConfigError(f"unknown environment variable {variable}; known keys: {', '.join(SETTINGS_BY_NAME)}")
            raw[name] = (value, f"environment variable {variable}")
    for name, value in (overrides or {}).items():
        if value is not None:
            raw[name] = (str(value), f"--{name.replace('_', '-')}")
    return Config(raw, apps)


###############################################################################
# Validation: from request bytes to rows
###############################################################################

# A JSON string, or a bare nan/inf outside strings: what Godot's JSON.stringify writes for
# non-finite floats. Used only when a body fails to parse, to accept exactly Godot's quirks.
_GODOT_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|-?\b(?:nan|inf)\b', re.S)
_STRING_ESCAPE = re.compile(r"\\(.)", re.S)
# An escaped UTF-16 surrogate: the only way a JSON text can smuggle in a string that is not
# valid Unicode (a lone surrogate). Bodies without one skip the per-string check.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_MISSING = object()


def _compact_encoder():
    """A function writing compact JSON (no spaces, Unicode as is, no NaN) through the C encoder.

    json.dumps() builds a new C encoder at every call, which costs more than encoding a
    typical event's value; this one is built once. Values come from json.loads, so they
    hold no cycles and need no cycle check (markers=None).
    """
    options = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    make_encoder = getattr(json.encoder, "c_make_encoder", None)
    if make_encoder is None:  # a Python without the C accelerator
        return options.encode
    encode = make_encoder(None, options.default, json.encoder.encode_basestring, None, ":", ",", False, False, False)

    def compact_json(value):
        return "".join(encode(value, 0))

    return compact_json


_compact_json = _compact_encoder()


def _godot_string(match):
    # Godot escapes a vertical tab as \v, which JSON lacks.
    return "\\u000b" if match.group(1) == "v" else match.group(0)


def _godot_token(match):
    token = match.group(0)
    if token[0] != '"':
        return "null"
    return _STRING_ESCAPE.sub(_godot_string, token) if "\\v" in token else token


def _non_finite_to_null(name):
    return None


def _bounded_int(digits):
    if len(digits) > MAX_INTEGER_DIGITS and len(digits.lstrip("-")) > MAX_INTEGER_DIGITS:
        raise ValueError("integer too long")
    return int(digits)


# Python 3.11 and newer refuse to convert longer integers by themselves, in C; older ones
# would spend seconds on one huge number, so there every integer's length is checked first.
_PARSE_INT = None if sys.version_info >= (3, 11) else _bounded_int


def parse_json(body):
    """The document in a request body; non-finite numbers become None. Raises BadRequest."""
    if not body:
        raise BadRequest("the request body is empty: send a JSON object (or, to /v1.0/events, an array of them)")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise BadRequest(f"the request body is not UTF-8 (bad byte at offset {error.start})") from None
    if text[0] == "\ufeff":
        text = text[1:]
    try:
        return json.loads(text, parse_constant=_non_finite_to_null, parse_int=_PARSE_INT)
    except json.JSONDecodeError as error:
        first_error = error
    except RecursionError:
        raise BadRequest("the request body nests arrays or objects too deeply") from None
    except ValueError as error:  # an integer too long to convert
        raise BadRequest(f"the request body holds an integer of over {MAX_INTEGER_DIGITS} digits") from None
    try:
        return json.loads(_GODOT_TOKEN.sub(_godot_token, text), parse_constant=_non_finite_to_null, parse_int=_PARSE_INT)
    except (ValueError, RecursionError):
        error = first_error
        raise BadRequest(
            f"the request body is not valid JSON: {error.msg} at line {error.lineno} column {error.colno}"
        ) from None


def _json_depth(document):
    """How deeply arrays and objects nest in `document`, without recursion."""
    deepest, stack = 0, [(document, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))
        deepest = max(deepest, depth)
    return deepest


def _holds_nul(document):
    """Whether any key or string in `document` holds a NUL character, without recursion."""
    stack = [document]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            if "\0" in node:
                return True
        elif isinstance(node, dict):
            stack.extend(node)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return False


def _finite(document):
    """`document` with every non-finite float (1e999 parses as inf) replaced by None."""
    if isinstance(document, float):
        return document if math.isfinite(document) else None
    if isinstance(document, dict):
        return {key: _finite(value) for key, value in document.items()}
    if isinstance(document, list):
        return [_finite(value) for value in document]
    return document


def _is_unicode(text):
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def client_address(peer, forwarded_for, trusted_proxies):
    """The sender of a request: its peer, unless that is a trusted proxy that names another.

    Each proxy appends the address it received from to X-Forwarded-For, so the sender is the
    last address in it that is not one of our own proxies; anything before it could be forged.
    """
    if not forwarded_for or peer not in trusted_proxies:
        return peer
    for hop in reversed(forwarded_for.split(",")):
        hop = hop.strip()
        if hop not in trusted_proxies:
            return hop or peer
    return peer


class RateLimiter:
    """At most `requests` per `seconds` from one client address, counted in fixed windows."""

    def __init__(self, limit):
        self.requests, self.seconds = limit
        self.per = {1: "second", 60: "minute", 3600: "hour", 86400: "day"}[self.seconds]
        self._lock = threading.Lock()
        self._windows = {}  # address -> [window number, requests so far in it]

    def check(self, address, now=None):
        """Count one request from `address`; raise TooManyRequests if it is one too many."""
        now = time.monotonic() if now is None else now
        window = int(now // self.seconds)
        with self._lock:
            counted = self._windows.get(address)
            if counted is not None and counted[0] == window:
                counted[1] += 1
                if counted[1] > self.requests:
                    wait = max(1, math.ceil((window + 1) * self.seconds - now))
                    raise TooManyRequests(
                        f"more than {self.requests} requests per {self.per} from {address}: send again in {wait} s", wait
                    )
                return
            if counted is None and len(self._windows) >= MAX_TRACKED_CLIENTS:
                self._forget(window)
            self._windows[address] = [window, 1]

    def _forget(self, window):
        for address in [address for address, counted in self._windows.items() if counted[0] != window]:
            del self._windows[address]
        if len(self._windows) >= MAX_TRACKED_CLIENTS:
            self._windows.clear()  # this many senders at once: start over rather than grow


ALL_APPLICATIONS = frozenset({"*"})  # what a global key may send events for


class Keyring:
    """The API keys a server accepts, compared in constant time, and what each is for.

    A key of [pycolytics] is good for any application; a key of [app:NAME] only for NAME,
    so a key that leaks out of one game cannot write into another's data.
    """

    def __init__(self, config):
        entries = [(key, None) for key in config.api_keys]
        entries += [(key, name) for name, app in config.apps.items() for key in app.get("api_keys", ())]
        self.dev_key_active = not entries
        self._keys = [(key.encode("utf-8"), name) for key, name in (entries or [(DEV_KEY, None)])]

    def applications(self, key):
        """The applications `key` may send events for: ALL_APPLICATIONS, a set of names, or None if unknown."""
        if key is None:
            # The original treated a missing key as its development key.
            return ALL_APPLICATIONS if self.dev_key_active else None
        try:
            candidate = key.encode("utf-8")
        except UnicodeEncodeError:
            return None
        names, everything = set(), False
        for known, name in self._keys:
            if compare_digest(known, candidate):
                everything |= name is None
                names.add(name)
        return ALL_APPLICATIONS if everything else frozenset(names) or None


class Validator:
    """Turns a parsed request body into rows for the `event` table, or says what is wrong.

    Every event first takes a fast path that only decides "valid" with C-speed checks. A
    request with any invalid event is then examined again, event by event and field by
    field, to list every problem; that slow path is the authority on what is wrong.
    """

    def __init__(self, config, keyring):
        self.keyring = keyring
        self.default_origins = config.cors_origins
        self.app_origins = {name: app["cors_origins"] for name, app in config.apps.items() if "cors_origins" in app}
        self.max_batch_events = config.max_batch_events
        self.max_string_length = config.max_string_length
        self.max_value_bytes = config.max_value_bytes
        self.max_value_depth = config.max_value_depth
        self._fields = operator.itemgetter(*EVENT_FIELDS)

    def rows(self, document, batch, body, received, origin=None):
        """Row tuples (the six strings, value JSON, time, received_at, event_id), or an HTTPError for the lot."""
        if batch:
            if not isinstance(document, list):
                raise UnprocessableEntity([_problem(["body"], "expected a JSON array of events", "array_type")])
            if len(document) > self.max_batch_events:
                message = (f"a batch holds at most {self.max_batch_events} events and this one has {len(document)}: "
                           "send it in smaller batches")
                raise UnprocessableEntity([_problem(["body"], message, "too_long")])
            events = document
        else:
            events = (document,)
        # Cheap facts about the whole body that let most events skip checks: a body with few
        # brackets cannot nest deeply, and one without \uD800-style escapes holds no surrogates.
        shallow = body.count(b"{") + body.count(b"[") <= self.max_value_depth
        check_unicode = _SURROGATE_ESCAPE.search(body) is not None
        times = (received, received.strftime(TIME_FORMAT))
        rows, unauthorized, forbidden, verdicts, invalid = [], [], [], {}, False
        for index, event in enumerate(events):
            row = self._fast_row(event, shallow, check_unicode, times)
            if row is None:
                invalid = True
                if type(event) is not dict:
                    continue
            else:
                rows.append(row)
            key = event.get("api_key")
            if key is None or type(key) is str:  # any other type is a 422 problem
                if key not in verdicts:
                    verdicts[key] = self.keyring.applications(key)
                allowed = verdicts[key]
                if allowed is None:
                    unauthorized.append(index)
                elif row is not None and (allowed is not ALL_APPLICATIONS or origin is not None):
                    forbidden += self._refusal(index, row[1], allowed, origin, batch)
        # Keys first: a sender without a valid key learns nothing about its events.
        if unauthorized:
            which = f" in events {', '.join(map(str, unauthorized))}" if batch else ""
            raise Unauthorized(f"invalid or missing api_key{which}")
        if forbidden:
            raise Forbidden("; ".join(forbidden))
        if invalid:
            problems = []
            for index, event in enumerate(events):
                where = ["body", index] if batch else ["body"]
                problems += self._problems(event, where, shallow, check_unicode, received)
            raise UnprocessableEntity(problems)
        return rows

    def _refusal(self, index, application, allowed, origin, batch):
        """Why an event with a good key is still refused ([] if it is not): its application's rules."""
        where = f"event {index}: " if batch else ""
        if allowed is not ALL_APPLICATIONS and application not in allowed:
            names = ", ".join(sorted(repr(name) for name in allowed))
            return [f"{where}this api_key is for application {names}, not {application!r}"]
        origins = self.app_origins.get(application, self.default_origins)
        if origin is not None and origins is not ANY_ORIGIN and origin not in origins:
            return [f"{where}pages from {origin} may not send events for application {application!r}"]
        return []

    def _fast_row(self, event, shallow, check_unicode, times):
        """The event's row if it is valid, else None (without saying why)."""
        try:
            fields = self._fields(event)
            joined = "".join(fields)  # raises TypeError unless every field is a string
        except (KeyError, TypeError):
            return None
        if max(map(len, fields)) > self.max_string_length or "\0" in joined or type(event) is not dict:
            return None
        key = event.get("api_key")
        if key is not None and type(key) is not str:
            return None
        text, problem = self._value_text(event.get("value", _MISSING), shallow, check_unicode)
        if problem or check_unicode and not _is_unicode(joined):
            return None
        if "timestamp" in event or "sent_at" in event or "event_id" in event:
            when, event_id, problems = _client_fields(event, times[0], check_unicode)
            return None if problems else fields + (text, when, times[1], event_id)
        return fields + (text, times[1], times[1], None)

    def _problems(self, event, where, shallow, check_unicode, received):
        """Every problem of one event, each naming its field."""
        if not isinstance(event, dict):
            return [_problem(where, "expected a JSON object (one event)", "object_type")]
        problems = []
        for name in EVENT_FIELDS:
            value = event.get(name)
            if name not in event:
                problems.append(_problem(where + [name], "is required", "missing"))
            elif value is None:
                problems.append(_problem(where + [name], "must be a string, not null", "string_type"))
            elif type(value) is not str:
                problems.append(_problem(where + [name], "must be a string", "string_type"))
            elif len(value) > self.max_string_length:
                message = f"is longer than {self.max_string_length} characters"
                problems.append(_problem(where + [name], message, "string_too_long"))
            elif check_unicode and not _is_unicode(value):
                problems.append(_problem(where + [name], "holds an unpaired UTF-16 surrogate", "unicode"))
            elif "\0" in value:  # many readers of SQLite text stop at a NUL
                problems.append(_problem(where + [name], "holds a NUL character (\\u0000)", "nul"))
        key = event.get("api_key")
        if key is not None and type(key) is not str:
            problems.append(_problem(where + ["api_key"], "must be a string", "string_type"))
        _, problem = self._value_text(event.get("value", _MISSING), shallow, check_unicode)
        if problem:
            problems.append(_problem(where + ["value"], *problem))
        for name, message, kind in _client_fields(event, received, check_unicode)[2]:
            problems.append(_problem(where + [name], message, kind))
        return problems

    def _value_text(self, value, shallow, check_unicode):
        """(compact JSON of an event's value, None), or (None, (message, kind)) saying what is wrong."""
        if value is _MISSING or type(value) is dict and not value:
            return "{}", None
        if type(value) is not dict:
            return None, ("must be a JSON object", "dict_type")
        try:
            text = _compact_json(value)
        except ValueError:  # a non-finite float, as from 1e999
            text = _compact_json(_finite(value))
        except RecursionError:
            text = None
        # A text of n characters nests at most n/2 deep, and at most as deep as it has brackets.
        if text is None or (
            not shallow and len(text) > 2 * self.max_value_depth
            and text.count("{") + text.count("[") > self.max_value_depth
            and _json_depth(value) > self.max_value_depth
        ):
            return None, (f"nests objects and arrays more than {self.max_value_depth} deep", "too_deep")
        if len(text) * 4 > self.max_value_bytes or check_unicode:
            try:
                size = len(text.encode("utf-8"))
            except UnicodeEncodeError:
                return None, ("holds an unpaired UTF-16 surrogate", "unicode")
            if size > self.max_value_bytes:
                return None, (f"is {size} bytes as JSON; at most {self.max_value_bytes} are stored", "too_large")
        # PostgreSQL's jsonb cannot hold a NUL character, and readers of SQLite text stop at one:
        # refused on both backends alike (the escape can also be a literal backslash and "u0000")
        if "\\u0000" in text and _holds_nul(value):
            return None, ("holds a NUL character (\\u0000) in a string", "nul")
        return text, None


# The range of client times taken as given: the Unix epoch to the end of year 9999.
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
_LAST_SECOND = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.timezone.utc)


# ISO 8601 / RFC 3339 as clients write it: a date, maybe a time (T or space) with seconds and
# a fraction, maybe a zone (none means UTC). Parsed here because datetime.fromisoformat reads
# less of it before Python 3.11.
_ISO_8601 = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)(?:[Tt ](\d\d):(\d\d)(?::(\d\d)(?:[.,](\d+))?)?)?\s*"
    r"(?:([Zz])|([+-])(\d\d):?(\d\d))?"
)


def _client_time(value):
    """A UTC datetime from ISO 8601 text or Unix seconds, or None if `value` is neither."""
    try:
        if type(value) in (int, float):
            moment = datetime.datetime.fromtimestamp(value, datetime.timezone.utc)
        elif type(value) is str and _ISO_8601.fullmatch(value.strip()):
            year, month, day, hour, minute, second, fraction, _, sign, zone_hours, zone_minutes = (
                _ISO_8601.fullmatch(value.strip()).groups()
            )
            micro = int((fraction or "0")[:6].ljust(6, "0"))
            moment = datetime.datetime(int(year), int(month), int(day), int(hour or 0), int(minute or 0),
                                       int(second or 0), micro, tzinfo=datetime.timezone.utc)
            if sign:
                moment -= int(sign + "1") * datetime.timedelta(hours=int(zone_hours), minutes=int(zone_minutes))
        else:
            return None
    except (ValueError, OverflowError, OSError):  # not a date, or out of any calendar's range
        return None
    return moment if _EPOCH <= moment <= _LAST_SECOND else None


def _client_fields(event, received, check_unicode):
    """(time, event_id, problems) from an event's optional timestamp, sent_at and event_id.

    The stored time is the best estimate of when the event happened: the client's timestamp,
    shifted by how far the client's clock was off when it sent the request (received - sent_at),
    and never later than the receive time.
    """
    problems = []
    when = received
    timestamp, sent_at = event.get("timestamp"), event.get("sent_at")
    happened = _client_time(timestamp) if timestamp is not None else None
    sent = _client_time(sent_at) if sent_at is not None else None
    for name, given, parsed in (("timestamp", timestamp, happened), ("sent_at", sent_at, sent)):
        if given is not None and parsed is None:
            message = "must be ISO 8601 text (2024-05-01T12:00:00Z) or Unix seconds, from 1970 to 9999"
            problems.append((name, message, "datetime"))
    if happened is not None:
        try:
            when = happened if sent is None else received - (sent - happened)
        except OverflowError:  # clocks centuries apart: the estimate falls off the calendar
            when = received if sent < happened else _EPOCH
        when = min(max(when, _EPOCH), received)
    event_id = event.get("event_id")
    if event_id is not None and (
        type(event_id) is not str or not 0 < len(event_id) <= MAX_EVENT_ID or "\0" in event_id
        or check_unicode and not _is_unicode(event_id)
    ):
        problems.append(("event_id", f"must be a string of 1 to {MAX_EVENT_ID} characters", "event_id"))
    return when.strftime(TIME_FORMAT), event_id, problems


def _problem(location, message, kind):
    """One entry of a 422 answer, shaped like FastAPI's so the original's clients read it."""
    if len(location) > 1 and isinstance(location[1], int):
        message = f"event {location[1]}: " + (f"{location[2]!r} " if len(location) > 2 else "") + message
    elif len(location) > 1:
        message = f"{location[1]!r} {message}"
    return {"loc": location, "msg": message, "type": kind}


###############################################################################
# Storage: SQLite and the group-commit writer
###############################################################################

# The original Pycolytics' table, column for column as SQLModel created it, so databases made
# by either program open in the other. Only a new table gets Pycolytics' own index, on `time`
# (README.md, "Indexes", has the measurements behind that choice): an existing database keeps
# its indexes and only gains the ADDED_COLUMNS, with no migration step to run.
SCHEMA = """
CREATE TABLE IF NOT EXISTS event (
    event_type VARCHAR NOT NULL,
    application VARCHAR NOT NULL,
    version VARCHAR NOT NULL,
    platform VARCHAR NOT NULL,
    user_id VARCHAR NOT NULL,
    session_id VARCHAR NOT NULL,
    value JSON NOT NULL,
    id INTEGER NOT NULL,
    time DATETIME NOT NULL,
    PRIMARY KEY (id)
);
CREATE INDEX IF NOT EXISTS ix_event_time ON event (time);
"""

# Columns Pycolytics adds to the original's table. A database without them (the original's,
# or an older Pycolytics') gets them at start-up: adding a column rewrites nothing, so this
# is instant on any size of table, and the original can still write into it.
ADDED_COLUMNS = (
    ("received_at", "DATETIME"),  # the server's receive time, when `time` is the client's
    ("event_id", "VARCHAR"),  # a client-made id: a retried event is stored once
)
# Unique among the rows that have one; rows without an event_id cost this index nothing.
EVENT_ID_INDEX = "CREATE UNIQUE INDEX IF NOT EXISTS ix_event_event_id ON event (event_id) WHERE event_id IS NOT NULL"

# OR IGNORE: an event_id that is already stored makes its row a no-op, so the retry of an
# acknowledged event is acknowledged again and stored once.
INSERT = (
    "INSERT OR IGNORE INTO event"
    " (event_type, application, version, platform, user_id, session_id, value, time, received_at, event_id)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)

# Times as stored: UTC, as text that SQLite's date functions and pandas read.
TIME_FORMAT = "%Y-%m-%d %H:%M:%S.%f"


def connect(path, synchronous="full", busy_timeout=30.0):
    """A connection with Pycolytics' pragmas; creates the database and its table if missing.

    WAL lets readers (pandas, the dashboard) work while events are written, and makes a
    commit one append to the log: https://www.sqlite.org/wal.html
    synchronous=FULL fsyncs the log at every commit, so a commit survives power loss; NORMAL
    may lose the last commits on power loss (never on a crash of the process) and is much
    faster on slow SD cards: https://www.sqlite.org/pragma.html#pragma_synchronous
    The busy timeout makes writers in other processes (gunicorn workers) wait their turn
    instead of failing with "database is locked": https://www.sqlite.org/c3ref/busy_timeout.html
    """
    connection = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
    try:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute(f"PRAGMA synchronous={_synchronous(synchronous)}")
        exists = connection.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'event'").fetchone()
        if not exists:
            connection.executescript(SCHEMA)
        columns = _columns(connection)
        missing = [name for name in EVENT_FIELDS + ("value", "id", "time") if name not in columns]
        if missing:
            raise sqlite3.DatabaseError(f"its table 'event' lacks the columns {', '.join(missing)}")
        if any(name not in columns for name, _ in ADDED_COLUMNS):
            _add_columns(connection)
        connection.execute(EVENT_ID_INDEX)
    except BaseException:
        connection.close()
        raise
    return connection


def _columns(connection):
    return {row[1] for row in connection.execute("PRAGMA table_info(event)")}


def _add_columns(connection):
    """Give the table the columns Pycolytics added; another process may be doing the same."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        columns = _columns(connection)
        for name, kind in ADDED_COLUMNS:
            if name not in columns:
                connection.execute(f"ALTER TABLE event ADD COLUMN {name} {kind}")
                log.info("upgraded the database: added the column event.%s", name)
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise


class Metrics:
    """Counters and a histogram for /metrics, in Prometheus' text format. Thread-safe."""

    # Commit latency buckets, in seconds: an fsync on an SSD is ~1 ms, on an SD card ~10-100 ms.
    BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

    def __init__(self):
        self._lock = threading.Lock()
        self.requests = collections.Counter()  # by status code
        self.stored = 0
        self.commit_buckets = [0] * len(self.BUCKETS)
        self.commits = 0
        self.commit_seconds = 0.0

    def request(self, status, count=1):
        with self._lock:
            self.requests[status[:3]] += count

    def commit(self, seconds, stored):
        with self._lock:
            self.stored += stored
            self.commits += 1
            self.commit_seconds += seconds
            for index, bound in enumerate(self.BUCKETS):
                if seconds <= bound:
                    self.commit_buckets[index] += 1

    def text(self, extra=()):
        with self._lock:
            lines = [
                "# HELP pycolytics_events_stored_total Events committed to the database.",
                "# TYPE pycolytics_events_stored_total counter",
                f"pycolytics_events_stored_total {self.stored}",
                "# HELP pycolytics_requests_total Requests answered, by HTTP status.",
                "# TYPE pycolytics_requests_total counter",
            ]
            lines += [f'pycolytics_requests_total{{status="{code}"}} {n}' for code, n in sorted(self.requests.items())]
            lines += [
                "# HELP pycolytics_commit_seconds Time to commit one group of events, fsync included.",
                "# TYPE pycolytics_commit_seconds histogram",
            ]
            lines += [f'pycolytics_commit_seconds_bucket{{le="{bound}"}} {n}'
                      for bound, n in zip(self.BUCKETS, self.commit_buckets)]
            lines += [f'pycolytics_commit_seconds_bucket{{le="+Inf"}} {self.commits}',
                      f"pycolytics_commit_seconds_sum {self.commit_seconds:.6f}",
                      f"pycolytics_commit_seconds_count {self.commits}"]
        return "\n".join(lines + list(extra)) + "\n"


# Rows one pruning step deletes: a transaction this small holds the write lock for
# milliseconds, so ingestion waits no longer than for a commit.
PRUNE_STEP_ROWS = 500


def urllib_quote(path):
    from urllib.parse import quote  # here: only health checks and exports need it

    return quote(path)


def read_only(path):
    """A connection that can only read `path`, and fails rather than create a missing file."""
    return sqlite3.connect("file:" + urllib_quote(os.path.abspath(path)) + "?mode=ro", uri=True, isolation_level=None)


class SQLiteStore:
    """Events in an SQLite file: the default, standard library only."""

    kind = "SQLite"
    parameter = "?"  # how a query's parameters are written
    since = "?"  # a time parameter compared with `time`
    day = "substr(time, 1, 10)"
    time_text = "time"
    received_text = "received_at"
    value_text = "value"

    def __init__(self, config):
        self.config = config
        self.errors = (sqlite3.Error,)

    def connect(self):
        return connect(self.config.database, self.config.synchronous, self.config.busy_timeout)

    def insert(self, connection, rows):
        """Insert `rows` in one transaction; return how many were new (not an event_id already stored)."""
        changes = connection.total_changes
        connection.execute("BEGIN IMMEDIATE")
        try:
            connection.executemany(INSERT, rows)
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        return connection.total_changes - changes

    def prune(self, connection, before, limit=PRUNE_STEP_ROWS):
        """Delete at most `limit` events older than `before` (stored time text); return how many."""
        connection.execute("BEGIN IMMEDIATE")
        try:
            deleted = connection.execute(
                "DELETE FROM event WHERE id IN (SELECT id FROM event WHERE time < ? ORDER BY id LIMIT ?)",
                (before, limit),
            ).rowcount
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        return deleted

    def lost(self, error):
        """Whether `error` means the connection is gone and a new one is needed: never, for a file."""
        return False

    def describe(self, error):
        """`error` as /healthz may show it: SQLite's messages name no host, user or database."""
        return str(error)

    def read(self):
        """A connection for reading only; it never creates a missing database."""
        return read_only(self.config.database)

    def columns(self, connection):
        return _columns(connection)

    def problem(self):
        """Why the database would not take events now, or None if it would."""
        try:
            space = os.statvfs(os.path.dirname(os.path.abspath(self.config.database)))
            if space.f_bavail * space.f_frsize < MIN_FREE_DISK:
                return "the disk is almost full"
            uri = "file:" + urllib_quote(os.path.abspath(self.config.database)) + "?mode=rw"
            connection = sqlite3.connect(uri, uri=True, timeout=HEALTH_TIMEOUT, isolation_level=None)
            try:
                connection.execute("BEGIN IMMEDIATE")  # can we take the write lock?
                connection.execute("ROLLBACK")
            finally:
                connection.close()
        except (OSError, sqlite3.Error) as error:
            return str(error)
        return None


# PostgreSQL's table: the same columns, with its own types for JSON and times.
POSTGRES_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS event (
        event_type VARCHAR NOT NULL,
        application VARCHAR NOT NULL,
        version VARCHAR NOT NULL,
        platform VARCHAR NOT NULL,
        user_id VARCHAR NOT NULL,
        session_id VARCHAR NOT NULL,
        value JSONB NOT NULL,
        id BIGSERIAL PRIMARY KEY,
        time TIMESTAMPTZ NOT NULL,
        received_at TIMESTAMPTZ,
        event_id VARCHAR
    )""",
    "CREATE INDEX IF NOT EXISTS ix_event_time ON event (time)",
    "CREATE UNIQUE INDEX IF NOT EXISTS ix_event_application_event_id ON event (application, event_id)"
    " WHERE event_id IS NOT NULL",
    # an event_id is unique per application: two games may make the same ids
    "DROP INDEX IF EXISTS ix_event_event_id",
)
# The indexes a ready schema has: when they are there, connecting takes no lock on the table
# (CREATE INDEX IF NOT EXISTS would take one, and wait behind every other collector's insert).
POSTGRES_SCHEMA_READY = (
    "SELECT to_regclass('event') IS NOT NULL AND to_regclass('ix_event_time') IS NOT NULL"
    " AND to_regclass('ix_event_application_event_id') IS NOT NULL AND to_regclass('ix_event_event_id') IS NULL"
)
# Times travel as the same UTC text as in SQLite; the session's time zone is UTC. The conflict
# target is the event_id index only: any other conflict (a primary key behind rows imported
# with their ids) is an error, never an event silently dropped behind a 204.
POSTGRES_INSERT = (
    "INSERT INTO event"
    " (event_type, application, version, platform, user_id, session_id, value, time, received_at, event_id)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s::jsonb, %s::timestamptz, %s::timestamptz, %s)"
    " ON CONFLICT (application, event_id) WHERE event_id IS NOT NULL DO NOTHING"
)
# Every session's settings, in one round trip. Waits for a lock and statements are bounded as
# SQLite's busy_timeout bounds them; synchronous_commit = on whatever the server's default is,
# so a 204 means the commit is on disk (and on a synchronous standby, if there is one).
POSTGRES_SESSION = (
    "SELECT set_config('TimeZone', 'UTC', false), set_config('lock_timeout', %s, false),"
    " set_config('statement_timeout', %s, false), set_config('synchronous_commit', %s, false)"
)
# synchronous = normal (or off) relaxes commits as on SQLite: a crash of the database server
# may lose the last commits, a crash of the collector loses nothing.
POSTGRES_SYNCHRONOUS_COMMIT = {"full": "on", "normal": "off", "off": "off"}
# Seconds beyond busy_timeout before the watchdog cuts a connection: time for the server's
# own timeout error to arrive first.
POSTGRES_GRACE = 5


class LostBeforeCommit(ConnectionError):
    """The connection was gone before a transaction's COMMIT was sent: nothing of it is stored,
    so the same rows on a new connection are stored once."""


def _cut(connection):
    """Shut the connection's socket down beneath libpq: a call blocked on it fails at once."""
    try:
        with socket.fromfd(connection.pgconn.socket, socket.AF_INET, socket.SOCK_STREAM) as duplicate:
            duplicate.shutdown(socket.SHUT_RDWR)
    except Exception:  # already closed: nothing is blocked on it
        pass


class Watchdog:
    """Cuts a connection whose call outlives its deadline. libpq waits forever for a peer that
    acknowledges TCP but never answers (a frozen proxy, a hung server): keepalives and
    tcp_user_timeout only notice a peer that stops acknowledging."""

    IDLE_SECONDS = 60  # the thread ends after this long with nothing to watch

    def __init__(self):
        self._changed = threading.Condition()
        self._watched = {}  # token: [deadline, connection, fired]
        self._thread = None

    @contextlib.contextmanager
    def watching(self, connection, seconds):
        """Within the block, `connection` is cut `seconds` from now; yields a list that holds
        True once it was."""
        entry = [time.monotonic() + seconds, connection, False]
        token = object()
        with self._changed:
            self._watched[token] = entry
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="pycolytics-watchdog", daemon=True)
                self._thread.start()
            self._changed.notify()
        try:
            yield entry
        finally:
            with self._changed:
                del self._watched[token]

    def _run(self):
        with self._changed:
            while True:
                now = time.monotonic()
                for entry in self._watched.values():
                    if entry[0] <= now and not entry[2]:
                        entry[2] = True
                        log.error("the database did not answer in time: cutting the connection")
                        _cut(entry[1])
                waiting = [entry[0] - now for entry in self._watched.values() if not entry[2]]
                if not waiting and not self._changed.wait(self.IDLE_SECONDS) and not self._watched:
                    self._thread = None
                    return
                if waiting:
                    self._changed.wait(max(0.01, min(waiting)))


class PostgresStore:
    """Events in PostgreSQL (or a database that speaks its protocol), for several collectors.

    The driver, psycopg 3, is imported only here: SQLite users never need it. Every wait is
    bounded by busy_timeout: connecting, a lock, a statement, a silent network (keepalives,
    tcp_user_timeout) and a peer that answers TCP but nothing else (the Watchdog).
    """

    kind = "PostgreSQL"
    parameter = "%s"
    since = "%s::timestamptz"
    day = "to_char(time AT TIME ZONE 'UTC', 'YYYY-MM-DD')"
    time_text = "to_char(time AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US')"
    received_text = "to_char(received_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US')"
    value_text = "value::text"

    def __init__(self, config):
        try:
            import psycopg
        except ImportError:
            raise ConfigError(
                f"{config.sources['database']}: a postgresql:// database needs the psycopg 3 driver: "
                'python3 -m pip install "psycopg[binary]"'
            ) from None
        self.psycopg = psycopg
        self.config = config
        self.errors = (psycopg.Error,)
        self.watchdog = Watchdog()
        self._told = None  # the last health problem logged, so a polling balancer logs it once

    def _open(self, seconds, statements=True):
        """A connection whose waits end after `seconds`; `statements`: a statement's too (not
        for export, whose one query may rightly take long)."""
        whole = max(2, math.ceil(seconds))  # libpq counts whole seconds, and at least 2
        # autocommit: every transaction is an explicit BEGIN, so none is ever left open by a
        # stray statement (and rolled back, unseen, when it closes). The URL's own
        # application_name, if any, wins over the fallback.
        connection = self.psycopg.connect(
            self.config.database, autocommit=True, connect_timeout=whole, keepalives=1,
            keepalives_idle=max(1, whole // 2), keepalives_interval=1, keepalives_count=3,
            tcp_user_timeout=whole * 1000, fallback_application_name="pycolytics",
        )
        try:
            locks = int(seconds * 1000)
            # a second more for a statement, so that a lock wait fails as one (and says so)
            statement = str(locks + 1000) if statements else "0"
            synchronous = POSTGRES_SYNCHRONOUS_COMMIT.get(self.config.synchronous, "on")
            with self.watchdog.watching(connection, seconds + POSTGRES_GRACE):
                connection.execute(POSTGRES_SESSION, (str(locks), statement, synchronous))
        except BaseException:
            connection.close()
            raise
        return connection

    def connect(self):
        connection = self._open(self.config.busy_timeout)
        try:
            with self.watchdog.watching(connection, self.config.busy_timeout + POSTGRES_GRACE):
                if not connection.execute(POSTGRES_SCHEMA_READY).fetchone()[0]:
                    self._create_schema(connection)
        except BaseException:
            connection.close()
            raise
        return connection

    def _create_schema(self, connection):
        for attempt in range(3):  # collectors starting together may race to create it
            try:
                with connection.transaction():
                    for statement in POSTGRES_SCHEMA:
                        connection.execute(statement)
                return
            except (self.psycopg.errors.UniqueViolation, self.psycopg.errors.DuplicateTable):
                if attempt == 2:
                    raise

    def insert(self, connection, rows):
        """Insert `rows` in one transaction; return how many were new (not an event_id already
        stored). LostBeforeCommit: the connection was gone before COMMIT was sent."""
        committing = False
        with self.watchdog.watching(connection, self.config.busy_timeout + POSTGRES_GRACE) as watch:
            try:
                with connection.cursor() as cursor:
                    cursor.execute("BEGIN")
                    cursor.executemany(POSTGRES_INSERT, rows)
                    inserted = max(0, cursor.rowcount)
                    committing = True
                    # statement_timeout never covers a commit (the server disables it first):
                    # a wait for a synchronous standby is bounded by the watchdog
                    cursor.execute("COMMIT")
            except self.psycopg.Error as error:
                if committing or watch[2]:
                    raise  # the commit's outcome is unknown, or the database hung: 503
                if connection.broken:
                    raise LostBeforeCommit(f"the database connection was lost before the commit: {error}") from error
                self._roll_back(connection)
                raise
        return inserted

    def _roll_back(self, connection):
        try:
            connection.execute("ROLLBACK")
        except self.psycopg.Error:  # the original error is what matters; the next BEGIN says if it is broken
            pass

    def prune(self, connection, before, limit=PRUNE_STEP_ROWS):
        with self.watchdog.watching(connection, self.config.busy_timeout + POSTGRES_GRACE):
            with connection.transaction():
                return connection.execute(
                    "DELETE FROM event WHERE id IN"
                    " (SELECT id FROM event WHERE time < %s::timestamptz ORDER BY id LIMIT %s)", (before, limit)
                ).rowcount

    def lost(self, error):
        return isinstance(error, (self.psycopg.OperationalError, self.psycopg.InterfaceError))

    def read(self):
        return self._open(self.config.busy_timeout, statements=False)

    def columns(self, connection):
        return {row[0] for row in connection.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'event'"
            " AND table_schema = current_schema()")}

    def problem(self):
        """Why the database would not take events now, or None: in general words (the driver's
        details, which name hosts and databases, go to the log). Waits HEALTH_TIMEOUT at most,
        and takes the lock an insert takes, so a table locked by a migration shows."""
        try:
            connection = self._open(HEALTH_TIMEOUT)
            try:
                with self.watchdog.watching(connection, HEALTH_TIMEOUT + POSTGRES_GRACE):
                    with connection.transaction():
                        connection.execute("LOCK TABLE event IN ROW EXCLUSIVE MODE")
            finally:
                connection.close()
        except self.psycopg.Error as error:
            problem = self.describe(error)
            detail = str(error).strip() or type(error).__name__
            if detail != self._told:
                log.warning("health check: %s: %s", problem, detail)
                self._told = detail
            return problem
        self._told = None
        return None

    def describe(self, error):
        """`error` in general words, for clients and /healthz: the driver's own text names hosts,
        ports, users and databases, and belongs in the log."""
        errors = self.psycopg.errors
        if isinstance(error, errors.LockNotAvailable):
            return "the event table is locked by another session"
        if isinstance(error, errors.QueryCanceled):
            return "the database did not answer in time"
        if isinstance(error, (errors.ReadOnlySqlTransaction, errors.UndefinedTable)):
            return "the database does not take events (read-only, or no event table)"
        if isinstance(error, self.psycopg.IntegrityError):
            return "the database refused the events as a conflict (the log says which)"
        if isinstance(error, (self.psycopg.OperationalError, self.psycopg.InterfaceError, ConnectionError)):
            return "the database cannot be reached"
        return "the database refused the request (the log says why)"


def store_for(config):
    """The storage `config.database` names: postgresql://... or an SQLite file."""
    if config.database.startswith(("postgresql://", "postgres://")):
        return PostgresStore(config)
    return SQLiteStore(config)


class Writer:
    """The one thread that writes: commits the rows of many requests in one transaction.

    Requests hand their rows over with a function to call once they are committed. The
    writer takes everything queued, commits it with one fsync, calls every function, and
    meanwhile the next group gathers: under load, one fsync serves many requests. The queue
    is bounded: when it is full, requests are refused with 503 and Retry-After rather than
    held in memory.
    """

    def __init__(self, config, metrics=None):
        self.config = config
        self.store = store_for(config)
        self.metrics = metrics or Metrics()
        self.last_error = None
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._queue = []
        self._queued_rows = 0
        self._closed = False
        self._thread = None
        self._connection = None
        self._reconnect_at = 0.0
        self.pruned = 0
        self._prune_due = time.monotonic() + 60  # retention_days: a minute after start, then hourly
        # How long a blocking write waits for its commit before answering 503: beyond any busy wait.
        self._patience = config.busy_timeout + 30

    def start(self):
        """Open the database (raising if it cannot be) and start the writer thread."""
        with self._lock:
            if self._thread is None and not self._closed:
                self._connection = self.store.connect()
                self._thread = threading.Thread(target=self._run, name="pycolytics-writer")
                self._thread.daemon = True
                self._thread.start()

    def submit(self, rows, committed):
        """Queue `rows`; the writer thread calls committed(error) once they are stored (error None) or not."""
        with self._lock:
            if self._closed:
                raise ServiceUnavailable("the server is shutting down; send the events again shortly", 5)
            if self._queued_rows and self._queued_rows + len(rows) > self.config.max_pending_events:
                raise ServiceUnavailable("the server is busy writing other events; send these again shortly")
            self._queue.append((rows, committed))
            self._queued_rows += len(rows)
            self._wakeup.notify()

    def write(self, rows):
        """Return once `rows` are committed; raise ServiceUnavailable if they cannot be."""
        done = threading.Lock()
        done.acquire()
        outcome = []

        def committed(error):
            outcome.append(error)
            done.release()

        self.submit(rows, committed)
        if not done.acquire(timeout=self._patience):
            raise ServiceUnavailable("the database did not answer in time; send the events again shortly", 5)
        if outcome[0] is not None:
            raise outcome[0]

    def close(self):
        """Commit everything queued, then stop the thread and close the database."""
        with self._lock:
            self._closed = True
            self._wakeup.notify()
            thread = self._thread
        if thread is not None:
            thread.join()

    def prune_soon(self):
        """Apply retention_days now rather than at the next hourly round (after a reload, say)."""
        with self._lock:
            self._prune_due = 0
            self._wakeup.notify()

    def _run(self):
        try:
            while True:
                with self._lock:
                    while not self._queue and not self._closed:
                        if self.config.retention_days and time.monotonic() >= self._prune_due:
                            break
                        wait = max(0.0, self._prune_due - time.monotonic()) if self.config.retention_days else None
                        self._wakeup.wait(wait)
                    if not self._queue and self._closed:
                        return
                    group, self._queue, self._queued_rows = self._queue, [], 0
                if group:
                    error = self._commit(group)
                    for _, committed in group:
                        committed(error)
                else:
                    self._prune_due = self._prune()
        finally:
            if self._connection is not None:
                self._connection.close()

    def _connected(self):
        """The writer's connection, opened again if it was lost (not more than once a second)."""
        if self._connection is None:
            if time.monotonic() < self._reconnect_at:
                raise ConnectionError("the database connection is lost; reconnecting")
            self._reconnect_at = time.monotonic() + 1
            self._connection = self.store.connect()
            log.info("reconnected to the database")
        return self._connection

    def _prune(self):
        """One small step of deleting events past retention_days, between commits; when to step next."""
        cutoff = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=self.config.retention_days)
        try:
            deleted = self.store.prune(self._connected(), cutoff.strftime(TIME_FORMAT))
        except Exception as error:  # the database's errors, or a lost connection
            self._forget_lost(error)
            log.warning("could not prune old events: %s", error)
            return time.monotonic() + 3600
        if deleted:
            self.pruned += deleted
        return time.monotonic() + (0 if deleted == PRUNE_STEP_ROWS else 3600)

    def _commit(self, group):
        started = time.monotonic()
        rows = list(itertools.chain.from_iterable(rows for rows, _ in group))
        try:
            try:
                inserted = self.store.insert(self._connected(), rows)
            except LostBeforeCommit as lost:  # found dead before anything was committed: once more, afresh
                self._forget_lost(lost)
                self._reconnect_at = 0
                inserted = self.store.insert(self._connected(), rows)
        except Exception as failure:  # the database is full, gone, unreachable or locked for too long
            log.error("could not store %d events: %s", len(rows), failure)
            self.last_error = failure
            self._forget_lost(failure)
            return ServiceUnavailable("the database could not store the events; send them again shortly", 5)
        self.last_error = None
        self.metrics.commit(time.monotonic() - started, inserted)  # new rows, not retried event_ids
        return None

    def _forget_lost(self, error):
        """Drop a connection that `error` says is gone, so the next commit opens a new one."""
        if self._connection is not None and (isinstance(error, ConnectionError) or self.store.lost(error)):
            try:
                self._connection.close()
            except Exception:  # closing what is already broken: nothing more to learn
                pass
            self._connection = None


###############################################################################
# The dashboard: /dashboard
###############################################################################

# The range the dashboard shows when none is asked for, in days up to today.
DASHBOARD_DAYS = 30
# The dashboard keeps the figures of days that ended this many days ago for an hour, and
# remembers this many days at most (a few hundred bytes each).
DASHBOARD_SETTLED_DAYS = 2
DASHBOARD_CACHE_SECONDS = 3600
DASHBOARD_CACHE_DAYS = 4000


def presented_read_key(environ):
    """The key a request presents: an HTTP Basic password (any user name) or a Bearer token."""
    scheme, _, credentials = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
    if scheme.lower() == "bearer":
        return credentials.strip()
    if scheme.lower() == "basic":
        import base64  # here: only the dashboard reads credentials
        import binascii

        try:
            return base64.b64decode(credentials.strip(), validate=True).decode("utf-8").partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return None
    return None


class Dashboard:
    """Charts of the stored events, drawn by the server as inline SVG: no scripts, fonts or CDNs.

    Reading needs one of `read_keys`; the write keys that ship inside games never open it.
    The figures are per day, from three scans of the days not yet cached, through the `time` index.
    """

    def __init__(self, config, store):
        self.store = store
        self._read_keys = [key.encode("utf-8") for key in config.read_keys]
        self._lock = threading.Lock()
        self._cache = {}  # day -> (when read, its summaries), oldest read first

    def authorize(self, environ):
        if not self._read_keys:
            raise Forbidden("the dashboard is off: set read_keys in the configuration to open it")
        key = presented_read_key(environ)
        matched = False
        try:
            candidate = (key or "").encode("utf-8")
        except UnicodeEncodeError:
            candidate = b""
        for known in self._read_keys:
            matched |= compare_digest(known, candidate)
        if not key or not matched:
            raise Unauthorized("the dashboard needs a read key: as the password of HTTP Basic, or a Bearer token",
                               [("WWW-Authenticate", 'Basic realm="pycolytics dashboard", charset="UTF-8"')])

    def page(self, environ):
        started = time.monotonic()
        application, since, until = self._filters(environ.get("QUERY_STRING", ""))
        connection = self.store.read()
        try:
            figures = self._figures(connection, application, since, until)
        finally:
            connection.close()
        return _dashboard_html(figures, application, since, until, time.monotonic() - started).encode()

    def _filters(self, query):
        from urllib.parse import parse_qs  # here: only the dashboard reads a query string

        fields = {name: values[-1] for name, values in parse_qs(query).items()}
        today = datetime.datetime.now(datetime.timezone.utc).date()
        try:
            until = datetime.date.fromisoformat(fields["until"]) if fields.get("until") else today
            since = (datetime.date.fromisoformat(fields["since"]) if fields.get("since")
                     else until - datetime.timedelta(days=DASHBOARD_DAYS - 1))
        except ValueError:
            raise BadRequest("since and until must be dates like 2024-05-01") from None
        if since > until:
            raise BadRequest("since must not be after until")
        return fields.get("application") or None, since, until

    def _figures(self, connection, application, since, until):
        days = [(since + datetime.timedelta(days=n)).isoformat() for n in range((until - since).days + 1)]
        summaries = self._summaries(connection, days)
        chosen = [summaries[day].get(application, _EMPTY_DAY) for day in days]
        ranked = {"event_type": collections.Counter(), "version": collections.Counter(), "platform": collections.Counter()}
        for summary in chosen:
            for (field, value), events in summary[3].items():
                ranked[field][value] += events
        applications = {app for day in days for app in summaries[day] if app is not None}
        return {
            "days": [(day,) + summary[:3] for day, summary in zip(days, chosen)],
            "ranked": {name: counter.most_common(10) for name, counter in ranked.items()},
            "applications": sorted(applications | ({application} if application else set())),
        }

    def _summaries(self, connection, days):
        """Each day's figures, per application and for all (key None), from the cache or the database.

        A day that ended DASHBOARD_SETTLED_DAYS ago hardly changes (only late events with old
        timestamps land in it), so its figures are kept for DASHBOARD_CACHE_SECONDS; the
        database is read only for the other days, in one range.
        """
        now = time.monotonic()
        settled = (datetime.datetime.now(datetime.timezone.utc).date()
                   - datetime.timedelta(days=DASHBOARD_SETTLED_DAYS)).isoformat()
        with self._lock:
            summaries = {day: self._cache[day][1] for day in days
                         if day in self._cache and day < settled and now - self._cache[day][0] < DASHBOARD_CACHE_SECONDS}
        missing = [day for day in days if day not in summaries]
        if missing:
            fresh = self._read_days(connection, missing[0], missing[-1])
            with self._lock:
                for day in missing:
                    summaries[day] = fresh.get(day, {})
                    self._cache[day] = (now, summaries[day])
                while len(self._cache) > DASHBOARD_CACHE_DAYS:
                    del self._cache[next(iter(self._cache))]
        return summaries

    def _read_days(self, connection, first, last):
        """{day: {application or None: (events, users, sessions, Counter of (field, value))}}."""
        bounds = [first, (datetime.date.fromisoformat(last) + datetime.timedelta(days=1)).isoformat()]
        where, day_of = f"WHERE time >= {self.store.since} AND time < {self.store.since}", self.store.day
        days = collections.defaultdict(dict)
        for day, application, events, users, sessions in connection.execute(
            f"SELECT {day_of}, application, count(*), count(DISTINCT user_id), count(DISTINCT session_id)"
            f" FROM event {where} GROUP BY 1, 2", bounds
        ):
            days[day][application] = (events, users, sessions, collections.Counter())
        for day, events, users, sessions in connection.execute(
            f"SELECT {day_of}, count(*), count(DISTINCT user_id), count(DISTINCT session_id)"
            f" FROM event {where} GROUP BY 1", bounds
        ):
            days[day][None] = (events, users, sessions, collections.Counter())
        for day, application, event_type, version, platform, events in connection.execute(
            f"SELECT {day_of}, application, event_type, version, platform, count(*) FROM event {where}"
            " GROUP BY 1, 2, 3, 4, 5", bounds
        ):
            for key in (application, None):
                ranked = days[day][key][3]
                ranked["event_type", event_type] += events
                ranked["version", version] += events
                ranked["platform", platform] += events
        return days


_EMPTY_DAY = (0, 0, 0, collections.Counter())


def _escape(text):
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def _columns_svg(points, label):
    """A bar per day: (day, value) points."""
    width, height, left, bottom = 760, 200, 48, 22
    top = max((value for _, value in points), default=0) or 1
    step = (width - left) / max(1, len(points))
    bars = []
    for n, (day, value) in enumerate(points):
        tall = (height - bottom - 10) * value / top
        bars.append(f'<rect class="bar" x="{left + n * step + step * 0.1:.1f}" y="{height - bottom - tall:.1f}" '
                    f'width="{step * 0.8:.1f}" height="{tall:.1f}"><title>{day}: {value:,} {label}</title></rect>')
    ticks = "".join(
        f'<text x="{left + n * step + step / 2:.1f}" y="{height - 6}" text-anchor="middle">{day[5:]}</text>'
        for n, (day, _) in enumerate(points) if n % max(1, len(points) // 8) == 0
    )
    return (f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" aria-label="{_escape(label)} per day">'
            f'<line x1="{left}" y1="{height - bottom}" x2="{width}" y2="{height - bottom}" class="axis"/>'
            f'<text x="{left - 6}" y="16" text-anchor="end">{top:,}</text>'
            f'<text x="{left - 6}" y="{height - bottom}" text-anchor="end">0</text>{"".join(bars)}{ticks}</svg>')


def _lines_svg(series):
    """A line per series over the days: {name: [(day, value)]}."""
    width, height, left, bottom = 760, 200, 48, 22
    top = max((value for points in series.values() for _, value in points), default=0) or 1
    lines, legend = [], []
    for n, (name, points) in enumerate(series.items()):
        step = (width - left - 10) / max(1, len(points) - 1)
        coordinates = " ".join(f"{left + i * step:.1f},{height - bottom - (height - bottom - 10) * value / top:.1f}"
                               for i, (_, value) in enumerate(points))
        lines.append(f'<polyline class="line line{n}" points="{coordinates}"><title>{_escape(name)}</title></polyline>')
        legend.append(f'<text x="{left + 10 + n * 130}" y="14" class="legend{n}">&#9632; {_escape(name)}</text>')
    return (f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" aria-label="daily users and sessions">'
            f'<line x1="{left}" y1="{height - bottom}" x2="{width}" y2="{height - bottom}" class="axis"/>'
            f'<text x="{left - 6}" y="16" text-anchor="end">{top:,}</text>'
            f'<text x="{left - 6}" y="{height - bottom}" text-anchor="end">0</text>{"".join(lines)}{"".join(legend)}</svg>')


def _ranking_svg(items, label):
    """Horizontal bars for the top (name, count) items."""
    if not items:
        return '<p class="empty">No events in this range.</p>'
    width, row = 360, 22
    top = items[0][1] or 1
    bars = []
    for n, (name, value) in enumerate(items):
        y = n * row
        bars.append(
            f'<rect class="bar" x="120" y="{y + 4}" width="{(width - 180) * value / top:.1f}" height="{row - 8}">'
            f'<title>{_escape(name)}: {value:,}</title></rect>'
            f'<text x="114" y="{y + 16}" text-anchor="end">{_escape(name[:18] or "(empty)")}</text>'
            f'<text x="{126 + (width - 180) * value / top:.1f}" y="{y + 16}">{value:,}</text>'
        )
    return (f'<svg class="chart" viewBox="0 0 {width} {row * len(items)}" role="img" aria-label="{_escape(label)}">'
            f'{"".join(bars)}</svg>')


def _dashboard_html(figures, application, since, until, seconds):
    days = figures["days"]
    events, sessions = sum(day[1] for day in days), sum(day[3] for day in days)
    users = round(sum(day[2] for day in days) / len(days))
    options = "".join(f'<option value="{_escape(name)}"{" selected" if name == application else ""}>{_escape(name)}</option>'
                      for name in figures["applications"])
    charts = (_columns_svg([(day, n) for day, n, _, _ in days], "events")
              if events else '<p class="empty">No events in this range.</p>')
    activity = _lines_svg({"users": [(day, n) for day, _, n, _ in days],
                           "sessions": [(day, n) for day, _, _, n in days]}) if events else ""
    ranked = figures["ranked"]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Pycolytics dashboard</title>
<style>
body{{font:15px/1.4 system-ui,sans-serif;margin:0;color:#1d2433;background:#f5f6f8}}
header{{background:#1d2433;color:#fff;padding:12px 24px;display:flex;flex-wrap:wrap;gap:16px;align-items:center}}
header h1{{font-size:20px;margin:0 16px 0 0}} form{{display:flex;gap:12px;flex-wrap:wrap;align-items:center}}
input,select,button{{font:inherit;padding:3px 6px}} main{{max-width:1100px;margin:0 auto;padding:16px 24px}}
.totals{{display:flex;gap:16px}} .totals div{{background:#fff;border-radius:8px;padding:12px 20px;flex:1}}
.totals b{{display:block;font-size:28px}} section{{background:#fff;border-radius:8px;padding:12px 20px;margin:16px 0}}
h2{{font-size:16px;margin:4px 0 8px}} .grid{{display:grid;grid-template-columns:repeat(auto-fit,minmax(320px,1fr));gap:16px}}
.grid section{{margin:0}} .chart{{width:100%;height:auto}} .chart text{{font-size:11px;fill:#5b6477}}
.bar{{fill:#3d7be0}} .axis{{stroke:#c5cad3}} .line{{fill:none;stroke-width:2.5}} .line0{{stroke:#3d7be0}}
.line1{{stroke:#e0793d}} .chart .legend0{{fill:#3d7be0;font-size:13px}} .chart .legend1{{fill:#e0793d;font-size:13px}}
.empty{{color:#5b6477}}
footer{{color:#5b6477;font-size:12px;padding:0 24px 24px;text-align:center}}
</style></head><body>
<header><h1>Pycolytics</h1>
<form method="get" action="/dashboard">
<label>Application <select name="application"><option value="">all</option>{options}</select></label>
<label>From <input type="date" name="since" value="{since.isoformat()}"></label>
<label>to <input type="date" name="until" value="{until.isoformat()}"></label>
<button type="submit">Show</button></form></header>
<main>
<div class="totals"><div><b>{events:,}</b>events</div><div><b>{users:,}</b>daily users, on average</div>
<div><b>{sessions:,}</b>sessions</div></div>
<section><h2>Events per day</h2>{charts}</section>
<section><h2>Daily active users and sessions</h2>{activity or '<p class="empty">No events in this range.</p>'}</section>
<div class="grid">
<section><h2>Top event types</h2>{_ranking_svg(ranked["event_type"], "top event types")}</section>
<section><h2>Versions</h2>{_ranking_svg(ranked["version"], "versions")}</section>
<section><h2>Platforms</h2>{_ranking_svg(ranked["platform"], "platforms")}</section>
</div></main>
<footer>Pycolytics {__version__} &middot; days in UTC &middot; drawn in {seconds * 1000:.0f} ms</footer>
</body></html>
"""


###############################################################################
# The WSGI application
###############################################################################

JSON_TYPE = ("Content-Type", "application/json")
HTML_TYPE = ("Content-Type", "text/html; charset=utf-8")

def _error_parts(error):
    """(status, headers, body) of the JSON answer to an HTTPError."""
    body = json.dumps({"detail": error.detail}).encode()
    return error.status, [JSON_TYPE, ("Content-Length", str(len(body)))] + error.headers, body


_INTERNAL_ERROR = _error_parts(HTTPError("internal server error"))  # never says more: no tracebacks out
_NO_CONTENT = ("204 No Content", [], b"")


_VARY_ORIGIN = [("Vary", "Origin")]


def _ok(body, content_type, *headers):
    """(status, headers, body) of a 200 answer."""
    return "200 OK", [content_type, ("Content-Length", str(len(body))), *headers], body


def read_body(environ, limit):
    """The request body, at most `limit` bytes; never reads more than limit + 1."""
    length = environ.get("CONTENT_LENGTH") or ""
    stream = environ["wsgi.input"]
    if length:
        if not length.isdigit():
            raise BadRequest("Content-Length must be a whole number of bytes")
        if int(length) > limit:
            raise PayloadTooLarge(f"the request body is {length} bytes; at most {limit} are accepted")
        body = stream.read(int(length))
        if len(body) < int(length):
            raise BadRequest("the request body is shorter than its Content-Length")
        return body
    if not environ.get("wsgi.input_terminated"):
        return b""
    body = stream.read(limit + 1)
    if len(body) > limit:
        raise PayloadTooLarge(f"the request body is over {limit} bytes; at most {limit} are accepted")
    return body


def decompress(body, encoding, limit):
    """A gzip or deflate body, decompressed to at most `limit` bytes: a bomb is refused early."""
    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise UnsupportedMediaType(f"Content-Encoding {encoding} is not supported: send gzip, deflate or identity")
    import zlib  # here: most servers never see a compressed body

    # 47 reads a gzip or a zlib header; -15 is raw deflate, which some clients send as "deflate".
    for window in (47, -15) if encoding == "deflate" else (47,):
        decompressor = zlib.decompressobj(window)
        try:
            data = decompressor.decompress(body, limit + 1)
        except zlib.error:
            continue
        if len(data) > limit or decompressor.unconsumed_tail:
            raise PayloadTooLarge(f"the request body decompresses to over {limit} bytes; at most {limit} are accepted")
        if not decompressor.eof:
            raise BadRequest(f"the {encoding} body is cut short")
        return data
    raise BadRequest(f"the request body is not valid {encoding} data")


class Pycolytics:
    """The WSGI application: `Pycolytics(config)(environ, start_response)`."""

    def __init__(self, config):
        self.writer = Writer(config)
        self.metrics = self.writer.metrics
        self.rate_limiter = None
        self.reconfigure(config)
        self._routes = {
            "/v1.0/event": {"POST": self.post_event, "OPTIONS": self.preflight},
            "/v1.0/events": {"POST": self.post_events, "OPTIONS": self.preflight},
            "/docs": {"GET": self.get_docs},
            "/openapi.json": {"GET": self.get_openapi},
            "/healthz": {"GET": self.get_health},
            "/metrics": {"GET": self.get_metrics},
            "/dashboard": {"GET": self.get_dashboard},
            "/": {"GET": self.get_index},
        }
        for methods in self._routes.values():
            if "GET" in methods:
                methods["HEAD"] = methods["GET"]
        # What the server's loop must not answer itself: these may wait for the database.
        self._reads_the_database = {self.get_health, self.get_dashboard}

    def reconfigure(self, config):
        """Put new settings in force (keys, limits, documentation); the database stays as it is."""
        self.validator = Validator(config, Keyring(config))
        self.dashboard = Dashboard(config, self.writer.store)
        origins = [config.cors_origins] + [app["cors_origins"] for app in config.apps.values() if "cors_origins" in app]
        self._every_origin = [("Access-Control-Allow-Origin", "*")] if ANY_ORIGIN in origins else None
        self._origins = frozenset().union(*(found for found in origins if found is not ANY_ORIGIN))
        if config.rate_limit != (self.config.rate_limit if self.rate_limiter else None):
            self.rate_limiter = RateLimiter(config.rate_limit) if config.rate_limit else None
        self._openapi = json.dumps(openapi_document(config), indent=2).encode()
        self._docs = docs_page(config).encode()
        self.config = self.writer.config = config

    def open(self):
        """Open the database now instead of at the first event, so a bad path stops start-up."""
        self.writer.start()

    def close(self):
        self.writer.close()

    def __call__(self, environ, start_response):
        """Plain WSGI: a posted request waits here until its events are committed."""
        try:
            answer = self._route(environ)(environ)
            if isinstance(answer, list):  # rows to store
                if answer:
                    self.writer.start()
                    self.writer.write(answer)
                answer = _NO_CONTENT
        except HTTPError as error:
            answer = _error_parts(error)
        except Exception:
            answer = self._failed(environ)
        status, headers, body = self._finish(environ, answer)
        start_response(status, headers)
        return [body]

    def answer_in_loop(self, environ, respond):
        """The built-in server's loop hook (see Server): answer without blocking, or return False.

        Everything that does not read the database is answered right here; posted events are
        validated here and answered once the writer has committed them, with every other
        request that arrived meanwhile (one fsync for all).
        """
        try:
            handler = self._route(environ)
            if handler in self._reads_the_database:
                return False
            answer = handler(environ)
            if isinstance(answer, list):  # rows to store
                if answer:
                    self.writer.start()
                    self.writer.submit(answer, functools.partial(self._committed, environ, respond))
                    return True
                answer = _NO_CONTENT
        except HTTPError as error:
            answer = _error_parts(error)
        except Exception:
            answer = self._failed(environ)
        respond(*self._finish(environ, answer))
        return True

    def server_answered(self, status):
        """The server's hook for the answers it gives by itself (bad framing, overload): counted."""
        self.metrics.request(status)

    def _committed(self, environ, respond, error=None):
        """Called by the writer thread once a posted request's rows are stored, or could not be."""
        respond(*self._finish(environ, _NO_CONTENT if error is None else _error_parts(error)))

    def _finish(self, environ, answer):
        """Every answer, whichever way it leaves: counted, and readable by the pages allowed to."""
        status, headers, body = answer
        self.metrics.request(status)
        return status, headers + self.cors_headers(environ.get("HTTP_ORIGIN")), body

    @staticmethod
    def _failed(environ):
        log.exception("error while answering %s %s", environ.get("REQUEST_METHOD"),
                      environ.get("PATH_INFO", "").encode("unicode_escape").decode("ascii"))
        return _INTERNAL_ERROR

    def cors_headers(self, origin):
        """What lets a page from `origin` read the answer (browser games, web apps), if it may."""
        if self._every_origin:
            return self._every_origin  # the same list for every answer: callers only add it to theirs
        if origin in self._origins:
            return [("Access-Control-Allow-Origin", origin), ("Vary", "Origin")]
        return _VARY_ORIGIN

    def preflight(self, environ):
        """A browser asking whether it may POST here: yes, for a day, with these headers."""
        return "204 No Content", [
            ("Access-Control-Allow-Methods", "POST, OPTIONS"),
            ("Access-Control-Allow-Headers", "Content-Type, Content-Encoding"),
            ("Access-Control-Max-Age", "86400"),
        ], b""

    def _route(self, environ):
        """The handler for a request; raises NotFound or MethodNotAllowed. The one routing of both ways in."""
        methods = self._routes.get(environ.get("PATH_INFO") or "/")
        if methods is None:
            raise NotFound(f"no such endpoint: {environ.get('PATH_INFO')}; events go to /v1.0/event or /v1.0/events")
        handler = methods.get(environ["REQUEST_METHOD"])
        if handler is None:
            allowed = ", ".join(methods)
            raise MethodNotAllowed(f"{environ['REQUEST_METHOD']} is not allowed here; use {allowed}", [("Allow", allowed)])
        return handler

    def post_event(self, environ):
        return self._rows(environ, batch=False)

    def post_events(self, environ):
        return self._rows(environ, batch=True)

    def _rows(self, environ, batch):
        """The rows a posted request asks to store; raises HTTPError for anything wrong with it."""
        body = read_body(environ, self.config.max_body_bytes)
        client = client_address(
            environ.get("REMOTE_ADDR"), environ.get("HTTP_X_FORWARDED_FOR"), self.config.trusted_proxies
        )
        if self.rate_limiter is not None:
            self.rate_limiter.check(client)
        encoding = environ.get("HTTP_CONTENT_ENCODING")
        if encoding and encoding.lower() != "identity":
            body = decompress(body, encoding.lower(), self.config.max_body_bytes)
        received = datetime.datetime.now(datetime.timezone.utc)
        return self.validator.rows(parse_json(body), batch, body, received, environ.get("HTTP_ORIGIN"))

    def get_docs(self, environ):
        return _ok(self._docs, HTML_TYPE)

    def get_openapi(self, environ):
        return _ok(self._openapi, JSON_TYPE)

    def get_health(self, environ):
        problem = self.database_problem()
        server_problem = environ.get("pycolytics.server_problem")  # the built-in server's own trouble
        document = {"status": "unavailable" if problem or server_problem else "ok",
                    "database": problem or "accepts writes", "version": __version__}
        if server_problem:
            document["server"] = server_problem
            problem = problem or server_problem
        body = json.dumps(document).encode()
        _, headers, body = _ok(body, JSON_TYPE, ("Cache-Control", "no-store"))
        return ("503 Service Unavailable" if problem else "200 OK"), headers, body

    def database_problem(self):
        """Why the database would not take events now, or None if it would."""
        if self.writer.last_error is not None:
            return f"the last commit failed: {self.writer.store.describe(self.writer.last_error)}"
        return self.writer.store.problem()

    def get_dashboard(self, environ):
        self.dashboard.authorize(environ)
        body = self.dashboard.page(environ)
        return _ok(body, HTML_TYPE, ("Cache-Control", "no-store"), ("Referrer-Policy", "no-referrer"),
                   ("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; "
                                               "form-action 'self'; frame-ancestors 'none'"))

    def get_metrics(self, environ):
        extra = ["# HELP pycolytics_events_pruned_total Events deleted for being older than retention_days.",
                 "# TYPE pycolytics_events_pruned_total counter", f"pycolytics_events_pruned_total {self.writer.pruned}"]
        body = self.metrics.text(extra).encode()
        return _ok(body, ("Content-Type", "text/plain; version=0.0.4"))

    def get_index(self, environ):
        body = json.dumps({"name": "pycolytics", "version": __version__, "api": API_VERSION, "docs": "/docs"}).encode()
        return _ok(body, JSON_TYPE)


def create_app(config=None):
    """A ready application; for `gunicorn 'pycolytics:create_app()'`, which then fails fast on bad settings."""
    app = Pycolytics(config or load_config())
    app.open()
    return app


class _LazyApplication:
    """The module's `application`: builds the real one from the environment at its first request.

    Servers that fork workers import the module first, so nothing may be opened at import.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._app = None
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._forget)

    def _forget(self):
        # A forked child must not share its parent's writer thread (which did not survive the fork).
        self._lock = threading.Lock()
        self._app = None

    def __call__(self, environ, start_response):
        app = self._app
        if app is None:
            with self._lock:
                if self._app is None:
                    self._app = create_app()
                app = self._app
        return app(environ, start_response)


application = _LazyApplication()


###############################################################################
# Documentation: /openapi.json and /docs
###############################################################################


def _event_schema(config):
    strings = {name: {"type": "string", "maxLength": config.max_string_length} for name in EVENT_FIELDS}
    return {
        "type": "object",
        "required": list(EVENT_FIELDS),
        "properties": dict(
            strings,
            value={"type": "object", "default": {}, "description": "Anything, as a JSON object."},
            api_key={"type": "string", "description": "One of the server's API keys."},
            timestamp=_client_time_schema("When the event happened, by the client's clock."),
            sent_at=_client_time_schema("When the client sent the request, by its clock: corrects a wrong clock."),
            event_id={"type": "string", "minLength": 1, "maxLength": MAX_EVENT_ID,
                      "description": "A unique id made by the client: an event whose id is stored is not stored again."},
        ),
        "additionalProperties": True,
    }


def _client_time_schema(description):
    return {"description": description + " ISO 8601 text (UTC unless it says) or Unix seconds.", "oneOf": [
        {"type": "string", "pattern": _ISO_8601.pattern},
        {"type": "number", "minimum": 0, "maximum": _LAST_SECOND.timestamp()},
    ]}


def openapi_document(config):
    error = {"$ref": "#/components/schemas/Error"}
    answers = {
        "204": {"description": "Stored: the events are committed to the database."},
        "400": {"description": "The body is not JSON or not UTF-8.", "content": {"application/json": {"schema": error}}},
        "401": {"description": "A missing or unknown api_key.", "content": {"application/json": {"schema": error}}},
        "403": {"description": "A key of another application, or a page from an origin it does not allow.",
                "content": {"application/json": {"schema": error}}},
        "413": {"description": "Over the size limits.", "content": {"application/json": {"schema": error}}},
        "415": {"description": "An unsupported Content-Encoding.", "content": {"application/json": {"schema": error}}},
        "422": {"description": "Events that are not valid.", "content": {"application/json": {"schema": error}}},
        "429": {"description": "Over the rate limit: retry after Retry-After seconds.",
                "content": {"application/json": {"schema": error}}},
        "503": {"description": "Busy or shutting down: retry later.", "content": {"application/json": {"schema": error}}},
    }

    def post(summary, schema):
        return {"post": {
            "summary": summary,
            "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
            "responses": answers,
        }}

    batch = {"type": "array", "items": {"$ref": "#/components/schemas/Event"}, "maxItems": config.max_batch_events}
    return {
        "openapi": "3.0.3",
        "info": {"title": "Pycolytics Event API", "version": API_VERSION, "description": f"Pycolytics {__version__}"},
        "paths": {
            "/v1.0/event": post("Store one event", {"$ref": "#/components/schemas/Event"}),
            "/v1.0/events": post("Store a batch of events, all or nothing", batch),
        },
        "components": {"schemas": {
            "Event": _event_schema(config),
            "Error": {"type": "object", "required": ["detail"], "properties": {"detail": {}}},
        }},
    }


def docs_page(config):
    example = json.dumps({
        "event_type": "level_started", "application": "my-game", "version": "1.0.2", "platform": "Linux",
        "user_id": "3f2a9c1e", "session_id": "a81c0f", "value": {"level": 3}, "api_key": DEV_KEY,
    }, indent=2)
    rows = "".join(
        f"<tr><td><code>{name}</code></td><td>string, required, at most {config.max_string_length} characters</td></tr>"
        for name in EVENT_FIELDS
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Pycolytics Event API</title>
<style>body{{font:16px/1.5 system-ui,sans-serif;max-width:50em;margin:2em auto;padding:0 1em}}
code,pre{{background:#f4f4f4}}pre{{padding:1em;overflow:auto}}td{{padding:.2em .8em;vertical-align:top}}</style>
</head><body>
<h1>Pycolytics Event API {API_VERSION}</h1>
<p>Pycolytics {__version__}. The machine-readable description is <a href="/openapi.json">/openapi.json</a>.</p>
<h2>POST /v1.0/event</h2><p>One event, as a JSON object:</p>
<pre>{example}</pre>
<h2>POST /v1.0/events</h2>
<p>A JSON array of at most {config.max_batch_events} events. All or nothing: if any event is refused, none is stored.</p>
<h2>Fields</h2><table>{rows}
<tr><td><code>value</code></td><td>a JSON object, optional (default <code>{{}}</code>), at most {config.max_value_bytes}
bytes as JSON and {config.max_value_depth} levels deep</td></tr>
<tr><td><code>api_key</code></td><td>one of the server's keys (a game's own key is good for that game only)</td></tr>
<tr><td><code>timestamp</code></td><td>optional: when it happened, by the client's clock; ISO 8601
(<code>2024-05-01T12:00:00Z</code>, UTC unless it says) or Unix seconds</td></tr>
<tr><td><code>sent_at</code></td><td>optional: when the client sent the request, by the same clock; the server then
corrects the clock's error. The stored <code>time</code> is the best estimate of when the event happened, never in
the future; <code>received_at</code> keeps the receive time.</td></tr>
<tr><td><code>event_id</code></td><td>optional: a unique string of at most {MAX_EVENT_ID} characters made by the client;
an event whose id is already stored is acknowledged and not stored again, so retries are safe</td></tr></table>
<p>Other fields are ignored. The body may be at most {config.max_body_bytes} bytes, also after decompression
(<code>Content-Encoding: gzip</code> or <code>deflate</code>); any Content-Type is accepted, so browsers can post
<code>text/plain</code> without a preflight. Every answer carries CORS headers for allowed origins, and
<code>OPTIONS</code> answers preflights.</p>
<h2>Answers</h2><table>
<tr><td>204</td><td>Stored: the events are committed to the database.</td></tr>
<tr><td>400</td><td>The body is not JSON or not UTF-8.</td></tr>
<tr><td>401</td><td>A missing or unknown <code>api_key</code> (the answer names the events).</td></tr>
<tr><td>403</td><td>A key of another game, or a web page from an origin that may not send this game's events.</td></tr>
<tr><td>413</td><td>The body is over its size limit.</td></tr>
<tr><td>415</td><td>A Content-Encoding other than gzip, deflate or identity.</td></tr>
<tr><td>429</td><td>Over the rate limit: send again after <code>Retry-After</code> seconds.</td></tr>
<tr><td>422</td><td>Invalid events, or too many in a batch; <code>detail</code> lists every problem with its event and field.</td></tr>
<tr><td>503</td><td>Busy or shutting down: send again after <code>Retry-After</code> seconds.</td></tr>
</table>
<p>Every error has a JSON body <code>{{"detail": ...}}</code> saying what to fix.</p>
<h2>Operations</h2>
<p><code>GET /healthz</code>: 200 while the database takes writes, 503 when it does not.
<code>GET /metrics</code>: Prometheus counters. <code>GET /dashboard</code>: charts of the events, opened with a read
key (HTTP Basic password or <code>Authorization: Bearer</code>).</p>
<h2>Example</h2>
<pre>curl -i http://127.0.0.1:8000/v1.0/event -H 'Content-Type: application/json' -d '{json.dumps(json.loads(example))}'</pre>
</body></html>
"""


###############################################################################
# The built-in HTTP/1.1 server
###############################################################################

# Blank lines a client may send before a request line: RFC 9112 (section 2.2) asks servers
# to skip at least one; more than a few is a client that wants to hold a slot for nothing.
MAX_BLANK_LINES = 8

# How many times per turn of the loop each connection with pipelined requests starts its
# next one: connections take turns, so one that pipelines a thousand waits its turn.
PIPELINE_ROUNDS = 16

# How long the server stops accepting when it is out of file descriptors, for the ones in
# use to be closed; meanwhile the kernel's backlog holds newcomers.
ACCEPT_PAUSE_SECONDS = 1.0

# What the log may hold while stderr cannot take it (a full pipe, a slow terminal); lines
# beyond it are dropped and counted, so that logging never blocks or stops the server.
LOG_BUFFER_BYTES = 1 << 20

# Bytes that may not appear in a request head: control characters (tab aside), and a CR or
# LF anywhere but in the CRLF that ends a line. RFC 9112 (section 2.2) allows taking a bare LF
# as a line end, but proxies that read it otherwise are how requests get smuggled.
_FORBIDDEN_IN_HEAD = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]|\r(?!\n)|(?<!\r)\n")

# A method or a header name: RFC 9110's token (section 5.6.2).
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")

# What a log line may show of client text: control characters become \xNN, so that a
# request line cannot forge log lines or reach a terminal as escape sequences.
_PRINTABLE = {code: f"\\x{code:02x}" for code in (*range(32), *range(127, 160))}


def tls_context(config):
    """An SSLContext for HTTPS with config's certificate, or None for plain HTTP.

    ssl is imported only here: it loads OpenSSL, 3.5 MB that plain-HTTP servers (and those
    behind nginx, which does the TLS) never need. TLS 1.2 is the oldest version offered.
    """
    if not config.certfile:
        return None
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    try:
        context.load_cert_chain(config.certfile, config.keyfile)
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(f"cannot load certfile {config.certfile} with keyfile {config.keyfile}: {error}") from None
    return context


def notify_systemd(state):
    """Tell systemd our state (Type=notify): READY=1, RELOADING=1, STOPPING=1. A no-op elsewhere."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address[0] == "@":  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as error:
        log.warning("cannot notify systemd at %s: %s", address, error)


class LogSink:
    """A stream for log lines that never blocks and never raises: what a server writes its log to.

    stderr can stall (a pipe nobody reads) or break (`| tee` died); either would stop an event
    loop that wrote to it directly. Lines wait in a bounded buffer for a thread of their own;
    when the buffer is full they are dropped, and the next line that fits says how many.
    """

    def __init__(self, stream, limit=LOG_BUFFER_BYTES):
        self._stream = stream
        self._limit = limit
        self._lines = collections.deque()
        self._size = 0
        self._dropped = 0
        self._ready = threading.Condition(threading.Lock())
        self._thread = threading.Thread(target=self._run, name="pycolytics-log", daemon=True)
        self._thread.start()

    def write(self, text):
        with self._ready:
            if self._size + len(text) > self._limit:
                self._dropped += 1
                return
            if self._dropped:
                text = f"[{self._dropped} log lines dropped: the log could not keep up]\n{text}"
                self._dropped = 0
            if not self._lines:
                self._ready.notify()
            self._lines.append(text)
            self._size += len(text)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def flush(self):
        pass  # the thread flushes; a caller must not wait for stderr

    def drain(self, timeout=1.0):
        """Give the thread a moment to write what is buffered (at exit)."""
        deadline = time.monotonic() + timeout
        while self._lines and time.monotonic() < deadline:
            time.sleep(0.01)

    def _run(self):
        while True:
            with self._ready:
                while not self._lines:
                    self._ready.wait()
                text = "".join(self._lines)
                self._lines.clear()
                self._size = 0
            try:
                self._stream.write(text)
                self._stream.flush()
            except (OSError, ValueError):
                pass  # stderr is closed or broken: the server goes on without its log


def _printable(text):
    """Client text fit for one log line."""
    return text.translate(_PRINTABLE)


class _Request:
    __slots__ = ("method", "path", "query", "version", "headers", "length", "body", "keep_alive", "line")


class _Connection:
    """One client connection, owned by the server's event loop."""

    __slots__ = ("sock", "peer", "buffer", "scanned", "blank_lines", "deadline", "request", "body_start",
                 "reserved", "continued", "busy", "keep_alive", "outbox", "writing", "lingering", "handshaking",
                 "closed", "limited")

    def __init__(self, sock, peer, deadline, limited):
        self.sock = sock
        self.peer = peer
        self.buffer = bytearray()
        self.scanned = 0  # how much of the buffer is known to hold no end of head: heads are searched once
        self.blank_lines = 0
        self.deadline = deadline  # when the loop gives up on it; None while its request is answered
        self.request = None  # a request whose head has arrived and whose body has not, yet
        self.body_start = 0
        self.reserved = 0  # body bytes counted against max_buffered_bytes
        self.continued = False
        self.busy = False  # a whole request is being answered
        self.keep_alive = True
        self.outbox = b""
        self.writing = False
        self.lingering = False
        self.handshaking = False
        self.closed = False
        self.limited = limited  # counted against max_connections_per_address


def _split_target(target, method):
    """(path, query) of a request target: a path, an absolute URL (RFC 9112 3.2.2) or OPTIONS' *."""
    if target[0] != "/":
        if target == "*" and method == "OPTIONS":
            return "*", ""
        scheme, sep, rest = target.partition("://")
        if not sep or scheme.lower() not in ("http", "https"):
            raise BadRequest("the request target must be a path, an http(s) URL, or * for OPTIONS")
        ends = [found for found in (rest.find("/"), rest.find("?")) if found >= 0]
        target = rest[min(ends):] if ends else "/"
        if target[0] != "/":
            target = "/" + target
    path, _, query = target.partition("?")
    return path, query


def _parse_head(head, config):
    """A _Request from the bytes before the blank line; raises HTTPError on bad framing."""
    bad = _FORBIDDEN_IN_HEAD.search(head)
    if bad:
        raise BadRequest(f"the request head holds the byte {bad.group()[:1]!r} at offset {bad.start()}: "
                         "lines end with CRLF and hold no control characters")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not _TOKEN.match(parts[0]) or not parts[1]:
        raise BadRequest("malformed request line")
    request = _Request()
    request.method, target, request.version = parts
    request.line = lines[0]
    if request.version not in ("HTTP/1.1", "HTTP/1.0"):
        if request.version.startswith("HTTP/"):
            raise VersionNotSupported("only HTTP/1.0 and HTTP/1.1 are served")
        raise BadRequest("malformed request line")
    request.path, request.query = _split_target(target, request.method)
    if len(lines) - 1 > config.max_header_fields:
        raise HeaderFieldsTooLarge(f"at most {config.max_header_fields} header fields are accepted")
    request.headers = headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN.match(name):
            raise BadRequest(f"malformed header line {_printable(line[:40])!r}")
        if len(line) > config.max_header_field:
            raise HeaderFieldsTooLarge(f"the header {name} is over {config.max_header_field} bytes")
        name, value = name.lower(), value.strip(" \t")
        if name in headers:
            if name == "host":
                raise BadRequest("more than one Host header")
            if name == "content-length" and value != headers[name]:
                raise BadRequest("conflicting Content-Length headers")
            value = value if name == "content-length" else headers[name] + ", " + value
        headers[name] = value
    if request.version == "HTTP/1.1" and "host" not in headers:
        raise BadRequest("an HTTP/1.1 request needs a Host header")
    if "transfer-encoding" in headers:
        if "content-length" in headers:
            raise BadRequest("both Transfer-Encoding and Content-Length: send one")
        raise LengthRequired("send the body with a Content-Length; Transfer-Encoding is not accepted")
    length = headers.get("content-length", "0")
    if not (length.isdigit() and length.isascii()) or len(length) > 18:
        raise BadRequest("Content-Length must be a whole number of bytes")
    request.length = int(length)
    tokens = headers.get("connection", "").lower()
    if request.version == "HTTP/1.1":
        request.keep_alive = "close" not in tokens
    else:
        request.keep_alive = "keep-alive" in tokens
    return request


class _HTTPDate:
    """The Date header, formatted by wsgiref once a second rather than once a request."""

    def __init__(self):
        self._second = None
        self._text = ""

    def __call__(self):
        second = int(time.time())
        if second != self._second:
            self._text = format_date_time(second)
            self._second = second
        return self._text


class Server:
    """An HTTP/1.1 server for a WSGI application, from the standard library only.

    One thread, the event loop (the caller of serve_forever), owns every socket: it reads
    without blocking until a request is whole, so slow, idle and silent clients cost a
    buffer each and never a thread, and it writes every answer. Every other thread hands its
    answers to the loop. A request runs the WSGI application in a bounded pool of worker
    threads, unless the application takes it in the loop through its hook:

    The loop hook. An application may offer `answer_in_loop(environ, respond)`. The loop calls
    it with each whole request's WSGI environ; the application either returns False (the
    request then runs as plain WSGI in a worker thread) or takes the request and calls
    `respond(status, headers, body)` exactly once, now or later and from any thread, never
    blocking the loop meanwhile. Pycolytics answers most requests this way, and posted events
    once its writer has committed them; with a middleware in between (no hook), every request
    takes a worker thread, which is correct and slower. An application may also offer
    `server_answered(status)`, to hear of the answers the server gives by itself (bad framing,
    timeouts, overload), so that its metrics count every answer.

    Everything a client can make it hold is bounded: connections (in all, and per address),
    buffered bodies, head sizes, the time a request may take to arrive, and the work one
    turn of the loop does for one connection. Nothing a client sends is handled by recursion,
    and no error while serving one connection leaves the loop: that connection is closed.
    """

    def __init__(self, app, config, host=None, port=None, reload=None):
        self.app = app
        self.config = config
        self.reload = reload  # called in the loop after a request_reload(), e.g. on SIGHUP
        self._answer_in_loop = getattr(app, "answer_in_loop", None)
        self._server_answered = getattr(app, "server_answered", None)
        self._reload_requested = False
        self._tls = tls_context(config)
        self._tls_pending = self._tls_errors()
        host = config.host if host is None else host
        port = config.port if port is None else port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.create_server((host, port), family=family, backlog=1024)
        self.listener.setblocking(False)
        self.server_address = self.listener.getsockname()[:2]
        self.problem = None  # what keeps the server from serving as it should now; /healthz tells
        self.log = sys.stderr
        self._selector = selectors.DefaultSelector()
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)
        self._loop_thread = None
        self._jobs = queue.SimpleQueue()
        self._finished = collections.deque()  # answers to send: (connection, request, status, headers, body)
        self._ready = collections.deque()  # connections whose buffer may hold their next request
        self._idle = collections.OrderedDict()  # connections waiting for a request or lingering, oldest first
        self._connections = {}
        self._per_address = collections.Counter()
        self._reserved = 0  # body bytes announced by requests being read or answered
        self._busy = 0
        self._listening = False
        self._accept_again = 0.0  # when to accept again after running out of file descriptors
        self._stopping = False
        self._date = _HTTPDate()
        self._workers = []
        self._failures_logged = set()
        self._log_requests = not config.quiet

    @property
    def url(self):
        host, port = self.server_address
        return f"{'https' if self._tls else 'http'}://{'[' + host + ']' if ':' in host else host}:{port}"

    def _tls_errors(self):
        """The TLS errors that mean "not yet" on a non-blocking socket (none without TLS)."""
        if self._tls is None:
            return ()
        import ssl

        return (ssl.SSLWantReadError, ssl.SSLWantWriteError)

    def reconfigure(self, config, tls):
        """New settings for what comes next: limits, timeouts, logging, the certificate."""
        self.config = config
        self._log_requests = not config.quiet
        if (tls is None) == (self._tls is None):  # switching HTTPS on or off needs a restart
            self._tls = tls

    def request_reload(self, *_signal_args):
        """Ask the loop to call `reload` soon. Any thread, or a signal handler."""
        self._reload_requested = True
        self._wake()

    def shutdown(self, *_signal_args):
        """Stop accepting; serve_forever answers what it has read, then returns. Any thread."""
        self._stopping = True
        self._wake()

    def _wake(self):
        try:
            self._wake_writer.send(b"\0")
        except OSError:
            pass  # a wake-up is already pending, or the server is closed

    # -- the event loop ----------------------------------------------------------------------

    def serve_forever(self):
        self._loop_thread = threading.get_ident()
        self._workers = [threading.Thread(target=self._work, name=f"pycolytics-{n}", daemon=True)
                         for n in range(self.config.threads)]
        for worker in self._workers:
            worker.start()
        self._selector.register(self._wake_reader, selectors.EVENT_READ, (self._take_wake_ups, None))
        self._listen(True)
        next_sweep = time.monotonic() + 1
        drain_by = None
        try:
            while True:
                timeout = 0 if self._ready or self._finished else 1.0
                for key, _ in self._selector.select(timeout):
                    callback, connection = key.data
                    self._guarded(callback, connection)
                self._serve_ready()
                if self._reload_requested and self.reload is not None:
                    self._reload_requested = False
                    self._guarded(self.reload)
                now = time.monotonic()
                if self._stopping:
                    if drain_by is None:
                        drain_by = now + self.config.request_timeout + self.config.busy_timeout
                        self._stop_reading()
                    if not self._busy or now > drain_by:
                        return
                if now >= next_sweep:
                    self._guarded(self._sweep, None, now)
                    next_sweep = now + 1
        finally:
            self._close_everything()

    def _guarded(self, function, connection=None, *arguments):
        """Call function(connection, *arguments); an error closes that connection, never the loop."""
        try:
            if connection is None:
                function(*arguments)
            else:
                function(connection, *arguments)
        except Exception as error:  # a bug, or an OS error nobody foresaw: one connection pays, not all
            where = (type(error), getattr(error.__traceback__, "tb_lineno", 0))
            first = where not in self._failures_logged and len(self._failures_logged) < 100
            self._failures_logged.add(where)
            log.error("unexpected %r while serving %s; closing the connection", error,
                      connection.peer if connection is not None else "the server", exc_info=first)
            if connection is not None:
                try:
                    self._close(connection)
                except Exception:  # its socket is beyond saving; forget it
                    self._connections.pop(connection.sock, None)

    def _serve_ready(self):
        """Send finished answers and start pipelined requests: each connection a few per turn."""
        for _ in range(PIPELINE_ROUNDS):
            while self._finished:
                self._guarded(self._answer, *self._finished.popleft())
            if not self._ready:
                return
            for _ in range(len(self._ready)):
                self._guarded(self._advance, self._ready.popleft())

    def _take_wake_ups(self):
        try:
            while self._wake_reader.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _listen(self, on):
        on = on and not self._stopping and time.monotonic() >= self._accept_again
        if on and not self._listening:
            self._selector.register(self.listener, selectors.EVENT_READ, (self._accept, None))
        elif not on and self._listening:
            self._selector.unregister(self.listener)
        self._listening = on

    def _accept(self):
        for _ in range(64):  # a few per turn: a flood of newcomers must not starve the rest
            if len(self._connections) >= self.config.max_connections and not self._make_room():
                self._listen(False)  # full: the kernel's backlog holds newcomers until a connection closes
                return
            try:
                sock, peer = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                if error.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._pause_accepting(error)
                    return
                continue  # a connection reset while it waited in the backlog
            self._welcome(sock, peer[0])

    def _welcome(self, sock, address):
        """Take a new connection into the loop, or turn it away if its address holds too many."""
        limited = address not in self.config.trusted_proxies  # a proxy speaks for many clients
        if limited and self._per_address[address] >= self.config.max_connections_per_address:
            self._turn_away(sock)
            return
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls is not None:
                sock = self._tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        except OSError:  # reset already (some Pythons read from the socket in wrap_socket)
            sock.close()
            return
        connection = _Connection(sock, address, time.monotonic() + self.config.request_timeout, limited)
        connection.handshaking = self._tls is not None
        if limited:
            self._per_address[address] += 1
        self._connections[sock] = connection
        self._idle[sock] = connection
        self._selector.register(sock, selectors.EVENT_READ, (self._read, connection))

    def _turn_away(self, sock):
        """Close a connection at once, with a 503 if it speaks plain HTTP: nothing of it is kept."""
        self._answered("503")
        try:
            if self._tls is None:
                sock.send(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 5\r\nContent-Length: 0\r\n"
                          b"Connection: close\r\n\r\n")
        except OSError:
            pass  # it left already
        sock.close()

    def _answered(self, status):
        if self._server_answered is not None:
            self._server_answered(status)

    def _make_room(self):
        """Close the connection that has waited longest for a request (or lingered), if any."""
        if not self._idle:
            return False
        _, connection = self._idle.popitem(last=False)
        self._close(connection)
        return True

    def _pause_accepting(self, error):
        if self.problem is None:
            log.warning("cannot accept connections: %s; trying again in %s s", error.strerror, ACCEPT_PAUSE_SECONDS)
        self.problem = f"out of file descriptors ({error.strerror}): new connections wait"
        self._accept_again = time.monotonic() + ACCEPT_PAUSE_SECONDS
        self._listen(False)
        self._make_room()  # one idle connection's descriptor lets the next request in

    def _read(self, connection):
        sock = connection.sock
        try:
            if connection.handshaking:
                sock.do_handshake()
                connection.handshaking = False
            data = sock.recv(RECV_BYTES)
            while self._tls and data and sock.pending():  # decrypted bytes that select() cannot see
                data += sock.recv(RECV_BYTES)
        except self._tls_pending:  # half a TLS record, or a handshake that needs more
            return
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # also a failed handshake or a broken TLS record (ssl.SSLError)
            data = b""
        if not data:
            self._close(connection)
        elif not connection.lingering:
            if self._idle.pop(sock, None) is not None:  # a request begins: it has request_timeout to arrive
                connection.deadline = time.monotonic() + self.config.request_timeout
            connection.buffer += data
            self._advance(connection)

    def _advance(self, connection):
        """Start answering the connection's next request if it is whole; refuse bad framing at once."""
        if connection.closed or connection.busy:
            return
        try:
            request = self._whole_request(connection)
        except HTTPError as error:
            self._refuse(connection, error)
            return
        if request is None:
            return
        self._selector.unregister(connection.sock)  # nothing more is read until this is answered
        connection.busy = True
        connection.deadline = None
        self._busy += 1
        if request.path == "*":  # OPTIONS *: a question about the server, which answers it
            self._answered("200")
            self._respond(connection, request, "200 OK", [("Allow", "GET, HEAD, POST, OPTIONS")], b"")
            return
        environ = self._environ(connection, request)
        respond = functools.partial(self._respond, connection, request)
        if self._answer_in_loop is None or not self._answer_in_loop(environ, respond):
            self._jobs.put((connection, request, environ))

    def _whole_request(self, connection):
        """The connection's next request if all of it has arrived, else None; raises HTTPError."""
        buffer, config = connection.buffer, self.config
        if connection.request is None:
            while buffer[:2] == b"\r\n":
                del buffer[:2]
                connection.blank_lines += 1
                if connection.blank_lines > MAX_BLANK_LINES:
                    raise BadRequest("too many blank lines before the request line")
            end = buffer.find(b"\r\n\r\n", max(connection.scanned - 3, 0))
            line_end = buffer.find(b"\r\n", 0, config.max_request_line + 2)
            if line_end < 0 and len(buffer) > config.max_request_line:
                raise URITooLong(f"the request line is over {config.max_request_line} bytes")
            if end < 0:
                connection.scanned = len(buffer)
                if len(buffer) > config.max_head_bytes:
                    raise HeaderFieldsTooLarge(f"the request head is over {config.max_head_bytes} bytes")
                return None
            if end > config.max_head_bytes:
                raise HeaderFieldsTooLarge(f"the request head is over {config.max_head_bytes} bytes")
            request = _parse_head(bytes(buffer[:end]), config)
            self._reserve(connection, request.length)
            connection.request = request
            connection.body_start = end + 4
        request = connection.request
        end = connection.body_start + request.length
        if len(buffer) < end:
            if not connection.continued and request.version == "HTTP/1.1" and \
                    request.headers.get("expect", "").lower() == "100-continue":
                connection.continued = True
                self._send_now(connection, b"HTTP/1.1 100 Continue\r\n\r\n")
            return None
        request.body = bytes(buffer[connection.body_start:end])
        del buffer[:end]
        connection.request = None
        connection.continued = False
        connection.scanned = connection.blank_lines = 0
        return request

    def _reserve(self, connection, length):
        """Count a body against the limits before it is read: one body, and all bodies together.

        A body that one recv() takes whole is not refused for the total: it costs no more than a
        head, which max_connections already bounds, and so clients with small batches are still
        served while large bodies fill the budget.
        """
        if length > self.config.max_body_bytes:
            raise PayloadTooLarge(f"the request body is {length} bytes; at most {self.config.max_body_bytes} "
                                  "are accepted")
        if length > RECV_BYTES and self._reserved + length > self.config.max_buffered_bytes:
            raise ServiceUnavailable("the server is receiving too many request bodies at once; "
                                     "send this again shortly")
        self._reserved += length
        connection.reserved = length

    def _release(self, connection):
        self._reserved -= connection.reserved
        connection.reserved = 0

    def _respond(self, connection, request, status, headers, body):
        """The answer to a request, from any thread: the loop sends it."""
        self._finished.append((connection, request, status, headers, body))
        if threading.get_ident() != self._loop_thread:
            self._wake()

    def _answer(self, connection, request, status, headers, body):
        if connection.closed or not connection.busy:
            return  # closed while it was answered (the client left, or the drain gave up on it)
        connection.keep_alive = keep_alive = request.keep_alive and not self._stopping
        head = [f"HTTP/1.1 {status}", f"Date: {self._date()}", f"Server: pycolytics/{__version__}"]
        head += [f"{name}: {value}" for name, value in headers]
        if status[0] != "1" and status[:3] not in ("204", "304") and not any(
            name.lower() == "content-length" for name, _ in headers
        ):
            head.append(f"Content-Length: {len(body)}")
        head.append("Connection: keep-alive" if keep_alive else "Connection: close")
        if self._log_requests:
            self._log(connection, request, status, len(body))
        if request.method == "HEAD":
            body = b""
        connection.outbox = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
        self._flush(connection)

    def _flush(self, connection):
        """Send what the connection's answer still has to send; then wait for its next request."""
        try:
            sent = connection.sock.send(connection.outbox)
        except (BlockingIOError, InterruptedError) + self._tls_pending:
            sent = 0
        except OSError:
            self._close(connection)
            return
        connection.outbox = connection.outbox[sent:]
        if connection.outbox:
            if not connection.writing:  # the client reads slowly: wait until it can take more
                connection.writing = True
                connection.deadline = time.monotonic() + self.config.request_timeout
                self._selector.register(connection.sock, selectors.EVENT_WRITE, (self._flush, connection))
            return
        if connection.writing:
            connection.writing = False
            self._selector.unregister(connection.sock)
        connection.busy = False
        self._busy -= 1
        self._release(connection)
        if not connection.keep_alive:
            self._close(connection)
            return
        self._selector.register(connection.sock, selectors.EVENT_READ, (self._read, connection))
        if connection.buffer:  # a pipelined request arrived with this one: its turn comes in the loop
            connection.deadline = time.monotonic() + self.config.request_timeout
            self._ready.append(connection)
        else:
            connection.deadline = time.monotonic() + self.config.idle_timeout
            self._idle[connection.sock] = connection

    def _send_now(self, connection, data):
        try:
            connection.sock.send(data)
        except OSError:
            pass  # the client is gone or not reading; the loop notices soon enough

    def _refuse(self, connection, error):
        """Answer a request that will not be read, then close without resetting the answer away.

        Closing a socket with unread input makes the kernel send a reset, which can destroy the
        answer before the client reads it; so shut down our side and discard what still comes
        for a moment (a "lingering close", as Apache and nginx do).
        """
        status, headers, body = _error_parts(error)
        self._answered(status)
        head = [f"HTTP/1.1 {status}", f"Date: {self._date()}"] + [f"{name}: {value}" for name, value in headers]
        try:
            connection.sock.send(("\r\n".join(head + ["Connection: close"]) + "\r\n\r\n").encode("latin-1") + body)
            connection.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(connection)
            return
        self._release(connection)
        connection.lingering = True
        connection.buffer = bytearray()
        connection.request = None
        connection.deadline = time.monotonic() + LINGER_SECONDS
        self._idle[connection.sock] = connection  # the first to go when slots run out

    def _sweep(self, now):
        """Close connections that idled, dawdled or lingered past their deadline; accept again."""
        for connection in list(self._connections.values()):
            if connection.deadline is not None and connection.deadline < now:
                if connection.lingering or connection.writing:
                    self._close(connection)
                elif connection.buffer or connection.request is not None:
                    self._refuse(connection, RequestTimeout("the request took too long to arrive"))
                else:
                    self._close(connection)
        if not self._listening and len(self._connections) < self.config.max_connections:
            self._listen(True)
        if self.problem is not None and now > self._accept_again + 5 * ACCEPT_PAUSE_SECONDS:
            log.info("accepting connections again")
            self.problem = None

    def _close(self, connection):
        if self._connections.pop(connection.sock, None) is None:
            return
        connection.closed = True
        self._idle.pop(connection.sock, None)
        if connection.busy:
            connection.busy = False
            self._busy -= 1
        self._release(connection)
        if connection.limited:
            self._per_address[connection.peer] -= 1
            if not self._per_address[connection.peer]:
                del self._per_address[connection.peer]
        try:
            self._selector.unregister(connection.sock)
        except (KeyError, ValueError):
            pass  # it was not registered: its request was being answered
        connection.sock.close()
        self._listen(True)

    def _stop_reading(self):
        """The start of a stop: no new connections, and none that has not sent a whole request."""
        self._listen(False)
        for connection in list(self._connections.values()):
            if not connection.busy:
                self._close(connection)

    def _close_everything(self):
        for _ in self._workers:
            self._jobs.put(None)
        for worker in self._workers:
            worker.join(self.config.request_timeout)
        for connection in list(self._connections.values()):
            self._close(connection)
        self.listener.close()
        self._selector.close()
        self._wake_reader.close()
        self._wake_writer.close()

    # -- the worker threads, for requests the application does not take in the loop -------

    def _work(self):
        while True:
            job = self._jobs.get()
            if job is None:
                return
            connection, request, environ = job
            try:
                answer = self._call_application(environ, request.method)
            except Exception:
                log.exception("error while answering %s", _printable(request.line))
                answer = _INTERNAL_ERROR
            self._respond(connection, request, *answer)

    def _call_application(self, environ, method):
        """Run the WSGI application (PEP 3333) for one request: (status, headers, body)."""
        answer = []
        written = []

        def start_response(status, headers, exc_info=None):
            if exc_info is not None:
                exc_info = None  # nothing is sent before the application returns: the new answer wins
            elif answer:
                raise AssertionError("start_response called a second time without exc_info")
            answer[:] = [status, headers]
            return written.append

        chunks = self.app(environ, start_response)
        try:
            for chunk in chunks:
                written.append(chunk)
        finally:
            if hasattr(chunks, "close"):
                chunks.close()
        status, headers = answer
        headers = [(name, value) for name, value in headers if not is_hop_by_hop(name)]
        body = b"".join(written)
        if method != "HEAD" or not any(name.lower() == "content-length" for name, _ in headers):
            headers = [(name, value) for name, value in headers if name.lower() != "content-length"]
            headers.append(("Content-Length", str(len(body))))
        return status, headers, body

    def _environ(self, connection, request):
        path = request.path
        if "%" in path:
            from urllib.parse import unquote_to_bytes  # here: it costs memory that plain paths never need

            path = unquote_to_bytes(path).decode("latin-1")
        host, port = self.server_address
        environ = {
            "REQUEST_METHOD": request.method,
            "SCRIPT_NAME": "",
            "PATH_INFO": path,
            "QUERY_STRING": request.query,
            "SERVER_NAME": host,
            "SERVER_PORT": str(port),
            "SERVER_PROTOCOL": request.version,
            "REMOTE_ADDR": connection.peer,
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "https" if self._tls else "http",
            "wsgi.input": io.BytesIO(request.body),
            "wsgi.errors": self.log,
            "wsgi.multithread": True,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
            "pycolytics.server_problem": self.problem,
        }
        for name, value in request.headers.items():
            if name == "content-length":
                environ["CONTENT_LENGTH"] = value
            elif name == "content-type":
                environ["CONTENT_TYPE"] = value
            elif "_" not in name:  # underscores would be confused with dashes (a spoofing trick)
                environ["HTTP_" + name.upper().replace("-", "_")] = value
        return environ

    def _log(self, connection, request, status, length):
        client = client_address(connection.peer, request.headers.get("x-forwarded-for"), self.config.trusted_proxies)
        when = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime())
        try:
            self.log.write(f'{_printable(client)} - - [{when}] "{_printable(request.line)}" {status[:3]} {length}\n')
        except (OSError, ValueError):
            pass  # stderr is broken; serve() logs through a LogSink, which never raises


###############################################################################
# The command line
###############################################################################


def serve(config, load=None):
    """Run the built-in server until SIGTERM or SIGINT; return the exit status.

    `load` makes a fresh Config; SIGHUP calls it and puts the result in force, or keeps the
    configuration in force if the new one is bad.
    """
    try:
        app = Pycolytics(config)
        app.open()
    except ConfigError:
        raise
    except Exception as error:  # the database's own errors, whichever it is
        log.error("cannot open the database %s: %s", _redacted(config.database), error)
        return 1
    try:
        server = Server(app, config, reload=lambda: _reload(app, server, load))
    except (OSError, ConfigError) as error:
        log.error("cannot serve on %s:%s: %s", config.host, config.port, error)
        app.close()
        return 1
    server.log = sink = _log_to_sink()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, server.shutdown)
    if load is not None and hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, server.request_reload)
    _warn_about_keys(config)
    log.info("Pycolytics %s listening on %s (database: %s)", __version__, server.url, _redacted(config.database))
    notify_systemd("READY=1")
    try:
        server.serve_forever()
    finally:
        notify_systemd("STOPPING=1")
        app.close()
    log.info("stopped; every acknowledged event is committed")
    sink.drain()
    return 0


def _log_to_sink():
    """Route the log's stderr handlers through a LogSink, so that no log line can block or stop serving."""
    sink = LogSink(sys.stderr)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stderr:
            handler.setStream(sink)
    return sink


def _redacted(database):
    """A database to show in logs: a file's absolute path, a URL without its password."""
    if "://" not in database:
        return os.path.abspath(database)
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", database)


def _warn_about_keys(config):
    if config.dev_key_active:
        log.warning("no api_keys are configured: accepting the public development key %r. "
                    "Set api_keys before you ship a game.", DEV_KEY)


def _reload(app, server, load):
    """Read the configuration again and put it in force; a bad one changes nothing."""
    notify_systemd(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
    try:
        config = load()
        tls = tls_context(config)
    except ConfigError as error:
        log.error("reload failed; the configuration in force stays: %s", error)
    else:
        for name in RESTART_SETTINGS:
            if getattr(config, name) != getattr(app.config, name):
                log.warning("%s changed; that takes a restart, the server keeps %r", name, getattr(app.config, name))
        app.reconfigure(config)
        server.reconfigure(config, tls)
        if config.retention_days:
            app.writer.prune_soon()
        _warn_about_keys(config)
        log.info("configuration reloaded")
    notify_systemd("READY=1")


def keygen(arguments, config):
    """Print a new random API key: 32 bytes from the operating system's random source."""
    import secrets  # here: it loads hashlib and OpenSSL, which serving never needs

    print(secrets.token_urlsafe(32))
    return 0


EXPORT_COLUMNS = ("id", "time", "received_at", "event_type", "application", "version", "platform",
                  "user_id", "session_id", "value", "event_id")


def _moment(text, option):
    """A stored-time text from a command line time (ISO 8601 or Unix seconds)."""
    moment = _client_time(float(text) if re.fullmatch(r"-?\d+(\.\d*)?", text) else text)
    if moment is None:
        raise ConfigError(f"{option} {text!r} is not a time: give ISO 8601 (2024-05-01, 2024-05-01T12:00Z) or Unix seconds")
    return moment.strftime(TIME_FORMAT)


def export(arguments, config):
    """Write events as CSV or JSON lines, row by row: constant memory on any size of database."""
    import csv

    store = store_for(config)
    conditions, parameters = [], []
    if arguments.application is not None:
        conditions.append(f"application = {store.parameter}")
        parameters.append(arguments.application)
    # "+time" (SQLite): read in id order without the time index, so nothing is sorted in memory
    for option, operator_ in (("since", ">="), ("until", "<")):
        if getattr(arguments, option):
            conditions.append(f"{'+' if store.parameter == '?' else ''}time {operator_} {store.since}")
            parameters.append(_moment(getattr(arguments, option), f"--{option}"))
    connection = store.read()
    present = store.columns(connection)
    texts = {"time": store.time_text, "received_at": store.received_text, "value": store.value_text}
    selected = ", ".join(texts.get(name, name) if name in present else f"NULL AS {name}" for name in EXPORT_COLUMNS)
    where = " WHERE " + " AND ".join(conditions) if conditions else ""
    if isinstance(store, PostgresStore):
        # a named (server-side) cursor streams from PostgreSQL, inside a transaction of its own;
        # SQLite's cursors stream anyway
        connection.execute("BEGIN READ ONLY")
        cursor = connection.cursor("export")
    else:
        cursor = connection.cursor()
    rows = cursor.execute(f"SELECT {selected} FROM event{where} ORDER BY id", parameters)
    output = open(arguments.output, "w", encoding="utf-8", newline="") if arguments.output else sys.stdout
    count = 0
    try:
        if arguments.format == "csv":
            writer = csv.writer(output)
            writer.writerow(EXPORT_COLUMNS)
            for row in rows:
                writer.writerow(row)
                count += 1
        else:
            value = EXPORT_COLUMNS.index("value")
            for row in rows:
                record = dict(zip(EXPORT_COLUMNS, row))
                record["value"] = json.loads(row[value])
                output.write(json.dumps(record, ensure_ascii=False) + "\n")
                count += 1
    finally:
        if output is not sys.stdout:
            output.close()
        connection.close()
    log.info("exported %d events", count)
    return 0


def prune(arguments, config):
    """Delete events older than --before, in small steps that never hold up a running server."""
    before = _moment(arguments.before, "--before")
    store = store_for(config)
    connection = store.connect()
    deleted = 0
    try:
        while True:
            step = store.prune(connection, before)
            deleted += step
            if step < PRUNE_STEP_ROWS:
                break
            time.sleep(0.01)  # let the server's writer in between steps
    finally:
        connection.close()
    log.info("deleted %d events from before %s", deleted, before)
    return 0


def backup(arguments, config):
    """A consistent copy of the database, taken with SQLite's online backup while the server runs."""
    if isinstance(store_for(config), PostgresStore):
        raise ConfigError("backup copies an SQLite database; for PostgreSQL use its own tools (pg_dump)")
    target = arguments.file
    partial = target + ".partial"
    source = read_only(config.database)
    try:
        copy = sqlite3.connect(partial)
        try:
            # a few MB a step, so a running server's writer is never locked out for long
            source.backup(copy, pages=1024, sleep=0.005)
        finally:
            copy.close()
    finally:
        source.close()
    os.replace(partial, target)
    log.info("backed up %s to %s", config.database, target)
    return 0


# Events one step of `copy` moves, in one PostgreSQL transaction with its progress mark.
COPY_STEP_ROWS = 5000
# `copy` knows a source database by an id kept inside it (made by its first copy, in a table
# of its own), not by its path: a moved database resumes, another one at the same path is new.
COPY_IDENTITY = "CREATE TABLE IF NOT EXISTS pycolytics_identity (id VARCHAR NOT NULL)"
# In the target, how far each source has been copied (its highest copied row id).
COPY_PROGRESS = "CREATE TABLE IF NOT EXISTS pycolytics_copied (source VARCHAR PRIMARY KEY, last_id BIGINT NOT NULL)"


def _identity(path, busy_timeout):
    """The id of the SQLite database at `path`, made and stored in it if it has none yet."""
    reader = read_only(path)
    try:
        if reader.execute("SELECT 1 FROM sqlite_master WHERE name = 'pycolytics_identity'").fetchone():
            found = reader.execute("SELECT id FROM pycolytics_identity").fetchone()
            if found:
                return found[0]
    finally:
        reader.close()
    uri = "file:" + urllib_quote(os.path.abspath(path)) + "?mode=rw"
    writer = sqlite3.connect(uri, uri=True, timeout=busy_timeout, isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")  # two copies starting together make one id
        try:
            writer.execute(COPY_IDENTITY)
            found = writer.execute("SELECT id FROM pycolytics_identity").fetchone()
            if not found:
                found = (os.urandom(16).hex(),)
                writer.execute("INSERT INTO pycolytics_identity (id) VALUES (?)", found)
            writer.execute("COMMIT")
        except BaseException:
            writer.execute("ROLLBACK")
            raise
    finally:
        writer.close()
    return found[0]


def copy_events(arguments, config):
    """Move an SQLite database's events into PostgreSQL. Run again, it resumes where it stopped
    and copies each event once, wherever the database lies now: progress is committed with
    every step, in the target, under the id the source keeps."""
    if not isinstance(store_for(config), SQLiteStore):
        raise ConfigError("copy reads an SQLite database: name it with --database FILE")
    target_config = copy_module.copy(config)
    target_config.database = arguments.to
    target = store_for(target_config)
    if not isinstance(target, PostgresStore):
        raise ConfigError(f"--to {arguments.to!r} is not a postgresql:// URL")
    origin = _identity(config.database, config.busy_timeout)
    source = read_only(config.database)
    destination = target.connect()
    copied = seen = 0
    try:
        with destination.transaction():
            destination.execute(COPY_PROGRESS)
        mark = destination.execute("SELECT last_id FROM pycolytics_copied WHERE source = %s", (origin,)).fetchone()
        last = mark[0] if mark else 0
        present = _columns(source)
        optional = ", ".join(name if name in present else f"NULL AS {name}" for name, _ in ADDED_COLUMNS)
        while True:
            rows = source.execute(
                "SELECT id, event_type, application, version, platform, user_id, session_id, value, time,"
                f" {optional} FROM event WHERE id > ? ORDER BY id LIMIT ?", (last, COPY_STEP_ROWS)
            ).fetchall()
            if not rows:
                break
            last = rows[-1][0]
            with destination.transaction():
                with destination.cursor() as cursor:
                    cursor.executemany(POSTGRES_INSERT, [row[1:] for row in rows])
                    copied += max(0, cursor.rowcount)
                destination.execute(
                    "INSERT INTO pycolytics_copied (source, last_id) VALUES (%s, %s)"
                    " ON CONFLICT (source) DO UPDATE SET last_id = excluded.last_id", (origin, last))
            seen += len(rows)
    finally:
        source.close()
        destination.close()
    log.info("copied %d events of database %s into %s (%d more were there already)",
             copied, origin, _redacted(arguments.to), seen - copied)
    return 0


def _parser():
    parser = argparse.ArgumentParser(
        prog="pycolytics.py",
        description="Collect analytics events over HTTP into an SQLite database. With no command, serve.",
        epilog=(
            "Settings come from, strongest first: these options, PYCOLYTICS_<KEY> environment variables "
            "(and the original Pycolytics' SQLITE_FILE_PATH, API_KEYS and RATE_LIMIT), the ini file, the defaults. "
            "The ini file is --config, else $PYCOLYTICS_CONFIG, else ./pycolytics.ini if present; "
            "pycolytics.ini in the repository documents every key."
        ),
    )
    parser.add_argument("--config", metavar="FILE", help="the ini file to read (sections [pycolytics], [app:NAME])")
    parser.add_argument("--host", help="the address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    parser.add_argument("--port", help="the port to listen on (default 8000)")
    parser.add_argument("--database", metavar="FILE", help="the SQLite database file (default pycolytics.db)")
    parser.add_argument("--quiet", action="store_const", const="yes", help="do not log each request")
    parser.add_argument("--version", action="version", version=f"pycolytics {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("keygen", help="print a new random API key")
    exporting = commands.add_parser("export", help="write events as CSV or JSON lines (pandas reads both)")
    exporting.add_argument("--format", choices=("csv", "jsonl"), default="csv", help="csv (default) or jsonl")
    exporting.add_argument("--application", metavar="NAME", help="only this application's events")
    exporting.add_argument("--since", metavar="T", help="only events at or after T (ISO 8601 or Unix seconds, UTC)")
    exporting.add_argument("--until", metavar="T", help="only events before T")
    exporting.add_argument("--output", metavar="FILE", help="write to FILE instead of standard output")
    pruning = commands.add_parser("prune", help="delete events older than a time, in small steps")
    pruning.add_argument("--before", metavar="T", required=True, help="delete events before T (ISO 8601 or Unix seconds)")
    backing_up = commands.add_parser("backup", help="copy the database consistently, while the server runs")
    backing_up.add_argument("file", metavar="FILE", help="where to write the copy")
    copying = commands.add_parser("copy", help="move an SQLite database's events into PostgreSQL (resumable)")
    copying.add_argument("--to", metavar="URL", required=True, help="postgresql://USER@HOST:PORT/DBNAME")
    return parser


COMMANDS = {"keygen": keygen, "export": export, "prune": prune, "backup": backup, "copy": copy_events}


def main(argv=None):
    arguments = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    overrides = {"host": arguments.host, "port": arguments.port, "database": arguments.database, "quiet": arguments.quiet}
    load = functools.partial(load_config, arguments.config, overrides=overrides)
    try:
        config = load()
        if arguments.command is None:
            return serve(config, load)
        return COMMANDS[arguments.command](arguments, config)
    except ConfigError as error:
        log.error("bad configuration: %s", error)
        return 2
    except Exception as error:  # OSError, or the database's own errors
        log.error("%s failed: %s", arguments.command or "serving", error)
        return 1


if __name__ == "__main__":
    sys.exit(main())
