"""The alert lifecycle: the engine, the recipient log, authority, schedules, CAP, statistics, settings."""
