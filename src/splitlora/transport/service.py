"""The gRPC service: read a message (with a deadline), hand it to the grid, stream the answer back.

The handlers never touch a model or run a torch op (see :mod:`splitlora.transport.sessions`).
Authentication happens before they run (:class:`~splitlora.transport.auth.TokenInterceptor`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from concurrent import futures

import grpc

from ..config import ServeOptions
from ..errors import UserError
from . import splitlora_pb2 as pb
from . import splitlora_pb2_grpc as pb_grpc
from .auth import TokenInterceptor, caller
from .sessions import GrpcGrid, Refused
from .throttle import Throttled
from .wire import GRPC_FRAME_LIMIT, WireError, bytes_to_chunks, from_chunks, state_wire_bytes, to_chunks


log = logging.getLogger("splitlora.transport.server")

HELLO_LIMIT = 64 << 10
SERVICE = pb.DESCRIPTOR.services_by_name["SplitLoRA"].full_name  # splitlora.v2.SplitLoRA
_OVERHEAD = 256 << 10  # protobuf framing and tensor names on top of the tensor bytes


class Servicer(pb_grpc.SplitLoRAServicer):
    def __init__(self, grid: GrpcGrid, opts: ServeOptions):
        self.grid, self.opts = grid, opts
        self.throttled = Throttled(log)  # refusals: logged per client and cause at counts 1, 2, 4, 8, ...
        adapter = state_wire_bytes(grid.shapes)
        # The largest reply: activations (or a gradient), or an sl hand-over (adapter and two moments).
        self.exchange_limit = min(max(grid.limits.max_step_bytes(), 3 * adapter) + _OVERHEAD, opts.max_message_bytes)

    def Hello(self, request_iterator, context):
        name = caller(context)
        with self._slot(name, context):
            req, _ = self._read(request_iterator, pb.HelloRequest, HELLO_LIMIT, context, name)
            reply = self._call(lambda: self.grid.hello(name, req), context, name, "Hello")
        yield from to_chunks(reply)

    def Exchange(self, request_iterator, context):
        name = caller(context)
        with self._slot(name, context):
            msg, size = self._read(request_iterator, pb.ClientMessage, self.exchange_limit, context, name)
            data = self._call(lambda: self.grid.exchange(name, msg, size, context.is_active), context, name,
                              "Exchange")
        if data is not None:
            yield from bytes_to_chunks(data)

    def Leave(self, request_iterator, context):
        # Registered as stream-unary (see _handlers), though clients call it unary (the same bytes on
        # the wire): gRPC reads a unary request in a worker thread before the handler (or the token
        # check's refusal) runs, with no deadline, so a few half-sent Leave calls, even with a wrong
        # token, held every worker and froze the server (issue 11). Here the one ``Done`` is read
        # with ``read_timeout``, within the client's call slots.
        name = caller(context)
        with self._slot(name, context):
            with self._deadline(context):
                try:
                    request = next(request_iterator, None)
                except grpc.RpcError:  # cancelled: too slow, or the client went away
                    context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "message not received in time")
            if request is None:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "Leave: empty stream")
            self.grid.leave(name, request)
        return pb.Ack()

    # ---- helpers ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _slot(self, name, context):
        slot = self.grid.call_slot(name)
        try:
            slot.__enter__()
        except Refused as exc:
            self.throttled.warning(name, "busy", "refused a call of client %s: %s", name, exc.text)
            context.abort(exc.code, exc.text)
        try:
            yield
        finally:
            slot.__exit__(None, None, None)

    def _read(self, chunks, cls, limit, context, name):
        """One message from the request stream; a sender slower than ``read_timeout`` is cut off."""
        with self._deadline(context) as timer:
            try:
                return from_chunks(chunks, cls, limit, what=cls.__name__)
            except WireError as exc:
                self.grid.drop_name(name, f"malformed {cls.__name__}: {exc}", grpc.StatusCode.INVALID_ARGUMENT)
                self.throttled.warning(name, f"invalid {cls.__name__}", "invalid %s from client %s: %s", cls.__name__, name, exc)
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            except grpc.RpcError:  # cancelled: too slow, or the client went away
                if not timer.is_alive():
                    self.grid.drop_name(name, f"took over {self.opts.read_timeout:g}s to send one message",
                                        grpc.StatusCode.DEADLINE_EXCEEDED)
                context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "message not received in time")

    @contextlib.contextmanager
    def _deadline(self, context):
        """The call is cancelled if the block takes longer than ``read_timeout`` (the timer is yielded:
        not alive afterwards means it fired)."""
        timer = threading.Timer(self.opts.read_timeout, context.cancel)
        timer.daemon = True
        timer.start()
        try:
            yield timer
        finally:
            timer.cancel()

    def _call(self, fn, context, name, method):
        try:
            return fn()
        except Refused as exc:
            if exc.code not in (grpc.StatusCode.ABORTED, grpc.StatusCode.UNAVAILABLE):
                self.throttled.warning(name, f"{method} {exc.code.name}", "refused %s from client %s: %s", method, name,
                                  exc.text)
            context.abort(exc.code, exc.text)


def grpc_options(frame_limit: int = GRPC_FRAME_LIMIT) -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", frame_limit), ("grpc.max_send_message_length", frame_limit),
            ("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000)]


def _handlers(servicer: Servicer) -> grpc.GenericRpcHandler:
    """The service's methods; as ``splitlora_pb2_grpc`` registers them, except Leave (see Servicer.Leave)."""
    chunks = dict(request_deserializer=pb.Chunk.FromString, response_serializer=pb.Chunk.SerializeToString)
    return grpc.method_handlers_generic_handler(SERVICE, {
        "Hello": grpc.stream_stream_rpc_method_handler(servicer.Hello, **chunks),
        "Exchange": grpc.stream_stream_rpc_method_handler(servicer.Exchange, **chunks),
        "Leave": grpc.stream_unary_rpc_method_handler(servicer.Leave, request_deserializer=pb.Done.FromString,
                                                      response_serializer=pb.Ack.SerializeToString),
    })


def start_grpc(grid: GrpcGrid, opts: ServeOptions) -> tuple[grpc.Server, int]:
    """Listen on ``opts.listen``. Refuses a port another process holds (no SO_REUSEPORT)."""
    workers = opts.calls_per_client * len(opts.tokens) + 8

    def refused_call():
        with grid.cond:
            grid.refused += 1

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="splitlora-rpc"),
                         options=[*grpc_options(), ("grpc.so_reuseport", 0)], maximum_concurrent_rpcs=2 * workers,
                         interceptors=[TokenInterceptor(opts.tokens, refused_call)])
    server.add_generic_rpc_handlers((_handlers(Servicer(grid, opts)),))
    try:
        if opts.tls_cert is not None:
            port = server.add_secure_port(opts.listen, grpc.ssl_server_credentials([(opts.tls_key, opts.tls_cert)]))
        else:
            port = server.add_insecure_port(opts.listen)
    except RuntimeError:
        port = 0
    if not port:
        raise UserError(f"cannot listen on {opts.listen} (the address is in use or invalid)")
    server.start()
    return server, port
