"""The two kinds of failure the CLI tells apart: bad input (exit 2) and everything else (exit 1)."""

from __future__ import annotations


class ServiceError(Exception):
    """An expected failure: one line on stderr, exit 1, no traceback."""

    exit_code = 1


class UsageError(ServiceError):
    """Bad usage or bad input (config, arguments, files): exit 2; nothing stored is changed."""

    exit_code = 2

