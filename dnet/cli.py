"""The `dnet` command line: `dnet shard`, `dnet api`, `dnet demo`, `dnet plan`, ..."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from dnet import __version__, cli_args
from dnet.cli_args import parse_layers

log = logging.getLogger("dnet")


def setup_logging(verbose: bool = False) -> None:
    """Readable logs: rich on a terminal, plain one-line records in files (easy to grep)."""
    level = logging.DEBUG if verbose else logging.INFO
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(show_path=False, markup=False)
        handler.setFormatter(logging.Formatter("%(message)s", datefmt="%H:%M:%S"))
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s",
                                               datefmt="%H:%M:%S"))
    logging.basicConfig(level=level, handlers=[handler])
    for noisy in ("httpx", "httpcore", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# ----- subcommands -------------------------------------------------------------------------


def _in_use(command: str, exc: OSError, flag: str) -> int:
    """One line for a port another process holds, naming the flag that changes it."""
    from dnet.ring.links import PortInUse

    if isinstance(exc, PortInUse):
        print(f"dnet {command}: port {exc.port} is already in use; choose another with "
              f"{flag}", file=sys.stderr)
    else:
        print(f"dnet {command}: {exc}", file=sys.stderr)
    return 1


def _add_kv_cap(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-kv-bytes", type=cli_args.size,
                   default=os.environ.get("DNET_MAX_KV_BYTES"),
                   help="KV-cache memory this node's requests may reserve, e.g. 4GB; past it "
                        "new requests get a 503 (default: half the memory available at start)")


def _add_prefix_cache(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefix-cache-bytes", type=cli_args.size,
                   default=os.environ.get("DNET_PREFIX_CACHE_BYTES"),
                   help="memory for the prefix cache, e.g. 4GB; 0 turns it off (default: what "
                        "the plan leaves free, up to 1/8 of the memory budget; for `dnet "
                        "shard`, 1/8 of the memory available once its layers are loaded)")


def _add_prefill_chunk(p: argparse.ArgumentParser) -> None:
    from dnet.entry.decisions import PREFILL_CHUNK

    p.add_argument("--prefill-chunk", type=cli_args.positive_int,
                   default=os.environ.get("DNET_PREFILL_CHUNK", str(PREFILL_CHUNK)),
                   help="prompt tokens per prefill step, and per prefix-cache block "
                        f"(default {PREFILL_CHUNK}; mlx-lm's prefill_step_size)")


def _add_kv_ttl(p: argparse.ArgumentParser) -> None:
    from dnet.shard.decisions import DEFAULT_KV_TTL_S

    p.add_argument("--kv-ttl", type=cli_args.positive_float, default=DEFAULT_KV_TTL_S,
                   help="seconds before an idle request's KV cache is dropped "
                        f"(default {DEFAULT_KV_TTL_S:g})")


def _add_http_limits(p: argparse.ArgumentParser) -> None:
    from dnet.entry.decisions import DEFAULT_MAX_REQUESTS

    p.add_argument("--max-requests", type=cli_args.positive_int,
                   default=os.environ.get("DNET_MAX_REQUESTS", str(DEFAULT_MAX_REQUESTS)),
                   help="concurrent requests this node accepts; past it a 429 "
                        f"(default {DEFAULT_MAX_REQUESTS})")
    p.add_argument("--api-key", default=os.environ.get("DNET_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (or 'x-api-key: KEY') on the "
                        "HTTP API")
    p.add_argument("--cors-origins", default=os.environ.get("DNET_CORS_ORIGINS", "*"),
                   help="origins browsers may call the API from, comma-separated "
                        "(default *: any)")
    p.add_argument("--special-tokens-in-messages", action="store_true",
                   default=os.environ.get("DNET_SPECIAL_TOKENS_IN_MESSAGES") == "1",
                   help="let special-token strings in chat messages (e.g. <|im_end|>) act as "
                        "control tokens, as before; by default they are plain text")


def _origins(args: argparse.Namespace) -> tuple[str, ...]:
    return tuple(o.strip() for o in args.cors_origins.split(",") if o.strip())


MEMBER_KEY_HELP = ("shared secret: every gRPC call is signed with it, and only members with "
                   "the same key form a ring (default: $DNET_CLUSTER_KEY; none: anyone on the "
                   "network can join)")
CLIENT_KEY_HELP = ("look only for the nodes of the cluster with this key over mDNS (default: "
                   "$DNET_CLUSTER_KEY)")


def _add_cluster_key(p: argparse.ArgumentParser, help: str = MEMBER_KEY_HELP) -> None:
    p.add_argument("--cluster-key", default=os.environ.get("DNET_CLUSTER_KEY"), help=help)



def add_shard_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", required=True, help="local model directory or HF repo id")
    p.add_argument("-p", "--port", type=cli_args.port_or_any, required=True,
                   help="gRPC port (0: any free port, logged)")
    p.add_argument("-l", "--layers", type=parse_layers, required=True,
                   help='layers to hold: "[0,1,2]" or "0-17,36-53"')
    p.add_argument("-n", "--next", required=True, dest="next_address",
                   help="next shard's host:port; the last shard names the API (host:http-port)")
    p.add_argument("--prefetch-window", type=int, default=None,
                   help="layers kept resident at once (default: all layers held)")
    p.add_argument("--host", type=cli_args.host, default="0.0.0.0",
                   help="address (or host name) to listen on (default 0.0.0.0)")
    _add_kv_ttl(p)
    _add_kv_cap(p)
    _add_prefix_cache(p)
    _add_cluster_key(p)


def run_shard_command(args: argparse.Namespace) -> int:
    from dnet.model_files import ModelNotFoundError, resolve_for_layers
    from dnet.shard.service import run_shard

    if args.prefetch_window is not None and args.prefetch_window < 1:
        print("dnet shard: --prefetch-window must be at least 1", file=sys.stderr)
        return 2
    try:
        model_dir = resolve_for_layers(args.model, args.layers)
    except ModelNotFoundError as exc:
        print(f"dnet shard: {exc}", file=sys.stderr)
        return 2
    from dnet.ring.links import listen_socket

    try:
        listen_socket(args.host, args.port).close()  # a taken port ends here, before loading
    except OSError as exc:
        return _in_use("shard", exc, "-p/--port")
    stop = _stop_on_signals()
    try:
        run_shard(args.model, model_dir, args.layers, args.host, args.port, args.next_address,
                  args.prefetch_window, args.kv_ttl, stop, kv_cap_bytes=args.max_kv_bytes,
                  prefix_cache_bytes=args.prefix_cache_bytes)
    except (ValueError, OSError) as exc:
        print(f"dnet shard: {exc}", file=sys.stderr)
        return 1
    return 0


def add_api_arguments(p: argparse.ArgumentParser) -> None:
    from dnet.entry import Timeouts
    p.add_argument("-a", "--address", default="0.0.0.0:8080",
                   help="HTTP address to listen on, host:port (default 0.0.0.0:8080)")
    p.add_argument("-s", "--shard", required=True, help="first shard's host:port (layer 0)")
    p.add_argument("-m", "--model", required=True, help="model id or path; must match shards")
    p.add_argument("--max-context", type=cli_args.positive_int, default=None,
                   help="longest prompt plus answer, in tokens (default: the model's)")
    p.add_argument("--token-timeout", type=cli_args.positive_float,
                   default=Timeouts.next_token_s,
                   help="seconds to wait for the next token before failing "
                        f"(default {Timeouts.next_token_s:g}; the first token may take "
                        f"{Timeouts.first_token_s:g})")
    _add_prefill_chunk(p)
    _add_http_limits(p)
    _add_cluster_key(p)


def run_api_command(args: argparse.Namespace) -> int:
    from dnet.api.app import HttpOptions
    from dnet.api.server import run_api
    from dnet.entry import Timeouts
    from dnet.tokenizer import load_chat_tokenizer

    timeouts = Timeouts(first_token_s=max(Timeouts.first_token_s, args.token_timeout),
                        next_token_s=args.token_timeout)
    try:
        run_api(args.model, args.address, args.shard, max_context=args.max_context,
                timeouts=timeouts, max_requests=args.max_requests,
                prefill_chunk=args.prefill_chunk,
                http=HttpOptions(api_key=args.api_key, cors_origins=_origins(args),
                                 special_tokens_in_messages=args.special_tokens_in_messages),
                load_tokenizer=load_chat_tokenizer)
    except ValueError as exc:  # ModelNotFoundError, or a host name that does not resolve
        print(f"dnet api: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        return _in_use("api", exc, "-a/--address")
    return 0


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", type=int, default=2, help="number of shards (default 2)")
    p.add_argument("--http-port", type=int, default=8080, help="API port (default 8080)")
    p.add_argument("--grpc-port", type=int, default=50501, help="first shard's port")
    p.add_argument("--once", action="store_true",
                   help="exit after the sample completion instead of serving")


def run_demo_command(args: argparse.Namespace) -> int:
    from dnet.demo import run_demo

    return run_demo(shards=args.shards, http_port=args.http_port, grpc_port=args.grpc_port,
                    serve=not args.once)


def add_join_arguments(p: argparse.ArgumentParser) -> None:
    from planner.devices import DEFAULT_CONTEXT_TOKENS
    p.add_argument("--model", default=os.environ.get("DNET_MODEL", ""),
                   help="the model this node proposes for the cluster (path or HF repo id)")
    p.add_argument("--name", default=os.environ.get("DNET_NAME", ""),
                   help="a human name for this node (default: dnet-<id>)")
    p.add_argument("--host", type=cli_args.host, default=os.environ.get("DNET_HOST"),
                   help="address (or host name) to advertise and bind (default: every "
                        "interface, advertising those that reach the peers); 127.0.0.1 or "
                        "localhost keeps a mesh on this machine")
    p.add_argument("--http-port", type=cli_args.port,
                   default=os.environ.get("DNET_HTTP_PORT", "8080"),
                   help="HTTP API port (default 8080)")
    p.add_argument("--grpc-port", type=cli_args.port,
                   default=os.environ.get("DNET_GRPC_PORT", "50501"),
                   help="gRPC port for the ring and control (default 50501)")
    p.add_argument("--memory-budget", default=os.environ.get("DNET_MEMORY_BUDGET"),
                   help="memory this node gives to weights and KV cache, e.g. 8GB or 512MB "
                        "(default: Metal's working set less 2 GiB on macOS, else 80%% of "
                        "available RAM)")
    _add_cluster_key(p)
    p.add_argument("--state-dir", default=os.environ.get("DNET_STATE_DIR", "~/.config/dnet"),
                   help="where the node id is kept (default ~/.config/dnet)")
    p.add_argument("--context", type=cli_args.positive_int, default=DEFAULT_CONTEXT_TOKENS,
                   help="tokens of KV cache the plan reserves per request "
                        f"(default {DEFAULT_CONTEXT_TOKENS})")
    _add_kv_ttl(p)
    _add_kv_cap(p)
    _add_prefix_cache(p)
    _add_prefill_chunk(p)
    _add_http_limits(p)


def run_join_command(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dnet.node.node import JoinOptions, Node
    from dnet.node.sizes import parse_size

    try:
        budget = parse_size(args.memory_budget) if args.memory_budget else None
    except ValueError as exc:
        print(f"dnet join: --memory-budget: {exc}", file=sys.stderr)
        return 2
    host = None if args.host == "0.0.0.0" else args.host  # every interface: chosen, not pinned
    options = JoinOptions(model=args.model, name=args.name, host=host,
                          http_port=args.http_port, grpc_port=args.grpc_port,
                          memory_budget_bytes=budget, cluster_key=args.cluster_key,
                          state_dir=Path(args.state_dir), kv_ttl_s=args.kv_ttl,
                          context_tokens=args.context, kv_cap_bytes=args.max_kv_bytes,
                          prefix_cache_bytes=args.prefix_cache_bytes,
                          prefill_chunk=args.prefill_chunk,
                          max_requests=args.max_requests, api_key=args.api_key,
                          cors_origins=_origins(args),
                          special_tokens_in_messages=args.special_tokens_in_messages)
    from dnet.ring.links import PortInUse

    stop = _shut_down_on_signals()
    try:
        node = Node(options)
    except (OSError, ValueError) as exc:
        print(f"dnet join: {exc}", file=sys.stderr)
        return 1
    try:
        node.start()
    except PortInUse as exc:
        flag = "--grpc-port" if exc.port == options.grpc_port else "--http-port"
        node.close()
        return _in_use("join", exc, flag)
    except OSError as exc:
        node.close()
        print(f"dnet join: {exc}", file=sys.stderr)
        return 1
    node.serve(stop)
    # Everything is closed in order (requests ended, mDNS goodbye said, servers stopped).
    # Exit without the interpreter's finalization: it can abort the process ("terminate
    # called without an active exception", status 134) while native threads of MLX or gRPC
    # are still winding down.
    _exit_now(0)
    return 0


def add_status_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api", default=os.environ.get("DNET_API"),
                   help="any node's HTTP address (default: find the mesh over mDNS)")
    p.add_argument("--host", type=cli_args.host, default=os.environ.get("DNET_HOST"),
                   help="interface address (or host name) to browse mDNS on (e.g. localhost)")
    _add_cluster_key(p, CLIENT_KEY_HELP)
    p.add_argument("--json", action="store_true", help="print the topology as JSON")
    p.add_argument("--watch", action="store_true", help="keep the view live")


def run_status_command(args: argparse.Namespace) -> int:
    from dnet.status import run_status

    return run_status(api=args.api, host=args.host, as_json=args.json, watch=args.watch)


def add_load_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model directory or HF repo id to run on the cluster")
    p.add_argument("--api", default=os.environ.get("DNET_API"),
                   help="any node's HTTP address (default: find the mesh over mDNS)")
    p.add_argument("--host", type=cli_args.host, default=os.environ.get("DNET_HOST"),
                   help="interface address (or host name) to browse mDNS on (e.g. localhost)")
    _add_cluster_key(p, CLIENT_KEY_HELP)


def run_load_command(args: argparse.Namespace) -> int:
    from dnet.status import run_load

    return run_load(args.model, api=args.api, host=args.host)


def add_chat_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api", default=os.environ.get("DNET_API"),
                   help="any node's HTTP address (default: find the mesh over mDNS)")
    p.add_argument("--host", type=cli_args.host, default=os.environ.get("DNET_HOST"),
                   help="interface address (or host name) to browse mDNS on (e.g. localhost)")
    _add_cluster_key(p, CLIENT_KEY_HELP)
    p.add_argument("--max-tokens", type=cli_args.positive_int, default=512)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--system", default=None, help="a system prompt")


def run_chat_command(args: argparse.Namespace) -> int:
    from dnet.chat import run_chat

    return run_chat(args.api, args.host, args.max_tokens, args.temperature, args.system)


def _shut_down_on_signals() -> threading.Event:
    """SIGINT/SIGTERM set the returned event (the node shuts down in order, see
    dnet/node/node.py), and the process exits within SHUTDOWN_S whatever happens; a second
    signal exits at once."""
    from dnet.node.node import SHUTDOWN_S

    stop = threading.Event()

    def handler(signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if stop.is_set():
            log.warning("received %s again: exiting now", name)
            _exit_now(130)
        log.info("received %s: shutting down (again to exit at once)", name)
        stop.set()
        timer = threading.Timer(SHUTDOWN_S, _overdue)
        timer.daemon = True
        timer.start()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop


def _overdue() -> None:
    from dnet.node.node import SHUTDOWN_S

    log.warning("shutdown took over %.1f s: exiting now", SHUTDOWN_S)
    _exit_now(0)


def _exit_now(code: int) -> None:
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(code)


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handler(signum: int, _frame: object) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dnet", description="Distributed LLM inference over a ring of machines.")
    parser.add_argument("--version", action="version", version=f"dnet {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    from dnet.plan_cli import add_plan_arguments, run_plan

    commands = [
        ("join", "join the mesh on this machine (zero-config)", add_join_arguments,
         run_join_command),
        ("status", "show the mesh: nodes, ring, layers, memory", add_status_arguments,
         run_status_command),
        ("load", "switch the cluster to another model", add_load_arguments, run_load_command),
        ("chat", "chat with the cluster in the terminal", add_chat_arguments, run_chat_command),
        ("demo", "a local ring on a generated model, no network needed", add_demo_arguments,
         run_demo_command),
        ("shard", "serve some layers of a model (manual mode)", add_shard_arguments,
         run_shard_command),
        ("api", "serve the HTTP API in front of a ring (manual mode)", add_api_arguments,
         run_api_command),
        ("plan", "plan layers and windows for a set of devices", add_plan_arguments, run_plan),
    ]
    for name, description, add_arguments, run in commands:
        command = sub.add_parser(name, help=description)
        add_arguments(command)
        command.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a `dnet` command; its exit status. Usage errors exit with 2 (argparse's usage
    line, no traceback), Ctrl-C outside a server with 130."""
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    from dnet.ring import auth

    auth.configure(getattr(args, "cluster_key", None))
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def _alias(command: str) -> int:
    return main([command, *sys.argv[1:]])


def shard_alias() -> int:
    """`piped_mlx_ring_shard`, the seed's name for `dnet shard`."""
    return _alias("shard")


def api_alias() -> int:
    """`piped_mlx_ring_api`, the seed's name for `dnet api`."""
    return _alias("api")


if __name__ == "__main__":
    sys.exit(main())
