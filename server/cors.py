"""Cross-origin requests to the HTTP API (vLLM's ``--allowed-origins``, ``--allowed-methods``,
``--allowed-headers``, ``--allow-credentials``), so that a chat UI served from another origin
can call the API from a browser.

A browser first sends a preflight (``OPTIONS`` with ``Origin`` and
``Access-Control-Request-Method``); it is answered here, before authentication (browsers send
no credentials with it), 200 with the allowed methods and headers or 400 naming what is not
allowed. Every other response to a request from an allowed origin carries
``Access-Control-Allow-Origin``, streams included (set as the response is prepared). As in
vLLM, every origin, method and header is allowed by default, without credentials; the bearer
token still guards the API.
"""
from __future__ import annotations

import dataclasses
import json
from aiohttp import web

# What "*" stands for in Access-Control-Allow-Methods (as Starlette's CORS middleware).
ALL_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")
# Headers a browser may always send (CORS-safelisted request headers).
SAFELISTED_HEADERS = frozenset(("accept", "accept-language", "content-language", "content-type"))
MAX_AGE_SECONDS = 600


def parse_list(text: str, name: str) -> tuple[str, ...]:
    """A flag's JSON list of strings (vLLM's form, ``'["https://ui.example"]'``)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{name} must be a JSON list of strings, e.g. '[\"*\"]'; got {text!r}")
    return tuple(value)


@dataclasses.dataclass(frozen=True)
class CORS:
    origins: tuple[str, ...] = ("*",)
    methods: tuple[str, ...] = ("*",)
    headers: tuple[str, ...] = ("*",)
    credentials: bool = False

    def __post_init__(self):
        for name in ("origins", "methods", "headers"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(v, str) and v for v in value):
                raise ValueError(f"allowed {name} must be a list of non-empty strings, got {value!r}")
        object.__setattr__(self, "methods", tuple(m.upper() for m in self.methods))

    def install(self, app: web.Application) -> None:
        """Answer preflights first (before authentication) and mark every response."""
        app.middlewares.insert(0, self._preflight)
        app.on_response_prepare.append(self._mark)

    def allows(self, origin: str) -> bool:
        return "*" in self.origins or origin in self.origins

    def _allow_origin(self, origin: str) -> dict[str, str]:
        if "*" in self.origins and not self.credentials:
            return {"Access-Control-Allow-Origin": "*"}
        headers = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
        if self.credentials:
            headers["Access-Control-Allow-Credentials"] = "true"
        return headers

    @web.middleware
    async def _preflight(self, request: web.Request, handler):
        origin = request.headers.get("Origin")
        method = request.headers.get("Access-Control-Request-Method")
        if request.method != "OPTIONS" or origin is None or method is None:
            return await handler(request)
        problems = []
        if not self.allows(origin):
            problems.append("origin")
        if "*" not in self.methods and method.upper() not in self.methods:
            problems.append("method")
        asked = [h.strip() for h in request.headers.get("Access-Control-Request-Headers", "").split(",")
                 if h.strip()]
        allowed = {h.lower() for h in self.headers} | SAFELISTED_HEADERS
        if "*" not in self.headers and any(h.lower() not in allowed for h in asked):
            problems.append("headers")
        if problems:
            return web.Response(status=400, text=f"Disallowed CORS {', '.join(problems)}")
        headers = self._allow_origin(origin)
        headers["Access-Control-Allow-Methods"] = ", ".join(
            ALL_METHODS if "*" in self.methods else self.methods)
        if asked:
            headers["Access-Control-Allow-Headers"] = ", ".join(
                asked if "*" in self.headers else self.headers)
        headers["Access-Control-Max-Age"] = str(MAX_AGE_SECONDS)
        return web.Response(status=200, text="OK", headers=headers)

    async def _mark(self, request: web.Request, response: web.StreamResponse) -> None:
        origin = request.headers.get("Origin")
        if origin is not None and self.allows(origin) and \
                "Access-Control-Allow-Origin" not in response.headers:
            response.headers.update(self._allow_origin(origin))
