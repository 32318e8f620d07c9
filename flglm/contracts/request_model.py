"""`StrictModel`, the base of every request body: unknown fields, NaN/Infinity and NUL characters refused."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator


def holds_nul(value: Any) -> bool:
    """Whether a NUL character hides in `value` (a string, or inside a dict, list or tuple)."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(holds_nul(k) or holds_nul(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(holds_nul(item) for item in value)
    return False


class StrictModel(BaseModel):
    """A request body: unknown fields, NaN/Infinity and NUL characters are refused (422 naming the field).

    NUL: PostgreSQL text cannot hold it (a 500 there, stored on SQLite); NaN/Infinity: they pass `gt`/`le`
    bounds unnoticed (NaN compares false) and read back as null."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _no_nul(cls, value: Any) -> Any:
        if holds_nul(value):
            raise ValueError("NUL characters are not allowed")
        return value
