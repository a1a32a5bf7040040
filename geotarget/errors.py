"""The geotarget exception family.

Every failure a caller can provoke raises a subclass of :class:`GeotargetError`.
The subclasses also inherit from the matching built-in exception so that
callers who already catch ``ValueError`` or ``KeyError`` keep working.
"""


class GeotargetError(Exception):
    """Base class of every error geotarget raises on purpose."""


class InvalidInputError(GeotargetError, ValueError):
    """An argument or input column is malformed: NaN, out of range, wrong shape, naive datetime."""


class CorruptFileError(GeotargetError, ValueError):
    """A file on disk fails validation (bad header, wrong size, checksum mismatch)."""


class LineageError(CorruptFileError):
    """Files that may each be intact do not belong together: another store lineage, a generation
    older than one already used, or an index whose store was replaced."""


class UnknownAlertError(GeotargetError, KeyError):
    """No alert with that id exists."""

    def __str__(self):  # KeyError quotes its argument; keep messages readable
        return str(self.args[0]) if self.args else ""


class UnknownOfficerError(GeotargetError, KeyError):
    """No officer with that id is registered."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


class UnauthorizedError(GeotargetError, PermissionError):
    """The officer may not perform this action on this alert."""


class AlertStateError(GeotargetError):
    """The action is not valid in the alert's current state (e.g. closing twice with another outcome)."""


class UnknownPushError(GeotargetError, KeyError):
    """No push with that id exists."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


class ShardUnavailableError(GeotargetError, RuntimeError):
    """A shard of a ``ShardedIndex`` did not answer in time, or its Ray actor is gone for good."""


class SignatureError(GeotargetError, ValueError):
    """Key material cannot be used, or a signed CAP message does not verify against the trusted certificate."""


class RateLimitError(GeotargetError):
    """A report exceeds the per-officer or per-division rate limit of the settings."""


class UnknownDivisionError(GeotargetError, KeyError):
    """No administrative division with that code is registered."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


class LeaseLostError(GeotargetError):
    """An action or a write on a PostgreSQL recipient log by a standby (it does not hold the lease),
    or by a process whose lease was taken over by another (the fencing token no longer matches);
    nothing was written."""
