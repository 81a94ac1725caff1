"""``disalign serve``: run the REST server with uvicorn.

    disalign serve --model model.ts --card model.json --calibration calib_dir [--host 127.0.0.1] [--port 8000]

Flags override the ``DISALIGN_*`` environment (see :mod:`disalign.service.settings`); the admin token is only
read from ``DISALIGN_ADMIN_TOKEN`` or the file named by ``DISALIGN_ADMIN_TOKEN_FILE``, and the traffic
sources' tokens from ``DISALIGN_PRIOR_SOURCES`` or ``DISALIGN_PRIOR_SOURCES_FILE``, never from a flag (they
would show in the process list). Exits 0 after a normal shutdown and 2 when the server refuses to
start (the log says why, in one sentence); a bad setting is one ``error: …`` line naming the flag and the
variable (``--calibration / DISALIGN_CALIBRATION is required.``).
"""

from __future__ import annotations

import argparse
import functools
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from disalign.calib.defaults import DEFAULT_MAX_PIXELS
from disalign.calib.errors import DisalignError
from disalign.cli.common import MODEL_ARG_HELP, HelpFormatter, model_arg, model_args_dict, parse_bytes

SETTING_FLAGS = ("model", "weights", "model_args", "classifier_layer", "card", "calibration", "model_name", "max_body_bytes",
                 "max_pixels", "max_images", "max_rows", "torch_threads", "max_batch", "max_wait_ms", "device",
                 "preprocessing", "watch_interval_s", "reload_timeout_s", "prior", "prior_window", "prior_update_every", "prior_min_rows",
                 "prior_max_step", "prior_dir", "prior_traffic_max_age_s")
