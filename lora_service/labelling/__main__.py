"""The labelling child: `python -m lora_service.labelling --config C FILE...`.

Prints one JSON object, `{"model", "weights_sha256", "captions": {file name: caption}}`, on
stdout; errors go to stderr as one line with exit 2 (bad config or weights) or 1."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from lora_service.config import load_config
from lora_service.errors import ServiceError
from lora_service.inbox.labeller import weights_path
from lora_service.process import die_with_parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_service.labelling")
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--fault", choices=("hang",), help=argparse.SUPPRESS)  # tests only
    parser.add_argument("files", nargs="*", type=Path)
    args = parser.parse_args(argv)
    die_with_parent()  # under the daemon: die with it, like the training child
    while args.fault == "hang":
        time.sleep(3600)
    try:
        config = load_config(args.config)
        weights = weights_path(config)
        from lora_service.models.clip import ClipLabeller

        labeller = ClipLabeller(config.labelling.model, weights, config.labelling.vocabulary,
                                config.labelling.top_k, config_dir=args.config.parent)
        captions = labeller(list(args.files))
    except ServiceError as exc:
        print(f"lora_service.labelling: {exc}", file=sys.stderr)
        return exc.exit_code
    json.dump({"model": labeller.model, "weights_sha256": labeller.weights_sha256,
               "captions": captions}, sys.stdout, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
