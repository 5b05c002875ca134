"""The pydantic-settings base of the service's settings (`appliance.system.config`) and the
updater's (`appliance.system.update.settings`).

Both read variables named exactly as documented (no prefix, case kept) through one
`EnvSettings.load`, and a bad value stops with one `ConfigError` that names the variable
(`UPDATER_KEEP: ...`), not a pydantic dump. It imports neither the web app nor the core, so the
updater (root, import-linter) may use it as the service does.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from pydantic import AliasChoices, Field, GetCoreSchemaHandler, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import CoreSchema, core_schema
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from appliance.exceptions import ConfigError

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SHOWN = 80  # characters of a refused value repeated in a message (values may be hostile)
MAX_LENGTH = 16384  # characters of one variable (the longest, ALLOWED_ORIGINS, needs < 9000)


def shown(value: object) -> str:
    """A refused value for an error message: quoted, escaped and cut to a readable length."""
    text = repr(value)
    return text if len(text) <= _SHOWN else f"{text[:_SHOWN]}...' ({len(str(value))} characters)"


@dataclass(frozen=True)
class Parse:
    """Field metadata: the rule that turns a variable's text into the field's value.

    Values given in code (`from_env(..., data_dir=path)`, an admin-panel JSON number) are not
    text: they skip the rule at load time and only get the field's type check; the admin panel
    calls the rule itself (`EnvSettings.rule`), which accepts both.
    """

    rule: Callable[[Any], Any]

    def __get_pydantic_core_schema__(
        self, source: type[Any], handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        def from_text(value: Any) -> Any:
            if not isinstance(value, str):
                return value
            if len(value) > MAX_LENGTH:
                raise ValueError(f"too long ({len(value)} characters, at most {MAX_LENGTH})")
            if _CONTROL.search(value):  # no setting has a use for them; a pasted file might
                raise ValueError(f"control characters are not allowed, got {shown(value)}")
            return self.rule(value)

        return core_schema.no_info_before_validator_function(from_text, handler(source))


def env_field(name: str, rule: Callable[[Any], Any] | None, default: Any, doc: str) -> Any:
    """A setting read from the variable `name`, parsed by `rule`, described by `doc`."""
    info: FieldInfo = Field(default, validation_alias=name, description=doc)
    if rule is not None:
        info.metadata.append(Parse(rule))
    return info


def _variables(info: FieldInfo) -> tuple[str, ...]:
    alias = info.validation_alias
    if isinstance(alias, str):
        return (alias,)
    if isinstance(alias, AliasChoices):
        return tuple(c for c in alias.choices if isinstance(c, str))
    return ()  # set in code only (not read from the environment)


# the environment `EnvSettings.load` reads (a test's mapping); None outside it: os.environ
_ENVIRON: ContextVar[Mapping[str, str] | None] = ContextVar("environ", default=None)


class _Environ(EnvSettingsSource):
    """pydantic-settings' environment source over a given mapping (os.environ or a test's),
    reduced to the variables the fields name (never a field's own name, such as data_dir)."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        names = {name for info in settings_cls.model_fields.values() for name in _variables(info)}
        self._environ = {key: value for key, value in environ.items() if key in names}
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {
            key: value
            for key, value in self._environ.items()
            if value != "" or not self.env_ignore_empty
        }


class EnvSettings(BaseSettings):
    """Settings from environment variables named as documented; see `load`."""

    model_config = SettingsConfigDict(
        case_sensitive=True,  # DATA_DIR, never data_dir
        validate_by_name=True,  # values given in code use the field names
        validate_by_alias=True,
        extra="ignore",  # the rest of the environment
        enable_decoding=False,  # comma lists, not JSON: each field's rule parses its text
    )
    # built in code (not by `load`): also read os.environ (True), or take only what it is given
    code_reads_environ: ClassVar[bool] = True

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # values given in code, then the environment; no .env file or secrets directory
        # (systemd's EnvironmentFile= is how the appliance is configured)
        environ = _ENVIRON.get()
        if environ is None:  # built in code, not by `load`
            if not cls.code_reads_environ:
                return (init_settings,)
            environ = os.environ
        return init_settings, _Environ(settings_cls, environ)

    @classmethod
    def variable(cls, field: str) -> str:
        """The environment variable of a field (its first one, if it has several)."""
        names = _variables(cls.model_fields[field]) if field in cls.model_fields else ()
        return names[0] if names else field

    @classmethod
    def rule(cls, field: str) -> Callable[[Any], Any]:
        """The one validation rule of a field, for code that re-validates the same value."""
        for item in cls.model_fields[field].metadata:
            if isinstance(item, Parse):
                return item.rule
        raise KeyError(f"{field} has no parse rule")

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None, /, **overrides: Any) -> Self:
        """Read the variables of `env` (default: os.environ); `overrides` (by field name) win.

        Raises ConfigError naming every bad variable, e.g. `HTTPS_PORT: expected a number ...`.
        """
        token = _ENVIRON.set(os.environ if env is None else env)
        try:
            return cls(**overrides)
        except ValidationError as exc:
            raise ConfigError(cls.explain(exc)) from None
        finally:
            _ENVIRON.reset(token)

    @classmethod
    def explain(cls, exc: ValidationError) -> str:
        """One line per refused variable, instead of pydantic's dump."""
        lines: list[str] = []
        for error in exc.errors(include_url=False):
            cause = (error.get("ctx") or {}).get("error")
            if isinstance(cause, ValueError):
                text = str(cause)  # a rule's own message; it shows the value
            else:
                text = f"{error['msg'][:1].lower()}{error['msg'][1:]}, got {shown(error['input'])}"
            loc = error["loc"]
            # a cross-field check names its variables itself
            lines.append(f"{cls.variable(str(loc[0]))}: {text}" if loc else text)
        return "; ".join(dict.fromkeys(lines))

    @classmethod
    def documentation(cls) -> list[tuple[str, str, str]]:
        """(variable, default, description) rows: the configuration reference is checked against
        them (docs/reference/configuration.md)."""
        rows = []
        for info in cls.model_fields.values():
            names = _variables(info)
            if not names:
                continue
            default = info.get_default(call_default_factory=True)
            if isinstance(default, tuple):
                text = ",".join(map(str, default))
            elif isinstance(default, bool):
                text = str(default).lower()
            else:
                text = "" if default is None else str(default)
            rows.append((names[0], text, info.description or ""))
        return rows
