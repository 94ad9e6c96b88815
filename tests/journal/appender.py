"""A child process that appends events and acknowledges each seq only after commit returned.

Usage: python appender.py STATE_DIR COUNT [TAG]. Prints one seq per line, flushed.
"""

import sys
from pathlib import Path

from lora_service.journal import Journal
from lora_service.journal import events as ev

state, count = Path(sys.argv[1]), int(sys.argv[2])
tag = sys.argv[3] if len(sys.argv) > 3 else "x"
journal = Journal.for_state(state)
for i in range(count):
    kind = i % 3
    if kind == 0:
        event = ev.LossLogged(run_id=tag, step=i, loss=1.0 / (i + 1), lr=1e-4)
    elif kind == 1:
        event = ev.TrainingRequested(reason="manual")
    else:
        event = ev.BatchDetected(name=f"{tag}-{i}")
    (seq,) = journal.append(event)
    sys.stdout.write(f"{seq}\n")
    sys.stdout.flush()
