"""`dayzero serve`: load a checkpoint, build the app, run uvicorn until SIGINT/SIGTERM.

On SIGTERM uvicorn stops accepting connections, lets every in-flight response (streams included)
finish, then runs the app's shutdown, which stops the engine thread; the process exits 0.
"""
from __future__ import annotations

import ipaddress
import signal
import socket
import sys
from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("--model", default=None,
                   help="checkpoint directory in the official hub layout (default: the built-in model)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: the directory name)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/* "
                                                   "(also read from DAYZERO_API_KEY)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context limit per request, prompt + output (default: the model's, capped by the KV cache)")
    p.add_argument("--max-in-flight", type=int, default=None,
                   help="requests answered at once; more get 429 (default: 4 x --max-num-seqs)")
    p.add_argument("--max-body-bytes", type=int, default=4 * 2**20, help="larger request bodies get 413")
    p.add_argument("--cpu-workers", type=int, default=2,
                   help="threads per lane of the pool that parses, renders, tokenizes and detokenizes off the "
                        "event loop (two lanes: bodies over 64 KiB or outputs over 4096 tokens, and the rest)")
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="requests in the engine's running batch (default: 32, lowered to what the cache budget holds)")
    p.add_argument("--max-num-batched-tokens", type=int, default=1024, help="tokens per engine step")
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None,
                   help="KV cache budget per rank (default: the memory free after the weights, less a margin, "
                        "shared by the local CPU ranks; engine/capacity.py)")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--numerics", choices=["official", "transformers"], default=None,
                   help="official (the default for DeepSeek-V4) or transformers (DeepSeek-V4.1's only mode, "
                        "its default)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--ops", choices=["triton", "cpu", "ref"], default=None,
                   help="kernels: triton, cpu (native C kernels) or ref (the PyTorch twins); default: "
                        "triton on GPUs, cpu on CPUs where it builds, else ref")
    p.add_argument("--enforce-eager", action="store_true",
                   help="never replay decode steps from CUDA graphs (default: graphs on CUDA GPUs)")
    p.add_argument("--v41-bounded-replay", action="store_true",
                   help="DeepSeek-V4.1 only: bounded-replay prefill, an approximation (its decoder layers run on each "
                        "prompt's last window tokens; docs/V41.md); off: the exact prefill")
    p.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto",
                   help="auto: cache rows in the compute dtype; fp8: K=V rows stored as FP8 (blocks of 64, "
                        "power-of-two scales) + rope dims, 584 instead of 1024 bytes a V4 row; lossless "
                        "with --numerics official, which rounds them so anyway")
    from dayzero.cli import add_parallel_arguments, add_speculative_arguments
    add_parallel_arguments(p)
    add_speculative_arguments(p)
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])


def serve(a) -> int:
    import os

    import uvicorn

    from dayzero import LLM
    from dayzero.builtin import BUILTIN_NAME, BUILTIN_NAMES, builtin_path
    from dayzero.engine.llm import resolve_model
    from dayzero.server.app import ServerArgs, build_app

    for name in ("max_model_len", "max_in_flight", "max_body_bytes", "cpu_workers"):
        v = getattr(a, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')}: must be positive, got {v}")
    try:
        if not ipaddress.ip_address(a.host).is_loopback:
            print(f"dayzero serve: warning: binding {a.host}, reachable beyond this machine"
                  f"{'' if (a.api_key or os.environ.get('DAYZERO_API_KEY')) else ' and without --api-key'}",
                  file=sys.stderr)
    except ValueError:
        pass  # a host name
    from dayzero.cli import speculative_config
    llm = LLM(a.model, device=a.device, dtype=a.dtype, numerics=a.numerics, max_num_seqs=a.max_num_seqs,
              max_num_batched_tokens=a.max_num_batched_tokens, enable_prefix_caching=not a.no_prefix_caching,
              num_speculative_tokens=a.num_speculative_tokens, kv_cache_memory_bytes=a.kv_cache_memory_bytes,
              speculative_config=speculative_config(a.speculative_config),
              ops=a.ops, enforce_eager=a.enforce_eager, kv_cache_dtype=a.kv_cache_dtype,
              tensor_parallel_size=a.tensor_parallel_size, enable_expert_parallel=a.enable_expert_parallel,
              data_parallel_size=a.data_parallel_size, cpu_experts=a.cpu_experts,
              v41_bounded_replay=a.v41_bounded_replay)
    name = a.served_model_name or (Path(a.model).resolve().name if a.model else BUILTIN_NAME)
    sargs = ServerArgs(model_name=name, api_key=a.api_key or os.environ.get("DAYZERO_API_KEY") or None,
                       max_model_len=a.max_model_len, max_in_flight=a.max_in_flight, max_body_bytes=a.max_body_bytes,
                       cpu_workers=a.cpu_workers, model_dir=str(resolve_model(a.model)),
                       builtin=resolve_model(a.model).resolve() in {builtin_path(n).resolve() for n in BUILTIN_NAMES})
    app = build_app(llm, sargs)
    server = app.state.server
    # a dead engine loop (a rank of --tensor-parallel-size gone) drains the server and exits non-zero;
    # meanwhile requests get 503
    server.loop.on_dead = lambda: os.kill(os.getpid(), signal.SIGTERM)
    # bind before saying so: a port in use is one clear line, not "serving on ..." and then a traceback
    try:
        sock = socket.create_server((a.host, a.port), family=socket.AF_INET6 if ":" in a.host else socket.AF_INET)
    except OSError as e:
        llm.close()
        print(f"dayzero serve: cannot listen on {a.host}:{a.port}: {e.strerror or e}", file=sys.stderr, flush=True)
        return 1
    print(f"dayzero: serving {name!r} (context {server.context} tokens) on http://{a.host}:{sock.getsockname()[1]}",
          file=sys.stderr, flush=True)
    config = uvicorn.Config(app, host=a.host, port=a.port, log_level=a.log_level, timeout_graceful_shutdown=None, http="h11",
                            access_log=a.log_level in ("info", "debug"))
    # h11: its ASGI receive reports a client's disconnect to a running stream, which aborts the request
    # uvicorn re-raises the signal that stopped it once it has drained; a drained SIGTERM is a clean exit
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # the re-raised SIGINT after a drained Ctrl-C
        pass
    finally:
        llm.close()  # the other ranks (--tensor-parallel-size) stop with this one
    if server.loop.error:
        print(f"dayzero: stopped: {server.loop.error}", file=sys.stderr, flush=True)
        return 1
    print("dayzero: stopped", file=sys.stderr, flush=True)
    return 0
