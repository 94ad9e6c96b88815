"""Inbox intake: watch the inbox, wait for complete batches, check every file, store the good
ones content-addressed, journal the decision, move the folder out of the way."""

from lora_service.inbox.intake import Intake, Labeller, Outcome, batch_id_of
from lora_service.inbox.queries import list_batches
from lora_service.inbox.watch import InboxWatcher

__all__ = ["InboxWatcher", "Intake", "Labeller", "Outcome", "batch_id_of", "list_batches"]
