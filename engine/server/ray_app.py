"""The same FastAPI app under Ray Serve: one replica is one `create_app(config)`, so one pipeline, whose own batcher
batches the requests routed to it; Serve adds replicas (several GPUs or machines) and autoscaling in front.

Run it from the CLI (a local Ray instance, or the cluster at RAY_ADDRESS; SIGTERM/Ctrl-C shuts it down):

    python -m engine serve --ray --model M --image-encoder E --adapter A [--replicas 2] [--gpus-per-replica 1]

or with Serve's own tools, where `args` are ServerConfig fields (the CLI flags with underscores) plus `replicas`,
`gpus_per_replica` and the autoscaling keys below (host and port are Serve's: `http_options`):

    serve run engine.server.ray_app:app model=M image_encoder=E adapter=A max_batch_rows=16 replicas=2

Autoscaling, as recommended in a Serve config (`serve deploy config.yaml`): a replica takes minutes to load real
weights, so keep one at least; Serve's delays (up after 30 s of load, down after 600 s idle) suit it. A replica
computes one batch of up to max_batch_rows UNet rows (2 a request with simple guidance, 4 with full) while the next
fills, so aim at about one batch of requests per replica: target_ongoing_requests ~ max_batch_rows / 2 (the
default here when min_replicas/max_replicas are given).

    http_options: {host: 0.0.0.0, port: 8000}
    applications:
      - name: engine
        route_prefix: /
        import_path: engine.server.ray_app:app
        args: {model: /w/sd15, image_encoder: /w/clip-vit-h-14, adapter: /w/ip-adapter-instruct-sd15.bin,
               max_batch_rows: 16, gpus_per_replica: 1, min_replicas: 1, max_replicas: 4, target_ongoing_requests: 8}

Each answer names its replica in an `x-engine-replica` header, which is how the CLI sees /ready on every replica.
Replica logs are Ray's, in the local instance's own temp dir (the CLI prints it; removed on exit):
DIR/session_latest/logs/serve/. On a loopback --host every Ray service listens on loopback only; see
docs/server.md, "Ray: what binds where".
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
import threading
import time
import typing
from dataclasses import fields, replace

import httpx

from ipadapter_instruct.engine.errors import EngineError
from ipadapter_instruct.engine.server.config import ServerConfig
from ipadapter_instruct.engine.server.guards import is_loopback
from ipadapter_instruct.engine.server.ray_reaper import MARKER, Reaper

APP_NAME = "engine"
REPLICA_HEADER = "x-engine-replica"
OBJECT_STORE_BYTES = 100 * 1024**2   # images travel over HTTP, not through Ray's object store
RAY_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray takes loopback as the node address (Linux too)
AUTOSCALING_KEYS = {"min_replicas": int, "max_replicas": int, "initial_replicas": int, "target_ongoing_requests": float,
                    "upscale_delay_s": float, "downscale_delay_s": float, "look_back_period_s": float}


class ReplicaHeaders:
    """Names the answering replica; leaves X-Request-Id to Serve's proxy, which adds it (the app's would come twice)."""

    def __init__(self, app, replica: str):
        self.app, self.header = app, (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_named(message):
            if message["type"] == "http.response.start":
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message = dict(message, headers=[*kept, self.header])
            await send(message)

        await self.app(scope, receive, send_named)


class EngineDeployment:
    """One replica: the app of app.py with its own pipeline (loaded in the background) and batcher."""

    def __init__(self, config: ServerConfig):
        self.config, self.engine_app = config, None
        bind_replica_grpc_to_node()

    def __serve_build_asgi_app__(self):
        from ray import serve

        from ipadapter_instruct.engine.server.app import create_app
        self.engine_app = create_app(self.config)
        replica = serve.get_replica_context().replica_id.unique_id
        self.engine_app.add_middleware(ReplicaHeaders, replica=replica)
        return self.engine_app

    def check_health(self) -> None:
        state = self.engine_app.state.engine if self.engine_app is not None else None
        if state is not None and state.failed:
            raise RuntimeError(f"the model failed to load: {state.failed}")


def default_gpus(config: ServerConfig) -> float:
    """1 with --device cuda, or with no device given and a GPU in the Ray cluster (or here); else 0."""
    if config.device is not None:
        return 1.0 if config.device.startswith("cuda") else 0.0
    import ray
    if ray.is_initialized():
        return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    import torch
    return 1.0 if torch.cuda.is_available() else 0.0


def build(config: ServerConfig, replicas: int = 1, gpus_per_replica: float | None = None,
          autoscaling: dict | None = None):
    """The Serve application: `replicas` fixed replicas, or autoscaling (Serve's autoscaling_config keys)."""
    from ray import serve

    gpus = default_gpus(config) if gpus_per_replica is None else gpus_per_replica
    options = dict(ray_actor_options={"num_cpus": 1, "num_gpus": gpus},
                   max_ongoing_requests=config.max_queue + config.max_batch_rows,  # the batcher queues, not Serve
                   graceful_shutdown_timeout_s=config.request_timeout_s)
    if autoscaling:
        if replicas != 1:
            raise ValueError(f"give replicas ({replicas}) or autoscaling ({sorted(autoscaling)}), not both")
        unknown = set(autoscaling) - set(AUTOSCALING_KEYS)
        if unknown:
            raise ValueError(f"unknown autoscaling keys {sorted(unknown)}; accepted: {sorted(AUTOSCALING_KEYS)}")
        options["autoscaling_config"] = {"target_ongoing_requests": max(1, config.max_batch_rows // 2), **autoscaling}
    else:
        options["num_replicas"] = replicas
    deployment = serve.deployment(name="EngineDeployment", **options)(serve.ingress()(EngineDeployment))
    return deployment.bind(config)


def convert(key: str, value, kind):
    """One `serve run` argument (a string, or a YAML scalar) as `kind`; ValueError naming the key otherwise."""
    if not isinstance(value, str):
        return value
    if kind is not bool and value.lower() in ("none", "null"):
        return None
    try:
        if kind is bool:
            return {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[value.lower()]
        return kind(value)
    except (KeyError, ValueError):
        raise ValueError(f"{key}={value!r}: not a valid {kind.__name__}") from None


def app(args: dict[str, str]):
    """The builder for `serve run engine.server.ray_app:app model=... key=value ...` (and Serve configs)."""
    hints = typing.get_type_hints(ServerConfig)
    kinds = {f.name: next(t for t in typing.get_args(hints[f.name]) or (hints[f.name],) if t is not type(None))
             for f in fields(ServerConfig) if f.name not in ("host", "port")}
    accepted = {**kinds, "replicas": int, "gpus_per_replica": float, **AUTOSCALING_KEYS}
    for key in args:
        if key in ("host", "port"):
            raise ValueError(f"{key}: Serve's proxy binds the address; set http_options.{key} in the Serve config")
        if key not in accepted:
            raise ValueError(f"unknown argument {key!r}; accepted: {', '.join(sorted(accepted))}")
    values = {k: convert(k, v, accepted[k]) for k, v in args.items()}
    if not values.get("model"):
        raise ValueError("model= is required: a diffusers SD1.5 folder")
    if (values.get("adapter") is None) != (values.get("image_encoder") is None):
        raise ValueError("adapter= and image_encoder= go together (or give neither for text to image)")
    # the proxy's address is Serve's (http_options), unknown here: the Host check needs allowed_hosts=NAMES
    values.setdefault("allowed_hosts", "*")
    autoscaling = {k: values.pop(k) for k in list(values) if k in AUTOSCALING_KEYS}
    replicas, gpus = values.pop("replicas", 1), values.pop("gpus_per_replica", None)
    return build(ServerConfig(**values), replicas=replicas, gpus_per_replica=gpus, autoscaling=autoscaling or None)


def free_port(host: str, port: int) -> int:
    """`port` when it can be bound (0: a free one), checked before Ray starts; EngineError otherwise."""
    from ipadapter_instruct.engine.server.run import bind
    with bind(host, port) as sock:
        return sock.getsockname()[1]


def local_ray(host: str) -> Reaper | None:
    """Before ray is imported: the local instance's temp dir, its reaper and, on a loopback host, Ray's loopback
    mode; None when joining the cluster at RAY_ADDRESS (not ours to bind or to clean up)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    address = os.environ.get("RAY_ADDRESS")
    if address:
        if is_loopback(address.rpartition(":")[0] or address):  # a loopback-only cluster: the driver's address too
            os.environ[RAY_LOOPBACK_ENV] = "0"
        return None
    parent = os.environ.get("RAY_TMPDIR") or ("/tmp" if os.path.isdir("/tmp") else None)  # short socket paths
    reaper = Reaper.start(tempfile.mkdtemp(prefix="ray-engine-", dir=parent))
    os.environ[MARKER] = reaper.temp_dir  # inherited by every process of the instance: what the reaper kills
    if is_loopback(host):
        os.environ[RAY_LOOPBACK_ENV] = "0"
    return reaper


def start_ray(host: str, reaper: Reaper | None) -> None:
    """Connects to the cluster at RAY_ADDRESS (reaper None), or starts the local instance in the reaper's dir."""
    import ray
    if reaper is None:
        ray.init(log_to_driver=False)
        return
    ray.init(include_dashboard=False, object_store_memory=OBJECT_STORE_BYTES, log_to_driver=False,
             _temp_dir=reaper.temp_dir)
    node = ray.util.get_node_ip_address()
    if is_loopback(host) and not is_loopback(node):
        raise EngineError(f"the local Ray instance took the address {node}, not loopback as --host {host} asks: "
                          f"ray was imported before {RAY_LOOPBACK_ENV}=0 could be set; start the server in a fresh "
                          "process")
    print(f"Ray: a local instance on {node} ({'loopback only' if is_loopback(node) else 'all interfaces'}); "
          f"its logs in {reaper.temp_dir}/session_latest/logs until the server exits", flush=True)


def bind_replica_grpc_to_node() -> None:
    """Serve (2.60) starts each replica's inter-deployment gRPC server on [::]:0 whatever the node's address; on a
    node of loopback address (our local instance on a loopback --host) it binds that address instead, as Ray's
    own servers do there. Routers reach it at the node's address, so nothing else changes."""
    import ray
    node = ray.util.get_node_ip_address()
    if not is_loopback(node):
        return
    try:
        from ray.serve._private import replica  # the module whose global the replica looks up when it binds
    except ImportError:
        replica = None
    original = getattr(replica, "add_port_to_grpc_server", None)
    if original is None:
        logging.getLogger("ipadapter_instruct.engine.server").warning(
            "this Ray Serve has no ray.serve._private.replica.add_port_to_grpc_server: the replica's "
            "inter-deployment gRPC server keeps Serve's own address (all interfaces in Serve 2.60)")
        return
    if getattr(original, "engine_bound", False):
        return

    def add_port(server, address: str):
        if address.startswith("[::]:"):
            address = f"{node}:{address.rsplit(':', 1)[1]}"
        return original(server, address)
    add_port.engine_bound = True
    replica.add_port_to_grpc_server = add_port


def wait_ready(url: str, replicas: int, stop: threading.Event) -> tuple[str | None, str | None]:
    """Polls /ready through Serve's proxy until `replicas` distinct replicas answered 200 -> (None, the task they
    serve, e.g. "text-to-image"); (a load error, None) otherwise."""
    seen: set[str] = set()
    task = None
    with httpx.Client(timeout=10) as client:
        while not stop.wait(0.1):
            try:
                r = client.get(url + "/ready")
                body = r.json() if REPLICA_HEADER in r.headers else {}  # else Serve's own answer (not deployed yet)
            except (httpx.HTTPError, ValueError):
                continue
            if body.get("error"):
                return body["error"], None
            if r.status_code == 200 and body:
                seen.add(r.headers[REPLICA_HEADER])
                task = body.get("task")
            if len(seen) >= replicas:
                return None, task
    return None, task


def plural(replicas: int) -> str:
    return f"{replicas} replica{'s' if replicas != 1 else ''}"


def serve_ray(config: ServerConfig, replicas: int = 1, gpus_per_replica: float | None = None) -> int:
    """`python -m engine serve --ray`: deploys, says when every replica is ready, shuts down on SIGTERM/SIGINT; the
    local Ray instance's processes and temp dir go with the process, however it ends (the reaper)."""
    from ipadapter_instruct.engine.server.state import process_age_s

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per /ready poll otherwise
    t0 = time.monotonic() - process_age_s()
    config = replace(config, port=free_port(config.host, config.port))  # Serve's proxy cannot report a port 0
    reaper = local_ray(config.host)
    try:
        start_ray(config.host, reaper)  # ray.init installs its own SIGTERM handler: ours go after it
        return run_serve(config, replicas, gpus_per_replica, ours=reaper is not None, t0=t0)
    finally:
        if reaper is not None:
            reaper.close()


def run_serve(config: ServerConfig, replicas: int, gpus_per_replica: float | None, ours: bool, t0: float) -> int:
    """Deploys on the Ray instance this process is connected to; `ours`: Serve and Ray to shut down after."""
    import ray
    from ray import serve

    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    host = f"[{config.host}]" if ":" in config.host else config.host
    url = f"http://{host}:{config.port}"
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        serve.run(build(config, replicas, gpus_per_replica), name=APP_NAME, route_prefix="/")
        print(f"listening on {url} (Ray Serve; /ready turns true when {plural(replicas)} can serve)", flush=True)
        error, task = wait_ready(url, replicas, stop)
        if error is not None:
            print(f"error: a replica could not load the model: {error}", file=sys.stderr, flush=True)
            return 1
        if not stop.is_set():
            print(f"ready: {url} ({task}, Ray Serve, {plural(replicas)}; "
                  f"{time.monotonic() - t0:.1f} s after the process started)", flush=True)
        while not stop.wait(0.5):
            pass
        print("stopping: Serve drains the replicas, then Ray shuts down", flush=True)
        return 0
    finally:  # a second signal from here on interrupts the shutdown
        for s, handler in previous.items():
            signal.signal(s, handler)
        serve.delete(APP_NAME)  # the replicas finish their requests (serve.shutdown alone drops them)
        if ours:
            serve.shutdown()
        ray.shutdown()
