"""structlog, set up once per process: JSON lines to the log file, readable lines to stderr.

Both outputs go through the stdlib `logging` handlers with structlog's `ProcessorFormatter`, so
library warnings (diffusers, accelerate) land in the same file as our own events.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import structlog

from lora_service.config import Config
from lora_service.errors import UsageError

_configured = False


def log_file(config: Config) -> Path:
    return config.logging.file or config.paths.state / "logs" / "train.log"


def setup_logging(config: Config, *, console: bool = True) -> None:
    global _configured
    if _configured:
        return
    _configured = True
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(config.logging.level.upper())

    path = log_file(config)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(path, encoding="utf-8")
    except OSError as exc:
        _configured = False
        key = "logging.file" if config.logging.file else "paths.state (its logs/train.log)"
        raise UsageError(f"{key}: {path}: cannot be written ({exc.strerror or exc})") from None
    renderer = (
        structlog.processors.JSONRenderer()
        if config.logging.json_
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    file_handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
            foreign_pre_chain=shared,
        )
    )
    root.addHandler(file_handler)
    if console:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(
            structlog.stdlib.ProcessorFormatter(
                processors=[
                    structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()),
                ],
                foreign_pre_chain=shared,
            )
        )
        root.addHandler(stream)


def get_logger(name: str = "lora_service") -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)
