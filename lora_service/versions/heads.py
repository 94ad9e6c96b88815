"""The head: moving it by hand (`rollback`, `promote`) and deploying it (torch-free).

Deploy: whenever the head moves and `paths.deploy_dir` is set, the head's kohya file is copied
atomically to `deploy_dir/<config.name>.safetensors` and `VersionExported(kind="deploy")` is
journaled (see `versions.publish` for why one fixed name).

A hand move is a decision on the head as read: it is appended with that position
(`journal.Expect`), so a publish or another move that lands in between makes it read and decide
again — the two never both win.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from lora_service.config import Config
from lora_service.errors import ServiceError, UsageError
from lora_service.journal import Event, Expect, Journal, StaleDecision, queries
from lora_service.journal.events import HeadMoved, VersionExported
from lora_service.store import atomic_copy
from lora_service.versions.verify import kohya_file, verify_version_files

DECIDE_ATTEMPTS = 100  # re-reads when another process moved the head while we decided


def version_row(journal: Journal, version: str) -> dict[str, Any]:
    """The `versions` row, or UsageError naming the known versions."""
    row = queries.version(journal, version)
    if row is None:
        known = queries.version_names(journal)
        listed = ", ".join(known[-8:]) if known else "none yet"
        raise UsageError(f"{version}: no such version (known: {listed})")
    return row



def version_files(row: dict[str, Any]) -> dict[str, str]:
    return json.loads(row["files"] or "{}")



def decide_on_head(
    journal: Journal, what: str, decide: Callable[[str | None], Sequence[Event]]
) -> Sequence[Event]:
    """Read the head, let `decide(head)` make the events, append them with the position read
    (`Expect`); when a head move landed in between, read and decide again. Returns the events
    appended. `what` names the decision in the error when the head never stands still."""
    for _ in range(DECIDE_ATTEMPTS):
        seq = journal.last_seq()
        events = decide(queries.head_version(journal))
        try:
            journal.append(*events, expect=Expect(seq))
        except StaleDecision:
            continue
        return events
    raise ServiceError(f"{what}: the head kept moving; {DECIDE_ATTEMPTS} decisions were stale")



def deploy(journal: Journal, config: Config, version: str) -> Path | None:
    """Copy `version`'s kohya file to `deploy_dir/<name>.safetensors` (atomic) and journal
    `VersionExported(kind="deploy")`; None when no deploy_dir is configured.

    `version` is the head the caller just made. When another process moves the head while
    the file is copied, the copy is done again for the new head, so the deployed file ends as
    the head's whichever of two deploys finishes last."""
    deploy_dir = config.paths.deploy_dir
    if deploy_dir is None:
        return None
    dst = deploy_dir / f"{config.name}.safetensors"
    for _ in range(DECIDE_ATTEMPTS):
        files = version_files(version_row(journal, version))
        src = config.paths.state / kohya_file(version, files)
        try:
            sha = atomic_copy(src, dst)
        except OSError as exc:
            raise ServiceError(f"{dst}: cannot deploy {version} ({exc.strerror or exc})") from None
        head = queries.head_version(journal)
        if head is None or head == version:
            break
        version = head  # the head moved while we copied: deploy the head instead
    journal.append(VersionExported(version=version, path=str(dst), sha256=sha))
    return dst


def move_head(
    journal: Journal,
    config: Config,
    version: str,
    *,
    reason: str,
    by: Literal["rollback", "promote"],
) -> None:
    """Move the head to `version` by hand (`rollback`, `promote`) and re-deploy.

    Refuses (UsageError, nothing changed) an unknown version, the current head, and a version
    whose files fail verification against the sha256s its `VersionCreated` journaled, naming
    each bad file. A deploy that fails after the head moved is a ServiceError that says so."""
    row = version_row(journal, version)
    problems = verify_version_files(config.paths.state, version_files(row))
    if problems:
        raise UsageError(
            f"{version}: files fail verification, head not moved: {'; '.join(problems)}"
        )

    def decide(current: str | None) -> list[HeadMoved]:
        if current == version:
            raise UsageError(f"{version} is already the head; nothing to do")
        return [HeadMoved(version=version, previous=current, reason=reason, by=by)]

    decide_on_head(journal, version, decide)
    try:
        deploy(journal, config, version)
    except ServiceError as exc:
        raise ServiceError(f"head moved to {version}, but the deploy failed: {exc}") from None
