"""``disalign serve``: run the REST server with uvicorn.

    disalign serve --model model.ts --card model.json --calibration calib_dir [--host 127.0.0.1] [--port 8000]
    python -m service --model model.ts --card model.json --calibration calib_dir

Flags override the ``DISALIGN_*`` environment (see :mod:`service.settings`); the admin token is only
read from ``DISALIGN_ADMIN_TOKEN``, never from a flag (it would show in the process list). Exits 0 after
a normal shutdown and 2 when the server refuses to start (the log says why, in one sentence).
"""

from __future__ import annotations

import argparse
import logging
import sys

from pydantic import ValidationError

from service.errors import validation_sentence

SETTING_FLAGS = ("model", "weights", "classifier_layer", "card", "calibration", "model_name", "max_body_bytes",
                 "max_pixels", "max_images", "max_rows", "torch_threads", "max_batch", "max_wait_ms", "device")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="stage-1 model (TorchScript file or model spec); env DISALIGN_MODEL")
    p.add_argument("--weights", help="weights file for model specs that need one; env DISALIGN_WEIGHTS")
    p.add_argument("--classifier-layer", help="name of the final linear layer; env DISALIGN_CLASSIFIER_LAYER")
    p.add_argument("--card", help="model card JSON with the preprocessing; env DISALIGN_CARD")
    p.add_argument("--calibration", help="calibration directory (re-read by /admin/reload); env DISALIGN_CALIBRATION")
    p.add_argument("--model-name", help="model name in the /v2 routes (default disalign)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--max-body-bytes", type=int, help="largest request body (default 8 MiB)")
    p.add_argument("--max-pixels", type=int, help="largest decoded image in pixels (default 25,000,000)")
    p.add_argument("--max-images", type=int, help="most images per request (default 64)")
    p.add_argument("--max-rows", type=int, help="most rows per /calibrate or /v2 infer request (default 4096)")
    p.add_argument("--torch-threads", type=int, help="torch intra-op threads (default min(4, CPUs))")
    p.add_argument("--max-batch", type=int, help="most images per forward pass (default 32)")
    p.add_argument("--max-wait-ms", type=float, help="how long a batch waits to fill up (default 2)")
    p.add_argument("--device", help="torch device of the model (default cpu)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="serve the calibrated model over REST",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from service.main import QuietStartupErrors, create_app
    from service.settings import Settings

    overrides = {name: getattr(args, name) for name in SETTING_FLAGS if getattr(args, name, None) is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        print(f"error: {validation_sentence(exc.errors())}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    app = create_app(settings)
    config = uvicorn.Config(QuietStartupErrors(app), host=args.host, port=args.port, log_level=args.log_level,
                            lifespan="on", timeout_graceful_shutdown=10)
    server = uvicorn.Server(config)
    server.run()
    return 0 if server.started else 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service", description="Serve the calibrated model over REST.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))
