"""`ctxkit serve`: the OpenAI-compatible proxy under uvicorn, over the local model or an upstream server.

    CTXKIT_API_KEYS="k-team-a-0001:team-a,k-team-b-0002:team-b" ctxkit serve --port 8000
    ctxkit serve --api-keys-file keys.txt --upstream http://vllm:8000/v1 --upstream-model gpt-4o-mini

    ctxkit serve --cache postgresql://ctxkit@db/ctxkit     # replicas share one semantic cache
    ctxkit serve --quarantine-store postgresql://ctxkit@db/ctxkit   # ... and quarantine records and releases

Replicas: run several behind a load balancer with the same keys. Each replica is stateless apart from
its stages; the shared state is the semantic cache, given as `--cache postgresql://...` (pgvector) to every
replica, and the quarantine records and releases, given as `--quarantine-store postgresql://...` (the same
database or another). `--cache DIR` keeps a local cache for a single replica. Each replica appends to its own
ledger file (or one shared file: appends are atomic whole lines).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigurationError

logger = logging.getLogger("ctxkit")

if TYPE_CHECKING:
    from ..backends.gguf_prompt import GGUFPrompt
    from ..stages.cache.store import CacheStore


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0-65535, got {value}")
    return value


def _seconds(text: str) -> float:
    """--graceful-timeout: a finite number of seconds, 0 or more. NaN and -1 (which some tools read as "no limit")
    were taken and cancelled every call in flight the moment SIGTERM came."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds, 0 or more, got {text}")
    return value


