"""The node's log: one line per record, no control characters from the wire, no patient data from
libraries, no flood of repeated library warnings.

Set up once by :func:`configure` (the CLI calls it for ``serve``, ``analyze`` and the receiver
processes); runtime code only ever uses ``logging.getLogger(__name__)``.

- :class:`EscapingFormatter`: every control character of a record's line (an AE title with
  CR/LF/ESC, a peer's exception text) is written as an escape (``\\r``, ``\\x1b``, ``\\u2028``),
  so a value from a peer can neither start a forged line nor drive the terminal.  A traceback
  keeps its own line breaks; its exception messages are escaped like the message.
- :class:`WithholdPatientData`: records of the libraries that read patient headers (highdicom,
  pydicom, and Python warnings raised in them, which :func:`configure` routes into logging) may
  quote a header value -- highdicom warns with the Patient's Name in clear -- so their text is
  replaced by where it came from.
- :class:`RepeatLimit`: a library logs per item it decodes (pynetdicom warns for each
  non-conformant UID of an A-ASSOCIATE-RQ: 2,000 proposed contexts were 20,000 lines); each call
  site gets :data:`RepeatLimit.per_thread` records per thread and :data:`RepeatLimit.per_site`
  in all per window, then one line saying the rest is suppressed, and the count when it resumes.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
import traceback
from typing import Any, TextIO

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: Characters that must not reach a log line raw: C0 controls (CR, LF, ESC, TAB...), DEL, C1
#: controls (NEL), the Unicode line and paragraph separators, and the bidirectional overrides
#: ("Trojan Source") that make a line read other than it is.
_ESCAPED = [*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0), 0x2028, 0x2029, *range(0x202A, 0x202F),
            *range(0x2066, 0x206A)]
_NAMED = {0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r"}
_TABLE = {c: _NAMED.get(c, f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}") for c in _ESCAPED}


def escape_controls(text: str) -> str:
    """``text`` with every control character written as a visible escape (see :data:`_ESCAPED`)."""
    return text.translate(_TABLE)


def _exception_lines(te: traceback.TracebackException) -> list[str]:
    """A traceback as :func:`traceback.format_exception` writes it (chained exceptions first), but
    each exception's own message (and notes) escaped: its text may come from a peer."""
    lines: list[str] = []
    if te.__cause__ is not None:
        lines += _exception_lines(te.__cause__)
        lines.append("\nThe above exception was the direct cause of the following exception:\n\n")
    elif te.__context__ is not None and not te.__suppress_context__:
        lines += _exception_lines(te.__context__)
        lines.append("\nDuring handling of the above exception, another exception occurred:\n\n")
    if te.stack:
        lines.append("Traceback (most recent call last):\n")
        lines += te.stack.format()  # file names and source lines: ours, not a peer's
    for part in te.format_exception_only():
        body = part[:-1] if part.endswith("\n") else part
        lines.append(escape_controls(body) + "\n")
    for sub in getattr(te, "exceptions", None) or ():  # an exception group's members
        lines += ["  " + line for line in "".join(_exception_lines(sub)).splitlines(keepends=True)]
    return lines


class EscapingFormatter(logging.Formatter):
    """A formatter whose line cannot be split or forged by a value inside the message."""

    def format(self, record: logging.LogRecord) -> str:
        # Another handler's formatter may have cached its (unescaped) traceback text in the
        # record: ours is worked out from exc_info, and the cache is left as it was.
        cached = record.exc_text
        if record.exc_info:
            record.exc_text = None
        elif cached:  # a traceback as text only: its line breaks stay, nothing else
            record.exc_text = "\n".join(escape_controls(line) for line in cached.split("\n"))
        try:
            return super().format(record)
        finally:
            record.exc_text = cached

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape_controls(super().formatMessage(record).rstrip("\r\n"))  # (a warning's text ends in one)

    def formatException(self, ei: Any) -> str:
        try:
            te = traceback.TracebackException(ei[0], ei[1], ei[2])
            text = "".join(_exception_lines(te))
        except Exception:  # noqa: BLE001 - never lose a record over its traceback
            return escape_controls(super().formatException(ei))
        return text[:-1] if text.endswith("\n") else text

    def formatStack(self, stack_info: str) -> str:
        return stack_info  # our own call stack: file names and source lines


#: Loggers (and their children) of the libraries that read patient headers.
PHI_LOGGERS = ("highdicom", "pydicom")
#: A warning captured from the ``warnings`` module: "path:line: Category: message".
_WARNING = re.compile(r"^(?P<path>.*?):(?P<line>\d+): (?P<category>\w+): ", re.S)
_PHI_PATHS = re.compile(r"[/\\](highdicom|pydicom)[/\\]")


