"""Bytes envelopes: round trips (empty, chunked), rejection of tampering, replay and wrong keys; no torch."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from flglm.wire.directions import Direction
from flglm.wire.envelope import (
    AEAD_MAX_BYTES,
    NONCE_BYTES,
    TAG_BYTES,
    EnvelopeHeader,
    open_envelope,
    read_header,
    seal,
)
from flglm.wire.errors import (
    AuthenticationError,
    DecodeError,
    EnvelopeMismatchError,
    PayloadTooLargeError,
    ReplayError,
    WireError,
)
from flglm.wire.keys import ChannelKeys, derive_channel_keys, generate_private_key
from flglm.wire.sequence import ReplayGuard, SequenceCounter

SERVER = generate_private_key()
CLIENT_A = generate_private_key()
CLIENT_B = generate_private_key()


def keys_for(job: str = "job-1", client: str = "client-a", private=CLIENT_A) -> ChannelKeys:  # type: ignore[no-untyped-def]
    return derive_channel_keys(private, SERVER.public_key(), job, client)


def header_for(
    direction: Direction = Direction.activations,
    sequence: int = 1,
    job: str = "job-1",
    client: str = "client-a",
) -> EnvelopeHeader:
    return EnvelopeHeader(
        job_id=job, round=2, step=7, client_id=client, direction=direction, sequence=sequence
    )


def open_a(
    data: bytes | bytearray, keys: ChannelKeys | None = None, **kwargs: object
) -> tuple[EnvelopeHeader, bytearray]:
    options: dict = {
        "expected_job": "job-1",
        "expected_client": "client-a",
        "expected_direction": Direction.activations,
    } | kwargs
    return open_envelope(keys or keys_for(), data, **options)


def test_round_trip_of_bytes_and_of_an_empty_payload() -> None:
    keys = keys_for()
    for payload in (b"hello hidden states", b""):
        header, opened = open_a(seal(keys, header_for(), payload), expected_round=2, expected_step=7)
        assert bytes(opened) == payload
        assert (header.job_id, header.round, header.step, header.sequence) == ("job-1", 2, 7, 1)
        assert header.payload_bytes == len(payload) and header.chunk_count == 1


@pytest.mark.parametrize("size", [0, 1, 63, 64, 65, 1000])
def test_chunked_round_trip_with_a_synthetic_chunk_size(size: int) -> None:
    payload = bytes(range(256)) * 4
    payload = payload[:size]
    sealed = seal(keys_for(), header_for(), payload, chunk_bytes=64)
    header, opened = open_a(sealed)
    assert bytes(opened) == payload
    assert header.chunk_count == max(1, -(-size // 64))
    assert len(sealed) == len(read_header(sealed)[1]) + 9 + size + header.chunk_count * (
        NONCE_BYTES + TAG_BYTES
    )


def test_the_default_chunk_size_respects_the_aead_limit() -> None:
    header = EnvelopeHeader(
        job_id="j", round=0, step=0, client_id="c", direction=Direction.gradients, sequence=0
    )
    assert header.chunk_bytes <= AEAD_MAX_BYTES
    with pytest.raises(WireError, match="chunk_bytes"):
        seal(keys_for("j", "c"), header, b"x", chunk_bytes=AEAD_MAX_BYTES + 1)


@pytest.mark.slow
def test_a_payload_over_2_gib_is_chunked_and_round_trips() -> None:
    size = 2**31 + 1000  # over the AEAD limit, with the real default chunk size
    payload = bytearray(size)
    payload[0], payload[2**30], payload[-1] = 1, 2, 3
    sealed = seal(keys_for(), header_for(), payload)
    del payload
    header, opened = open_a(sealed, max_payload_bytes=2**32)
    assert header.chunk_count == 3
    assert len(opened) == size
    assert (opened[0], opened[2**30], opened[-1], opened[12345]) == (1, 2, 3, 0)


def test_flipping_any_bit_anywhere_is_rejected() -> None:
    # Three chunks, so nonces, ciphertexts and tags of first, middle and last chunk are all covered.
    sealed = bytes(seal(keys_for(), header_for(), bytes(range(40)), chunk_bytes=16))
    _, header_bytes = read_header(sealed)
    body_start = 9 + len(header_bytes)
    assert bytes(open_a(sealed)[1]) == bytes(range(40))
    for byte_index in range(len(sealed)):
        for bit in range(8):
            tampered = bytearray(sealed)
            tampered[byte_index] ^= 1 << bit
            with pytest.raises(WireError) as info:
                open_a(tampered)
            if byte_index >= body_start:
                # Nonce, ciphertext or tag: must fail as authentication, never decode anything.
                assert isinstance(info.value, AuthenticationError), (byte_index, bit, info.value)


def test_a_rewritten_header_fails_authentication() -> None:
    """A well-formed header edit (e.g. another step or sequence) is exactly what the AEAD data prevents."""
    sealed = bytes(seal(keys_for(), header_for(sequence=5), b"payload"))
    header, header_bytes = read_header(sealed)
    for change in ({"step": 8}, {"sequence": 6}, {"round": 3}):
        forged = dataclasses.replace(header, **change).to_bytes()  # type: ignore[arg-type]
        assert len(forged) == len(header_bytes)
        with pytest.raises(AuthenticationError):
            open_a(sealed.replace(header_bytes, forged))


def test_replayed_and_older_messages_are_rejected() -> None:
    keys, guard = keys_for(), ReplayGuard()
    first = seal(keys, header_for(sequence=10), b"a")
    older = seal(keys, header_for(sequence=9), b"b")
    newer = seal(keys, header_for(sequence=11), b"c")
    open_a(first, replay_guard=guard)
    with pytest.raises(ReplayError, match="replayed or reordered") as info:
        open_a(first, replay_guard=guard)
    assert info.value.http_status == 409
    with pytest.raises(ReplayError):
        open_a(older, replay_guard=guard)
    assert bytes(open_a(newer, replay_guard=guard)[1]) == b"c"
    # Streams are per (job, client, direction): sequence 1 on another direction is fine.
    gradients = seal(keys, header_for(Direction.gradients, sequence=1), b"g")
    open_a(gradients, replay_guard=guard, expected_direction=Direction.gradients)


def test_a_message_that_fails_authentication_does_not_advance_the_guard() -> None:
    keys, guard = keys_for(), ReplayGuard()
    forged = bytearray(seal(keys, header_for(sequence=1000), b"x"))
    forged[-1] ^= 1
    with pytest.raises(AuthenticationError):
        open_a(forged, replay_guard=guard)
    assert guard.last_sequence("job-1", "client-a", Direction.activations) is None
    open_a(seal(keys, header_for(sequence=1), b"ok"), replay_guard=guard)


def test_client_a_message_cannot_be_opened_with_client_b_keys() -> None:
    sealed = seal(keys_for(), header_for(), b"client a's hidden states")
    b_keys = keys_for(client="client-b", private=CLIENT_B)
    with pytest.raises(EnvelopeMismatchError):
        open_a(sealed, keys=b_keys)
    with pytest.raises(EnvelopeMismatchError, match="client_id"):
        open_a(sealed, keys=b_keys, expected_client="client-b")
    # Even relabelled as client-a's channel, B's key material does not open A's message.
    relabelled = ChannelKeys(job_id="job-1", client_id="client-a", keys=b_keys.keys)
    with pytest.raises(AuthenticationError) as info:
        open_a(sealed, keys=relabelled)
    assert type(info.value) is AuthenticationError


def test_a_job_1_key_cannot_open_job_2_traffic() -> None:
    job2_keys = keys_for(job="job-2")
    sealed = seal(job2_keys, header_for(job="job-2"), b"job two")
    job1_as_job2 = ChannelKeys(job_id="job-2", client_id="client-a", keys=keys_for(job="job-1").keys)
    with pytest.raises(AuthenticationError) as info:
        open_a(sealed, keys=job1_as_job2, expected_job="job-2")
    assert type(info.value) is AuthenticationError
    with pytest.raises(EnvelopeMismatchError):
        open_a(sealed, keys=keys_for(job="job-1"))


def test_a_message_is_only_accepted_for_its_own_direction_round_and_step() -> None:
    sealed = seal(keys_for(), header_for(Direction.activations_result), b"h1")
    with pytest.raises(EnvelopeMismatchError, match="direction"):
        open_a(sealed)  # a server reply presented as a client upload
    key_swapped = ChannelKeys(
        job_id="job-1",
        client_id="client-a",
        keys={**keys_for().keys, Direction.activations: keys_for().key_for(Direction.gradients)},
    )
    with pytest.raises(AuthenticationError):
        open_a(seal(keys_for(), header_for(Direction.gradients), b"g"), keys=key_swapped)
    sealed = seal(keys_for(), header_for(), b"h0")
    with pytest.raises(EnvelopeMismatchError, match="round"):
        open_a(sealed, expected_round=3)
    with pytest.raises(EnvelopeMismatchError, match="step"):
        open_a(sealed, expected_step=8)


def test_sealing_refuses_keys_of_another_channel() -> None:
    with pytest.raises(WireError, match="keys are for"):
        seal(keys_for(job="job-2"), header_for(), b"x")


def test_identical_messages_get_fresh_subkeys_so_no_key_nonce_pair_repeats() -> None:
    """A retried step (or two replicas) sealing the same header and payload must not reuse (key, nonce)."""
    keys, payload = keys_for(), bytes(100)
    first, second = seal(keys, header_for(), payload), seal(keys, header_for(), payload)
    (h1, raw1), (h2, raw2) = read_header(first), read_header(second)
    assert h1.salt != h2.salt
    body1, body2 = first[9 + len(raw1) :], second[9 + len(raw2) :]
    assert body1[:NONCE_BYTES] == body2[:NONCE_BYTES]  # same counter nonce ...
    assert body1[NONCE_BYTES:] != body2[NONCE_BYTES:]  # ... under a different subkey
    assert bytes(open_a(second)[1]) == payload


def test_truncation_trailing_bytes_and_size_limits() -> None:
    sealed = bytes(seal(keys_for(), header_for(), bytes(100), chunk_bytes=40))
    with pytest.raises(DecodeError, match="truncated"):
        open_a(sealed[:-1])
    with pytest.raises(DecodeError, match="trailing"):
        open_a(sealed + b"\x00")
    with pytest.raises(DecodeError, match="truncated"):
        open_a(sealed[: -(40 + NONCE_BYTES + TAG_BYTES)])  # a whole chunk dropped
    with pytest.raises(PayloadTooLargeError):
        open_a(sealed, max_payload_bytes=99)
    with pytest.raises(DecodeError, match="magic"):
        open_a(b"GARBAGE" + sealed)


def test_header_parsing_is_strict() -> None:
    header, raw = read_header(seal(keys_for(), header_for(), b"x"))
    fields = json.loads(raw)
    for change in (
        {"extra": 1},
        {"round": -1},
        {"round": True},
        {"direction": "sideways"},
        {"dtype": "float64"},
    ):
        with pytest.raises(DecodeError):
            EnvelopeHeader.from_bytes(json.dumps(fields | change).encode())
    with pytest.raises(DecodeError, match="duplicate"):
        EnvelopeHeader.from_bytes(raw[:-1] + b',"round":2}')
    assert EnvelopeHeader.from_bytes(header.to_bytes()) == header


def test_replay_guard_state_survives_a_restart(tmp_path: Path) -> None:
    keys, guard = keys_for(), ReplayGuard()
    open_a(seal(keys, header_for(sequence=5), b"x"), replay_guard=guard)
    guard.save(tmp_path / "guard.json")
    restored = ReplayGuard.load(tmp_path / "guard.json")
    with pytest.raises(ReplayError):
        open_a(seal(keys, header_for(sequence=5), b"x"), replay_guard=restored)
    restored.forget_job("job-1")
    assert restored.state() == []
    assert ReplayGuard.load(tmp_path / "missing.json").state() == []
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DecodeError):
        ReplayGuard.load(tmp_path / "bad.json")


def test_sequence_counter_never_repeats_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "sequence.json"
    counter = SequenceCounter(path, reserve=4)
    issued = [counter.next() for _ in range(6)]
    assert issued == sorted(set(issued))
    # The reservation on disk always covers everything handed out, before it is handed out.
    assert json.loads(path.read_text())["reserved_until"] > issued[-1]
    restarted = SequenceCounter(path, reserve=4)  # simulates a crash right after the sixth message
    assert restarted.next() > issued[-1]
    path.write_text('{"reserved_until": -3}')
    with pytest.raises(DecodeError, match="invalid"):
        SequenceCounter(path)


def test_the_bytes_envelope_seals_and_opens_without_importing_torch() -> None:
    """Only the tensor wrappers (`flglm.wire.tensor_envelope`) need torch; the envelope itself does not."""
    script = (
        "import sys\n"
        "from flglm.wire.directions import Direction\n"
        "from flglm.wire.envelope import EnvelopeHeader, open_envelope, seal\n"
        "from flglm.wire.keys import derive_channel_keys, generate_private_key\n"
        "keys = derive_channel_keys(generate_private_key(), generate_private_key().public_key(), 'j', 'c')\n"
        "header = EnvelopeHeader(job_id='j', round=0, step=0, client_id='c', direction='gradients',\n"
        "                        sequence=1, format='tensor', dtype='float32', shape=(2, 3),\n"
        "                        wire_dtype='bfloat16')\n"
        "opened = open_envelope(keys, seal(keys, header, b'x' * 12), expected_job='j', expected_client='c',\n"
        "                       expected_direction=Direction.gradients)\n"
        "assert bytes(opened[1]) == b'x' * 12 and opened[0].shape == (2, 3)\n"
        "assert 'torch' not in sys.modules, 'the bytes envelope imported torch'\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
