"""The `hooks:` section: commands and HTTP POSTs run when a version is published or held, or a job fails.

Kept apart from config.py so that file stays readable; config.py puts the list in DaemonConfig. What runs
them is daemon/supervisor/hooks.py; docs/operations.md has copy-paste examples.
"""

from __future__ import annotations

from typing import Annotated, Literal

from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator


def _not_bool(v):
    if isinstance(v, bool):
        raise ValueError("must be a number, not true/false")
    return v


HookEvent = Literal["published", "held", "failed"]


def _url(v):
    """http(s), a host, no spaces or control characters: a URL that cannot be sent is refused at start, not at
    the first event."""
    if not isinstance(v, str):
        return v
    parts = urlsplit(v) if v.isprintable() and not any(c.isspace() for c in v) else None
    try:
        ok = parts is not None and parts.scheme in ("http", "https") and bool(parts.hostname) and (parts.port or 1)
    except ValueError:  # a port that is no number, or out of range
        ok = False
    if not ok:
        raise ValueError("must be an http:// or https:// URL with a host, e.g. http://127.0.0.1:9000/hook")
    return v


class HookConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _yaml_on(cls, data):
        # YAML 1.1 (PyYAML) reads a bare `on:` key as the boolean true, as GitHub Actions files know well.
        if isinstance(data, dict) and True in data and "on" not in data:
            data = {("on" if k is True else k): v for k, v in data.items()}
        return data

    on: Annotated[list[HookEvent], Field(min_length=1), AfterValidator(lambda v: list(dict.fromkeys(v)))]
    command: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)] | None = None  # argv, no shell
    url: Annotated[str, BeforeValidator(_url)] | None = None  # POST of the event as JSON
    secret_env: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] | None = None  # HMAC key's env variable
    timeout_seconds: Annotated[float, BeforeValidator(_not_bool), Field(ge=0.1, le=3600)] = 10.0
    retries: Annotated[int, BeforeValidator(_not_bool), Field(ge=0, le=10)] = 3

    @model_validator(mode="after")
    def _something_to_run(self):
        if self.command is None and self.url is None:
            raise ValueError("a hook needs a `command` (argv list), a `url`, or both")
        if self.secret_env is not None and self.url is None:
            raise ValueError("`secret_env` signs an HTTP POST: it needs a `url`")
        return self
