"""Typed errors of the wire format; every one is a `WireError` (a `ValueError`) carrying its HTTP status."""

from __future__ import annotations


class WireError(ValueError):
    """Base of every wire-format failure; `http_status` lets the backend map them in one place."""

    http_status: int = 400


class DecodeError(WireError):
    """Bytes that are not a well-formed tensor, tensor dict or envelope (truncated, trailing, bad header)."""


class PayloadTooLargeError(DecodeError):
    """A header claims (or a buffer holds) more bytes than the receiver's `max_bytes` allows."""

    http_status = 413


class UnexpectedTensorError(DecodeError):
    """A well-formed tensor whose dtype, shape or names differ from what the receiver expected."""


class AuthenticationError(WireError):
    """AES-GCM tag check failed: wrong key, wrong job/client/direction, or any bit of the message altered."""


class EnvelopeMismatchError(AuthenticationError):
    """An authentic-looking header addressed to another job, client, direction, round or step."""


class ReplayError(WireError):
    """A sequence number not strictly above the last accepted one: a replay, a duplicate or a reordering."""

    http_status = 409


class KeyFormatError(WireError):
    """A public or private key that cannot be parsed (bad base64, wrong length or type, low-order point)."""


class InsecureKeyFileError(KeyFormatError):
    """A private-key file readable or writable by group or others: refused rather than trusted."""
