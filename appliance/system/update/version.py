"""Release versions: one parser and one order (PEP 440, `packaging.version`) for the updater,
the release builder, the request spool and the admin panel's update check.

pip installs a release as `whisper-appliance==<version>`, so every usable version is a PEP 440
version anyway: 1.2.0 > 1.2.0rc1, 1.2.0+update1 > 1.2.0, `v1.10` > `1.9.9`.
"""

from __future__ import annotations

import re

from packaging.version import InvalidVersion, Version

from appliance.exceptions import ApplianceError

# a version that is also a safe directory name under releases/: no '/', no '..'
_NAME = re.compile(r"^[0-9][0-9A-Za-z.+-]{0,60}$")


class VersionError(ApplianceError, ValueError):
    """Not a version number."""

    status, code = 400, "invalid_version"


def version_key(text: str) -> Version:
    """The sort key of a version number; raises VersionError for anything else."""
    try:
        return Version(text.strip())
    except InvalidVersion:
        raise VersionError(f"not a version number: {text[:60]!r}") from None


def release_name_ok(name: object) -> bool:
    """A version-shaped directory name: no '/', no '..', nothing a path could be made of."""
    return isinstance(name, str) and bool(_NAME.match(name)) and ".." not in name
