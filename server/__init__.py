"""gRPC serving over the qwenjax engine: ``qwenjax serve`` or ``python -m server``.

Layout: ``app`` (server lifecycle, health, reflection, drain), ``servicer`` (the
Inference RPCs, admission, status codes), ``convert`` (wire ↔ engine objects),
``auth`` (bearer token), ``metrics`` (Prometheus), ``cli`` (flags, start-up, SIGTERM).
See docs/server.md.
"""
