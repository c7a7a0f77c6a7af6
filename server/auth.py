"""Bearer-token check on every Inference call (``authorization: Bearer <token>`` metadata).

Health and reflection stay open: load balancers and Kubernetes gRPC probes cannot
send metadata, and reflection reveals only the public schema.
"""
from __future__ import annotations

import hmac
from typing import Sequence

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


def expected_tokens(tokens: str | Sequence[str]) -> tuple[bytes, ...]:
    """The accepted token(s) (vLLM's --api-key takes several), checked non-empty."""
    tokens = (tokens,) if isinstance(tokens, str) else tuple(tokens)
    if not tokens or not all(tokens):
        raise ValueError("api tokens must be non-empty")
    return tuple(token.encode() for token in tokens)


def token_matches(presented: bytes, expected: Sequence[bytes]) -> bool:
    # Constant-time comparison against every token: the time a wrong token takes must leak
    # neither its prefix nor which token it came close to.
    return sum(hmac.compare_digest(presented, token) for token in expected) > 0


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
    def __init__(self, tokens: str | Sequence[str]):
        self._tokens = expected_tokens(tokens)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        presented = _presented_token(handler_call_details.invocation_metadata)
        if presented is None:
            return _denying(handler, "missing 'authorization: Bearer <token>' metadata")
        if not token_matches(presented, self._tokens):
            return _denying(handler, "wrong bearer token")
        return handler
