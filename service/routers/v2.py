"""Open Inference Protocol (KServe v2) routes, with the binary tensor data extension.

    GET  /v2                                            server metadata (extensions: binary_tensor_data)
    GET  /v2/models/{name}[/versions/{version}]         model metadata
    GET  /v2/models/{name}[/versions/{version}]/ready   model readiness
    POST /v2/models/{name}[/versions/{version}]/infer   inference, JSON or binary tensors

The model's version is the calibration's version (``versions`` in the metadata lists the one served);
a versioned path must name it, and its answer is computed by that calibration or not at all (404).
Inputs: ``features`` [N, d] and ``logits`` [N, K] (FP32, FP16, FP64 or BF16, converted to float32), or
``image`` [N] (BYTES: image files, base64 strings in JSON). Outputs: ``probabilities`` and ``logits``
(calibrated), both when ``outputs`` is absent; each as JSON ``data`` or, on request (``binary_data``
per output, ``binary_data_output`` for the request), as binary data. The wire format — framing, tensors,
the response body — is :mod:`disalign.service.wire_v2`; this router only reads the HTTP request, calls the
runtime and writes the HTTP response. An invalid request answers 400, the protocol's status (the other
routes answer 422). ``parameters.calibration_version`` names the calibration that computed every output
of the response and ``parameters.prior_version`` the class prior it is aligned to (:mod:`disalign.service.prior`;
request ``parameters: {"prior": "balanced"}`` to ignore the server's).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from disalign.calib import __version__
from disalign.calib.errors import DisalignError, InputError
from disalign.service.checks import finite_or_raise
from disalign.service.deps import check_model_name, get_runtime
from disalign.service.errors import disalign_status, error_response
from disalign.service.messages import validation_sentence
from disalign.service.offload import JSON_BYTES_PER_NUMBER, decode_images, off_loop_if_large
from disalign.service.routers.common import traffic_source, use_served_prior
from disalign.service.runtime import RowRequest, Runtime
from disalign.service.schemas import (
    InferRequest,
    InferResponse,
    ModelMetadata,
    ModelReady,
    ServerMetadata,
    TensorSpec,
    error_responses,
    json_body,
)
from disalign.service.wire_v2 import (
    EXTENSIONS,
    HEADER_LENGTH,
    HEADER_NAME,
    OUTPUT_NAMES,
    InferBody,
    OutputTensor,
    binary_padding,
    byte_elements,
    encode_response,
    float_rows,
    requested_outputs,
    split_body,
    split_inputs,
)

BODY_TYPES = ("application/json", "application/octet-stream", "")


class V2Route(APIRoute):
    """Called with the bare request and its path parameters (strings), like ``DirectRoute``: no per-request
    dependency resolution on the hot route. Invalid input answers 400, as the protocol says."""

    def get_route_handler(self) -> Callable[[Request], Any]:
        endpoint = self.endpoint

        async def handle(request: Request) -> Response:
            try:
                result = await endpoint(request, **request.path_params)
            except ValidationError as exc:
                return error_response(400, validation_sentence(exc.errors()))
            except DisalignError as exc:
                status = disalign_status(exc)
                return error_response(400 if status == 422 else status, str(exc))
            if isinstance(result, BaseModel):  # the metadata routes
                return Response(result.model_dump_json(), media_type="application/json")
            return result

        return handle


router = APIRouter(prefix="/v2", tags=["v2"], route_class=V2Route)


async def served(request: Request, name: str, version: str | None) -> Runtime:
    """The runtime when ``name`` (and ``version``, if given) is what this server serves; 404 or 503 if not."""
    await check_model_name(name, request.app.state.settings)
    runtime = await get_runtime(request)
    if version is not None and version != runtime.calibration.version:
        raise HTTPException(404, f"model '{name}' has no version '{version}'; the served version is '{runtime.calibration.version}'.")
    return runtime


# -- inference (registered first: the busy route is matched first) ---------------------------------------
async def read_body(request: Request) -> tuple[bytes | bytearray, memoryview | None]:
    """The JSON part of the body and the binary part after it (None without Inference-Header-Content-Length).

    415 unless the body is JSON or octet-stream, uncompressed. With binary data the body is read into a
    buffer that starts early by the padding that lands the binary part 8-byte aligned
    (:func:`~disalign.service.wire_v2.binary_padding`): its tensors are then used where they lie, without a copy.
    """
    headers = dict(request.scope["headers"])  # raw names are lower-case bytes
    media_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower().decode("latin-1")
    if media_type not in BODY_TYPES and not media_type.endswith("+json"):
        raise HTTPException(415, f"the body should be application/json, or application/octet-stream with binary tensors, found {media_type}.")
    encoding = headers.get(b"content-encoding", b"identity").strip().lower().decode("latin-1")
    if encoding != "identity":
        raise HTTPException(415, f"the body is {encoding}-encoded; send it uncompressed.")
    declared = headers.get(HEADER_LENGTH)
    pad = binary_padding(declared)
    return split_body(await body_into(request, pad, headers.get(b"content-length", b"")), pad, declared)


async def body_into(request: Request, pad: int, content_length: bytes) -> bytearray:
    """The body after ``pad`` zero bytes, in one buffer filled as the chunks arrive (each byte copied once).

    The body limit middleware has checked Content-Length and counts what comes in (``request.receive``);
    without a length (chunked) the buffer grows as it goes.
    """
    buffer = bytearray(pad + int(content_length)) if content_length.isdigit() else bytearray(pad)
    end = pad
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        if end + len(chunk) <= len(buffer):
            buffer[end:end + len(chunk)] = chunk
        else:
            buffer[end:] = chunk
        end += len(chunk)
        if not message.get("more_body", False):
            break
    del buffer[end:]  # a body shorter than its Content-Length
    return buffer


def row_request(runtime: Runtime, parsed: InferBody, use_prior: bool = True, source: str | None = None) -> RowRequest:
    model, rows = runtime.model, runtime.settings.max_rows
    inputs, binary = parsed.inputs, parsed.binary
    features = float_rows(inputs["features"], binary.get("features"), model.feature_dim, rows)
    logits = float_rows(inputs["logits"], binary.get("logits"), model.num_classes, rows)
    if features.shape[0] != logits.shape[0]:
        raise InputError(f"input 'features' has {features.shape[0]} rows but input 'logits' has {logits.shape[0]}.")
    return RowRequest(features, logits, use_prior=use_prior, source=source)


INFER_DOC: dict[str, Any] = {
    "parameters": [{"name": HEADER_NAME, "in": "header", "required": False,
                    "description": "length of the JSON part when binary tensors follow it (binary tensor data extension)",
                    "schema": {"type": "integer", "minimum": 1}}],
    **json_body(InferRequest),
}
INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    **error_responses(400, 404, 413, 415, 503),
    200: {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
          "description": "JSON, or with binary outputs the JSON part followed by their bytes",
          "headers": {HEADER_NAME: {"description": "length of the JSON part (binary outputs only)",
                                                          "schema": {"type": "integer"}}}},
}


@router.post("/models/{name}/infer", response_model=InferResponse, openapi_extra=INFER_DOC, responses=INFER_RESPONSES)
async def infer(request: Request, name: str) -> Response:
    """Calibrated probabilities and logits for ``features`` + ``logits`` or ``image``, JSON or binary tensors."""
    return await run_inference(request, name, None)


@router.post("/models/{name}/versions/{version}/infer", response_model=InferResponse, openapi_extra=INFER_DOC,
             responses=INFER_RESPONSES)
async def version_infer(request: Request, name: str, version: str) -> Response:
    """Inference by the calibration ``version`` (404 if another one is served)."""
    return await run_inference(request, name, version)


async def run_inference(request: Request, name: str, version: str | None) -> Response:
    runtime = await served(request, name, version)
    json_part, rest = await read_body(request)
    body = await off_loop_if_large(len(json_part), InferRequest.model_validate_json, json_part)
    parsed = split_inputs(body, rest)
    outputs = requested_outputs(body)
    use_prior = use_served_prior((body.parameters.model_extra or {}).get("prior") if body.parameters else None)
    if set(parsed.inputs) == {"features", "logits"}:
        json_values = sum(len(t.data or ()) for t in body.inputs)  # nested: rows, the same order of work
        rows = await off_loop_if_large(JSON_BYTES_PER_NUMBER * json_values, row_request, runtime, parsed, use_prior,
                                       traffic_source(request, runtime))
        result = await runtime.calibrate_rows(rows)
        state, arrays, prior_version = result.calibration, {"logits": result.logits, "probabilities": result.probabilities}, result.prior_version
    elif set(parsed.inputs) == {"image"}:
        blobs = byte_elements(parsed.inputs["image"], parsed.binary.get("image"), runtime.settings.max_images)
        images = await runtime.classify(await decode_images(runtime.image_tensor, blobs), use_prior, traffic_source(request, runtime))
        calibrated, prior_version = images.calibrated_logits, images.prior_version
        state, arrays = images.calibration, {"logits": calibrated.numpy(), "probabilities": torch.softmax(calibrated, dim=1).numpy()}
    else:
        raise InputError(f"inputs should be 'features' and 'logits' (floats) or 'image' (BYTES), found {sorted(parsed.inputs)}.")
    if version is not None and state.version != version:  # a reload swapped the calibration meanwhile
        raise HTTPException(404, f"model '{name}' version '{version}' was replaced by '{state.version}' while this request ran.")
    finite_or_raise(arrays["logits"], "calibrated logits")
    payload = {"model_name": name, "model_version": state.version, **({"id": body.id} if body.id is not None else {}),
               "parameters": {"calibration_version": state.version, "prior_version": prior_version}}
    tensors = [OutputTensor(n, arrays[n], binary) for n, binary in outputs.items()]
    json_values = sum(arrays[n].size for n, binary in outputs.items() if not binary)
    content, json_size = await off_loop_if_large(JSON_BYTES_PER_NUMBER * json_values, encode_response, payload, tensors)
    if json_size is None:
        return Response(content, media_type="application/json")
    return Response(content, media_type="application/octet-stream", headers={HEADER_NAME: str(json_size)})


# -- metadata and readiness -----------------------------------------------------------------------------
@router.get("", response_model=ServerMetadata)
async def server_metadata(request: Request) -> ServerMetadata:
    """The server's name, version and protocol extensions."""
    return ServerMetadata(name="disalign", version=__version__, extensions=EXTENSIONS)


