"""The `versions:` section: how a new version is judged before `latest` moves to it (docs/trust.md).

Kept apart from config.py so that file stays readable; config.py puts it in DaemonConfig. Per-adapter
overridable (config/adapters/<name>.yaml), so each adapter has its own probes and standing eval file.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator


def _not_bool(v):
    if isinstance(v, bool):
        raise ValueError("must be a number, not true/false")
    return v


Fraction = Annotated[float, BeforeValidator(_not_bool), Field(ge=0, le=0.9)]


class ProbeConfig(BaseModel):
    """A prompt asked (greedy) of the new version and of `latest` after training; answers go into metadata."""

    model_config = ConfigDict(extra="forbid")

    prompt: Annotated[str, Field(min_length=1, max_length=4000)]
    expect: Annotated[str, Field(min_length=1)] | None = None  # the answer must contain this (case-insensitive)
    must_not_contain: Annotated[str, Field(min_length=1)] | None = None  # ... and must not contain this
    required: bool = False  # a failed required probe holds the version (unless promotion: always)

    @model_validator(mode="after")
    def _checkable(self):
        if self.required and self.expect is None and self.must_not_contain is None:
            raise ValueError("a required probe needs `expect` or `must_not_contain` (something to check)")
        return self


class VersionsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # always: every new version becomes `latest`; not_worse: only if its standing-set eval loss is at most
    # (1 + tolerance) x latest's; better: only if it is at most (1 - tolerance) x latest's (and lower).
    promotion: Literal["always", "not_worse", "better"] = "not_worse"
    tolerance: Annotated[float, BeforeValidator(_not_bool), Field(ge=0, le=1)] = 0.02
    # A JSONL file (any training format) every version of the adapter is measured on; relative to the config
    # file naming it. null: the adapter's eval pool, built from each job's held-out split.
    eval_file: str | None = None
    eval_pool_max_examples: Annotated[int, BeforeValidator(_not_bool), Field(ge=0, le=100000)] = 200
    # continue mode: this share of each step's examples comes from the adapter's earlier accepted files.
    replay_fraction: Fraction = 0.2
    probes: Annotated[list[ProbeConfig], Field(max_length=50)] = []
    probe_max_new_tokens: Annotated[int, BeforeValidator(_not_bool), Field(ge=1, le=1024)] = 48
