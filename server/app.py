"""One server: gRPC Inference + Health + reflection, the OpenAI-compatible HTTP API, metrics;
and their lifecycle.

    server = InferenceServer(ServerConfig(port=0))
    await server.start()                 # listening; health NOT_SERVING, Inference UNAVAILABLE
    await server.attach(EngineThread(engine))   # health SERVING
    ...
    await server.drain(timeout=30)       # UNAVAILABLE to new calls, in-flight ones finish
    await server.stop()

The server listens before the model is loaded, so probes see NOT_SERVING (not a
refused connection) during a load and warm-up that take minutes on a big model.
Several servers may share one EngineThread (tests run a plain, a token-protected
and a TLS server over one loaded model); each counts its own admissions and metrics.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import pathlib
import ssl

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from qwenjax.generation_config import describe as describe_defaults
from qwenjax_proto.v1 import inference_pb2 as pb
from qwenjax_proto.v1 import inference_pb2_grpc as pb_grpc
from server.auth import BearerTokenInterceptor
from server.cors import CORS
from server.metrics import ServerMetrics
from server.gateway import Admission, Gateway
from server.servicer import InferenceServicer, model_name

log = logging.getLogger(__name__)

INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["Inference"].full_name


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051                 # 0: any free port (see InferenceServer.port)
    metrics_port: int | None = 9400   # None: no metrics endpoint; 0: any free port
    # The OpenAI-compatible HTTP API (server.openai_api) on host:http_port. None: off; 0: any free
    # port. It shares admission, drain, auth, TLS and metrics with the gRPC server.
    http_port: int | None = None
    served_model_names: tuple[str, ...] = ()  # names the HTTP API answers to (default: the model's)
    max_queue: int = 256              # requests admitted but without a first token; 0 = no limit
    max_queued_tokens: int = 262_144  # prompt tokens of those; 0 = no limit
    # Larger requests get INVALID_ARGUMENT naming this limit. The transport refuses messages
    # over 4× it with RESOURCE_EXHAUSTED before they are parsed, so memory stays bounded.
    max_request_bytes: int = 4 << 20
    api_token: str | tuple[str, ...] | None = None  # bearer token(s) required on Inference calls
    tls_cert: str | None = None       # PEM files; both or neither
    tls_key: str | None = None
    drain_timeout: float = 30.0       # seconds in-flight requests get after SIGTERM
    # A step running longer than this (a hung device or collective: nothing fails) turns health
    # NOT_SERVING and logs where the engine thread is; SERVING again once it ends. 0 = off.
    step_timeout: float = 300.0
    # Load/unload LoRA adapters from the server's disk while serving (HTTP /v1/load_lora_adapter,
    # gRPC LoadLoRAAdapter): off by default, as vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING.
    allow_runtime_lora_updating: bool = False
    # Split chat replies into reasoning and content (qwenjax.reasoning; vLLM's --reasoning-parser).
    reasoning_parser: str | None = None
    # Serve HTTP POST /update_weights_from_disk (SGLang's): new weights from the server's disk.
    allow_weight_updates: bool = False
    # Serve HTTP POST /sleep, /wake_up, GET /is_sleeping (vLLM's sleep mode).
    enable_sleep_mode: bool = False
    # Requests may bring their own chat_template (vLLM's --trust-request-chat-template).
    trust_request_chat_template: bool = False
    # Log each request as it is admitted (its first max_log_len prompt token ids, its sampling
    # parameters) and as it ends (reason, TTFT, latency): vLLM's --enable-log-requests.
    enable_log_requests: bool = False
    max_log_len: int = 64
    # Browsers' cross-origin requests to the HTTP API (server/cors.py; vLLM's --allowed-origins,
    # …): every origin by default, as vLLM; None: no CORS headers (browsers refuse other origins).
    cors: CORS | None = CORS()
    # Serve POST /start_profile and /stop_profile, writing jax.profiler traces here (None: off).
    profiler_dir: str | None = None
    # /metrics also under these servers' names, with their model_name label (server.metrics
    # METRIC_ALIASES), so that vLLM's and SGLang's dashboards and autoscalers read it unchanged.
    metrics_aliases: tuple[str, ...] = ("vllm", "sglang")

    def __post_init__(self):
        from qwenjax.reasoning import check_reasoning_parser

        check_reasoning_parser(self.reasoning_parser)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        for name in ("max_queue", "max_queued_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be ≥ 0 (0 = no limit), got {getattr(self, name)}")
        if self.max_log_len < 0:
            raise ValueError(f"max_log_len must be ≥ 0, got {self.max_log_len}")
        if self.max_request_bytes < 1024:
            raise ValueError(f"max_request_bytes must be ≥ 1024, got {self.max_request_bytes}")
        if self.drain_timeout < 0:
            raise ValueError(f"drain_timeout must be ≥ 0, got {self.drain_timeout}")
        if self.step_timeout < 0:
            raise ValueError(f"step_timeout must be ≥ 0 (0 = off), got {self.step_timeout}")


def _cannot_listen(flag: str, host: str, port: int, error: Exception | None) -> OSError:
    """A bind failure named by its flag: two servers on one host clash on the default ports."""
    why = getattr(error, "strerror", None) or error or "the address is in use or not this host's"
    other = "0 for any free port" if flag == "--port" else "0 to turn it off"
    return OSError(f"{flag} {port}: cannot listen on {host}:{port} ({why}); another server on "
                   f"this host? Give {flag} another port, or {other}")


class InferenceServer:
    def __init__(self, config: ServerConfig = ServerConfig()):
        self.config = config
        self.metrics = ServerMetrics(lambda: self.gateway.engines, lambda: self.gateway.in_flight,
                                     self.model_name, config.metrics_aliases)
        self.gateway = Gateway(Admission(config.max_queue, config.max_queued_tokens), self.metrics,
                               config.max_log_len if config.enable_log_requests else None)
        self.servicer = InferenceServicer(self.gateway, config.max_request_bytes,
                                          config.served_model_names,
                                          config.allow_runtime_lora_updating,
                                          config.reasoning_parser)
        self.health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._watchdog: asyncio.Task | None = None
        self.stalled = False  # a step has run past config.step_timeout
        self.http = None              # server.openai_api.OpenAIServer, when http_port is set
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.http_port: int | None = None

    def model_name(self) -> str | None:
        """The name the APIs report (the first served name, else the model directory's); None
        while the model is loading and no name was given."""
        from server.servicer import model_name

        if self.config.served_model_names:
            return self.config.served_model_names[0]
        engine = self.gateway.engine
        return None if engine is None else model_name(engine.lm.source)

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    async def _set_health(self, status) -> None:
        for service in ("", INFERENCE_SERVICE):
            await self.health.set(service, status)

    async def start(self) -> None:
        config = self.config
        interceptors = [BearerTokenInterceptor(config.api_token)] if config.api_token else []
        limit = 4 * config.max_request_bytes
        self._server = server = grpc.aio.server(interceptors=interceptors, options=[
            ("grpc.max_receive_message_length", limit),
            # gRPC sets SO_REUSEPORT by default: a second server on a busy port would then
            # silently split the traffic instead of failing to start.
            ("grpc.so_reuseport", 0),
        ])
        pb_grpc.add_InferenceServicer_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        reflection.enable_server_reflection(
            (INFERENCE_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        address = f"{config.host}:{config.port}"
        tls = self._tls()  # checked before any port is taken: a bad file is not a busy port
        try:
            if tls is not None:
                key, cert = pathlib.Path(config.tls_key).read_bytes(), pathlib.Path(config.tls_cert).read_bytes()
                self.port = server.add_secure_port(address, grpc.ssl_server_credentials([(key, cert)]))
            else:
                self.port = server.add_insecure_port(address)
        except RuntimeError:  # grpcio's "Failed to bind" (its log line above says why)
            raise _cannot_listen("--port", config.host, config.port, None) from None
        if not self.port:
            raise _cannot_listen("--port", config.host, config.port, None)
        await server.start()
        if config.metrics_port is not None:
            try:
                self.metrics_port = self.metrics.serve(config.host, config.metrics_port)
            except OSError as error:
                raise _cannot_listen("--metrics-port", config.host, config.metrics_port, error) from None
        if config.http_port is not None:
            try:
                await self._start_http(tls)
            except OSError as error:
                raise _cannot_listen("--http-port", config.host, config.http_port, error) from None

    def _tls(self) -> ssl.SSLContext | None:
        """The HTTP API's TLS context (None: plain); raises ValueError naming the files when
        they are missing or not a certificate chain and its key."""
        config = self.config
        if config.tls_cert is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(config.tls_cert, config.tls_key)
        except (OSError, ssl.SSLError) as error:  # (SSLError is an OSError: said first for clarity)
            raise ValueError(f"--tls-cert {config.tls_cert} / --tls-key {config.tls_key}: not a "
                             f"usable certificate chain and key ({error})") from None
        return context

    async def _start_http(self, context: ssl.SSLContext | None) -> None:
        from server.openai_api import OpenAIServer

        config = self.config
        self.http = OpenAIServer(self.gateway, self.metrics.registry, self.serving,
                                 api_token=config.api_token, max_request_bytes=config.max_request_bytes,
                                 served_model_names=config.served_model_names,
                                 allow_runtime_lora_updating=config.allow_runtime_lora_updating,
                                 reasoning_parser=config.reasoning_parser,
                                 allow_weight_updates=config.allow_weight_updates,
                                 enable_sleep_mode=config.enable_sleep_mode, cors=config.cors,
                                 trust_request_chat_template=config.trust_request_chat_template,
                                 profiler_dir=config.profiler_dir)
        self.http_port = await self.http.start(config.host, config.http_port, context)

    def serving(self) -> bool:
        """What health reports: SERVING once attached, until a drain or a stalled step."""
        return self.gateway.engine_thread is not None and not self.gateway.draining and not self.stalled

    async def attach(self, engine_thread) -> None:
        """Serve ``engine_thread`` (an EngineThread over a warmed-up engine): health goes SERVING."""
        self.gateway.engine_thread = engine_thread
        if not self.gateway.draining:
            await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        if self.config.step_timeout and self._watchdog is None:
            self._watchdog = asyncio.create_task(self._watch_steps(engine_thread))

    async def _watch_steps(self, engine_thread) -> None:
        """Health follows the engine loop: NOT_SERVING while a step has run past step_timeout
        (logged once, with the engine thread's stack), SERVING again when it ends."""
        timeout = self.config.step_timeout
        while True:
            await asyncio.sleep(min(5.0, timeout / 4))
            seconds = engine_thread.step_seconds
            if seconds > timeout and not self.stalled:
                self.stalled = True
                log.error("an engine step has run for %.0f s (step_timeout %.0f s): health is "
                          "NOT_SERVING until it ends; the engine thread is at:\n%s",
                          seconds, timeout, engine_thread.stack())
                await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
            elif seconds <= timeout and self.stalled:
                self.stalled = False
                log.warning("the engine step that ran past step_timeout has ended")
                if not self.gateway.draining:
                    await self._set_health(health_pb2.HealthCheckResponse.SERVING)

    async def drain(self, timeout: float | None = None) -> bool:
        """Refuse new work (UNAVAILABLE, health NOT_SERVING) and wait for in-flight requests.

        True when all finished within ``timeout`` seconds (default: the config's)."""
        self.gateway.draining = True
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.gateway.paused:  # (requests held by a pause would never finish)
            log.warning("draining a paused engine: resuming generation so in-flight requests finish")
            await self.gateway.resume()
        timeout = self.config.drain_timeout if timeout is None else timeout
        return await self.gateway.wait_idle(timeout)

    async def stop(self, grace: float | None = 0.0) -> None:
        """Close the port; calls still running after ``grace`` seconds are cancelled (and aborted)."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self.http is not None:
            await self.http.stop()
            self.http = None
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        self.metrics.stop()

    def describe(self) -> str:
        """The start-up log line: model, mesh, dtype, warm-up time, addresses."""
        engine = self.gateway.engine
        lm = engine.lm
        mesh = ",".join(f"{k}={v}" for k, v in lm.mesh.shape.items())
        metrics = f"http://{self.config.host}:{self.metrics_port}/metrics" if self.metrics_port else "off"
        scheme = "https" if self.config.tls_cert else "http"
        http = f"{scheme}://{self.config.host}:{self.http_port}/v1" if self.http_port else "off"
        quantized = f" quantization={lm.quantization}" if lm.quantization else ""
        replicas = len(self.gateway.engines)
        mesh = f"mesh({mesh})" + (f" × {replicas} replicas" if replicas > 1 else "")
        return (f"serving {model_name(lm.source)} {mesh} dtype={lm.dtype}{quantized} "
                f"max_context={engine.max_model_len} kv_pages={engine.allocator.num_pages} "
                f"warm-up={engine.warm_up_seconds:.1f}s on {self.address} "
                f"tls={'on' if self.config.tls_cert else 'off'} "
                f"auth={'on' if self.config.api_token else 'off'} openai-api={http} metrics={metrics}; "
                f"{describe_defaults(engine.sampling_defaults)}")
