"""The Open Inference Protocol routes of a real ``disalign serve`` process, driven by NVIDIA's ``tritonclient``
(the reference v2 client) and, for what it does not check itself (headers, errors), by plain HTTP.

Every answer is compared with ``DisAlign.predict_proba`` on the same rows: real ResNet-32 stage-1 outputs
of CIFAR-10-LT test images (``examples/cifar10lt/test.h5``). One server process for the whole module.
"""

from __future__ import annotations

import base64
import json
import socket
from pathlib import Path

import httpx
import ml_dtypes
import numpy as np
import orjson
import pytest
import torch
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from disalign.calib.data.bank import load_bank
from disalign.calib.estimators.disalign import DisAlign
from tests.service.conftest import ADMIN_TOKEN, REPO, Artifacts, ServerProcess, install

ROWS = 6


@pytest.fixture(scope="module")
def rows() -> tuple[np.ndarray, np.ndarray]:
    """Features (ROWS, 64) and logits (ROWS, 10) float32 of real CIFAR-10-LT test images."""
    bank = load_bank(REPO / "examples" / "cifar10lt" / "test.h5")
    pick = torch.arange(0, bank.num_rows, bank.num_rows // ROWS)[:ROWS]
    return bank.features[pick].float().numpy(), bank.logits[pick].float().numpy()  # features are stored as float16


@pytest.fixture(scope="module")
def client(server: ServerProcess):
    with triton.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def version(server: ServerProcess) -> str:
    return httpx.get(f"{server.url}/v2/models/disalign").json()["calibration_version"]


def expected(artifacts: Artifacts, features: np.ndarray, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and calibrated logits (N, K) of DisAlign on these rows, without the server."""
    model = DisAlign.load(artifacts.good)
    f, z = torch.from_numpy(np.asarray(features, np.float32)), torch.from_numpy(np.asarray(logits, np.float32))
    return model.predict_proba(f, z).numpy(), model.predict_logits(f, z).numpy()


def triton_inputs(features: np.ndarray, logits: np.ndarray, datatype: str, binary: bool) -> list[triton.InferInput]:
    dtype = {"FP32": np.float32, "FP16": np.float16, "FP64": np.float64, "BF16": ml_dtypes.bfloat16}[datatype]
    out = []
    for name, array in (("features", features), ("logits", logits)):
        tensor = triton.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array.astype(dtype), binary_data=binary)
        out.append(tensor)
    return out


# -- health and metadata -----------------------------------------------------------------------------------
def test_health_and_metadata(client, version: str):
    assert client.is_server_live() and client.is_server_ready()
    assert client.get_server_metadata() == {"name": "disalign", "version": "0.1.0", "extensions": ["binary_tensor_data"]}
    assert client.is_model_ready("disalign") and client.is_model_ready("disalign", version)
    assert not client.is_model_ready("disalign", "disalign-000000000000") and not client.is_model_ready("resnet")
    meta = client.get_model_metadata("disalign")
    assert meta["versions"] == [version] and client.get_model_metadata("disalign", version) == meta
    assert {t["name"]: (t["datatype"], t["shape"]) for t in meta["inputs"]} == {
        "features": ("FP32", [-1, 64]), "logits": ("FP32", [-1, 10]), "image": ("BYTES", [-1])}
    with pytest.raises(InferenceServerException, match="has no version 'nope'") as error:
        client.get_model_metadata("disalign", "nope")
    assert error.value.status() == "404"


# -- inference ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("datatype", "binary_in", "binary_out"),
    [("FP32", False, False), ("FP32", True, True), ("FP32", True, False), ("FP32", False, True),
     ("FP16", True, True), ("FP16", False, False), ("FP64", True, True), ("FP64", False, False), ("BF16", True, True)],
)
def test_infer_matches_predict_proba(client, rows, artifacts: Artifacts, version: str, datatype: str, binary_in: bool,
                                     binary_out: bool):
    features, logits = rows
    outputs = [triton.InferRequestedOutput(n, binary_data=binary_out) for n in ("probabilities", "logits")]
    result = client.infer("disalign", triton_inputs(features, logits, datatype, binary_in), outputs=outputs,
                          request_id=f"r-{datatype}")
    response = result.get_response()
    assert response["id"] == f"r-{datatype}" and response["model_version"] == version
    assert all(("data" in out) != binary_out for out in response["outputs"])
    probabilities, calibrated = result.as_numpy("probabilities"), result.as_numpy("logits")
    assert probabilities.dtype == np.float32 and probabilities.shape == (ROWS, 10)
    # What the server computed on: the rows rounded to the wire datatype, then float32.
    wire = {"FP16": np.float16, "BF16": ml_dtypes.bfloat16}.get(datatype, np.float32)
    p_wire, z_wire = expected(artifacts, features.astype(wire), logits.astype(wire))
    np.testing.assert_allclose(probabilities, p_wire, atol=1e-5, rtol=0)
    np.testing.assert_allclose(calibrated, z_wire, atol=1e-4, rtol=1e-5)
    if datatype != "BF16":  # BF16 keeps 3 significant digits: it is checked on its own rounding only
        np.testing.assert_allclose(probabilities, expected(artifacts, features, logits)[0], atol=1e-3 if datatype == "FP16" else 1e-5, rtol=0)


def test_infer_defaults_versions_and_parameters(client, server: ServerProcess, rows, artifacts: Artifacts, version: str):
    features, logits = rows
    p, z = expected(artifacts, features, logits)
    # No outputs named: all of them (tritonclient then asks for binary_data_output), on the versioned path;
    # a parameter the server does not know is ignored.
    result = client.infer("disalign", triton_inputs(features, logits, "FP32", True), model_version=version,
                          parameters={"note": "ignored"})
    assert [o["name"] for o in result.get_response()["outputs"]] == ["probabilities", "logits"]
    assert all("binary_data_size" in o["parameters"] for o in result.get_response()["outputs"])
    np.testing.assert_allclose(result.as_numpy("probabilities"), p, atol=1e-5, rtol=0)
    with pytest.raises(InferenceServerException, match="has no version") as error:
        client.infer("disalign", triton_inputs(features, logits, "FP32", True), model_version="disalign-000000000000")
    assert error.value.status() == "404"
    # binary_data_output for the request (reserved in tritonclient: sent by hand), overridden by one output.
    body, headers = binary_request(features, logits, parameters={"binary_data_output": True},
                                   outputs=[{"name": "logits", "parameters": {"binary_data": False}}, {"name": "probabilities"}])
    r = httpx.post(f"{server.url}/v2/models/disalign/infer", content=body, headers=headers, timeout=30)
    result = triton.InferResult.from_response_body(r.content, header_length=int(r.headers["inference-header-content-length"]))
    assert [("data" in o) for o in result.get_response()["outputs"]] == [True, False]
    np.testing.assert_allclose(result.as_numpy("logits"), z, atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(result.as_numpy("probabilities"), p, atol=1e-5, rtol=0)


def test_binary_image_input_equals_the_json_one(client, server: ServerProcess, cifar_jpegs: list[Path]):
    blobs = [p.read_bytes() for p in cifar_jpegs[:3]]
    image = triton.InferInput("image", [3], "BYTES")
    image.set_data_from_numpy(np.array(blobs, dtype=np.object_), binary_data=True)
    binary = client.infer("disalign", [image], outputs=[triton.InferRequestedOutput("probabilities")]).as_numpy("probabilities")
    r = httpx.post(f"{server.url}/v2/models/disalign/infer", timeout=30, json={"inputs": [
        {"name": "image", "shape": [3], "datatype": "BYTES", "data": [base64.b64encode(b).decode() for b in blobs]}]})
    np.testing.assert_allclose(binary, np.array(r.json()["outputs"][0]["data"], np.float32).reshape(3, 10), atol=1e-6)


# -- the wire format, checked by hand ---------------------------------------------------------------------
def binary_request(features: np.ndarray, logits: np.ndarray, **request) -> tuple[bytes, dict[str, str]]:
    header = orjson.dumps({"inputs": [
        {"name": "features", "shape": list(features.shape), "datatype": "FP32", "parameters": {"binary_data_size": features.nbytes}},
        {"name": "logits", "shape": list(logits.shape), "datatype": "FP32", "parameters": {"binary_data_size": logits.nbytes}}],
        **request})
    return header + features.tobytes() + logits.tobytes(), {"Inference-Header-Content-Length": str(len(header)),
                                                           "Content-Type": "application/octet-stream"}


def test_binary_response_headers_and_layout(server: ServerProcess, rows, artifacts: Artifacts):
    features, logits = rows
    body, headers = binary_request(features, logits, outputs=[{"name": "probabilities", "parameters": {"binary_data": True}}])
    r = httpx.post(f"{server.url}/v2/models/disalign/infer", content=body, headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    json_size = int(r.headers["inference-header-content-length"])
    assert int(r.headers["content-length"]) == json_size + ROWS * 10 * 4 == len(r.content)
    (out,) = json.loads(r.content[:json_size])["outputs"]
    assert out == {"name": "probabilities", "datatype": "FP32", "shape": [ROWS, 10], "parameters": {"binary_data_size": ROWS * 40}}
    probabilities = np.frombuffer(r.content[json_size:], "<f4").reshape(ROWS, 10)
    np.testing.assert_allclose(probabilities, expected(artifacts, features, logits)[0], atol=1e-5, rtol=0)


def test_nested_json_data(server: ServerProcess, rows, artifacts: Artifacts):
    features, logits = rows
    r = httpx.post(f"{server.url}/v2/models/disalign/infer", timeout=30, json={"id": "nested", "inputs": [
        {"name": "features", "shape": [ROWS, 64], "datatype": "FP32", "data": features.tolist()},
        {"name": "logits", "shape": [ROWS, 10], "datatype": "FP32", "data": logits.tolist()}]})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json", r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    assert r.json()["id"] == "nested" and set(out) == {"probabilities", "logits"}
    np.testing.assert_allclose(np.reshape(out["probabilities"]["data"], (ROWS, 10)), expected(artifacts, features, logits)[0], atol=1e-5)


def tensor(name: str, shape: list[int], data: list, datatype: str = "FP32") -> dict:
    return {"name": name, "shape": shape, "datatype": datatype, "data": data}


OK_INPUTS = [tensor("features", [1, 64], [0.0] * 64), tensor("logits", [1, 10], [0.0] * 10)]


@pytest.mark.parametrize(
    ("request_body", "status", "match"),
    [
        ({"inputs": [OK_INPUTS[0], tensor("logits", [1, 9], [0.0] * 9)]}, 400, "input 'logits' should have shape [N, 10], found [1, 9]"),
        ({"inputs": [tensor("features", [1, 64], [0.0] * 63), OK_INPUTS[1]]}, 400, "has 63 values but its shape [1, 64] needs 64"),
        ({"inputs": [tensor("features", [2, 64], [[0.0] * 64, [0.0] * 63]), OK_INPUTS[1]]}, 400, "nested lists of different lengths"),
        ({"inputs": [tensor("features", [2, 64], [0.0] * 128), OK_INPUTS[1]]}, 400, "has 2 rows but input 'logits' has 1"),
        ({"inputs": [OK_INPUTS[0]]}, 400, "inputs should be 'features' and 'logits'"),
        ({"inputs": [tensor("features", [1, 64], ["a"] * 64), OK_INPUTS[1]]}, 400, "should be numbers, not strings"),
        ({"inputs": [tensor("features", [1, 64], [0.0] * 64, "INT8"), OK_INPUTS[1]]}, 400, "inputs[0].datatype"),
        ({"inputs": [tensor("features", [1, 64], [1e39] * 64, "FP64"), OK_INPUTS[1]]}, 400, "must be finite"),
        ({"inputs": [tensor("features", [1, 64], [float("nan")] * 64), OK_INPUTS[1]]}, 400, "must be finite"),
        ({"inputs": OK_INPUTS, "outputs": [{"name": "gate"}]}, 400, "output 'gate' does not exist"),
        ({"inputs": OK_INPUTS, "outputs": [{"name": "logits", "parameters": {"classification": 3}}]}, 400, "classification extension"),
        ({"inputs": [{**OK_INPUTS[0], "data": None, "parameters": {"binary_data_size": 256}}, OK_INPUTS[1]]}, 400,
         "has binary data but the request has no Inference-Header-Content-Length"),
        ({"inputs": [tensor("image", [1], ["!!"], "BYTES")]}, 400, "is not valid base64"),
        ({"inputs": [tensor("image", [1], ["aGk="], "BYTES")]}, 400, "could not be decoded"),
        ({"inputs": [tensor("image", [2], ["aGk="], "BYTES")]}, 400, "should have shape [N] with N = 1"),
        ({"inputs": [tensor("image", [1], [0.5], "BYTES")]}, 400, "should have base64 strings as data"),
    ],
)
def test_infer_errors(server: ServerProcess, request_body: dict, status: int, match: str):
    r = httpx.post(f"{server.url}/v2/models/disalign/infer", content=json.dumps(request_body), timeout=30)  # NaN as NaN
    assert r.status_code == status and list(r.json()) == ["error"], r.text
    assert match in r.json()["error"] and r.json()["error"].endswith("."), r.text


@pytest.mark.parametrize(
    ("cut", "header", "match"),
    [
        (0, "12x", "should be a number of bytes"),
        (0, "999999", "says 999999 bytes but the body has"),
        (0, "1" * 5000, "should be a number of bytes"),  # past Python's int() digit limit: once a 500
        (0, "0" * 4999 + "7", "should be a number of bytes"),
        (4, None, "binary part of the body has"),  # 4 bytes missing from the logits
    ],
)
def test_binary_framing_errors(server: ServerProcess, cut: int, header: str | None, match: str):
    body, headers = binary_request(np.zeros((1, 64), np.float32), np.zeros((1, 10), np.float32))
    headers["Inference-Header-Content-Length"] = header or headers["Inference-Header-Content-Length"]
    r = httpx.post(f"{server.url}/v2/models/disalign/infer", content=body[:len(body) - cut], headers=headers, timeout=30)
    assert r.status_code == 400 and match in r.json()["error"], r.text


def test_body_limit_applies_before_the_binary_body_is_read(server: ServerProcess):
    host, port = server.url.removeprefix("http://").split(":")
    head = (b"POST /v2/models/disalign/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
            b"Inference-Header-Content-Length: 100\r\nContent-Length: 100000000\r\n\r\n")
    answer = b""
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(head)  # and not one byte of the body
        while chunk := s.recv(65536):  # until the server closes the connection
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413") and b"larger than the limit" in answer


def test_server_log_is_clean(server: ServerProcess):
    assert "Warning" not in server.log.read_text(), server.log.read_text()[-3000:]


def test_a_reload_retires_the_old_version(server: ServerProcess, server_calibration: Path, artifacts: Artifacts, client,
                                          version: str, rows):
    install(artifacts.other, server_calibration)
    r = httpx.post(f"{server.url}/admin/reload", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30)
    new = r.json()["calibration_version"]
    assert r.status_code == 200 and new != version
    assert client.get_model_metadata("disalign")["versions"] == [new]
    assert client.is_model_ready("disalign", new) and not client.is_model_ready("disalign", version)
    inputs = triton_inputs(*rows, "FP32", True)
    assert client.infer("disalign", inputs, model_version=new).get_response()["model_version"] == new
    with pytest.raises(InferenceServerException, match=f"has no version '{version}'"):
        client.infer("disalign", inputs, model_version=version)