def model_metadata(name: str, runtime: Runtime) -> ModelMetadata:
    model, state = runtime.model, runtime.calibration
    k, d = model.num_classes, model.feature_dim
    floats = "FP32"  # FP16, FP64 and BF16 are accepted too, converted to float32
    return ModelMetadata(
        name=name,
        versions=[state.version],
        platform=f"pytorch_{model.kind}",
        inputs=[TensorSpec(name="features", datatype=floats, shape=[-1, d]),
                TensorSpec(name="logits", datatype=floats, shape=[-1, k]),
                TensorSpec(name="image", datatype="BYTES", shape=[-1])],
        outputs=[TensorSpec(name=n, datatype="FP32", shape=[-1, k]) for n in OUTPUT_NAMES],
        classes=state.class_names,
        num_classes=k,
        feature_dim=d,
        model_fingerprint=model.fingerprint,
        calibration_version=state.version,
        calibration_method=state.meta.method,
        calibration_created=state.meta.created,
    )


@router.get("/models/{name}", response_model=ModelMetadata, responses=error_responses(404, 503))
async def metadata(request: Request, name: str) -> ModelMetadata:
    """Inputs, outputs, class names and the calibration version (the model's version) of the served model."""
    return model_metadata(name, await served(request, name, None))


@router.get("/models/{name}/versions/{version}", response_model=ModelMetadata, responses=error_responses(404, 503))
async def version_metadata(request: Request, name: str, version: str) -> ModelMetadata:
    """The metadata, if ``version`` is the calibration version served."""
    return model_metadata(name, await served(request, name, version))


@router.get("/models/{name}/ready", response_model=ModelReady, responses=error_responses(404, 503))
async def model_ready(request: Request, name: str) -> ModelReady:
    """200 once the model and its calibration are loaded; 503 before, 404 for another model."""
    await served(request, name, None)
    return ModelReady(name=name, ready=True)


@router.get("/models/{name}/versions/{version}/ready", response_model=ModelReady, responses=error_responses(404, 503))
async def version_ready(request: Request, name: str, version: str) -> ModelReady:
    """200 while ``version`` is the calibration version served."""
    await served(request, name, version)
    return ModelReady(name=name, ready=True)
