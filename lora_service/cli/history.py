"""Commands about versions and batches: history, loss, audit, head moves, export."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import click

from lora_service.cli.common import (
    config_option,
    echo,
    emit_json,
    json_option,
    load,
    open_journal,
    table,
)
from lora_service.errors import ServiceError, UsageError
from lora_service.inbox.queries import list_batches
from lora_service.journal import events as ev
from lora_service.journal import queries
from lora_service.versions import history
from lora_service.versions.heads import decide_on_head, move_head


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _per_batch(losses: dict[str, float]) -> str:
    return ", ".join(f"{batch[:8]}: {loss:.4f}" for batch, loss in sorted(losses.items()))


def _standing(row: dict[str, Any]) -> str:
    if row["head"]:
        return "head"
    if row["held"]:
        return f"held: {row['held_reason']}" if row["held_reason"] else "held"
    return "lineage" if row["in_head_lineage"] else "off lineage"


@click.command()
@config_option
@json_option
def versions(config_path: Path, as_json: bool) -> None:
    """The version history: parent, batches, images, steps, losses, head marker.

    Each version's `step` is the global step at its end and `steps` its own run's; `val_loss`
    is on the fixed validation images, overall and per batch (`val_loss_per_batch`), so a
    version that forgot an older batch shows it. The table indents each version under its
    parent and says which one is the head, which are in its lineage and which were held."""
    config = load(config_path)
    with open_journal(config, "read") as journal:
        rows = history.version_rows(journal)
    if as_json:
        emit_json(rows)
        return
    labels = history.tree_labels(rows)
    _wide_table(
        "versions",
        ["version", "parent", "created", "batches", "images", "step (run)", "train loss",
         "val loss", "val loss per batch", "standing"],
        [
            (
                labels[r["version"]],
                r["parent"] or "-",
                (r["created_at"] or "")[:16].replace("T", " "),
                f"{len(r['new_batches'])} new / {len(r['batches'])}",
                r["images"],
                f"{r['step']} (+{r['steps']})",
                _loss(r["train_loss"]),
                _loss(r["val_loss"]),
                _per_batch(r["val_loss_per_batch"]),
                _standing(r),
            )
            for r in rows
        ],
    )


POINTS_SHOWN = 40


def _wide_table(title: str, columns: list[str], rows: list[tuple[Any, ...]]) -> None:
    """Wide enough for the version history: the version tree never wraps, and piped output
    gets 160 columns rather than rich's default 80."""
    table(title, columns, rows, min_width=160, no_wrap_first=True)


