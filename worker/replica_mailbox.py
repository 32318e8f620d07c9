"""A replica's mailbox: what it may take, its clients' channel keys, opening uploads, publishing results.

Everything here is one replica's view of the blob store for the messages of its own clients. It holds no
lock of its own: the replica calls it while it holds its lock (or from its constructor), one task at a time.
The replay guard is the replica's (it is checkpointed and restored with it), so it is passed per call.
"""

from __future__ import annotations

import logging

import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from flglm.contracts.blob_store import BlobStore, PutOutcome
from flglm.contracts.refusals import ForeignClient, MissingMessage, ReplicaMisrouted
from flglm.step_messages import PayloadLimits, open_activations, open_hidden, rejection_from_wire, seal_hidden
from flglm.step_protocol import MessageDirection, MessageRef, WorkerJobSpec
from flglm.wire.errors import WireError
from flglm.wire.keys import ChannelKeys, derive_channel_keys, public_key_from_b64
from flglm.wire.sequence import ReplayGuard

log = logging.getLogger(__name__)


class ReplicaMailbox:
    """The messages of the clients of replica `replica` of `spec`'s job, in `store`."""

    def __init__(
        self,
        spec: WorkerJobSpec,
        replica: int,
        store: BlobStore,
        server_private_key: X25519PrivateKey,
        limits: PayloadLimits,
        wire_dtype: torch.dtype,
    ) -> None:
        self.spec, self.replica, self.store = spec, replica, store
        self.clients = spec.replica_clients(replica)
        self.limits, self.wire_dtype = limits, wire_dtype
        self._server_private_key = server_private_key
        self._keys: dict[int, ChannelKeys] = {}

    def check_addressed(self, ref: MessageRef, direction: MessageDirection) -> None:
        """Refuse a message of another job or direction, or of a client this replica does not serve."""
        if ref.job_id != self.spec.job_id:
            raise ReplicaMisrouted(f"message of job {ref.job_id} reached job {self.spec.job_id}")
        if ref.direction is not direction:
            raise ReplicaMisrouted(f"a {ref.direction.value} message reached the {direction.value} task")
        if ref.client_id not in self.spec.client_ids():
            raise ForeignClient(f"client {ref.client_id} is not a client of job {self.spec.job_id}")
        if ref.client_id not in self.clients:
            raise ReplicaMisrouted(
                f"client {ref.client_id} is served by replica {self.spec.replica_of(ref.client_id)}, "
                f"not {self.replica}"
            )

    def channel(self, client_id: int) -> ChannelKeys:
        """The keys of the channel with `client_id`, derived once."""
        if client_id not in self._keys:
            public = public_key_from_b64(self.spec.public_key_of(client_id))
            self._keys[client_id] = derive_channel_keys(
                self._server_private_key, public, str(self.spec.job_id), str(client_id)
            )
        return self._keys[client_id]

    def upload(self, ref: MessageRef) -> bytes:
        """The stored bytes of an upload, or MissingMessage."""
        blob = self.store.get(ref.blob_key())
        if blob is None:
            raise MissingMessage(f"no upload at {ref.blob_key()} (never sent, or expired)")
        return blob

    def open_forward(
        self, ref: MessageRef, blob: bytes, guard: ReplayGuard
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Open an (eval_)activations upload: (hidden (batch, seq, hidden), mask (batch, seq)); wire errors
        become the engine's typed refusals."""
        try:
            return open_activations(self.channel(ref.client_id), ref, blob, self.limits, guard)
        except WireError as exc:
            raise rejection_from_wire(exc) from None

    def open_gradients(
        self, ref: MessageRef, blob: bytes, expected_shape: tuple[int, ...], guard: ReplayGuard
    ) -> torch.Tensor:
        """Open a gradients upload of `expected_shape` (batch, seq, hidden); wire errors become refusals."""
        try:
            return open_hidden(self.channel(ref.client_id), ref, blob, self.limits, expected_shape, guard)
        except WireError as exc:
            raise rejection_from_wire(exc) from None

    def publish(self, ref: MessageRef, tensor: torch.Tensor) -> None:
        """Seal `tensor` (batch, seq, hidden) for `ref`'s client and store it once; the first one stands."""
        sealed = seal_hidden(self.channel(ref.client_id), ref, tensor.detach().cpu(), self.wire_dtype)
        outcome = self.store.put_if_absent(ref.blob_key(), sealed, self.spec.blob_ttl_s)
        if outcome is PutOutcome.conflict:
            # Results are sealed with a fresh salt, so a recomputed result never equals the stored bytes:
            # the first published result stands, and the agent reads only that one.
            log.info(
                "replica %s: result %s already published; keeping the first", self.replica, ref.blob_key()
            )
