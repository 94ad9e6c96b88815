"""The long-running service: supervisor, schedule, training child, systemd integration."""
