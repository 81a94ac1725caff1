"""Build the disalign image without a Docker engine or a container registry: buildah + a debootstrap base.

    python deploy/build_image.py [--tag localhost/disalign:local] [--torch-version auto] [--layers]

1. The base image ``localhost/disalign-base:bookworm-<recipe hash>``: ``debootstrap --variant=minbase
   --include=python3,python3-venv bookworm`` (no recommends; docs, manuals, locales and apt lists
   dropped; dpkg without fsync while it runs), committed with ``buildah from scratch`` + ``buildah add``. Reused when it already exists
   (``--rebuild-base`` makes it again).
2. ``buildah bud --isolation chroot --format docker`` of the repository's Dockerfile on that base (the
   docker format keeps the HEALTHCHECK). pip inside the build uses the sources pip is configured with
   here (``pip config list`` and ``PIP_*``: find-links, extra index URLs, CA bundle), passed as build
   arguments and bind-mounted read-only into the build at the same paths (``buildah bud -v``).
3. torch: ``--torch-version auto`` takes the CPU wheel that lies in a local find-links directory (then
   without torchvision: no CPU build of it lies beside that wheel); without one, the Dockerfile's pinned
   version from its CPU index.

Prints one JSON line: the image, the base, the seconds of each step and the image size (uncompressed
layers). Exit status 3 with one sentence when a network source the build needs cannot be reached (the
tests skip on it), 2 for a bad argument, 1 when a step fails.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUITE = "bookworm"  # Debian 12: Python 3.11, the version of the project's wheels
PACKAGES = ("python3", "python3-venv")
STRIPPED = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale", "var/lib/apt/lists", "var/cache/apt")
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
UNREACHABLE = 3


class Unreachable(RuntimeError):
    """A network source that the build needs cannot be reached."""


def base_tag() -> str:
    recipe = json.dumps([SUITE, "minbase", PACKAGES, STRIPPED, BASE_PATH, "two-stage"]).encode()
    return f"localhost/disalign-base:{SUITE}-{hashlib.sha256(recipe).hexdigest()[:12]}"


def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=True, **kwargs)


def image_exists(tag: str) -> bool:
    return subprocess.run(["buildah", "inspect", "--type", "image", tag], capture_output=True).returncode == 0


def check_reachable(url: str, what: str) -> None:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=20):
            pass
    except (urllib.error.URLError, OSError) as exc:
        raise Unreachable(f"{what} {url} cannot be reached ({exc}).") from None


def make_base(tag: str, mirror: str) -> None:
    """debootstrap a minimal Debian with Python into a temporary directory and commit it as ``tag``."""
    check_reachable(f"{mirror}/dists/{SUITE}/Release", "the Debian mirror")
    work = Path(tempfile.mkdtemp(prefix="disalign-base-", dir="/var/tmp"))
    try:
        rootfs, archive = work / "rootfs", work / "rootfs.tar"
        # Two stages, so that dpkg can skip its fsync per file in between: ~40 % less time installing.
        run(["debootstrap", "--foreign", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(rootfs), mirror],
            stdout=subprocess.DEVNULL)
        unsafe_io = rootfs / "etc" / "dpkg" / "dpkg.cfg.d" / "unsafe-io"
        unsafe_io.parent.mkdir(parents=True, exist_ok=True)
        unsafe_io.write_text("force-unsafe-io\n")
        run(["chroot", str(rootfs), "/debootstrap/debootstrap", "--second-stage"], stdout=subprocess.DEVNULL)
        unsafe_io.unlink()
        for relative in STRIPPED:
            shutil.rmtree(rootfs / relative, ignore_errors=True)
        run(["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(archive), "."])
        container = run(["buildah", "from", "scratch"], capture_output=True, text=True).stdout.strip()
        try:
            run(["buildah", "add", "--quiet", container, str(archive), "/"], stdout=subprocess.DEVNULL)
            run(["buildah", "config", "--env", f"PATH={BASE_PATH}", "--cmd", "/bin/bash", container])
            run(["buildah", "commit", "--quiet", container, tag], stdout=subprocess.DEVNULL)
        finally:
            subprocess.run(["buildah", "rm", container], capture_output=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def pip_configuration() -> dict[str, str]:
    """pip's settings here (``pip config list``; the ``PIP_*`` environment wins), e.g. {'find-links': '/opt/wheels'}."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    values: dict[str, str] = {}
    for line in listed.splitlines():  # global.find-links='/opt/wheels', :env:.cert='/etc/ssl/…'
        match = re.fullmatch(r"(?P<scope>[^.]*)\.(?P<key>[\w-]+)='(?P<value>.*)'", line.strip())
        if match and (match["scope"] == ":env:" or match["key"] not in values):
            values[match["key"]] = match["value"]
    for key in ("find-links", "extra-index-url", "index-url", "cert"):
        env = os.environ.get("PIP_" + key.upper().replace("-", "_"))
        if env:
            values[key] = env
    return values


