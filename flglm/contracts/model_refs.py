"""What a model ref may look like, checked where a job enters (torch-free): `check_model_ref`.

The backend cannot load a model (it has no torch) nor see the agents' and workers' disks, so it refuses
only what can never load anywhere: a `tiny:` ref of an unknown architecture or with a bad seed, and strings
that are neither a built-in name, an absolute path nor a Hugging Face hub id. Near misses get a "did you
mean".
`flglm.models.resolve_model_ref` is what loads them, on the agents and workers.
"""

from __future__ import annotations

import difflib
import re

# The tiny architectures (`flglm.tiny_models` builds them; a test holds the two lists equal).
TINY_ARCHITECTURE_NAMES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3", "glm", "gemma2", "gpt2")
BUILT_IN_REFS: tuple[str, ...] = ("smollm2-135m", "smollm2-135m-instruct")
# A hub id: `name` or `org/name` of letters, digits, `-`, `_`, `.` (what the hub accepts).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?$")


def check_model_ref(ref: str) -> str:
    """`ref` when it can name a model; else a ValueError that says what refs look like and the nearest one."""
    if ref.startswith("tiny:"):
        _, arch, *rest = ref.split(":")
        known = [f"tiny:{name}" for name in TINY_ARCHITECTURE_NAMES]
        if arch not in TINY_ARCHITECTURE_NAMES:
            raise ValueError(f"unknown tiny architecture {arch!r}{_nearest(ref, known)}; one of {known}")
        if len(rest) > 1 or (rest and not (rest[0].isdigit() and len(rest[0]) <= 9)):
            raise ValueError(f"bad tiny model ref {ref!r}: expected tiny:<arch>[:seed], seed a small integer")
        return ref
    if ref.lower() in BUILT_IN_REFS or ref.startswith("/"):
        return ref
    if ref.startswith(("~", "./", "../")):
        raise ValueError(
            f"model directory {ref!r} must be an absolute path: agents and workers each read it on their disk"
        )
    if not _HUB_ID.match(ref):
        raise ValueError(
            f"model ref {ref!r}{_nearest(ref.lower(), list(BUILT_IN_REFS))} is none of: tiny:<arch>[:seed], "
            f"{BUILT_IN_REFS[0]}, an absolute directory path, a Hugging Face hub id (org/name) in the local "
            "cache"
        )
    near = _nearest(ref.lower(), list(BUILT_IN_REFS))
    if near and ref.lower() not in BUILT_IN_REFS and "/" not in ref:
        raise ValueError(f"model ref {ref!r} is not a built-in model{near}")
    return ref


def _nearest(value: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(value, choices, n=1, cutoff=0.75)
    return f"; did you mean {close[0]}?" if close else ""
