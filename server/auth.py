"""Bearer-token check on every Inference call (``authorization: Bearer <token>`` metadata).

Health and reflection stay open: load balancers and Kubernetes gRPC probes cannot
send metadata, and reflection reveals only the public schema.
"""
from __future__ import annotations

import hmac

import grpc

OPEN_METHOD_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


def bearer_token(value: str | bytes | None) -> bytes | None:
    """The token of an ``authorization`` value "Bearer <token>" (gRPC metadata or HTTP header)."""
    if value is None:
        return None
    value = value.decode() if isinstance(value, bytes) else value
    scheme, _, token = value.partition(" ")
    return token.strip().encode() if scheme.lower() == "bearer" and token.strip() else None


def token_matches(presented: bytes, expected: bytes) -> bool:
    # Constant-time comparison: the time a wrong token takes must not leak its prefix.
    return hmac.compare_digest(presented, expected)


def _presented_token(metadata) -> bytes | None:
    for key, value in metadata or ():
        if key == "authorization":
            return bearer_token(value)
    return None


def _denying(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that fails with UNAUTHENTICATED."""

    async def deny(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(deny, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str):
        if not token:
            raise ValueError("api token must be non-empty")
        self._token = token.encode()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        presented = _presented_token(handler_call_details.invocation_metadata)
        if presented is None:
            return _denying(handler, "missing 'authorization: Bearer <token>' metadata")
        if not token_matches(presented, self._token):
            return _denying(handler, "wrong bearer token")
        return handler
