"""Open Inference Protocol (KServe v2) model routes: ``GET /v2/models/{name}`` and ``POST /v2/models/{name}/infer``.

Inputs are either ``features`` (FP32, [N, d]) and ``logits`` (FP32, [N, K]), or ``image`` (BYTES, [N],
base64-encoded files). Outputs: ``probabilities`` (FP32, [N, K], the default) and/or ``logits`` (the
calibrated logits). ``model_version`` and ``parameters.calibration_version`` name the calibration that
computed every output of the response; ``parameters.prior_version`` the class prior it is aligned to
(:mod:`service.prior`; request ``parameters: {"prior": "balanced"}`` to ignore the server's).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from fastapi import APIRouter, Request, Response

from calib.errors import InputError
from service.deps import ModelName, RuntimeDep
from service.prior import use_served_prior
from service.routers.common import (
    JSON_BYTES_PER_NUMBER,
    check_count,
    decode_base64,
    decode_images,
    finite_float32,
    finite_or_raise,
    json_response,
    off_loop_if_large,
    read_json,
)
from service.runtime import RowRequest, Runtime
from service.schemas import (
    InferInput,
    InferRequest,
    InferResponse,
    ModelMetadata,
    TensorSpec,
    error_responses,
    json_body,
)

router = APIRouter(prefix="/v2/models", tags=["v2"])

OUTPUT_NAMES = ("probabilities", "logits")


@router.get("/{name}", response_model=ModelMetadata, responses=error_responses(404, 422, 503))
async def metadata(name: ModelName, runtime: RuntimeDep) -> ModelMetadata:
    """Inputs, outputs, class names and the calibration version of the served model."""
    model, state = runtime.model, runtime.calibration
    k, d = model.num_classes, model.feature_dim
    return ModelMetadata(
        name=name,
        versions=[state.version],
        platform=f"pytorch_{model.kind}",
        inputs=[TensorSpec(name="features", datatype="FP32", shape=[-1, d]),
                TensorSpec(name="logits", datatype="FP32", shape=[-1, k]),
                TensorSpec(name="image", datatype="BYTES", shape=[-1])],
        outputs=[TensorSpec(name="probabilities", datatype="FP32", shape=[-1, k]),
                 TensorSpec(name="logits", datatype="FP32", shape=[-1, k])],
        classes=state.class_names,
        num_classes=k,
        feature_dim=d,
        model_fingerprint=model.fingerprint,
        calibration_version=state.version,
        calibration_method=state.meta.method,
        calibration_created=state.meta.created,
    )


def fp32_array(tensor: InferInput, width: int, max_rows: int) -> np.ndarray:
    """An FP32 input of shape [N, width] → (N, width) float32, finite."""
    name = tensor.name
    if tensor.datatype != "FP32" or any(isinstance(v, str) for v in tensor.data):
        raise InputError(f"input '{name}' should have datatype FP32 with numbers as data, found {tensor.datatype}.")
    if len(tensor.shape) != 2 or tensor.shape[1] != width or tensor.shape[0] < 1:
        raise InputError(f"input '{name}' should have shape [N, {width}], found {tensor.shape}.")
    check_count(f"input '{name}' rows", tensor.shape[0], max_rows, "max_rows")
    if len(tensor.data) != math.prod(tensor.shape):
        raise InputError(f"input '{name}' has {len(tensor.data)} values but its shape {tensor.shape} needs {math.prod(tensor.shape)}.")
    return finite_float32(tensor.data, f"input '{name}' data").reshape(tensor.shape)


def image_blobs(tensor: InferInput, max_images: int) -> list[bytes]:
    """A BYTES input of shape [N] of base64 strings → N image files."""
    if tensor.datatype != "BYTES" or any(not isinstance(v, str) for v in tensor.data):
        raise InputError(f"input 'image' should have datatype BYTES with base64 strings as data, found {tensor.datatype}.")
    if len(tensor.shape) != 1 or tensor.shape[0] != len(tensor.data) or not tensor.data:
        raise InputError(f"input 'image' should have shape [N] with N = {len(tensor.data)} (the number of strings), found {tensor.shape}.")
    check_count("images", len(tensor.data), max_images, "max_images")
    return decode_base64([str(v) for v in tensor.data], "inputs.image.data")


def requested_outputs(body: InferRequest) -> list[str]:
    names = [o.name for o in body.outputs] if body.outputs else ["probabilities"]
    for n in names:
        if n not in OUTPUT_NAMES:
            raise InputError(f"output '{n}' does not exist; the outputs are {', '.join(OUTPUT_NAMES)}.")
    return list(dict.fromkeys(names))


def row_request(runtime: Runtime, inputs: dict[str, InferInput], use_prior: bool = True) -> RowRequest:
    model, rows = runtime.model, runtime.settings.max_rows
    features = fp32_array(inputs["features"], model.feature_dim, rows)
    logits = fp32_array(inputs["logits"], model.num_classes, rows)
    if features.shape[0] != logits.shape[0]:
        raise InputError(f"input 'features' has {features.shape[0]} rows but input 'logits' has {logits.shape[0]}.")
    return RowRequest(features, logits, use_prior=use_prior)


@router.post("/{name}/infer", response_model=InferResponse, openapi_extra=json_body(InferRequest),
             responses=error_responses(400, 404, 413, 415, 422, 503))
async def infer(name: ModelName, request: Request, runtime: RuntimeDep) -> Response:
    """Calibrated probabilities for v2 JSON tensors (``features`` + ``logits``, or ``image``)."""
    body = await read_json(request, InferRequest)
    inputs = {t.name: t for t in body.inputs}
    outputs = requested_outputs(body)
    if len(inputs) != len(body.inputs):
        raise InputError("each input name may appear only once.")
    use_prior = use_served_prior((body.parameters or {}).get("prior"))
    if set(inputs) == {"features", "logits"}:
        values = len(inputs["features"].data) + len(inputs["logits"].data)
        rows = await runtime.calibrate_rows(await off_loop_if_large(JSON_BYTES_PER_NUMBER * values, row_request, runtime, inputs, use_prior))
        state, arrays, prior_version = rows.calibration, {"logits": rows.logits, "probabilities": rows.probabilities}, rows.prior_version
    elif set(inputs) == {"image"}:
        blobs = image_blobs(inputs["image"], runtime.settings.max_images)
        result = await runtime.classify(await decode_images(runtime.image_tensor, blobs))
        calibrated, prior = runtime.prior.apply(result.calibrated_logits, use_prior, result.calibration, observe=False)
        prior_version = prior.version_for(use_prior)
        state, arrays = result.calibration, {"logits": calibrated.numpy(), "probabilities": torch.softmax(calibrated, dim=1).numpy()}
    else:
        raise InputError(f"inputs should be 'features' and 'logits' (FP32) or 'image' (BYTES), found {sorted(inputs)}.")
    finite_or_raise(arrays["logits"], "calibrated logits")
    # The InferResponse schema, written by orjson straight from the float32 arrays.
    return await json_response({
        "model_name": name,
        "model_version": state.version,
        "id": body.id,
        "parameters": {"calibration_version": state.version, "prior_version": prior_version},
        "outputs": [{"name": n, "datatype": "FP32", "shape": list(arrays[n].shape), "data": arrays[n].reshape(-1)} for n in outputs],
    }, approx_values=sum(arrays[n].size for n in outputs))
