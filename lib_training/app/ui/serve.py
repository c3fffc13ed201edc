"""`python -m lib_training serve`: run the standalone app on a checkpoint, or on the demo assets.

Gradio, FastAPI and uvicorn are imported only when the command runs, so the rest of the CLI starts
without them.
"""

from __future__ import annotations

import argparse
import errno
import socket
from pathlib import Path

from lib_training.app.terminal_log import log_to_terminal
from lib_training.errors import UserError

DEFAULT_PORT = 7870


def add_serve_parser(commands: argparse._SubParsersAction) -> None:
    """Add the `serve` subcommand to the CLI's subcommands."""
    serve = commands.add_parser(
        "serve",
        help="run the standalone app: training UI, Generate panel and HTTP API",
        description="Serve the training UI and the HTTP API (/training/v1, documented at /docs) on one "
        "local web server. --demo makes a tiny model and a sample dataset (once, cached) and fills the "
        "form, so a complete training can be clicked through in under a minute on a CPU.",
    )
    serve.add_argument("--ckpt", type=Path, default=None, help="checkpoint to train on (.safetensors or .ckpt)")
    serve.add_argument(
        "--demo",
        action="store_true",
        help="use a tiny generated SD1 model (unless --ckpt is given) and a sample dataset, and pre-fill the form; "
        "cached in $SDWT_CACHE or ~/.cache/sd-webui-training",
    )
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)"
    )
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    serve.add_argument("--outputs", type=Path, default=Path("outputs"), help="output folder (default ./outputs)")
    serve.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    serve.add_argument("--dtype", default="auto", help="weights' dtype: auto, fp32, fp16 or bf16 (default auto)")
    serve.set_defaults(run=run_serve)


def check_port_free(host: str, port: int) -> None:
    """UserError naming the fix if `host:port` cannot be listened on."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            reason = "is in use" if error.errno == errno.EADDRINUSE else f"cannot be used ({error.strerror})"
            raise UserError(f"port {port} on {host} {reason}; choose another with --port") from None


def check_web_stack() -> None:
    """Gradio 4 renders its page with Starlette's pre-1.0 template call; Starlette 1.x refuses it."""
    import gradio
    import starlette

    if gradio.__version__.startswith("4.") and int(starlette.__version__.split(".")[0]) >= 1:
        raise UserError(
            f"gradio {gradio.__version__} cannot serve its page with starlette {starlette.__version__}; "
            "install a compatible one: pip install 'starlette<1'"
        )


def run_serve(args: argparse.Namespace) -> None:
    if args.ckpt is None and not args.demo:
        raise UserError(
            "serve needs a model: give a checkpoint with --ckpt PATH, or try the app on a tiny generated "
            "model with --demo"
        )
    if args.ckpt is not None and not args.ckpt.is_file():
        raise UserError(f"the checkpoint {args.ckpt} does not exist; check the path given to --ckpt")
    check_port_free(args.host, args.port)
    check_web_stack()
    log_to_terminal()

    import uvicorn

    from lib_training.app.service import StandaloneWorkspace, TrainingService
    from lib_training.app.ui.app import build_app

    presets, generate_defaults = {}, {}
    checkpoint = args.ckpt
    if args.demo:
        from lib_training.app.ui.demo import demo_assets, generate_preset, training_preset

        assets = demo_assets()
        checkpoint = checkpoint or assets.checkpoint
        presets = {"embedding": training_preset(assets)}
        generate_defaults = generate_preset()
    service = TrainingService(StandaloneWorkspace(checkpoint, args.outputs, device=args.device, dtype=args.dtype))
    app = build_app(service, presets, generate_defaults)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(
        f"sd-webui-training: open http://{shown}:{args.port}/  (model {checkpoint}, outputs {args.outputs})", flush=True
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
