"""Secure tensor wire format: per-client X25519 + HKDF keys, AES-256-GCM envelopes, and a pickle-free codec.

Shared by the client agent and the worker; imports neither FastAPI, SQLAlchemy nor Celery.

What crosses the wire
    Per step and client: h0 (`activations`, client → server), h1 (`activations_result`), dL/dh1
    (`gradients`, client → server), dL/dh0 (`gradients_result`); per round: client-block adapter weights
    (`adapters_up`) and their FedAvg (`adapters_down`); for local evaluation, forward only: h0 of an eval
    batch (`eval_activations`, client → server) and its h1 (`eval_result`). A single tensor is raw
    little-endian bytes whose dtype and shape live in the authenticated envelope header; tensor dicts (h0
    with its attention mask, adapters) are safetensors whose header we validate before safetensors reads
    it (`codec`, `tensor_envelope`). Nothing is ever unpickled.

Keys (`keys`)
    At enrollment the client agent generates an X25519 key pair; the private key is written 0600
    (atomically) and never leaves the client; only its public half (raw 32 bytes, base64) goes to the
    control plane. The server side holds a fresh X25519 key pair per job (made when the job opens), whose
    private half the workers read from a 0600 file and whose public half the control plane publishes to
    the job's clients; jobs from before per-job keys use the deployment's key pair. The job's private key
    is deleted a retention period after the job ended, so a later server compromise cannot decrypt that
    job's recorded traffic, and a leaked job key exposes no other job. Both sides compute the same X25519
    secret and expand it with HKDF-SHA256 (salt = SHA-256 of the label and both public keys; info = label,
    job id, client id, direction, each length-prefixed) into one AES-256 key per (job, client, direction).
    Different jobs, clients and directions get independent keys: a leaked job key reveals nothing of another
    job, and a server reply cannot be reflected back to the server as a client message because each
    direction has its own key and exactly one sender.

Envelope (`envelope`, torch-free; tensors go in and out through `tensor_envelope`)
    header (job, round, step, client, direction, sequence, format, dtype, shape, wire dtype, payload and
    chunk sizes, 32-byte random salt, version) as canonical JSON, authenticated as AES-GCM associated
    data (visible on the path, but any change fails authentication); then the payload in chunks of at
    most 1 GiB (below the 2^31-1 bytes one AES-GCM call takes), each `nonce | ciphertext | tag`.

Nonce design
    Each message is sealed under its own subkey, HKDF-SHA256(direction key, salt = the header's random
    salt, info = SHA-256 of the header bytes), and chunk i uses nonce i under it. No (key, nonce) pair can
    repeat without two messages drawing the same 256-bit salt, so nonce safety needs no state at all: the
    server is distributed (several worker replicas, restarts, a retried step recomputes the reply to the
    same request) and a per-key counter there would need a shared, crash-consistent store on the hot
    path; here two replicas sealing the identical header still use different subkeys. The client side
    uses the same scheme (one code path, no counter to lose in a crash or a restored VM snapshot). The
    cost is one HKDF per message (microseconds).

Sequence numbers and replay (`sequence`)
    Sequence numbers are for ordering and replay, not for nonces. The client draws them from a
    `SequenceCounter` persisted in its state dir, reserving blocks ahead of use, so after a crash it
    resumes above anything it may have sent. A server reply carries the sequence of the request it answers
    (`adapters_down` carries the round), so a retried step yields a reply the client accepts at most once.
    Receivers keep a `ReplayGuard` (or the backend's shared-storage equivalent, see `SequenceGuard`) that
    accepts a message only if its sequence is strictly above the last accepted one of its (job, client,
    direction), and only after it authenticated. A duplicate upload therefore has one effect: the second
    copy gets `ReplayError` (HTTP 409), which an agent retrying an upload reads as "already delivered".

Protects against
    Peer clients and anyone on the path (or with access to Redis / the job store, which hold only
    ciphertext) reading or altering a client's tensors and adapters; replayed, reordered, truncated,
    extended, redirected (other job, client, direction, round or step) or reflected messages; hostile
    bytes: decoders check sizes before allocating, reject trailing bytes and never execute code.

Does not protect against
    The server itself: it decrypts and sees h0, h1 and the cut gradients by design (honest-but-curious
    model; how much text they leak is measured by the privacy audit, with optional noise as defence).
    Metadata: job and client ids, shapes, sizes and timing are authenticated but not hidden (TLS hides
    them from the path). A stolen client private key or server private key exposes that key pair's
    channels, past and future (no forward secrecy within one key pair's life: a server key stolen while
    its job runs, or within its retention, exposes that job; per-job keys bound it to the one job). A
    control plane that publishes a substituted public key (compare `public_key_fingerprint` out of band if
    that is in your threat model). Denial of service (dropping or delaying messages). The
    precision lost by a float16/bfloat16 wire dtype is a training effect, not a security one.
"""

import importlib

# Lazy re-exports: `flglm.wire.keys`, `flglm.wire.errors` and the bytes-level `flglm.wire.envelope` stay
# importable without torch (the control plane needs keys, not tensors); `from flglm.wire import seal_tensor`
# still works.
_EXPORTS = {
    "AuthenticationError": "errors",
    "ChannelKeys": "keys",
    "ClientKeyPair": "keys",
    "DecodeError": "errors",
    "Direction": "directions",
    "EnvelopeHeader": "envelope",
    "EnvelopeMismatchError": "errors",
    "InsecureKeyFileError": "errors",
    "KeyFormatError": "errors",
    "PayloadTooLargeError": "errors",
    "ReplayError": "errors",
    "ReplayGuard": "sequence",
    "Sender": "directions",
    "SequenceCounter": "sequence",
    "SequenceGuard": "sequence",
    "UnexpectedTensorError": "errors",
    "WireError": "errors",
    "cast_for_wire": "codec",
    "cast_from_wire": "codec",
    "decode_tensors": "codec",
    "derive_channel_keys": "keys",
    "encode_tensors": "codec",
    "generate_private_key": "keys",
    "load_private_key": "keys",
    "open_envelope": "envelope",
    "open_tensor": "tensor_envelope",
    "open_tensors": "tensor_envelope",
    "parse_wire_dtype": "codec",
    "public_key_fingerprint": "keys",
    "public_key_from_b64": "keys",
    "public_key_to_b64": "keys",
    "save_private_key": "keys",
    "seal": "envelope",
    "seal_tensor": "tensor_envelope",
    "seal_tensors": "tensor_envelope",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"flglm.wire.{_EXPORTS[name]}"), name)
