"""The `hooks:` section: commands and HTTP POSTs run when a version is published or held, or a job fails.

Kept apart from config.py so that file stays readable; config.py puts the list in DaemonConfig. What runs
them is daemon/supervisor/hooks.py; docs/operations.md has copy-paste examples.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator


def _not_bool(v):
    if isinstance(v, bool):
        raise ValueError("must be a number, not true/false")
    return v


HookEvent = Literal["published", "held", "failed"]


class HookConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    on: Annotated[list[HookEvent], Field(min_length=1)]
    command: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)] | None = None  # argv, no shell
    url: Annotated[str, Field(pattern=r"^https?://")] | None = None  # POST of the event as JSON
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
