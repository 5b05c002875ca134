"""What goes wrong in the updater: refused before anything changed, or failed after a switch."""


class UpdateRefused(Exception):
    """Refused before anything changed."""


class UpdateFailed(Exception):
    """A step after the switch failed (the caller rolls back)."""


class UnsafeDataFile(OSError):
    """A file of the service user's that root must not open: a link, a hard link, not a file."""
