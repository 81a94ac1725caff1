"""Request and response bodies of the REST API (pydantic); the domain objects live in :mod:`disalign.service.runtime`.

The ``/v2`` bodies follow the Open Inference Protocol (KServe v2) JSON tensors: ``data`` is the
row-major flattened tensor, ``shape`` its shape.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ErrorBody(BaseModel):
    error: str = Field(description="one sentence saying what was wrong and what was expected")


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


# -- /v2 (Open Inference Protocol) ------------------------------------------------------------------
class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str] = Field(description="protocol extensions: binary_tensor_data")


class ModelReady(BaseModel):
    name: str
    ready: bool


class TensorSpec(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 marks a dimension of any size")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str] = Field(description="the served calibration version; /v2/models/{name}/versions/{version}/… accepts it")
    platform: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    classes: list[str]
    num_classes: int
    feature_dim: int
    model_fingerprint: str
    calibration_version: str
    calibration_method: str
    calibration_created: str


# Row-major tensor contents, flat or in their natural nesting (our inputs have at most two dimensions).
TensorData = list[float] | list[list[float]] | list[str]
Datatype = Literal["FP32", "FP16", "FP64", "BF16", "BYTES"]


class InputParameters(BaseModel):
    model_config = ConfigDict(extra="allow")

    binary_data_size: int | None = Field(None, ge=0, description="bytes of this tensor in the binary part of the body")


class InferInput(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(max_length=64)
    shape: list[int] = Field(min_length=1, max_length=4)
    datatype: Datatype
    data: TensorData | None = Field(None, description="absent when parameters.binary_data_size is given")
    parameters: InputParameters | None = None


class OutputParameters(BaseModel):
    model_config = ConfigDict(extra="allow")

    binary_data: bool | None = Field(None, description="return this output as raw little-endian bytes after the JSON")


class RequestedOutput(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(max_length=64)
    parameters: OutputParameters | None = None


class RequestParameters(BaseModel):
    model_config = ConfigDict(extra="allow")

    binary_data_output: bool = Field(False, description="return every output as binary data unless it says otherwise")


class InferRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str | None = Field(None, max_length=256)
    inputs: list[InferInput] = Field(min_length=1, max_length=2)
    outputs: list[RequestedOutput] | None = Field(None, max_length=2, description="all outputs when absent")
    parameters: RequestParameters | None = None


class InferOutput(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    data: list[float] | None = Field(None, description="absent for a binary output")
    parameters: dict[str, int] | None = Field(None, description="binary_data_size of a binary output")


class InferResponse(BaseModel):
    model_name: str
    model_version: str = Field(description="the calibration version that computed every output")
    id: str | None = Field(None, description="the request's id, when it had one")
    parameters: dict[str, str]
    outputs: list[InferOutput]


# -- /predict and /calibrate ------------------------------------------------------------------------
class Prediction(BaseModel):
    label: str
    index: int
    probability: float


class ImagePredictions(BaseModel):
    top_k: list[Prediction] = Field(description="calibrated model")
    raw_top_k: list[Prediction] | None = Field(None, description="stage-1 model (with raw=true)")


class PredictJSON(BaseModel):
    """JSON alternative to multipart: images as base64 strings."""

    model_config = ConfigDict(extra="forbid")

    images: list[str] = Field(min_length=1, description="base64-encoded image files (JPEG, PNG, …)")


class PriorQuery(BaseModel):
    """The query parameter of ``/calibrate`` (and ``/predict``) choosing the class prior of the answer."""

    model_config = ConfigDict(extra="ignore")

    prior: Literal["served", "balanced"] = Field("served", description="the server's class prior (DISALIGN_PRIOR) or balanced")


class PredictQuery(PriorQuery):
    """The query parameters of ``/predict``."""

    model_config = ConfigDict(extra="ignore")

    top_k: int | None = Field(None, ge=1, description="classes per image (default min(5, K))")
    raw: bool = Field(False, description="also return the stage-1 (uncalibrated) top-k")


class PredictResponse(BaseModel):
    model_name: str
    calibration_version: str
    prior_version: str = Field(description="the class prior the predictions are aligned to: 'balanced' or '<source>-<hex>'")
    predictions: list[ImagePredictions] = Field(description="one entry per image, in request order")


class CalibrateRow(BaseModel):
    model_config = ConfigDict(extra="forbid")

    features: list[float] = Field(description="stage-1 features (d values)")
    logits: list[float] = Field(description="stage-1 logits (K values)")


class CalibrateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rows: list[CalibrateRow] = Field(min_length=1)
    top_k: int | None = Field(None, ge=1, description="classes per row in top_k (default min(5, K))")


class CalibrateResult(BaseModel):
    logits: list[float] = Field(description="calibrated logits (K values)")
    probabilities: list[float] = Field(description="softmax of the calibrated logits (K values)")
    top_k: list[Prediction]


class CalibrateResponse(BaseModel):
    model_name: str
    calibration_version: str
    prior_version: str = Field(description="the class prior the results are aligned to: 'balanced' or '<source>-<hex>'")
    results: list[CalibrateResult]


# -- /admin -----------------------------------------------------------------------------------------
class ReloadResponse(BaseModel):
    calibration_version: str
    previous_version: str
    changed: bool


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI ``requestBody`` of a route that validates its JSON body itself (nested models inlined)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(value) for value in node]
        return node

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(schema)}}}}


def query_parameters(model: type[BaseModel]) -> list[dict[str, Any]]:
    """OpenAPI ``parameters`` of a route that validates its query string itself with ``model``."""
    schema = model.model_json_schema()
    required = set(schema.get("required", ()))
    return [{"name": name, "in": "query", "required": name in required, "description": prop.get("description", ""),
             "schema": {key: value for key, value in prop.items() if key not in ("description", "title")}}
            for name, prop in schema["properties"].items()]


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries: every listed status answers an :class:`ErrorBody`."""
    descriptions = {400: "Undecodable input", 401: "Missing or wrong token", 403: "Admin routes disabled",
                    404: "Unknown model or route", 409: "Calibration does not fit the model",
                    413: "Body or image too large", 415: "Unsupported Content-Type",
                    422: "Invalid request", 503: "Model not loaded"}
    return {code: {"model": ErrorBody, "description": descriptions[code]} for code in codes}
