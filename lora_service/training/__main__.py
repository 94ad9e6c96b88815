"""The training child: `python -m lora_service.training --config C --run RUN_ID`.

Also `--register-base`: materialise and register the configured base model (the daemon does
this in a child, since it imports torch), print its sha256, exit 0.

Exit status: 0 when the run finished (a version was published) or was stopped by SIGTERM/SIGINT
after saving a checkpoint (the run stays `running` in the journal; starting the child again
resumes it); 1 on any failure, after journaling `RunFailed` with the reason. Stdout gets one
JSON line summarising the outcome; progress and logs go to stderr.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


PARENT_ENV = "LORA_SERVICE_PARENT_PID"  # set by lora_service.daemon.child
FAULT_ENV = "LORA_SERVICE_TEST_CHILD_FAULT"  # used only by tests
PR_SET_PDEATHSIG = 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_service.training")
    parser.add_argument("--config", required=True)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--run", dest="run_id", help="train this run (from its RunStarted)")
    what.add_argument("--register-base", action="store_true",
                      help="materialise and register the configured base model, then exit")
    parser.add_argument("--progress", choices=("auto", "on", "off"), default="auto")
    args = parser.parse_args(argv)
    die_with_parent()
    if os.environ.get(FAULT_ENV) == "segv" and args.run_id:
        os.kill(os.getpid(), signal.SIGSEGV)  # tests only: a child that crashes hard

    from lora_service.config import load_config
    from lora_service.errors import ServiceError
    from lora_service.journal import Journal
    from lora_service.journal.events import RunFailed

    try:
        config = load_config(args.config)
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    from lora_service.logs import setup_logging

    progress = args.progress == "on" or (args.progress == "auto" and sys.stderr.isatty())
    setup_logging(config, console=not progress)  # the bar replaces per-step console lines
    journal = Journal.for_state(config.paths.state)
    if args.register_base:
        from lora_service.training import base_model

        try:
            base = base_model.materialise(config.base_model, config.paths.state)
            base_model.register(journal, base)
        except ServiceError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return exc.exit_code
        print(base.sha256, flush=True)
        return 0
    from lora_service.training.run import StopFlag, execute, summary

    stop = StopFlag()
    stop.install()
    try:
        outcome = execute(config, journal, args.run_id, progress=progress, stop=stop)
    except BaseException as exc:  # noqa: BLE001  (every failure is journaled, then reported)
        expected = isinstance(exc, ServiceError)
        reason = str(exc) if expected else f"{type(exc).__name__}: {exc}"
        tail = "" if expected else traceback.format_exc()[-4000:]
        try:
            if os.environ.get("RANK", "0") == "0":  # one RunFailed, not one per process
                journal.append(RunFailed(run_id=args.run_id,
                                         reason=reason or type(exc).__name__, stderr_tail=tail))
        finally:
            print(f"error: run {args.run_id} failed: {reason}", file=sys.stderr)
            if tail:
                print(tail, file=sys.stderr)
        return 1
    # the run is over: a stop asked for now must not kill the interpreter's slow teardown,
    # or the exit status would say "killed by SIGTERM" about a run that finished
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    if os.environ.get("RANK", "0") == "0":
        print(summary(outcome), flush=True)
    return 0


def die_with_parent() -> None:
    """Under the daemon (LORA_SERVICE_PARENT_PID set): ask Linux to SIGKILL this process when
    its parent dies, so a killed daemon leaves no orphaned training child behind."""
    parent = os.environ.get(PARENT_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    # the parent (the daemon, or the launcher that sets this for its workers) may have died
    # before prctl: then we were already re-parented
    if str(os.getppid()) != parent:
        os._exit(1)


if __name__ == "__main__":
    sys.exit(main())