class WithholdPatientData(logging.Filter):
    """Replaces the text of records from libraries that may quote patient data by their origin.

    The record still says which library and line warned (so an admin can look into it), never
    what value it warned about.  Other records pass unchanged.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name
        if any(name == p or name.startswith(p + ".") for p in PHI_LOGGERS):
            where = f"{record.module}.py:{record.lineno}"
            self._withhold(record, f"message withheld (a {name.split('.')[0]} message may quote patient "
                                   f"data; raised at {where})")
        elif name == "py.warnings":
            text = str(record.getMessage())
            match = _WARNING.match(text)
            if match is None or _PHI_PATHS.search(match["path"]):
                where = (f"{match['path'].rsplit('/', 1)[-1]}:{match['line']}, {match['category']}"
                         if match else "unknown origin")
                self._withhold(record, f"warning withheld (a DICOM library's warning may quote patient "
                                       f"data; raised at {where})")
        return True

    @staticmethod
    def _withhold(record: logging.LogRecord, text: str) -> None:
        record.msg, record.args = text, None
        record.exc_info = record.exc_text = None  # an exception's message may quote the value too


class RepeatLimit(logging.Filter):
    """Lets through the first records of each call site, then one line saying the rest is held back.

    Limits per window of :attr:`window` seconds: :attr:`per_thread` records of one call site
    (logger, file, line) in one thread -- an association's DUL and association threads are its
    own -- and :attr:`per_site` of that call site in all threads.  The first record held back
    is written with a note saying so; the first one through in a later window tells how many were
    held back.  Records of ``scp_node``'s own loggers, and ERROR and above, are never held back.
    """

    per_thread = 5
    per_site = 50
    window = 60.0

    def __init__(self, exempt: tuple[str, ...] = ("scp_node",), clock: Any = time.monotonic) -> None:
        super().__init__()
        self._exempt = exempt
        self._clock = clock
        self._lock = threading.Lock()
        # key -> [window start, records passed, records held back, held back announced]
        self._sites: dict[Any, list[Any]] = {}
        self._threads: dict[Any, list[Any]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name
        if record.levelno >= logging.ERROR or any(name == e or name.startswith(e + ".") for e in self._exempt):
            return True
        site = (name, record.pathname, record.lineno)
        now = self._clock()
        with self._lock:
            if len(self._threads) > 4096 or len(self._sites) > 4096:
                self._forget(now)
            t, t_held = self._entry(self._threads, (threading.get_ident(), *site), now)
            s, s_held = self._entry(self._sites, site, now)
            if t[1] < self.per_thread and s[1] < self.per_site:
                t[1] += 1
                s[1] += 1
                held = max(t_held, s_held)
                if held:
                    _annotate(record, f" [{held} similar messages were held back before this one]")
                return True
            over = [e for e, limit in ((t, self.per_thread), (s, self.per_site)) if e[1] >= limit]
            if not any(e[3] for e in over):
                for e in over:
                    e[3] = True
                _annotate(record, f" [further messages like this are held back for up to {self.window:g} s]")
                return True
            for e in over:
                e[2] += 1
            return False

    def _entry(self, table: dict[Any, list[Any]], key: Any, now: float) -> tuple[list[Any], int]:
        """The key's entry, a new one when its window has passed (with what the old one held back)."""
        entry = table.get(key)
        if entry is not None and now - entry[0] < self.window:
            return entry, 0
        held = entry[2] if entry is not None else 0
        table[key] = entry = [now, 0, 0, False]
        return entry, held

    def _forget(self, now: float) -> None:
        for table in (self._threads, self._sites):
            for key in [k for k, v in table.items() if now - v[0] >= self.window]:
                del table[key]


def _annotate(record: logging.LogRecord, note: str) -> None:
    record.msg = str(record.msg) + note.replace("%", "%%")


def configure(verbose: bool = False, stream: TextIO | None = None) -> logging.Handler:
    """The node's logging: one handler on the root logger (stderr unless ``stream``), with the
    escaping formatter, the patient data filter and -- unless ``verbose`` -- the repeat limit;
    Python warnings go through it too.  Replaces handlers an earlier call installed."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(EscapingFormatter(FORMAT))
    handler.addFilter(WithholdPatientData())
    if not verbose:
        handler.addFilter(RepeatLimit())
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_scp_node", False)]:
        root.removeHandler(old)
    handler._scp_node = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.captureWarnings(True)  # warnings.warn() text reaches stderr only through the handler
    if not verbose:  # pynetdicom logs every PDU at INFO: too chatty for a node that runs all day
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        logging.getLogger("apscheduler").setLevel(logging.WARNING)
    return handler
