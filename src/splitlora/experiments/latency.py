"""A latency model: measured FLOPs and bytes of each training step -> simulated wall time.

Simulation runs every party on one machine, so its wall clock says nothing about a deployment in
which clients are edge devices, the main server is a data-centre GPU and the two talk over a WAN.
This module turns what a step *did* (FLOPs each party computed, bytes each message carried, measured
on a real step) into the time that step would take on such a deployment.

The model (every constant is a field of :class:`LatencyModel`):

* computing ``F`` FLOPs takes ``F / client_flops`` seconds on a client and ``F / server_flops`` on
  the main server (effective, i.e. achieved, FLOP/s, not the data-sheet peak);
* one message of ``n`` bytes takes ``message_latency_s + 8 n / uplink_bps`` seconds client -> server
  and ``message_latency_s + 8 n / downlink_bps`` back; every client has its own link, so messages of
  different clients overlap (the server's ingress is not the bottleneck);
* a step follows the algorithm's layout, as its trace records it (:meth:`LatencyModel.step_time`):

  - pooled data (``cen``): the server runs the whole step: ``F_whole / server_flops``
    (the data is assumed to be on the server already: the privacy-free upper bound);
  - whole-model clients (``fed``): every client runs its step in parallel: ``max_i F_i / client_flops``;
  - split (``splitlora`` and ``sl``): per client ``i`` (all clients at once; ``sl`` has one per step)
    ``fwd_i / client_flops``, the activations up, the server's part, the gradient down, then
    ``bwd_i / client_flops``. The server serves one client batch at a time, in client-id order
    (``server_mode: sequential``; with ``batched`` it waits for every client and runs once), so
    client ``i``'s server work starts at ``max(arrival_i, server free)``. The step ends when the
    last client's backward ends.
  - U-shape: between the server's forward and backward come one more round trip per client: h_(L-T)
    down, the client's tail (``tail_i / client_flops``), dL/dh_(L-T) up. The server stays with one
    client's batch through it (sequential), or waits for every tail (batched).
  - Synchronisation (FedAvg of adapters every I steps, or ``sl``'s hand-over of the client-side
    adapter) is appended: ``max_i up(u_i) + max_i down(d_i)`` over the clients that send/receive.

Step time is the sum of those; a run's simulated time is the sum over its steps. The defaults
describe an edge client with a few TFLOP/s of usable compute, one data-centre GPU as the server,
100 Mbit/s links each way and 20 ms per message.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from ..bench.trace import StepTrace


@dataclass(frozen=True)
class LatencyModel:
    """Effective compute of each side, link bandwidths and per-message latency (see module doc)."""

    client_flops: float = 4e12  # an edge client (a laptop/Jetson-class GPU) achieving 4 TFLOP/s
    server_flops: float = 100e12  # a data-centre GPU achieving 100 TFLOP/s
    uplink_bps: float = 100e6  # 100 Mbit/s client -> server
    downlink_bps: float = 100e6  # 100 Mbit/s server -> client
    message_latency_s: float = 0.02  # 20 ms per message, each way

    def __post_init__(self):
        for name in ("client_flops", "server_flops", "uplink_bps", "downlink_bps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 (got {getattr(self, name)})")
        if self.message_latency_s < 0:
            raise ValueError(f"message_latency_s must be >= 0 (got {self.message_latency_s})")

    def with_(self, **changes) -> "LatencyModel":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    # ---- primitives --------------------------------------------------------------------------
    def client_s(self, flops: float) -> float:
        return flops / self.client_flops

    def server_s(self, flops: float) -> float:
        return flops / self.server_flops

    def up_s(self, nbytes: int) -> float:
        """One message client -> server."""
        return self.message_latency_s + 8.0 * nbytes / self.uplink_bps

    def down_s(self, nbytes: int) -> float:
        """One message server -> client."""
        return self.message_latency_s + 8.0 * nbytes / self.downlink_bps

    # ---- one step ------------------------------------------------------------------------------
    def compute_time(self, step: StepTrace) -> float:
        """The step without its synchronisation phase."""
        if step.pooled:
            return self.server_s(step.server_whole_flops)
        if step.whole_clients:
            return max((self.client_s(c.whole_flops) for c in step.clients), default=0.0)
        return self._split_time(step)

    def sync_time(self, step: StepTrace) -> float:
        up = max((self.up_s(b) for b in step.sync_up_bytes if b > 0), default=0.0)
        down = max((self.down_s(b) for b in step.sync_down_bytes if b > 0), default=0.0)
        return up + down

    def step_time(self, step: StepTrace) -> float:
        return self.compute_time(step) + self.sync_time(step)

    def run_time(self, steps) -> float:
        return sum(self.step_time(s) for s in steps)

    def cumulative(self, steps) -> list[float]:
        """Simulated time at the end of each step."""
        out, total = [], 0.0
        for s in steps:
            total += self.step_time(s)
            out.append(total)
        return out

    def _split_time(self, step: StepTrace) -> float:
        clients = sorted(step.clients, key=lambda c: c.client)
        if not clients:
            return 0.0
        arrivals = [self.client_s(c.fwd_flops) + self.up_s(c.up_bytes) for c in clients]

        def tail(c) -> float:  # U-shape: h_(L-T) down, the client's tail, dL/dh_(L-T) up (else 0)
            if not step.u_shape:
                return 0.0
            return self.down_s(c.mid_down_bytes) + self.client_s(c.tail_flops) + self.up_s(c.mid_up_bytes)

        if step.batched_server:
            done = max(arrivals) + self.server_s(sum(c.server_flops for c in clients))
            if step.u_shape:
                done += max(tail(c) for c in clients) + self.server_s(sum(c.server_bwd_flops for c in clients))
            served = [done] * len(clients)
        else:
            served, free = [], 0.0
            for c, arrival in zip(clients, arrivals):  # the server takes batches in client-id order
                free = max(arrival, free) + self.server_s(c.server_flops) + tail(c) + self.server_s(c.server_bwd_flops)
                served.append(free)
        return max(t + self.down_s(c.down_bytes) + self.client_s(c.bwd_flops) for c, t in zip(clients, served))


def time_to_target(times: list[float], losses: list[float], target: float) -> float | None:
    """The first time at which ``losses`` (evaluated at ``times``) is at or below ``target``.

    Validation is only known where it was evaluated, so this is the first such point (no
    interpolation: an upper bound on the true crossing time). ``None`` when never reached.
    """
    for t, loss in zip(times, losses):
        if loss is not None and loss <= target:
            return t
    return None


# Scenarios reported next to the defaults (what changes when the edge client is weaker, or the link faster).
SCENARIOS: dict[str, LatencyModel] = {
    "default": LatencyModel(),
    "weak-client": LatencyModel(client_flops=0.5e12),
    "fast-link": LatencyModel(uplink_bps=1e9, downlink_bps=1e9, message_latency_s=0.005),
}