def local_path(location: str) -> Path | None:
    """The local directory or file behind a pip location (a path or a file:// URL); None for remote URLs."""
    parsed = urllib.parse.urlparse(location)
    if parsed.scheme == "file":
        return Path(urllib.parse.unquote(parsed.path))
    return Path(location) if not parsed.scheme and location.startswith("/") else None


def pip_build_arguments(pip: dict[str, str]) -> tuple[list[str], list[Path]]:
    """``--build-arg`` values for the Dockerfile's PIP_* arguments and the local paths they need mounted.

    A file:// index ``…/simple`` links its wheels as ``../../files/x.whl``: its parent is mounted."""
    args, mounts = [], []
    for key, arg in (("find-links", "PIP_FIND_LINKS"), ("extra-index-url", "PIP_EXTRA_INDEX_URL"), ("cert", "PIP_CERT")):
        if key not in pip:
            continue
        args.append(f"{arg}={pip[key]}")
        for location in pip[key].split():
            path = local_path(location)
            if path is not None and path.exists():
                mounts.append(path.parent if path.name == "simple" else path)
    return args, mounts


def local_cpu_torch(pip: dict[str, str]) -> str | None:
    """The version of a CPU torch wheel for CPython 3.11 in a local find-links directory (e.g. '2.13.0+cpu')."""
    for location in pip.get("find-links", "").split():
        path = local_path(location)
        if path is not None and path.is_dir():
            for wheel in sorted(path.glob("torch-*+cpu-cp311-cp311-*.whl")):
                return wheel.name.split("-")[1]
    return None


def image_size(tag: str) -> int:
    inspected = json.loads(run(["buildah", "inspect", "--type", "image", tag], capture_output=True, text=True).stdout)
    return sum(layer["size"] for layer in json.loads(inspected["Manifest"])["layers"])


def build(args: argparse.Namespace) -> dict:
    timings: dict[str, float] = {}
    base = args.base or base_tag()
    if args.rebuild_base or not image_exists(base):
        start = time.perf_counter()
        make_base(base, args.mirror)
        timings["base_seconds"] = round(time.perf_counter() - start, 1)
    else:
        timings["base_seconds"] = 0.0  # reused
    pip = pip_configuration()
    check_reachable(pip.get("index-url", "https://pypi.org/simple/"), "the package index")
    build_args, mounts = pip_build_arguments(pip)
    build_args.append(f"BASE_IMAGE={base}")
    torch = local_cpu_torch(pip) if args.torch_version == "auto" else args.torch_version
    if torch is not None:
        build_args += [f"TORCH_VERSION={torch}", "TORCH_INDEX_URL=", "TORCHVISION_VERSION="]
    else:  # the Dockerfile's pin, from its torch index
        (index,) = re.findall(r"^ARG TORCH_INDEX_URL=(\S+)$", (REPO / "Dockerfile").read_text(), flags=re.MULTILINE)
        check_reachable(f"{index}/torch/", "the torch wheel index")
    argv = ["buildah", "bud", "--isolation", "chroot", "--format", "docker", "--tag", args.tag, "--file", str(REPO / "Dockerfile")]
    argv += ["--layers"] if args.layers else []
    for value in build_args:
        argv += ["--build-arg", value]
    for path in dict.fromkeys(mounts):
        argv += ["--volume", f"{path}:{path}:ro"]
    start = time.perf_counter()
    run([*argv, str(REPO)], stdout=None if args.verbose else subprocess.DEVNULL)
    timings["build_seconds"] = round(time.perf_counter() - start, 1)
    return {"image": args.tag, "base_image": base, **timings, "size_bytes": image_size(args.tag), "torch": torch or "Dockerfile default"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tag", default="localhost/disalign:local", help="name of the image to build")
    parser.add_argument("--base", default=None, help="base image to build on instead of the debootstrap one")
    parser.add_argument("--rebuild-base", action="store_true", help="debootstrap the base again even if it exists")
    parser.add_argument("--mirror", default="http://deb.debian.org/debian", help="Debian mirror for debootstrap")
    parser.add_argument("--torch-version", default="auto", help="'auto': a local CPU wheel, else the Dockerfile's pin")
    parser.add_argument("--layers", action="store_true", help="cache every step (faster rebuilds, more disk)")
    parser.add_argument("--verbose", action="store_true", help="show the output of buildah bud")
    args = parser.parse_args(argv)
    missing = [tool for tool in ("buildah", "debootstrap") if shutil.which(tool) is None]
    if missing:
        print(f"error: {' and '.join(missing)} not installed (apt-get install buildah debootstrap).", file=sys.stderr)
        return 2
    try:
        print(json.dumps(build(args)))
    except Unreachable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return UNREACHABLE
    except subprocess.CalledProcessError as exc:
        print(f"error: {' '.join(exc.cmd[:3])} … failed with exit status {exc.returncode}.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
