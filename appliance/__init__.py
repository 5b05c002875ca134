"""Whisper appliance: self-hosted speech-to-text with a browser UI, live speech and an API."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("whisper-appliance")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
