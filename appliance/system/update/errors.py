"""What goes wrong in the updater: refused before anything changed, or failed after a switch."""

from appliance.exceptions import ApplianceError


class UpdateRefused(ApplianceError):
    """Refused before anything changed."""

    status, code = 409, "update_refused"


class UpdateFailed(ApplianceError):
    """A step after the switch failed (the caller rolls back)."""

    status, code = 500, "update_failed"


class UnsafeDataFile(ApplianceError, OSError):
    """A file of the service user's that root must not open: a link, a hard link, not a file."""

    status, code = 500, "unsafe_data_file"
