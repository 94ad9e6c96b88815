"""The training child: `python -m lora_service.training --config C --run RUN_ID`.

Also `--register-base`: materialise and register the configured base model (the daemon does
this in a child, since it imports torch), print its sha256, exit 0. And `--import-adapter PATH
[--format kohya|peft]`: `lora-service import` (`models.importing`), one JSON line on success,
`error: …` and exit 2 for a file that does not fit (nothing stored). And `--sample V --prompt P
--seed S --output O` / `--compare V1 V2 --output O`: `lora-service sample` and `compare`'s
drawing, one JSON line (path, width, height). The torch-free side runs these one-shot jobs
through `daemon.child.run_once`.

Exit status: 0 when the run finished (a version was published) or was stopped by SIGTERM/SIGINT
after saving a checkpoint (the run stays `running` in the journal; starting the child again
resumes it); 1 on any failure, after journaling `RunFailed` with the reason; 75 (EX_TEMPFAIL)
when the failure is the disk's (full, failing): its reason starts with `disk: `, and the daemon
retries such a run without counting it as an attempt. Stdout gets one JSON line summarising the
outcome; progress and logs go to stderr.

`--heartbeat PATH`: touched as the run progresses (see `heartbeat`), so the daemon notices a
child that hangs. `--fault SPEC` (tests only, passed by the daemon's `child_args` seam or the
test's own command line): the faults of `training/faults.py`.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


import json  # noqa: E402

from lora_service.config import Config, load_config  # noqa: E402
from lora_service.errors import ServiceError  # noqa: E402
from lora_service.journal import Journal  # noqa: E402
from lora_service.journal.events import RunFailed  # noqa: E402
from lora_service.logs import setup_logging  # noqa: E402
from lora_service.process import DISK_PREFIX, EX_TEMPFAIL, die_with_parent  # noqa: E402
from lora_service.store import disk_trouble  # noqa: E402
from lora_service.training import heartbeat  # noqa: E402
from lora_service.training.faults import Faults  # noqa: E402
from lora_service.versions.samples import compare_sheet, write_png  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_service.training")
    parser.add_argument("--config", required=True)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--run", dest="run_id", help="train this run (from its RunStarted)")
    what.add_argument("--register-base", action="store_true",
                      help="materialise and register the configured base model, then exit")
    what.add_argument("--import-adapter", type=Path, metavar="PATH",
                      help="import a kohya or peft LoRA as a new lineage root, then exit")
    what.add_argument("--sample", metavar="V",
                      help="render one image of version V (--prompt, --seed) to --output")
    what.add_argument("--compare", nargs=2, metavar=("V1", "V2"),
                      help="write the A/B sheet of V1 and V2 to --output")
    parser.add_argument("--format", choices=("kohya", "peft"), help="with --import-adapter")
    parser.add_argument("--prompt", default="", help="with --sample")
    parser.add_argument("--seed", type=int, default=0, help="with --sample")
    parser.add_argument("--output", type=Path, help="with --sample and --compare: a PNG file")
    parser.add_argument("--progress", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--heartbeat", type=Path, help="touch this file as the run progresses")
    parser.add_argument("--fault", action="append", default=[], metavar="SPEC",
                        help=argparse.SUPPRESS)  # tests only: see training/faults.py
    args = parser.parse_args(argv)
    die_with_parent()
    faults = Faults.parse(args.fault)
    if faults.segv and args.run_id:
        os.kill(os.getpid(), signal.SIGSEGV)  # a child that crashes hard
    heartbeat.use(args.heartbeat)
    with heartbeat.phase():  # imports and opening: seconds, tens of them on a busy machine
        try:
            config = load_config(args.config)
        except ServiceError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return exc.exit_code
        progress = args.progress == "on" or (args.progress == "auto" and sys.stderr.isatty())
        setup_logging(config, console=not progress)  # the bar replaces per-step console lines
        if args.sample or args.compare:
            return _draw(config, args)
        journal = Journal.for_state(config.paths.state)
        if args.register_base:
            from lora_service.models import base_model

            try:
                base = base_model.materialise(config.base_model, config.paths.state)
                base_model.register(journal, base)
            except (ServiceError, OSError) as exc:
                disk = disk_trouble(exc)
                if disk is not None:  # the disk's fault, not the model's: say so (exit 75)
                    print(f"error: {DISK_PREFIX}{disk}", file=sys.stderr)
                    return EX_TEMPFAIL
                if not isinstance(exc, ServiceError):
                    raise
                print(f"error: {exc}", file=sys.stderr)
                return exc.exit_code
            print(base.sha256, flush=True)
            return 0
        if args.import_adapter is not None:
            return _import(journal, config, args.import_adapter, args.format)
        from lora_service.training.run import StopFlag, execute, summary

    stop = StopFlag()
    stop.install()
    try:
        outcome = execute(config, journal, args.run_id, progress=progress, stop=stop,
                          faults=faults)
    except BaseException as exc:  # noqa: BLE001  (every failure is journaled, then reported)
        return _failed(journal, args.run_id, exc, disk_trouble(exc))
    # the run is over: a stop asked for now must not kill the interpreter's slow teardown,
    # or the exit status would say "killed by SIGTERM" about a run that finished
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    if os.environ.get("RANK", "0") == "0":
        print(summary(outcome), flush=True)
    return 0


def _import(journal: Journal, config: Config, path: Path, fmt: str | None) -> int:
    """`lora-service import`'s torch side; expected failures are one `error:` line."""
    from lora_service.models.importing import import_adapter  # torch: only when asked

    try:
        summary = import_adapter(journal, config, path, fmt)  # type: ignore[arg-type]
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # a full disk, an unreadable file: one line, nothing journaled
        print(f"error: {exc.filename or path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary, sort_keys=True), flush=True)
    return 0


def _draw(config: Config, args: argparse.Namespace) -> int:
    """`lora-service sample` and `compare`'s torch side: a PNG at --output, one JSON line."""
    from lora_service.models.render import render_columns, render_one  # torch

    try:
        with Journal.for_state(config.paths.state, mode="read") as journal:
            if args.sample:
                image = render_one(journal, config, args.sample, args.prompt, args.seed)
            else:
                image = compare_sheet(journal, config, *args.compare,
                                      render=render_columns(journal, config))
            assert image is not None  # with a renderer, a sheet is always drawn
            write_png(args.output, image)
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(json.dumps({"path": str(args.output), "width": image.width, "height": image.height}))
    return 0


def _failed(journal: Journal, run_id: str, exc: BaseException, disk: str | None) -> int:
    """Report and journal a failed run; the exit status says whether the disk is to blame
    (the daemon journals the failure itself when the disk refuses our RunFailed)."""
    expected = isinstance(exc, ServiceError) or disk is not None
    reason = (f"{DISK_PREFIX}{disk}" if disk else str(exc) if expected
              else f"{type(exc).__name__}: {exc}")
    tail = "" if expected else traceback.format_exc()[-4000:]
    print(f"error: run {run_id} failed: {reason}", file=sys.stderr)
    if tail:
        print(tail, file=sys.stderr)
    if os.environ.get("RANK", "0") == "0":  # one RunFailed, not one per process
        try:
            journal.append(RunFailed(run_id=run_id, reason=reason or type(exc).__name__,
                                     stderr_tail=tail))
        except Exception as refused:  # noqa: BLE001
            print(f"error: run {run_id}: cannot journal the failure: {refused}", file=sys.stderr)
    return EX_TEMPFAIL if disk else 1


if __name__ == "__main__":
    code = main()
    # everything this process wrote is durable (journal commits, fsynced files) and its threads
    # are done: skip the interpreter's teardown of torch and its libraries, a second or more
    # that the daemon (and a user waiting for the next run or a sample) would wait for
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
