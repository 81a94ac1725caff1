"""The app in process (TestClient): every route, every error status, known answers against offline inference."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from disalign.calib.artifact.publish import artifact_dir
from disalign.calib.errors import ArtifactError, DisalignError
from disalign.calib.estimators.methods import load_calibration
from disalign.feature_extract.models import load_model
from disalign.feature_extract.preprocess import Preprocessing, clean_view, decode_image, normalize
from disalign.service.main import create_app
from tests.service.conftest import ADMIN_TOKEN, CARD, MODEL, REPO, Artifacts, install, make_settings, png_bomb

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def offline_probabilities(images: list[Path], calibration: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage-1 and calibrated probabilities (N, K) computed without the server."""
    model, prep = load_model(str(MODEL)), Preprocessing.from_card(CARD)
    batch = torch.stack([clean_view(decode_image(p), prep) for p in images])
    features, logits = model.features_and_logits(normalize(batch, prep))
    calibrated = load_calibration(calibration).predict_logits(features, logits)
    return logits.softmax(1), calibrated.softmax(1)


def row(k: int = 10, d: int = 64, value: float = 0.5) -> dict:
    return {"features": [value] * d, "logits": [float(i) for i in range(k)]}


def assert_error(response, status: int, match: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and match in body["error"], body
    assert body["error"].endswith("."), body


# -- health and metadata ---------------------------------------------------------------------------
def test_health_and_metadata(client: TestClient, artifacts: Artifacts, fingerprint: str, class_names: list[str]):
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    meta = client.get("/v2/models/disalign").json()
    version = meta["calibration_version"]
    assert version.startswith("disalign-") and meta["versions"] == [version]
    assert meta["classes"] == class_names and meta["num_classes"] == 10 and meta["feature_dim"] == 64
    assert meta["model_fingerprint"] == fingerprint
    assert {t["name"]: t["shape"] for t in meta["inputs"]} == {"features": [-1, 64], "logits": [-1, 10], "image": [-1]}
    assert {t["name"] for t in meta["outputs"]} == {"probabilities", "logits"}


def test_not_ready_before_the_lifespan_ran(calibration_dir: Path):
    c = TestClient(create_app(make_settings(calibration_dir)))  # no `with`: the model is never loaded
    assert c.get("/v2/health/live").status_code == 200
    assert_error(c.get("/v2/health/ready"), 503, "not loaded")
    assert_error(c.post("/calibrate", json={"rows": [row()]}), 503, "not loaded")
    assert_error(c.get("/v2/models/disalign"), 503, "not loaded")


@pytest.mark.parametrize(("method", "path", "allowed"), [
    ("PUT", "/admin/prior", "GET, POST"),  # two routes on one path: once "Allow: GET" only
    ("DELETE", "/admin/prior", "GET, POST"),
    ("POST", "/v2/health/live", "GET, HEAD"),
    ("GET", "/calibrate", "POST"),
    ("GET", "/admin/reload", "POST"),
])
def test_405_lists_every_method_of_the_path(client: TestClient, method: str, path: str, allowed: str):
    response = client.request(method, path, headers=AUTH)
    assert_error(response, 405, f"{method} is not allowed on {path}")
    assert response.headers["allow"] == allowed


def test_unknown_model_and_route_are_404(client: TestClient):
    assert_error(client.get("/v2/models/resnet"), 404, "model 'resnet' is not served here")
    assert_error(client.post("/v2/models/resnet/infer", json={"inputs": []}), 404, "not served here")
    assert_error(client.get("/nowhere"), 404, "no route /nowhere")


# -- /predict ----------------------------------------------------------------------------------------
def test_predict_multipart_matches_offline_inference(client: TestClient, cifar_jpegs: list[Path], artifacts: Artifacts):
    images = cifar_jpegs[:4]
    files = [("file", (p.name, p.read_bytes(), "image/jpeg")) for p in images]
    r = client.post("/predict", files=files, params={"top_k": 3, "raw": "true"})
    assert r.status_code == 200, r.text
    body = r.json()
    raw, calibrated = offline_probabilities(images, artifacts.good)
    assert len(body["predictions"]) == 4
    for pred, p_raw, p_cal in zip(body["predictions"], raw, calibrated, strict=True):
        assert [t["index"] for t in pred["top_k"]] == p_cal.topk(3).indices.tolist()
        assert pred["top_k"][0]["probability"] == pytest.approx(float(p_cal.max()), abs=1e-5)
        assert [t["index"] for t in pred["raw_top_k"]] == p_raw.topk(3).indices.tolist()
        assert pred["raw_top_k"][0]["label"] == client.app.state.runtime.calibration.class_names[int(p_raw.argmax())]
    assert body["calibration_version"] == client.get("/v2/models/disalign").json()["calibration_version"]


def test_predict_json_base64_and_default_top_k(client: TestClient, cifar_jpegs: list[Path]):
    r = client.post("/predict", json={"images": [b64(cifar_jpegs[0]), b64(cifar_jpegs[1])]})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [len(p["top_k"]) for p in preds] == [5, 5] and preds[0]["raw_top_k"] is None
    probs = [t["probability"] for t in preds[0]["top_k"]]
    assert probs == sorted(probs, reverse=True)


def test_predict_errors(client: TestClient, cifar_jpegs: list[Path]):
    jpeg = cifar_jpegs[0].read_bytes()
    assert_error(client.post("/predict", files=[("file", ("x.jpg", b"not an image", "image/jpeg"))]), 400, "could not be decoded")
    assert_error(client.post("/predict", json={"images": ["@@not-base64@@"]}), 400, "images[0] is not valid base64")
    assert_error(client.post("/predict", json={"images": [base64.b64encode(jpeg[:40]).decode()]}), 400, "could not be decoded")
    assert_error(client.post("/predict", files=[("file", ("b.png", png_bomb(100_000, 100_000), "image/png"))]), 413, "")
    assert_error(client.post("/predict", content=b"hello", headers={"content-type": "text/plain"}), 415, "multipart/form-data")
    assert_error(client.post("/predict", files=[("other", ("x.jpg", jpeg, "image/jpeg"))]), 422, "at least one 'file'")
    mixed = client.post("/predict", data={"file": "text"}, files=[("x", ("x.jpg", jpeg, "image/jpeg"))])
    assert_error(mixed, 422, "should be a file upload")
    assert_error(client.post("/predict", json={"images": []}), 422, "images")
    assert_error(client.post("/predict", json={"images": [b64(cifar_jpegs[0])], "path": "/etc"}), 422, "path")
    assert_error(client.post("/predict", json={"images": [b64(cifar_jpegs[0])]}, params={"top_k": 11}), 422, "top_k should be between 1 and K=10")
    assert_error(client.post("/predict", json={"images": [b64(cifar_jpegs[0])]}, params={"top_k": 0}), 422, "top_k")
    assert_error(client.post("/predict", content=b"{", headers={"content-type": "application/json"}), 422, "not valid JSON")


def test_pixel_and_image_count_limits(calibration_dir: Path, cifar_jpegs: list[Path]):
    with TestClient(create_app(make_settings(calibration_dir, max_pixels=2000, max_images=2))) as c:
        big = io.BytesIO()
        Image.new("RGB", (50, 50)).save(big, "PNG")
        assert_error(c.post("/predict", files=[("file", ("b.png", big.getvalue(), "image/png"))]), 413, "more than max_pixels=2000")
        assert c.post("/predict", files=[("file", ("s.jpg", cifar_jpegs[0].read_bytes(), "image/jpeg"))]).status_code == 200
        three = [("file", (p.name, p.read_bytes(), "image/jpeg")) for p in cifar_jpegs[:3]]
        assert c.post("/predict", files=three).status_code in (400, 422)  # refused by the form parser or by the count
        assert_error(c.post("/predict", json={"images": [b64(p) for p in cifar_jpegs[:3]]}), 422, "at most 2 per request")


# -- body limit ----------------------------------------------------------------------------------------
def test_body_limit_by_content_length_and_by_streamed_bytes(calibration_dir: Path):
    with TestClient(create_app(make_settings(calibration_dir, max_body_bytes=4096))) as c:
        r = c.post("/calibrate", content=b"{}", headers={"content-type": "application/json", "content-length": "999999"})
        assert_error(r, 413, "larger than the limit of 4096 bytes")

        def chunks():  # no Content-Length: Transfer-Encoding chunked
            for _ in range(10):
                yield b" " * 1000

        r = c.post("/calibrate", content=chunks(), headers={"content-type": "application/json"})
        assert_error(r, 413, "larger than the limit of 4096 bytes")
        r = c.post("/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
        assert_error(r, 413, "larger than the limit")
        assert c.post("/calibrate", json={"rows": [row()]}).status_code == 200  # still serving


# -- /calibrate ------------------------------------------------------------------------------------------
def test_calibrate_matches_the_calibrator(client: TestClient, artifacts: Artifacts):
    rows = [row(value=0.1), row(value=2.0)]
    r = client.post("/calibrate", json={"rows": rows, "top_k": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    expected = load_calibration(artifacts.good).predict_logits(
        torch.tensor([x["features"] for x in rows]), torch.tensor([x["logits"] for x in rows]))
    for result, z in zip(body["results"], expected, strict=True):
        assert result["logits"] == pytest.approx(z.tolist(), abs=1e-5)
        assert result["probabilities"] == pytest.approx(z.softmax(0).tolist(), abs=1e-6)
        assert [t["index"] for t in result["top_k"]] == z.topk(2).indices.tolist()
    assert body["calibration_version"] == client.app.state.runtime.calibration.version


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        ({"rows": [row(k=9)]}, "rows[0].logits has 9 values, expected K=10"),
        ({"rows": [row(), row(d=63)]}, "rows[1].features has 63 values, expected d=64"),
        ({"rows": []}, "rows"),
        ({"rows": [row()], "top_k": 11}, "top_k should be between 1 and K=10"),
        ({"rows": [{"features": ["x"] * 64, "logits": [0.0] * 10}]}, "rows[0].features[0]: input should be a valid number"),
        ({"rows": [{"features": [0.0] * 64}]}, "rows[0].logits: field required"),
        ({"rows": [row()], "calibration": "/tmp/other"}, "calibration"),
    ],
)
def test_calibrate_rejects_bad_rows(client: TestClient, payload: dict, match: str):
    assert_error(client.post("/calibrate", json=payload), 422, match)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_calibrate_rejects_non_finite_values(client: TestClient, literal: str):
    body = json.dumps({"rows": [row()]}).replace("0.5", literal, 1)
    r = client.post("/calibrate", content=body, headers={"content-type": "application/json"})
    assert_error(r, 422, "finite")


def test_calibrate_rejects_values_that_overflow_float32(client: TestClient):
    big = row()
    big["logits"] = [1e39] * 10  # finite in JSON, inf as float32
    assert_error(client.post("/calibrate", json={"rows": [big]}), 422, "finite")


# -- /v2 infer -------------------------------------------------------------------------------------------
def tensor(name: str, shape: list[int], data: list, datatype: str = "FP32") -> dict:
    return {"name": name, "shape": shape, "datatype": datatype, "data": data}


def test_v2_infer_features_and_logits(client: TestClient, artifacts: Artifacts):
    features, logits = [0.3] * 128, [float(i % 10) for i in range(20)]
    r = client.post("/v2/models/disalign/infer", json={
        "id": "req-1",
        "inputs": [tensor("features", [2, 64], features), tensor("logits", [2, 10], logits)],
        "outputs": [{"name": "probabilities"}, {"name": "logits"}],
    })
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == "req-1" and body["model_name"] == "disalign"
    assert body["model_version"] == body["parameters"]["calibration_version"]
    out = {o["name"]: o for o in body["outputs"]}
    expected = load_calibration(artifacts.good).predict_logits(torch.tensor(features).view(2, 64), torch.tensor(logits).view(2, 10))
    assert out["probabilities"]["shape"] == [2, 10] and out["probabilities"]["datatype"] == "FP32"
    assert out["probabilities"]["data"] == pytest.approx(expected.softmax(1).flatten().tolist(), abs=1e-6)
    assert out["logits"]["data"] == pytest.approx(expected.flatten().tolist(), abs=1e-5)


def test_v2_infer_image(client: TestClient, cifar_jpegs: list[Path], artifacts: Artifacts):
    r = client.post("/v2/models/disalign/infer", json={"inputs": [tensor("image", [2], [b64(p) for p in cifar_jpegs[:2]], "BYTES")]})
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]  # all outputs, probabilities first (errors and binary tensors: test_v2.py)
    assert out["name"] == "probabilities" and out["shape"] == [2, 10]
    _, calibrated = offline_probabilities(cifar_jpegs[:2], artifacts.good)
    assert out["data"] == pytest.approx(calibrated.flatten().tolist(), abs=1e-5)


# -- /admin/reload --------------------------------------------------------------------------------------
def test_reload_needs_the_token(client: TestClient):
    r = client.post("/admin/reload")
    assert_error(r, 401, "Authorization: Bearer")
    assert r.headers["www-authenticate"] == "Bearer"
    assert_error(client.post("/admin/reload", headers={"Authorization": "Bearer wrong-token"}), 401, "admin token is wrong")
    assert_error(client.post("/admin/reload", headers={"Authorization": f"Basic {ADMIN_TOKEN}"}), 401, "Authorization: Bearer")


def test_admin_routes_disabled_without_a_token(calibration_dir: Path):
    with TestClient(create_app(make_settings(calibration_dir, admin_token=None))) as c:
        assert_error(c.post("/admin/reload", headers=AUTH), 403, "admin routes are disabled")


def test_reload_swaps_to_the_new_calibration(fresh_client: TestClient, calibration_dir: Path, artifacts: Artifacts):
    before = fresh_client.post("/calibrate", json={"rows": [row()]}).json()
    assert fresh_client.post("/admin/reload", headers=AUTH).json()["changed"] is False
    install(artifacts.other, calibration_dir)
    r = fresh_client.post("/admin/reload", headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["changed"] is True and body["previous_version"] == before["calibration_version"]
    after = fresh_client.post("/calibrate", json={"rows": [row()]}).json()
    assert after["calibration_version"] == body["calibration_version"] != before["calibration_version"]
    assert after["results"][0]["logits"] != before["results"][0]["logits"]
    assert fresh_client.get("/v2/models/disalign").json()["calibration_version"] == body["calibration_version"]


@pytest.mark.parametrize(
    ("artifact", "status", "match"),
    [
        ("wrong_k", 409, "the calibration has K=5 classes but the served model 'disalign' has K=10"),
        ("wrong_fingerprint", 409, "was fitted for model sha256:000000000000"),
        ("corrupt", 422, "calibration.json is not valid JSON"),
        ("missing", 422, "parameters.safetensors is missing"),
    ],
)
def test_a_bad_reload_keeps_the_old_calibration(fresh_client: TestClient, calibration_dir: Path, artifacts: Artifacts,
                                                artifact: str, status: int, match: str):
    before = fresh_client.post("/calibrate", json={"rows": [row()]}).json()
    if artifact == "corrupt":
        (artifact_dir(calibration_dir) / "calibration.json").write_text("{not json")
    elif artifact == "missing":
        (artifact_dir(calibration_dir) / "parameters.safetensors").unlink()
    else:
        install(getattr(artifacts, artifact), calibration_dir)
    assert_error(fresh_client.post("/admin/reload", headers=AUTH), status, match)
    after = fresh_client.post("/calibrate", json={"rows": [row()]}).json()
    assert after == before
    assert 'disalign_calibration_info{created="' in fresh_client.get("/metrics").text


# -- start-up refusal, metrics, schema --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("artifact", "match"),
    [("wrong_k", "the calibration has K=5 classes but the served model 'disalign' has K=10."),
     ("wrong_fingerprint", "the calibration was fitted for model sha256:000000000000 but the served model")],
)
def test_refuses_to_start_when_the_calibration_does_not_fit(artifacts: Artifacts, artifact: str, match: str):
    app = create_app(make_settings(getattr(artifacts, artifact)))
    with pytest.raises(ArtifactError, match=match.replace("(", r"\(")), TestClient(app):
        pass
    assert app.state.startup_error.startswith(match[:30])


def test_metrics(fresh_client: TestClient, cifar_jpegs: list[Path]):
    fresh_client.post("/calibrate", json={"rows": [row()]})
    fresh_client.post("/calibrate", json={"rows": [row(k=3)]})
    fresh_client.post("/predict", json={"images": [b64(cifar_jpegs[0])]})
    fresh_client.get("/v2/models/nope")
    text = fresh_client.get("/metrics").text
    version = fresh_client.app.state.runtime.calibration.version
    assert 'disalign_requests_total{code="200",method="POST",route="/calibrate"} 1.0' in text
    assert 'disalign_requests_total{code="422",method="POST",route="/calibrate"} 1.0' in text
    assert 'disalign_requests_total{code="404",method="GET",route="/v2/models/{name}"} 1.0' in text
    assert 'disalign_request_duration_seconds_count{method="POST",route="/predict"} 1.0' in text
    assert "disalign_batch_size_count 1.0" in text  # one /predict (the warm-up bypasses the batcher)
    assert f'version="{version}"' in text and 'kind="torchscript"' in text
    assert "_created" not in text and "status=" not in text
    for standard in ("process_resident_memory_bytes ", "process_cpu_seconds_total ", "process_open_fds ", "python_info{",
                     'python_gc_collections_total{generation="0"}'):
        assert standard in text, standard


def test_every_metric_is_documented(client: TestClient):
    families = {line.split()[2] for line in client.get("/metrics").text.splitlines() if line.startswith("# TYPE ")}
    documented = (REPO / "docs" / "service.md").read_text()
    assert families >= {"disalign_requests_total", "process_resident_memory_bytes", "python_gc_objects_collected_total"}
    missing = sorted(name for name in families if f"`{name}" not in documented)
    assert not missing, f"metrics not in docs/service.md: {missing}"


def test_openapi_schema(client: TestClient):
    schema = client.get("/openapi.json").json()
    assert "/metrics" not in schema["paths"]
    assert {"/v2/health/live", "/v2/health/ready", "/v2/models/{name}", "/v2/models/{name}/infer", "/predict",
            "/calibrate", "/admin/reload"} <= set(schema["paths"])
    predict = schema["paths"]["/predict"]["post"]
    assert set(predict["requestBody"]["content"]) == {"multipart/form-data", "application/json"}
    for path in schema["paths"].values():  # no parameter anywhere names a server path
        for op in path.values():
            names = [p["name"] for p in op.get("parameters", [])]
            assert not any(n in ("path", "dir", "directory", "calibration", "model") for n in names)
    assert schema["paths"]["/calibrate"]["post"]["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorBody")


def test_json_routes_refuse_other_content_types(client: TestClient):
    for path in ("/calibrate", "/v2/models/disalign/infer"):
        r = client.post(path, content=b"rows=1", headers={"content-type": "application/x-www-form-urlencoded"})
        assert_error(r, 415, "should be application/json")
    r = client.post("/calibrate", content=b"\xff\xfe not utf-8", headers={"content-type": "application/json"})
    assert_error(r, 422, "not valid JSON")


def test_concurrent_calibrate_requests_share_a_row_batch_and_get_their_own_rows(client: TestClient, artifacts: Artifacts):
    # Row batches mix requests with different row counts and top_k; each answer must be its own rows'.
    from disalign.service.runtime import RowRequest

    runtime = client.app.state.runtime
    rng = torch.Generator().manual_seed(0)
    requests = [RowRequest(torch.rand(n, 64, generator=rng).numpy(), torch.randn(n, 10, generator=rng).numpy(), k)
                for n, k in ((1, 3), (4, 1), (2, 10))]
    results = runtime._calibrate_batch(requests)
    calibrator = load_calibration(artifacts.good)
    for request, result in zip(requests, results, strict=True):
        expected = calibrator.predict_logits(torch.from_numpy(request.features), torch.from_numpy(request.logits))
        assert torch.allclose(torch.from_numpy(result.logits), expected, atol=1e-6)
        assert torch.allclose(torch.from_numpy(result.probabilities), expected.softmax(1), atol=1e-6)
        assert result.top_indices.tolist() == expected.topk(request.top_k, dim=1).indices.tolist()
        assert result.calibration is runtime.calibration


def test_calibrate_answers_a_body_parsed_off_the_event_loop(client: TestClient, artifacts: Artifacts):
    # 300 rows ≈ 100 kB of JSON: above INLINE_JSON_BYTES, parsed and written on a worker thread.
    from disalign.service.offload import INLINE_JSON_BYTES

    rows = [row(value=0.001 * i) for i in range(300)]
    content = json.dumps({"rows": rows, "top_k": 1}).encode()
    assert len(content) > INLINE_JSON_BYTES
    r = client.post("/calibrate", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    expected = load_calibration(artifacts.good).predict_logits(
        torch.tensor([x["features"] for x in rows]), torch.tensor([x["logits"] for x in rows]))
    got = torch.tensor([result["logits"] for result in r.json()["results"]])
    assert torch.allclose(got, expected, atol=1e-5)


def test_startup_moves_the_long_lived_objects_out_of_the_collector(client: TestClient):
    import gc

    assert gc.get_freeze_count() > 10_000  # torch, numpy, the model: never walked by a collection again


# -- deeply nested JSON wherever the server reads it (issue 21 §3) --------------------------------------------
NESTED = "[" * 100_000 + "]" * 100_000


def test_deeply_nested_json_is_one_sentence_in_bodies_prior_files_and_cards(client: TestClient, calibration_dir: Path,
                                                                           tmp_path: Path):
    for path, status, match in (("/calibrate", 422, "recursion limit exceeded"), ("/v2/models/disalign/infer", 400, "recursion limit exceeded"),
                                ("/predict", 422, "recursion limit exceeded"), ("/admin/prior", 400, "nested too deeply")):
        response = client.post(path, content='{"rows": ' + NESTED + "}", headers={**AUTH, "Content-Type": "application/json"})
        assert_error(response, status, f"the request body is not valid JSON ({match}")
    # the admin's prior: [1e308] * K is K finite numbers whose sum is not (once served as all zeros)
    assert_error(client.post("/admin/prior", headers=AUTH, json={"action": "set", "prior": [1e308] * 10}), 422,
                 "prior should hold finite numbers >= 0 with a positive, finite sum; found a sum of inf.")
    (tmp_path / "prior.json").write_text(NESTED)
    with pytest.raises(DisalignError, match=r"prior file .*prior\.json is nested deeper than 32 levels \(JSON arrays and objects\)\.$"):
        with TestClient(create_app(make_settings(calibration_dir, prior=str(tmp_path / "prior.json")))):
            pass
    (tmp_path / "card.json").write_text(NESTED)
    with pytest.raises(DisalignError, match=r"model card .*card\.json is nested deeper than 32 levels \(JSON arrays and objects\)\.$"):
        with TestClient(create_app(make_settings(calibration_dir, card=tmp_path / "card.json"))):
            pass
