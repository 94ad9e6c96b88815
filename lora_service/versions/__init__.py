"""Versions: the trained adapters, the head, the promotion gate, deploy and export.

`publish`, `gate` and `verify` import no torch (`publish_version` loads `versions.export`, which
does, only when called), so the daemon and the CLI may import this package.
"""

from lora_service.versions.gate import decide
from lora_service.versions.publish import export_version, move_head, publish_version
from lora_service.versions.verify import verify_version_files

__all__ = ["decide", "export_version", "move_head", "publish_version", "verify_version_files"]
