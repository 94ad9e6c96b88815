"""Inbox intake: watch the inbox, wait for complete batches, check every file, store the good
ones content-addressed, journal the decision, move the folder out of the way.

Nothing is imported here: a command that only reads the batches view (`inbox.queries`) does
not pay for the intake's imports."""
