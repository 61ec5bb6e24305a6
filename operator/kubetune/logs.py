"""Structured logs: one JSON object per line, shared by the operator, the trainer and the CLI."""

from __future__ import annotations

import json
import logging


class JsonFormatter(logging.Formatter):
    """One JSON object per line; `extra=` fields become keys. Secrets are never passed to logs."""

    # kopf adds its whole OperatorSettings to every record (`settings`): ~3 KB of repr per line, at every
    # handler call, that says nothing about the event
    _skip = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "settings"}

    def format(self, record: logging.LogRecord) -> str:
        payload = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
                   "message": record.getMessage()}
        payload.update({k: v for k, v in vars(record).items() if k not in self._skip and not k.startswith("_")})
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


# HTTP client libraries whose DEBUG records carry request headers, i.e. S3 `Authorization` (an access key
# id and a signature): never below INFO, even with --verbose.
WIRE_LOGGERS = ("botocore", "boto3", "s3transfer", "urllib3")


def quiet_wire_loggers() -> None:
    for name in WIRE_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.INFO, logging.getLogger(name).level))


def configure_logging(verbose: bool) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler], force=True)
    quiet_wire_loggers()  # every program that configures logging this way: operator, agent, trainer, engine
