"""What slow, large or hostile clients can hold, against a real ``disalign serve`` process over raw sockets.

The server runs with short deadlines (header 1 s, body 2 s, keep-alive 1 s) and a body budget of three
8 MiB bodies; every failure is made to happen for real: bytes sent slowly, bodies never finished, a 3 KB
PNG declaring 25 Mpx. The request-head guard subclasses uvicorn's private ``HttpToolsProtocol``: the part of
that class it relies on is checked here first, by name and signature and on a real uvicorn server, so that a
uvicorn release changing it fails these tests instead of silently dropping the head deadline.
"""

from __future__ import annotations

import inspect
import io
import json
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import uvicorn
from PIL import Image
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from disalign.service.limits import GuardedHttpToolsProtocol
from tests.service.conftest import Artifacts, ServerProcess, install, start_server

TIMEOUT_HEADER_S = 1.0
TIMEOUT_BODY_S = 2.0
MAX_BODY = 8 * 2**20
BUDGET_BODIES = 3
HEALTHCHECK_TIMEOUT_S = 4.0  # the Docker healthcheck's: a slower probe marks the container unhealthy
SETTINGS = {"DISALIGN_TIMEOUT_HEADER": str(TIMEOUT_HEADER_S), "DISALIGN_TIMEOUT_BODY": str(TIMEOUT_BODY_S),
            "DISALIGN_TIMEOUT_KEEP_ALIVE": "1", "DISALIGN_MAX_BODY_BYTES": str(MAX_BODY),
            "DISALIGN_MAX_INFLIGHT_BODY_BYTES": f"{BUDGET_BODIES * 8}MiB", "DISALIGN_LIMIT_CONCURRENCY": "100"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, artifacts: Artifacts) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("limits")
    install(artifacts.good, root / "calibration")
    proc = start_server(root / "calibration", root / "server.log", env=SETTINGS)
    yield proc
    assert proc.stop() == 0, proc.log.read_text()[-3000:]


def connect(server: ServerProcess) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def read_until_closed(sock: socket.socket, wait_s: float) -> tuple[bytes, float, bool]:
    """(bytes received, seconds until the server closed, closed?) within ``wait_s``."""
    start, data = time.monotonic(), b""
    while (left := wait_s - (time.monotonic() - start)) > 0:
        readable, _, _ = select.select([sock], [], [], left)
        if not readable:
            break
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data, time.monotonic() - start, True
        if not chunk:
            return data, time.monotonic() - start, True
        data += chunk
    return data, time.monotonic() - start, False


def status_of(response: bytes) -> int | None:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else None


def error_of(response: bytes) -> str:
    return json.loads(response.split(b"\r\n\r\n", 1)[1])["error"]


class HealthProbe:
    """Polls /v2/health/live every 50 ms on a thread and keeps the latencies (inf for a failed probe).

    A new connection per probe, as a load balancer's health check does: a kept-alive one could be closed
    by the 1 s keep-alive timeout while this thread waits for the GIL, and the next probe would fail."""

    def __init__(self, url: str):
        self.url, self.latencies, self._stop = url, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            start = time.perf_counter()
            try:
                ok = httpx.get(f"{self.url}/v2/health/live", timeout=30).status_code == 200
            except httpx.HTTPError:
                ok = False
            self.latencies.append(time.perf_counter() - start if ok else float("inf"))
            time.sleep(0.05)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)


# -- uvicorn's private protocol, which GuardedHttpToolsProtocol subclasses ------------------------------------
# The methods it overrides, with their parameters after self: uvicorn (and asyncio) call them by these names,
# so a renamed one would leave the override uncalled and the deadline silently gone.
OVERRIDDEN = {"__init__": ["config", "server_state", "app_state", "_loop"], "connection_made": ["transport"],
              "connection_lost": ["exc"], "data_received": ["data"], "on_message_begin": [], "on_headers_complete": [],
              "on_response_complete": []}
PROTOCOL_ATTRIBUTES = ("loop", "transport", "flow", "cycle", "client")  # read or written by the subclass
CYCLE_ATTRIBUTES = ("response_complete", "more_body", "keep_alive")