def add_parser(commands: Any) -> None:
    serve = commands.add_parser("serve", help="an OpenAI-compatible proxy: /v1/chat/completions through ctxkit")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=_port, default=8000, help="TCP port, 0-65535 (default 8000)")
    serve.add_argument("--api-keys-file", type=Path,
                       help="file of 'key namespace' lines (default: $CTXKIT_API_KEYS='key:namespace,...')")
    serve.add_argument("--ledger", type=Path, default=Path("ctxkit-serve.jsonl"),
                       help="ledger file to append to (default ctxkit-serve.jsonl in the current directory)")
    serve.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024, help="larger bodies get 413 (default 4194304, 4 MiB)")
    serve.add_argument("--max-concurrency", type=int, default=None,
                       help="calls in flight at once (default: 1 for the local model, 64 upstream)")
    serve.add_argument("--max-queue", type=int, default=None, metavar="N",
                       help="calls that may wait for a slot; more get 503 with a Retry-After (default: no limit)")
    serve.add_argument("--metrics-token-env", default="CTXKIT_METRICS_TOKEN", metavar="VAR",
                       help="environment variable holding the bearer token /metrics asks for "
                            "(default CTXKIT_METRICS_TOKEN); unset: /metrics answers loopback clients only")
    serve.add_argument("--graceful-timeout", type=_seconds, default=20.0, metavar="SECONDS",
                       help="on SIGTERM, how long calls in flight may finish before they are cancelled (and "
                            "ledgered as such); keep it under the orchestrator's kill grace (default 20)")
    serve.add_argument("--no-stages", action="store_true", help="serve with no stages (a metering pass-through)")
    serve.add_argument("--cache", metavar="DIR|DSN",
                       help="semantic cache: a directory (local store, one replica) or a postgresql:// DSN "
                            "(shared by replicas); default: no cache")
    serve.add_argument("--state-dir", metavar="DIR", type=Path,
                       help="keep quarantine records and releases, and conversation summaries, in DIR so they "
                            "outlive a restart (default: in memory)")
    serve.add_argument("--quarantine-store", metavar="DSN",
                       help="keep quarantine records and releases in this postgresql:// database instead, shared "
                            "by replicas on every host (may be the --cache database)")
    local = serve.add_argument_group("local model (the default backend)")
    local.add_argument("--model", help="GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    local.add_argument("--n-ctx", type=int, default=4096, help="context window in tokens (default 4096)")
    local.add_argument("--n-threads", type=int, default=None)
    local.add_argument("--n-gpu-layers", type=int, default=0)
    upstream = serve.add_argument_group("upstream OpenAI-compatible server (OpenAI, vLLM, llama.cpp server)")
    upstream.add_argument("--upstream", metavar="URL", help="base URL, e.g. http://127.0.0.1:8080/v1")
    upstream.add_argument("--upstream-model", help="model name the upstream serves")
    upstream.add_argument("--upstream-key-env", default="OPENAI_API_KEY",
                          help="environment variable holding the upstream API key (default OPENAI_API_KEY)")
    upstream.add_argument("--upstream-gguf", type=Path,
                          help="count tokens with this GGUF's tokenizer (a non-OpenAI model served from a GGUF)")
    upstream.add_argument("--upstream-context-window", type=int, default=None,
                          help="the upstream's context window in tokens (its n_ctx); default: what the upstream "
                               "reports (llama-server, vLLM), else the GGUF's trained context, else the OpenAI model's")
    upstream.add_argument("--upstream-timeout", type=float, default=60.0, help="seconds (default 60)")
    upstream.add_argument("--upstream-retries", type=int, default=3, help="retries before the first byte (default 3)")
    serve.set_defaults(func=run_cli)


def build_backend(args: argparse.Namespace) -> Any:
    if args.upstream is None:
        from ..backends.llama_cpp import LlamaCppBackend

        return LlamaCppBackend(args.model, n_ctx=args.n_ctx, n_threads=args.n_threads, n_gpu_layers=args.n_gpu_layers)
    from ..backends.gguf_prompt import GGUFPrompt
    from ..backends.openai_compat import OpenAIBackend, check_base_url

    check_base_url(args.upstream, "--upstream")  # before the window is asked of it, which quietly failed
    if not args.upstream_model:
        raise ConfigurationError("--upstream needs --upstream-model (the model name the upstream serves)")
    counter = GGUFPrompt.from_gguf(args.upstream_gguf) if args.upstream_gguf else None
    if counter is None:
        from ..tokens.tiktoken_counter import encoding_name_for_model

        if encoding_name_for_model(args.upstream_model) is None:
            raise ConfigurationError(
                f"--upstream-model {args.upstream_model!r} is not an OpenAI model: pass --upstream-gguf FILE "
                "(the GGUF the upstream serves; its tokenizer and chat template only) so token counts are exact"
            )
    window = args.upstream_context_window
    if window is None and counter is not None:
        window = _upstream_context_window(args, counter)
    return OpenAIBackend(
        args.upstream_model, base_url=args.upstream, api_key_env=args.upstream_key_env,
        timeout=args.upstream_timeout, max_retries=args.upstream_retries, counter=counter, context_window=window,
    )


def _upstream_context_window(args: argparse.Namespace, counter: GGUFPrompt) -> int | None:
    """A GGUF-served model's window: the server's n_ctx, which summarization fires at a fraction of and the
    overflow check guards. Not an OpenAI default of 128k, and not the GGUF's trained context unless nothing
    better is known (servers run 2k-8k by default: 128k for a Llama 3.1 GGUF would make both idle)."""
    served = _served_context_window(args.upstream, args.upstream_model, min(args.upstream_timeout, 10.0),
                                    api_key=os.environ.get(args.upstream_key_env))
    if served is not None:
        return served
    logger.warning("ctxkit serve: the upstream does not say its context window; assuming the GGUF's trained "
                   "%s tokens. Pass --upstream-context-window (the server's n_ctx) if it runs with fewer.",
                   counter.context_length)
    return counter.context_length


def _served_context_window(base_url: str, model: str, timeout: float, api_key: str | None = None) -> int | None:
    """What the upstream reports: llama.cpp's llama-server in GET /props (n_ctx), vLLM in GET /v1/models
    (max_model_len). None where it reports neither (llama-cpp-python's server, Ollama)."""
    import json
    import urllib.request

    def get(url: str) -> Any:
        try:
            # An upstream run with a key (vLLM --api-key, llama-server --api-key) answers these only with it.
            headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as answer:
                return json.load(answer)
        except (OSError, ValueError):
            return None

    root = base_url.rstrip("/").removesuffix("/v1")
    props = get(f"{root}/props")
    if isinstance(props, dict):
        n_ctx = (props.get("default_generation_settings") or {}).get("n_ctx") or props.get("n_ctx")
        if isinstance(n_ctx, int) and n_ctx > 0:
            return n_ctx
    models = get(f"{base_url.rstrip('/')}/models")
    for entry in (models.get("data") or []) if isinstance(models, dict) else []:
        length = entry.get("max_model_len") if isinstance(entry, dict) else None
        if isinstance(length, int) and length > 0 and entry.get("id") in (model, None):
            return length
    return None


def build_cache_store(location: str | None) -> CacheStore | None:
    """The cache store `--cache` names: None, a PostgreSQL DSN (shared by replicas), or a local directory."""
    if not location:
        return None
    if location.startswith(("postgresql://", "postgres://")):
        from ..stages.cache.pg_store import PostgresStore

        return PostgresStore(location)
    if "://" in location:
        raise ConfigurationError(f"--cache takes a directory or a postgresql:// DSN, not {location.split('://')[0]}://")
    if re.match(r"postgres(?:ql)?:", location, re.IGNORECASE):
        # A DSN with a slash missing ("postgresql:/user@db/app") made a local cache in ./postgresql:/user@db/app,
        # and every replica quietly kept its own. Not echoed: it may hold a password.
        raise ConfigurationError("--cache looks like a mistyped DSN: give postgresql://user:password@host/dbname, "
                                 "or a directory")
    if re.search(r"(?:^|\s)(?:host|hostaddr|port|dbname|user|password|passfile|service|sslmode)\s*=", location):
        # libpq's keyword form ("host=db user=app password=..."): taken as a directory, it made a local cache named
        # after the DSN, its password in the path and in every warning naming the cache. Not echoed.
        raise ConfigurationError("--cache is given a keyword DSN (host=... password=...): give the database as a "
                                 "postgresql://user:password@host/dbname URL, or a directory")
    from ..stages.cache import LocalStore

    return LocalStore(location)


def run_cli(args: argparse.Namespace) -> None:
    try:
        # All three: llama-cpp-python[server] (the `local` extra) brings uvicorn and starlette, not prometheus-client,
        # so checking uvicorn alone let `ctxkit serve` die on a traceback in create_app's import.
        import prometheus_client  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn
    except ImportError as exc:
        raise ConfigurationError(f"ctxkit serve needs its server extra ({exc.name} is missing): "
                                 "pip install 'ctxkit[serve]'") from None

    from ..ledger import Ledger
    from ..pipeline import Pipeline
    from ..stages import default_stages
    from .app import create_app
    from .auth import ApiKeys

    if args.quarantine_store and not args.quarantine_store.startswith(("postgresql://", "postgres://")):
        # QuarantineStage's own error named its `directory=` parameter, which no command-line user has.
        raise ConfigurationError("--quarantine-store takes a postgresql:// URL; to keep quarantine records in a "
                                 "directory, give --state-dir DIR")
    log_level = os.environ.get("CTXKIT_LOG_LEVEL", "info")
    if log_level.lower() not in uvicorn.config.LOG_LEVELS:  # else a KeyError traceback once the model had loaded
        raise ConfigurationError(f"CTXKIT_LOG_LEVEL must be one of {', '.join(uvicorn.config.LOG_LEVELS)}, "
                                 f"got {log_level!r}")
    keys = ApiKeys.from_file(args.api_keys_file) if args.api_keys_file else ApiKeys.from_env()
    backend = build_backend(args)
    if args.no_stages and (args.cache or args.state_dir or args.quarantine_store):
        raise ConfigurationError("--cache, --state-dir and --quarantine-store have no effect with --no-stages: "
                                 "they keep stages' state")
    stages = [] if args.no_stages else default_stages(backend, cache_store=build_cache_store(args.cache),
                                                      state_dir=args.state_dir,
                                                      quarantine_store=args.quarantine_store)
    pipeline = Pipeline(backend, stages, ledger=Ledger(args.ledger))
    app = create_app(pipeline, keys, max_body_bytes=args.max_body_bytes, max_concurrency=args.max_concurrency,
                     max_queue=args.max_queue,
                     metrics_token=os.environ.get(args.metrics_token_env) or None)
    print(f"ctxkit serve: {backend.name} / {backend.model}; stages {[s.name for s in stages]}; "
          f"{len(keys.namespaces)} namespace(s); ledger {args.ledger}; http://{args.host}:{args.port}/v1",
          flush=True)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=log_level.lower(),
                            lifespan="off", timeout_graceful_shutdown=args.graceful_timeout)
    # uvicorn's access log prints method, path and status, never headers; but a client that puts its key in
    # the query string (refused with a 401) would have it printed with the path: the query is left out.
    logging.getLogger("uvicorn.access").addFilter(_without_query_string)
    _run_until_sigterm(config)


def _run_until_sigterm(config: Any) -> None:
    import asyncio

    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn's server, letting the calls its graceful timeout cancelled end (their ledger records are
        written as they unwind) before it re-raises SIGTERM, which would end the process first."""

        async def shutdown(self, sockets: Any = None) -> None:
            await super().shutdown(sockets)
            cancelled = list(self.server_state.tasks)
            if cancelled:
                await asyncio.wait(cancelled, timeout=5)

    GracefulServer(config).run()


def _without_query_string(record: logging.LogRecord) -> bool:
    args = record.args
    if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and "?" in args[2]:
        record.args = (*args[:2], args[2].split("?", 1)[0] + "?…", *args[3:])
    return True