@click.command()
@config_option
@json_option
@click.option("--version", "version_name", metavar="V",
              help="V's lineage instead of the head's.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), help="Write a PNG chart.")
@click.option("--points", "max_points", type=click.IntRange(min=10), default=queries.LOSS_POINTS,
              show_default=True, metavar="N",
              help="At most N points of the curve: beyond, the lowest and highest loss of each "
                   "of N/2 equal step ranges.")
@click.option("--full", is_flag=True, help="Every logged point (--json), not at most N.")
def loss(config_path: Path, as_json: bool, version_name: str | None, plot: Path | None,
         max_points: int, full: bool) -> None:
    """The loss trend: per version and per logged step; a PNG chart on request.

    Shows the lineage of the head (or of V): each version's train and validation loss, and
    the logged train losses by global step (a version's curve continues its parent's). A
    curve of more than N points is downsampled on the way out of the journal to the lowest and
    highest loss of each of N/2 equal step ranges, so every spike stays visible; `downsampled`
    in --json says how, and --full gives every point instead. The chart marks where each
    version ends and its validation loss."""
    config = load(config_path)
    with open_journal(config, "read") as journal:
        series = history.loss_series(journal, version_name,
                                     points=None if full and as_json else max_points)
        if plot is not None:
            from lora_service.cli.charts import plot_loss

            drawn = series if isinstance(series["points"], list) else history.loss_series(
                journal, version_name, points=max_points)
            plot_loss(drawn, plot)
        if as_json:
            _emit_series(series | ({"plot": str(plot)} if plot is not None else {}))
            return
        tail = history.loss_tail(journal, version_name, POINTS_SHOWN)
    table(
        f"losses, lineage of {series['version'] or '(no version yet)'}",
        ["version", "steps", "train loss", "val loss", "val loss per batch"],
        [
            (
                v["version"] + (" (head)" if v["head"] else ""),
                f"{v['start_step'] + 1}-{v['step']}",
                _loss(v["train_loss"]),
                _loss(v["val_loss"]),
                _per_batch(v["val_loss_per_batch"]),
            )
            for v in series["versions"]
        ],
    )
    sampled = series["downsampled"]
    total = sampled["total_points"] if sampled else len(series["points"])
    title = "train loss by step"
    if total > len(tail):
        title += f" (last {len(tail)} of {total}; --json --full for all)"
    table(
        title,
        ["step", "loss", "lr", "version"],
        [(p["step"], _loss(p["loss"]), f"{p['lr']:.3g}", p["version"] or "(training)")
         for p in tail],
    )
    if plot is not None:
        echo(f"wrote {plot}")


_NESTED = "\x01nested"  # a dict's value in `_element`'s first pass: "\u0001nested" in JSON


def _flat(value: dict[str, Any], indent: str) -> str:
    """json.dumps(value, indent=2, sort_keys=True, default=str) of a dict of scalars at
    `indent`, by the C encoder (5x faster): the item separator holds the line break."""
    text = json.dumps(value, sort_keys=True, default=str, separators=(",\n" + indent + "  ", ": "))
    return "{\n" + indent + "  " + text[1:-1] + "\n" + indent + "}"


def _element(item: Any) -> str:
    """What json.dumps(list, indent=2, sort_keys=True, default=str) writes for `item` in a list
    that is a value of the top-level object; a dict of scalars and non-empty dicts of scalars
    (a point, a version) by the C encoder."""
    if isinstance(item, dict) and item and all(type(k) is str for k in item):
        nested = {k: v for k, v in item.items() if isinstance(v, dict | list | tuple)}
        if all(type(v) is dict and v and all(type(k) is str and not isinstance(
                x, dict | list | tuple) for k, x in v.items()) for v in nested.values()):
            text = _flat(item | dict.fromkeys(nested, _NESTED), "    ")
            for key, value in nested.items():  # (a string's own quotes are escaped)
                text = text.replace(f'{json.dumps(key)}: "\\u0001nested"',
                                    f"{json.dumps(key)}: {_flat(value, '      ')}", 1)
            return text
    return json.dumps(item, indent=2, sort_keys=True, default=str).replace("\n", "\n    ")


def _emit_list(out: Any, items: Any) -> None:
    written = 0
    for item in items:
        out.write(("," if written else "") + "\n    " + _element(item))
        written += 1
    out.write("\n  ]" if written else "]")


def _emit_series(series: dict[str, Any]) -> None:
    """`emit_json(series)`, the same text: `points` written as they come when they are an
    iterator (`loss --full`: a million points are never held at once), and they and
    `versions` by the C encoder (`_element`: the indented one took a third of `loss --json`)."""
    before, middle, after = re.split(
        r'\n  "(?:points|versions)": \[\],?',
        json.dumps(series | {"points": [], "versions": []}, indent=2, sort_keys=True,
                   default=str))
    out = click.get_text_stream("stdout")
    out.write(before + '\n  "points": [')
    _emit_list(out, series["points"])
    out.write("," + middle + '\n  "versions": [')
    _emit_list(out, series["versions"])
    out.write(after + "\n")
    out.flush()


@click.command()
@config_option
@json_option
@click.argument("version_name", metavar="V")
def audit(config_path: Path, as_json: bool, version_name: str) -> None:
    """Lineage back to the base model, batches with image hashes, config, events, verification.

    Every file the version depends on (its own and its ancestors' version files, every image
    and caption of every batch trained into it, the base model's files) is re-hashed against
    the journal; any that is missing or changed is named and the exit status is 1."""
    config = load(config_path)
    with open_journal(config, "read") as journal:
        record = history.audit_record(journal, config.paths.state, version_name)
    if as_json:
        emit_json(record)
    else:
        _print_audit(record)
    check = record["verification"]
    if not check["ok"]:
        raise ServiceError(
            f"{version_name}: {len(check['problems'])} file(s) fail verification: "
            + "; ".join(check["problems"])
        )


def _print_audit(record: dict[str, Any]) -> None:
    base = record["base_model"]
    chain = " -> ".join([*(v["version"] for v in record["lineage"]), "base"])
    echo(f"audit of {record['version']} (head: {record['head'] or '-'})")
    echo(f"lineage: {chain}")
    echo(f"base model: {base['spec']} sha256 {base['sha256']} (seq {base['seq']})")
    for v in record["lineage"]:
        echo("")
        imported = v.get("imported")
        if imported:
            geometry = imported["geometry"]
            echo(
                f"{v['version']}: imported {imported['origin']} ({imported['format']}, sha256 "
                f"{imported['sha256']}), rank {geometry['rank']}, alpha {geometry['alpha']:g}, "
                f"{imported['modules']} modules: a lineage root on the base model"
            )
        else:
            echo(
                f"{v['version']}: parent {v['parent'] or 'base'}, run {v['run_id']}, step "
                f"{v['step']} (+{v['steps']}), seed {v['seed']}, lr {v['learning_rate']}, "
                f"epochs {v['epochs']}, train loss {_loss(v['train_loss'])}, val loss "
                f"{_loss(v['val_loss'])}"
            )
        for rel, sha in sorted(v["files"].items()):
            echo(f"  file {rel} {sha}")
        for batch in v["batches"]:
            kind = "new" if batch["new"] else "rehearsal"
            echo(f"  batch {batch['batch_id']} ({batch['name']}, {kind}, accepted at "
                       f"seq {batch['accepted_seq']})")
            for image in batch["images"]:
                echo(f"    {image['file']} {image['sha256']} "
                           f"[{image['caption_source']}] {image['caption']!r}")
        for event in v["events"]:
            echo(f"  event {event['seq']} {event['type']} {event['hash'][:16]}")
    echo("")
    echo("effective config: " + json.dumps(record["config"], sort_keys=True))
    check = record["verification"]
    verdict = "ok" if check["ok"] else f"FAILED ({len(check['problems'])} problem(s))"
    echo(f"verification: {check['checked']} files, {verdict}")
    for problem in check["problems"]:
        echo(f"  {problem}")


@click.command()
@config_option
@click.argument("version_name", metavar="V")
@click.option("--reason", required=True, help="Why (journaled with the head move).")
def rollback(config_path: Path, version_name: str, reason: str) -> None:
    """Move the head to V (refuses a version whose files fail verification).

    The next incremental run starts from V. Batches trained only in versions that leave the
    head's lineage stay out of later runs until `requeue` puts them back. deploy_dir follows."""
    config = load(config_path)
    with open_journal(config) as journal:
        previous = queries.head_version(journal)
        move_head(journal, config, version_name, reason=reason, by="rollback")
        out = [b for b, s in queries.batch_states(journal).items() if s.status == "out of lineage"]
    echo(f"head: {previous or '-'} -> {version_name}")
    if out:
        echo(f"out of the lineage now (requeue to train again): {', '.join(out)}")


@click.command()
@config_option
@click.argument("version_name", metavar="V")
@click.option("--reason", default="promoted by hand", show_default=True,
              help="Why (journaled with the head move).")
def promote(config_path: Path, version_name: str, reason: str) -> None:
    """Move the head to a version the promotion gate held."""
    config = load(config_path)
    with open_journal(config) as journal:
        previous = queries.head_version(journal)
        move_head(journal, config, version_name, reason=reason, by="promote")
    echo(f"head: {previous or '-'} -> {version_name}")


@click.command()
@config_option
@json_option
def batches(config_path: Path, as_json: bool) -> None:
    """Every batch: status, images, caption sources, reasons for bad files."""
    config = load(config_path)
    with open_journal(config, "read") as journal:
        rows = list_batches(journal)
    if as_json:
        emit_json(rows)
        return
    table(
        "batches",
        ["batch", "name", "status", "images", "captions", "bad files", "accepted"],
        [
            (
                r["batch_id"] or "-",
                r["name"],
                r["status"] if not r["reason"] else f"{r['status']}: {r['reason']}",
                r["images"],
                ",".join(r["caption_sources"]),
                "; ".join(f"{b['file']}: {b['reason']}" for b in r["bad"]),
                r["ts"],
            )
            for r in rows
        ],
    )


@click.command()
@config_option
@click.argument("batch_id")
@click.option("--reason", default="", help="Why (journaled).")
def requeue(config_path: Path, batch_id: str, reason: str) -> None:
    """Put a batch that is out of the head's lineage back into the next run."""
    config = load(config_path)

    def decide(_head: str | None) -> list[ev.Event]:
        state = queries.batch_states(journal).get(batch_id)
        if state is None:
            raise UsageError(f"batch {batch_id!r}: no accepted batch has this id (see `batches`)")
        if state.pending:
            raise UsageError(f"batch {batch_id}: already pending; nothing to requeue")
        if state.status.startswith("trained in"):
            raise UsageError(
                f"batch {batch_id}: {state.status}, in the head's lineage; only a batch out of "
                "the lineage (after a rollback) or held can be requeued"
            )
        return [ev.BatchRequeued(batch_id=batch_id, reason=reason)]

    with open_journal(config) as journal:  # decided on the head as read: a move re-decides
        decide_on_head(journal, f"requeue {batch_id}", decide)
    echo(f"requeued {batch_id}: it joins the next run")


@click.command()
@config_option
@click.argument("version_name", metavar="V")
@click.option("--format", "fmt", type=click.Choice(["kohya", "peft"]), default="kohya",
              show_default=True)
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True)
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def export(config_path: Path, version_name: str, fmt: str, output: Path, force: bool) -> None:
    """Write a version's adapter in kohya/WebUI or peft format.

    kohya: the `.safetensors` file (into PATH when it is a folder); peft: the adapter folder as
    PATH. The files are checked against the journal first; an existing PATH needs --force."""
    # here, not at the top: `versions.publish` starts structlog (50 ms), for this command only
    from lora_service.versions.export import export_version

    config = load(config_path)
    with open_journal(config) as journal:
        target = export_version(
            journal, config, version_name, "peft" if fmt == "peft" else "kohya", output,
            force=force,
        )
    echo(f"wrote {target}")


COMMANDS = [versions, loss, audit, rollback, promote, batches, requeue, export]