@pytest.fixture(scope="module")
def guarded_uvicorn() -> Iterator[tuple[tuple[str, int], list[GuardedHttpToolsProtocol]]]:
    """A real uvicorn server (in a thread, no model) running the guarded protocol with a 0.5 s head deadline:
    its address and every protocol instance it made."""
    protocols: list[GuardedHttpToolsProtocol] = []

    def protocol(*args, **kwargs) -> GuardedHttpToolsProtocol:
        protocols.append(GuardedHttpToolsProtocol(*args, timeout_header=0.5, **kwargs))
        return protocols[-1]

    async def app(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, http=protocol, lifespan="off", log_config=None, loop="asyncio"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started
    try:
        yield sock.getsockname(), protocols
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def test_the_private_uvicorn_api_the_guarded_protocol_relies_on_is_unchanged(guarded_uvicorn):
    for name, parameters in OVERRIDDEN.items():
        assert name in vars(HttpToolsProtocol), f"uvicorn's HttpToolsProtocol has no {name} any more (GuardedHttpToolsProtocol overrides it)"
        found = list(inspect.signature(vars(HttpToolsProtocol)[name]).parameters)[1:]
        assert found == parameters, f"HttpToolsProtocol.{name} takes {found} now, GuardedHttpToolsProtocol was written for {parameters}"
    assert STATUS_LINE[408].startswith(b"HTTP/1.1 408 ") and STATUS_LINE[431].startswith(b"HTTP/1.1 431 ")
    address, protocols = guarded_uvicorn
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        protocol = protocols[-1]
        missing = [name for name in PROTOCOL_ATTRIBUTES if not hasattr(protocol, name)]
        missing += [f"cycle.{name}" for name in CYCLE_ATTRIBUTES if not hasattr(protocol.cycle, name)]
        missing += [] if callable(getattr(protocol.flow, "pause_reading", None)) else ["flow.pause_reading"]
        assert missing == [], f"uvicorn's protocol no longer has {missing}, which GuardedHttpToolsProtocol uses"


@pytest.mark.parametrize("sent", [b"", b"GET / HTTP/1.1\r\nHost: x\r\n"], ids=["nothing", "partial headers"])
def test_a_real_uvicorn_server_with_the_guarded_protocol_enforces_the_head_deadline(guarded_uvicorn, sent: bytes):
    # Without the subclass's timer uvicorn would wait for ever here (its keep-alive timeout starts after a response).
    with socket.create_connection(guarded_uvicorn[0], timeout=10) as sock:
        sock.sendall(sent)
        data, elapsed, closed = read_until_closed(sock, 5)
    assert closed and status_of(data) == 408 and 0.45 <= elapsed <= 3, (data, elapsed)
    assert error_of(data) == "the request line and headers did not arrive within 0.5 s (DISALIGN_TIMEOUT_HEADER)."


# -- image bombs (issue 9, item 8) ------------------------------------------------------------------
def test_a_small_file_declaring_many_pixels_is_decoded_off_the_event_loop(server: ServerProcess):
    buf = io.BytesIO()
    Image.new("1", (5000, 5000)).save(buf, format="PNG")
    bomb = buf.getvalue()
    assert len(bomb) < 4096  # 3 KB that declare 25 Mpx (the default --max-pixels accepts them)
    files = [("file", (f"b{i}.png", bomb, "image/png")) for i in range(8)]  # 24 KB: "small" by bytes
    with HealthProbe(server.url) as probe:
        time.sleep(0.3)
        start = time.perf_counter()
        response = httpx.post(f"{server.url}/predict", files=files, timeout=120)
        decoding = time.perf_counter() - start
        time.sleep(0.3)
    assert response.status_code == 200, response.text
    # Decoded on the event loop, the eight images block it for as long as the request takes (0.44 s each on
    # a quiet core, 10 s in all on the loaded test machine): no probe is answered in the meantime. Off the
    # loop, probes are answered throughout (relative bound: the machine's load scales both sides).
    assert max(probe.latencies) < min(HEALTHCHECK_TIMEOUT_S, 0.5 * decoding), (decoding, sorted(probe.latencies)[-5:])


# -- request heads and bodies (item 9) -------------------------------------------------------------------------
HEAD_LATE = "the request line and headers did not arrive within 1 s (DISALIGN_TIMEOUT_HEADER)."
BODY_LATE = "the request body did not arrive within 2 s (DISALIGN_TIMEOUT_BODY)."


@pytest.mark.parametrize(("sent", "deadline_s", "sentence"), [
    (b"", TIMEOUT_HEADER_S, HEAD_LATE),
    (b"GET /v2/hea", TIMEOUT_HEADER_S, HEAD_LATE),
    (b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n", TIMEOUT_HEADER_S, HEAD_LATE),
    (b"POST /calibrate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"rows\": [",
     TIMEOUT_BODY_S, BODY_LATE),
], ids=["nothing", "partial request line", "partial headers", "partial body"])
def test_a_request_that_does_not_arrive_in_time_is_answered_408_and_closed(server: ServerProcess, sent: bytes,
                                                                           deadline_s: float, sentence: str):
    with connect(server) as sock:
        sock.sendall(sent)
        data, elapsed, closed = read_until_closed(sock, deadline_s + 3)
    assert closed and status_of(data) == 408, data
    assert deadline_s * 0.9 <= elapsed <= deadline_s + 2
    assert error_of(data) == sentence


def test_a_request_head_larger_than_64_kib_is_answered_431(server: ServerProcess):
    with connect(server) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: ")
        try:
            for _ in range(16):  # 1 MiB of one header value; httptools alone would buffer it all
                sock.sendall(b"a" * 65536)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before the end
        data, _, closed = read_until_closed(sock, 5)
    assert closed and status_of(data) == 431, data


def test_an_idle_kept_alive_connection_closes_after_timeout_keep_alive(server: ServerProcess):
    with connect(server) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        data, elapsed, closed = read_until_closed(sock, 4)
    assert status_of(data) == 200 and closed and elapsed < 3, (data, elapsed)  # uvicorn's default would be 5 s


def test_head_on_the_health_routes(server: ServerProcess):
    for route in ("live", "ready"):
        response = httpx.head(f"{server.url}/v2/health/{route}")
        assert response.status_code == 200 and response.content == b""


# -- request bodies (item 9) ------------------------------------------------------------------------
def test_a_body_left_unread_by_an_early_answer_cannot_hold_the_connection(server: ServerProcess):
    with connect(server) as sock:
        sock.sendall(b"POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nab")
        data = b""
        while b"}" not in data:
            data += sock.recv(65536)
        assert status_of(data) == 404
        answered, closed = time.monotonic(), False
        try:
            for _ in range(10):  # trickle the rest of the body: every byte would re-arm uvicorn's keep-alive timer
                sock.sendall(b"x")
                readable, _, _ = select.select([sock], [], [], 0.3)
                if readable and sock.recv(65536) == b"":
                    closed = True
                    break
        except (BrokenPipeError, ConnectionResetError):
            closed = True
    assert closed and time.monotonic() - answered < 1.5


def upload(server: ServerProcess, results: list, start_together: threading.Barrier, size: int = MAX_BODY) -> None:
    """A client announcing an 8 MiB body: sends all but its last byte unless answered at once, then waits."""
    start_together.wait(30)
    start = time.monotonic()
    with connect(server) as sock:
        sock.sendall(b"POST /calibrate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % size)
        data, _, closed = read_until_closed(sock, 0.5)  # refusals come before any body byte is read
        if not data:
            try:
                sock.sendall(b" " * (size - 1))
            except (BrokenPipeError, ConnectionResetError):
                pass
            data, _, closed = read_until_closed(sock, TIMEOUT_BODY_S + 4)
        elif not closed:  # answered at once; the close may come a little later on a loaded machine
            more, _, closed = read_until_closed(sock, 5)
            data += more
    results.append((status_of(data), data, time.monotonic() - start, closed))


def test_slow_uploads_get_408_or_503_in_bounded_memory_while_health_stays_fast(server: ServerProcess):
    process = psutil.Process(server.process.pid)
    baseline = peak = process.memory_info().rss
    results: list = []
    barrier = threading.Barrier(60)
    clients = [threading.Thread(target=upload, args=(server, results, barrier)) for _ in range(60)]
    with HealthProbe(server.url) as probe:
        for client in clients:
            client.start()
        while any(c.is_alive() for c in clients):
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.02)
    statuses = sorted(status for status, *_ in results)
    # At most three bodies at once: most clients are refused at once (a budget freed by a 408 may admit a
    # late starter on a loaded machine, so not exactly 57), the admitted ones time out.
    assert statuses.count(503) >= 45 and statuses.count(408) >= 1, statuses
    assert set(statuses) <= {408, 503}, statuses
    refused = next(data for status, data, *_ in results if status == 503)
    assert b"retry-after: 1\r\n" in refused.lower() and "too many request bodies" in error_of(refused)
    assert all(closed for *_, closed in results)
    assert all(elapsed <= TIMEOUT_BODY_S + 3 for status, _, elapsed, _ in results if status == 408)
    # Three bodies of 8 MiB may be held (twice over while joined); sixty would be 500 MB and more.
    assert (peak - baseline) / 2**20 < 150, f"RSS grew by {(peak - baseline) / 2**20:.0f} MiB"
    assert max(probe.latencies) < HEALTHCHECK_TIMEOUT_S, sorted(probe.latencies)[-5:]
    assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200


def test_limit_concurrency_answers_503_past_the_limit(server: ServerProcess):
    idle = [connect(server) for _ in range(100)]  # each held open; the head deadline closes them after 1 s
    try:
        time.sleep(0.2)
        response = httpx.get(f"{server.url}/v2/health/live", timeout=5)
    finally:
        for sock in idle:
            sock.close()
    assert response.status_code == 503
    time.sleep(TIMEOUT_HEADER_S)
    assert httpx.get(f"{server.url}/v2/health/live").status_code == 200


def test_the_16_bit_png_of_a_picture_is_classified_as_its_8_bit_png(server: ServerProcess, cifar_jpegs: list[Path]):
    import numpy as np

    gray = np.asarray(Image.open(cifar_jpegs[5]).convert("L"))
    answers = []
    for array in (gray, gray.astype(np.uint16) * 257):
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG")
        response = httpx.post(f"{server.url}/predict", files=[("file", ("g.png", buf.getvalue(), "image/png"))],
                              params={"top_k": 10}, timeout=30)
        assert response.status_code == 200, response.text
        answers.append(response.json()["predictions"][0]["top_k"])
    assert answers[0] == answers[1]  # same classes, same probabilities (16-bit v * 257 is 8-bit v exactly)


def test_decode_errors_over_http_name_no_python_objects(server: ServerProcess):
    response = httpx.post(f"{server.url}/predict", files=[("file", ("x.png", b"not an image at all", "image/png"))], timeout=30)
    assert response.status_code == 400
    assert response.json() == {"error": "image <bytes> could not be decoded (not an image format Pillow reads: JPEG, PNG, BMP, GIF, TIFF, WebP …)."}


# -- a client that goes away mid-body (issue 21 §4) ---------------------------------------------------
ABANDONED = {
    "/calibrate": b"Content-Type: application/json\r\n",
    "/v2/models/disalign/infer": b"Content-Type: application/json\r\n",
    "/v2/models/disalign/infer#binary": b"Content-Type: application/octet-stream\r\nInference-Header-Content-Length: 10\r\n",
    "/predict": b"Content-Type: multipart/form-data; boundary=xyz\r\n",
    "/admin/prior": b"Content-Type: application/json\r\nAuthorization: Bearer test-admin-token-0123456789\r\n",
}


@pytest.mark.parametrize("route", list(ABANDONED))
def test_a_request_abandoned_mid_body_logs_one_line_and_no_traceback(server: ServerProcess, route: str):
    start = len(server.log.read_bytes())
    path = route.split("#")[0].encode()
    with connect(server) as sock:
        sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\n%sContent-Length: 100000\r\n\r\n" % (path, ABANDONED[route]))
        sock.sendall(b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n' + b"x" * 500)
        time.sleep(0.2)  # the app is reading the body now
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and b"closed the connection" not in server.log.read_bytes()[start:]:
        time.sleep(0.05)
    time.sleep(0.3)  # anything logged after that line would show too
    lines = server.log.read_bytes()[start:].decode().splitlines()
    assert not any("Traceback" in line or "ClientDisconnect" in line or "Exception in ASGI" in line for line in lines), lines
    noted = [line for line in lines if "closed the connection" in line]
    assert len(noted) == 1 and path.decode() in noted[0], lines
    assert httpx.get(f"{server.url}/v2/health/live").status_code == 200
