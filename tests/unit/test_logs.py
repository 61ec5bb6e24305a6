"""Logging set-up shared by every kubetune program (operator, agent, trainer, engine)."""

from __future__ import annotations

import logging

from kubetune import logs


def test_verbose_never_lowers_the_wire_loggers_below_info():
    """botocore's DEBUG records print request headers, i.e. S3 Authorization (an access key id)."""
    saved = {name: logging.getLogger(name).level for name in ("", *logs.WIRE_LOGGERS)}
    try:
        logs.configure_logging(verbose=True)
        assert logging.getLogger().level == logging.DEBUG
        for name in logs.WIRE_LOGGERS:
            assert not logging.getLogger(name).isEnabledFor(logging.DEBUG), name
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
