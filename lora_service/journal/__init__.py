"""The event journal: append-only, hash-chained, with projections kept in step."""

from lora_service.journal.events import EVENT_TYPES, Event
from lora_service.journal.sqlite import Expect, Journal, JournalError, StaleDecision, StoredEvent

__all__ = [
    "EVENT_TYPES", "Event", "Expect", "Journal", "JournalError", "StaleDecision", "StoredEvent",
]
