"""What a wire message carries (`Direction`) and which side sends it (`Sender`)."""

from __future__ import annotations

from enum import StrEnum


class Sender(StrEnum):
    """The side that seals a message; each direction has exactly one."""

    client = "client"
    server = "server"


class Direction(StrEnum):
    """Kind of message on one client's channel; each gets its own AES key, bound to one sender."""

    activations = "activations"  # h0 after the client's input block, client → server
    activations_result = "activations_result"  # h1 after the server's middle blocks, server → client
    gradients = "gradients"  # dL/dh1 from the client's output block, client → server
    gradients_result = "gradients_result"  # dL/dh0 from the server's backward, server → client
    adapters_up = "adapters_up"  # client-block adapter weights at round end, client → server
    adapters_down = "adapters_down"  # FedAvg result of the client adapters, server → client
    eval_activations = "eval_activations"  # h0 of a local-evaluation batch (forward only), client → server
    eval_result = "eval_result"  # h1 of that batch, computed without a graph, server → client

    @property
    def sender(self) -> Sender:
        """The only side allowed to seal this direction."""
        return Sender.client if self in _CLIENT_SENT else Sender.server


_CLIENT_SENT = frozenset(
    {Direction.activations, Direction.gradients, Direction.adapters_up, Direction.eval_activations}
)
