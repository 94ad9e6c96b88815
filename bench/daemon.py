"""The supervisor's resident memory while it runs (goal < 100 MB), against a bare interpreter.

Starts `lora-service run` on a temporary config with the embedded model, waits until it has
registered the base model and is idle in its loop, reads VmRSS from /proc, and prints it next to
the RSS of a bare `python -c` measured in the same run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def main() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    bare = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    time.sleep(1)
    reference = rss_mb(bare.pid)
    bare.kill()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "conf" / "config.yaml"
        config.parent.mkdir()
        config.write_text(yaml.safe_dump({"paths": {"inbox": "../inbox", "state": "../state"}}))
        daemon = subprocess.Popen([sys.executable, "-m", "lora_service", "run", "--config",
                                   str(config)], env=env, stderr=subprocess.DEVNULL)
        status = Path(tmp) / "state" / "daemon.json"
        deadline = time.monotonic() + 120
        while not status.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(3)  # a few idle loop ticks with the watcher and scheduler running
        measured = rss_mb(daemon.pid)
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)
    print(f"supervisor RSS: {measured:.1f} MB (goal < 100 MB); bare python: {reference:.1f} MB; "
          f"ratio {measured / reference:.2f}")


if __name__ == "__main__":
    main()
