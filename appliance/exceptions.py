"""The one root of the appliance's own errors, for every layer (core, web, system).

An `ApplianceError` carries what a client is told: an HTTP `status`, a stable `code` and a
`message` for people. The web app renders any of them in one place
(`appliance.web.errors.register_error_handlers`) as `{"error": {"code", "message"}}`.

    raise ApplianceError(409, "model_not_available", "model 'x' is not on this appliance")
    class QueueFull(ApplianceError): status, code = 429, "queue_full"   # then: QueueFull("...")

An error that keeps the defaults (500, "internal_error") is not meant for clients: the handler
logs it and answers with a generic message, as for any unexpected exception.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, overload


class ApplianceError(Exception):
    status: int = 500
    code: str = "internal_error"

    @overload
    def __init__(self, message: str = ..., /) -> None: ...

    @overload
    def __init__(
        self, status: int, code: str, message: str, /, headers: Mapping[str, str] | None = None
    ) -> None: ...

    def __init__(self, *given: Any, headers: Mapping[str, str] | None = None) -> None:
        args = list(given)
        if len(args) == 4:  # APIError(status, code, message, headers)
            headers = args.pop()
        if len(args) == 3:
            self.status, self.code, message = int(args[0]), str(args[1]), str(args[2])
        elif len(args) == 1:
            message = str(args[0])
        elif not args:
            message = ""
        else:
            raise TypeError("ApplianceError(message) or ApplianceError(status, code, message)")
        super().__init__(*([message] if args else []))
        self.headers: dict[str, str] = dict(headers or {})

    @property
    def message(self) -> str:
        """What the client is told (the exception's text unless a subclass sets it)."""
        explicit: str | None = self.__dict__.get("_message")
        return explicit if explicit is not None else str(self)

    @message.setter
    def message(self, value: str) -> None:
        self.__dict__["_message"] = value

    @property
    def internal(self) -> bool:
        """Not meant for clients: rendered as a generic 500 and logged."""
        return self.status >= 500 and self.code == "internal_error"


class ConfigError(ApplianceError, ValueError):
    """A setting has a value the appliance cannot run with (every layer may raise it; the
    settings live in `appliance.system.config`, which re-exports it)."""