# What a client may hold (disalign.service.limits): the request head and body deadlines, the body budget, uvicorn's limits.
LIMIT_FLAGS = ("max_inflight_body_bytes", "timeout_header", "timeout_body", "timeout_keep_alive", "limit_concurrency")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=argparse.SUPPRESS,
                   help="stage-1 model: TorchScript file, timm:<name>, hf:<dir>, torchvision:<arch> or package.module:function; env DISALIGN_MODEL")
    p.add_argument("--weights", default=argparse.SUPPRESS, help="weights file for model specs that need one; env DISALIGN_WEIGHTS")
    p.add_argument("--model-arg", dest="model_args", action="append", type=model_arg, metavar="KEY=VALUE", default=argparse.SUPPRESS,
                   help=f"{MODEL_ARG_HELP}; the same as extract's; env DISALIGN_MODEL_ARGS (a JSON object)")
    p.add_argument("--classifier-layer", default=argparse.SUPPRESS, help="name of the final linear layer; env DISALIGN_CLASSIFIER_LAYER")
    p.add_argument("--card", default=argparse.SUPPRESS, help="model card JSON with the preprocessing (default: the calibration's); env DISALIGN_CARD")
    p.add_argument("--preprocessing", default=argparse.SUPPRESS, choices=("imagenet",),
                   help="named preprocessing instead of a card; must agree with the calibration's; env DISALIGN_PREPROCESSING")
    p.add_argument("--calibration", default=argparse.SUPPRESS, help="calibration directory (re-read by /admin/reload); env DISALIGN_CALIBRATION")
    p.add_argument("--model-name", default=argparse.SUPPRESS, help="model name in the /v2 routes (default disalign); env DISALIGN_MODEL_NAME")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--max-body-bytes", default=argparse.SUPPRESS, type=parse_bytes, help="largest request body, e.g. 16M (default 8MiB)")
    p.add_argument("--max-inflight-body-bytes", default=argparse.SUPPRESS, type=parse_bytes,
                   help="request bodies held at once, in bytes; 503 + Retry-After beyond (default 64MiB)")
    p.add_argument("--timeout-header", default=argparse.SUPPRESS, type=float, help="seconds for a request line and headers to arrive; 408 beyond (default 10)")
    p.add_argument("--timeout-body", default=argparse.SUPPRESS, type=float, help="seconds for a whole request body to arrive; 408 beyond (default 30)")
    p.add_argument("--timeout-keep-alive", default=argparse.SUPPRESS, type=float, help="seconds an idle kept-alive connection stays open (default 5)")
    p.add_argument("--limit-concurrency", default=argparse.SUPPRESS, type=int, help="most connections and requests at once; 503 beyond (default: no limit)")
    p.add_argument("--max-pixels", default=argparse.SUPPRESS, type=int, help=f"largest decoded image in pixels (default {DEFAULT_MAX_PIXELS:,}, as extract)")
    p.add_argument("--max-images", default=argparse.SUPPRESS, type=int, help="most images per request (default 64)")
    p.add_argument("--max-rows", default=argparse.SUPPRESS, type=int, help="most rows per /calibrate or /v2 infer request (default 4096)")
    p.add_argument("--torch-threads", default=argparse.SUPPRESS, type=int, help="torch intra-op threads (default min(4, CPUs))")
    p.add_argument("--max-batch", default=argparse.SUPPRESS, type=int, help="most images per forward pass (default 32)")
    p.add_argument("--max-wait-ms", default=argparse.SUPPRESS, type=float, help="how long the first image of a batch may wait for others (default 0: batch what queued during the previous pass)")
    p.add_argument("--device", default=argparse.SUPPRESS, help="torch device of the model (default cpu)")
    p.add_argument("--watch-interval-s", default=argparse.SUPPRESS, type=float,
                   help="seconds between checks of the calibration directory for a new version (default 1; 0: never)")
    p.add_argument("--reload-timeout-s", default=argparse.SUPPRESS, type=float,
                   help="longest a reload may spend reading and checking a calibration; 503 beyond (default 60)")
    p.add_argument("--prior", default=argparse.SUPPRESS, help="class prior of the answers: balanced (default), adaptive or a prior file (JSON)")
    p.add_argument("--prior-window", default=argparse.SUPPRESS, type=int, help="adaptive prior: rows of traffic kept (default 5000)")
    p.add_argument("--prior-update-every", default=argparse.SUPPRESS, type=int, help="adaptive prior: requests between estimates (default 100)")
    p.add_argument("--prior-min-rows", default=argparse.SUPPRESS, type=int, help="adaptive prior: rows before the first estimate (default 200)")
    p.add_argument("--prior-max-step", default=argparse.SUPPRESS, type=float,
                   help="adaptive prior: largest L1 move of one published estimate (default 0.2)")
    p.add_argument("--prior-dir", default=argparse.SUPPRESS,
                   help="adaptive prior: where the deployment's prior is published (default <calibration>/prior)")
    p.add_argument("--prior-traffic-max-age-s", default=argparse.SUPPRESS, type=float,
                   help="adaptive prior: a replica's window older than this is not pooled (default 600)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="server log level (uvicorn and disalign)")
    p.add_argument("--quiet", action="store_true", help="log warnings and errors only (the same as --log-level warning)")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="serve the calibrated model over REST", description="Serve the calibrated model over REST.",
                              formatter_class=HelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from disalign.service.settings import Settings

    overrides = {name: getattr(args, name) for name in (*SETTING_FLAGS, *LIMIT_FLAGS) if getattr(args, name, None) is not None}
    if "model_args" in overrides:
        try:
            overrides["model_args"] = model_args_dict(overrides["model_args"])
        except DisalignError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        print(f"error: {settings_sentence(exc.errors())}", file=sys.stderr)
        return 2
    import uvicorn  # heavy imports (torch) only once the settings are valid

    from disalign.service.limits import GuardedHttpToolsProtocol
    from disalign.service.main import QuietStartupErrors, create_app

    log_level = "warning" if args.quiet and args.log_level in ("info", "debug") else args.log_level
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    # The inference thread re-takes the GIL between torch calls; with the default 5 ms switch interval a
    # busy event loop can make it wait that long each time. Measured beside a thread running Python
    # non-stop: the ResNet-32 forward 1.3-2.1x slower at 5 ms, 1.1-1.4x at 1 ms.
    sys.setswitchinterval(0.001)
    app = create_app(settings)
    config = uvicorn.Config(QuietStartupErrors(app), host=args.host, port=args.port, log_level=log_level,
                            lifespan="on", timeout_graceful_shutdown=10,
                            http=functools.partial(GuardedHttpToolsProtocol, timeout_header=settings.timeout_header),
                            timeout_keep_alive=settings.timeout_keep_alive, limit_concurrency=settings.limit_concurrency)
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


def setting_names(field: str) -> str:
    """How a user sets a field: ``--calibration / DISALIGN_CALIBRATION`` (the environment only, without a flag)."""
    env = f"DISALIGN_{field.upper()}"
    flag = "--model-arg" if field == "model_args" else f"--{field.replace('_', '-')}"
    return f"{flag} / {env}" if field in SETTING_FLAGS or field in LIMIT_FLAGS else env


def settings_sentence(errors: Sequence[dict[str, Any]]) -> str:
    """One sentence for invalid settings, naming what the user typed rather than pydantic's field names;
    the first problem, then the others (named, up to a few, and counted)."""
    from disalign.service.messages import further_problems

    return f"{setting_problem(errors[0])}{further_problems([setting_problem(e) for e in errors[1:]])}."


def setting_problem(error: dict[str, Any]) -> str:
    """One invalid setting: ``--flag / DISALIGN_FLAG: what is wrong, found …``."""
    loc = error.get("loc") or ()
    message = str(error.get("msg", "is invalid")).removeprefix("Value error, ").rstrip(".")
    if not loc:  # a check across several settings: its message names them
        return message
    where = setting_names(str(loc[0])) + "".join(f".{part}" for part in loc[1:])  # DISALIGN_PRIOR_SOURCES.partner.max_share
    if error.get("type") == "missing":
        return f"{where} is required"
    found = error.get("input")
    secret = str(loc[0]) == "admin_token" or str(loc[-1]) == "token"
    shown = "" if secret or not isinstance(found, str | int | float) or "found" in message else f", found {found!r}"
    return f"{where}: {message[:1].lower()}{message[1:]}{shown}"


class _Stop(Exception):
    """SIGTERM, re-raised by uvicorn after its graceful shutdown."""


def _raise_stop(signum, frame) -> None:
    raise _Stop
