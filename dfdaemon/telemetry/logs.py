"""Process-wide logging shared by the daemon, the scheduler stub and the CLIs.

One line per event on stderr, as ``key=value`` text or as JSON objects (``log.format``); inside a
span every line carries the trace and span ids, so a log line leads to its trace.
"""

from __future__ import annotations

import json
import logging
import sys

from opentelemetry import trace

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class _TraceContext(logging.Filter):
    """Stamp each record with the ids of the span current where it was logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = trace.get_current_span().get_span_context()
        record.trace_id = f"{context.trace_id:032x}" if context.is_valid else ""
        record.span_id = f"{context.span_id:016x}" if context.is_valid else ""
        return True


class _TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        trace_id = getattr(record, "trace_id", "")
        return f"{line} trace_id={trace_id} span_id={getattr(record, 'span_id', '')}" if trace_id else line


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if getattr(record, "trace_id", ""):
            entry["trace_id"] = getattr(record, "trace_id", "")
            entry["span_id"] = getattr(record, "span_id", "")
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class _GrpcNoise(logging.Filter):
    """grpc logs two routine events of a P2P network from its core, with tracebacks: a caller that went away before
    its answer was sent (a peer that cancelled a piece), and a peer's message that does not parse (the code that
    made the call reports it, with the peer's name). Each becomes one line without the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("ExecuteBatchError raised in core by servicer method"):
            self._rewrite(record, logging.INFO, f"caller went away before {message.rsplit(' ', 1)[-1]} answered")
        elif message.startswith("Exception deserializing message"):
            self._rewrite(record, logging.WARNING, "a gRPC message from a peer does not parse")
        return True

    @staticmethod
    def _rewrite(record: logging.LogRecord, level: int, message: str) -> None:
        record.msg, record.args = message, ()
        record.exc_info, record.exc_text = None, None
        record.levelno, record.levelname = level, logging.getLevelName(level)


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    """Configure the root logger for this process."""
    for name in ("grpc._cython.cygrpc", "grpc._common"):
        logging.getLogger(name).addFilter(_GrpcNoise())
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_TraceContext())
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS.get(level, logging.INFO))
