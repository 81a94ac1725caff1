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
import signal
import sys
import threading

from pydantic import ValidationError

from service.messages import validation_sentence

SETTING_FLAGS = ("model", "weights", "classifier_layer", "card", "calibration", "model_name", "max_body_bytes",
                 "max_pixels", "max_images", "max_rows", "torch_threads", "max_batch", "max_wait_ms", "device",
                 "preprocessing", "watch_interval_s")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=argparse.SUPPRESS, help="stage-1 model (TorchScript file or model spec); env DISALIGN_MODEL")
    p.add_argument("--weights", default=argparse.SUPPRESS, help="weights file for model specs that need one; env DISALIGN_WEIGHTS")
    p.add_argument("--classifier-layer", default=argparse.SUPPRESS, help="name of the final linear layer; env DISALIGN_CLASSIFIER_LAYER")
    p.add_argument("--card", default=argparse.SUPPRESS, help="model card JSON with the preprocessing (default: the calibration's); env DISALIGN_CARD")
    p.add_argument("--preprocessing", default=argparse.SUPPRESS, choices=("imagenet",),
                   help="named preprocessing instead of a card; must agree with the calibration's; env DISALIGN_PREPROCESSING")
    p.add_argument("--calibration", default=argparse.SUPPRESS, help="calibration directory (re-read by /admin/reload); env DISALIGN_CALIBRATION")
    p.add_argument("--model-name", default=argparse.SUPPRESS, help="model name in the /v2 routes (default disalign); env DISALIGN_MODEL_NAME")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--max-body-bytes", default=argparse.SUPPRESS, type=int, help="largest request body (default 8 MiB)")
    p.add_argument("--max-pixels", default=argparse.SUPPRESS, type=int, help="largest decoded image in pixels (default 25,000,000)")
    p.add_argument("--max-images", default=argparse.SUPPRESS, type=int, help="most images per request (default 64)")
    p.add_argument("--max-rows", default=argparse.SUPPRESS, type=int, help="most rows per /calibrate or /v2 infer request (default 4096)")
    p.add_argument("--torch-threads", default=argparse.SUPPRESS, type=int, help="torch intra-op threads (default min(4, CPUs))")
    p.add_argument("--max-batch", default=argparse.SUPPRESS, type=int, help="most images per forward pass (default 32)")
    p.add_argument("--max-wait-ms", default=argparse.SUPPRESS, type=float, help="how long the first image of a batch may wait for others (default 0: batch what queued during the previous pass)")
    p.add_argument("--device", default=argparse.SUPPRESS, help="torch device of the model (default cpu)")
    p.add_argument("--watch-interval-s", default=argparse.SUPPRESS, type=float,
                   help="seconds between checks of the calibration directory for a new version (default 1; 0: never)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="serve the calibrated model over REST",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from service.settings import Settings

    overrides = {name: getattr(args, name) for name in SETTING_FLAGS if getattr(args, name, None) is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        print(f"error: {validation_sentence(exc.errors())}", file=sys.stderr)
        return 2
    import uvicorn  # heavy imports (torch) only once the settings are valid

    from service.main import QuietStartupErrors, create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    # The inference thread re-takes the GIL between torch calls; with the default 5 ms switch interval a
    # busy event loop can make it wait that long each time. Measured beside a thread running Python
    # non-stop: the ResNet-32 forward 1.3-2.1x slower at 5 ms, 1.1-1.4x at 1 ms.
    sys.setswitchinterval(0.001)
    app = create_app(settings)
    config = uvicorn.Config(QuietStartupErrors(app), host=args.host, port=args.port, log_level=args.log_level,
                            lifespan="on", timeout_graceful_shutdown=10)
    server = uvicorn.Server(config)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal: end with status 0 instead.
    previous = signal.signal(signal.SIGTERM, _raise_stop) if threading.current_thread() is threading.main_thread() else None
    try:
        server.run()
    except SystemExit as exc:  # uvicorn exits 3 when start-up fails; the log already said why
        return 0 if exc.code in (0, None) else 2
    except (KeyboardInterrupt, _Stop):
        pass
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0 if server.started else 2


class _Stop(Exception):
    """SIGTERM, re-raised by uvicorn after its graceful shutdown."""


def _raise_stop(signum, frame) -> None:
    raise _Stop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service", description="Serve the calibrated model over REST.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))
