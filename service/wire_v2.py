"""The Open Inference Protocol v2 wire format: body framing, tensors ↔ numpy, the response body; no HTTP here.

The v2 router (:mod:`disalign.service.routers.v2`) reads the HTTP body and headers and calls these; every
function raises :class:`InputError` with one sentence naming the input (400 on ``/v2``).

**Binary tensor data extension** (Triton's ``binary_tensor_data``, what ``tritonclient`` sends by
default). The body is the JSON inference request followed by the raw bytes of every input whose
``parameters.binary_data_size`` is given, in the order of ``inputs``; the header
``Inference-Header-Content-Length`` gives the length of the JSON part, ``Content-Length`` the whole.
Tensors are little-endian, row-major, without padding; a BYTES element is a 4-byte little-endian
length followed by its bytes. A response with binary outputs is built the same way: the JSON
response (each binary output with ``parameters.binary_data_size`` and no ``data``), then the bytes.

Float inputs (FP32, FP16, FP64, BF16) become float32, the model's dtype: binary ones straight from the
body's buffer with :func:`numpy.frombuffer` (no number is parsed; FP32 is not even copied), JSON ones
from their numbers, flat or nested in the tensor's shape. BYTES inputs are image files (base64 strings
in JSON). Outputs are ``probabilities`` and ``logits``, float32, as JSON ``data`` or binary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from disalign.calib.errors import InputError
from disalign.service.checks import check_count, decode_base64, finite_float32
from disalign.service.schemas import InferInput, InferRequest

HEADER_NAME = "Inference-Header-Content-Length"
HEADER_LENGTH = HEADER_NAME.lower().encode()  # as ASGI gives header names
EXTENSIONS = ["binary_tensor_data"]
OUTPUT_NAMES = ("probabilities", "logits")
# Wire dtype of each float datatype; BF16 is read as the upper 16 bits of a float32.
FLOAT_DATATYPES = {"FP32": np.dtype("<f4"), "FP16": np.dtype("<f2"), "FP64": np.dtype("<f8"), "BF16": np.dtype("<u2")}
# More digits than any body length has (the body limit is far below 10^18): a longer header is refused before
# int() sees it, whose digit limit (4,300) would raise a ValueError, once answered 500.
MAX_LENGTH_DIGITS = 18
UNSUPPORTED_PARAMETERS = {"shared_memory_region": "shared memory", "classification": "the classification extension"}


@dataclass(frozen=True)
class InferBody:
    """A parsed inference request: its JSON part, and the raw bytes of each binary input by name."""

    request: InferRequest
    inputs: dict[str, InferInput]
    binary: dict[str, memoryview]


@dataclass(frozen=True)
class OutputTensor:
    """One output of the response: a float32 array and whether it travels as binary data."""

    name: str
    array: np.ndarray
    binary: bool


def json_length(header: str | None, body_length: int) -> int | None:
    """The ``Inference-Header-Content-Length`` header as a number of bytes within the body (None without it)."""
    if header is None:
        return None
    if not (header.isascii() and header.isdigit() and len(header) <= MAX_LENGTH_DIGITS):
        shown = f"'{header[:32]}…' ({len(header)} characters)" if len(header) > 32 else f"'{header}'"
        raise InputError(f"the Inference-Header-Content-Length header should be a number of bytes (at most "
                         f"{MAX_LENGTH_DIGITS} digits), found {shown}.")
    length = int(header)
    if not 0 < length <= body_length:
        raise InputError(f"the Inference-Header-Content-Length header says {length} bytes but the body has {body_length}.")
    return length


def binary_padding(declared: bytes | None) -> int:
    """Zero bytes to read the body after so that its binary part starts 8-byte aligned: its tensors are then
    used where they lie, without a copy (``declared``: the raw ``Inference-Header-Content-Length``, if any)."""
    if declared is None or not declared.isdigit() or len(declared) > MAX_LENGTH_DIGITS:
        return 0  # split_body refuses such a header with one sentence
    return -int(declared) % 8


def split_body(buffer: bytearray, pad: int, declared: bytes | None) -> tuple[bytes | bytearray, memoryview | None]:
    """A body read after ``pad`` zero bytes → its JSON part and its binary part (None without the header)."""
    header_length = json_length(None if declared is None else declared.decode("latin-1"), len(buffer) - pad)
    if header_length is None:
        return buffer, None  # pad is 0 without the header
    view = memoryview(buffer)
    return bytes(view[pad:pad + header_length]), view[pad + header_length:]


def check_parameters(extra: dict[str, Any] | None, where: str) -> None:
    """Refuse the parameters of protocol extensions this server does not implement."""
    for key, feature in UNSUPPORTED_PARAMETERS.items():
        if extra and key in extra and extra[key] not in (None, 0, False):
            raise InputError(f"{where} asks for {feature} ('{key}'), which this server does not support.")


def split_inputs(request: InferRequest, rest: memoryview | None) -> InferBody:
    """Give each binary input its slice of ``rest``, the body after the JSON part (None: no such header).

    The slices must add up to ``rest`` exactly.
    """
    inputs = {t.name: t for t in request.inputs}
    if len(inputs) != len(request.inputs):
        raise InputError("each input name may appear only once.")
    binary, offset = {}, 0
    for tensor in request.inputs:
        params = tensor.parameters
        check_parameters(params.model_extra if params else None, f"input '{tensor.name}'")
        size = params.binary_data_size if params else None
        if size is None:
            if tensor.data is None:
                raise InputError(f"input '{tensor.name}' has neither data nor parameters.binary_data_size.")
            continue
        if tensor.data is not None:
            raise InputError(f"input '{tensor.name}' has both data and parameters.binary_data_size; give one of them.")
        if rest is None:
            raise InputError(f"input '{tensor.name}' has binary data but the request has no Inference-Header-Content-Length header.")
        binary[tensor.name] = rest[offset:offset + size]
        offset += size
    if rest is not None and offset != len(rest):
        raise InputError(f"the binary part of the body has {len(rest)} bytes but the inputs' binary_data_size add up to {offset}.")
    return InferBody(request, inputs, binary)


def requested_outputs(request: InferRequest) -> dict[str, bool]:
    """Output name → whether it is sent as binary data; every output when none is named."""
    default = request.parameters.binary_data_output if request.parameters else False
    if not request.outputs:
        return dict.fromkeys(OUTPUT_NAMES, default)
    outputs: dict[str, bool] = {}
    for out in request.outputs:
        if out.name not in OUTPUT_NAMES:
            raise InputError(f"output '{out.name}' does not exist; the outputs are {', '.join(OUTPUT_NAMES)}.")
        if out.name in outputs:
            raise InputError(f"output '{out.name}' is requested twice.")
        params = out.parameters
        check_parameters(params.model_extra if params else None, f"output '{out.name}'")
        outputs[out.name] = default if params is None or params.binary_data is None else params.binary_data
    return outputs


def float_rows(tensor: InferInput, raw: memoryview | None, width: int, max_rows: int) -> np.ndarray:
    """A float input of shape [N, width] → (N, width) float32, finite; ``raw``: its binary data, if binary."""
    name, datatype, shape = tensor.name, tensor.datatype, tensor.shape
    wire = FLOAT_DATATYPES.get(datatype)
    if wire is None:
        raise InputError(f"input '{name}' should have datatype FP32, FP16, FP64 or BF16, found {datatype}.")
    if len(shape) != 2 or shape[1] != width or shape[0] < 1:
        raise InputError(f"input '{name}' should have shape [N, {width}], found {shape}.")
    check_count(f"input '{name}' rows", shape[0], max_rows, "max_rows")
    count, what = shape[0] * width, f"input '{name}' data"
    if raw is not None:
        if len(raw) != count * wire.itemsize:
            raise InputError(f"input '{name}' has {len(raw)} bytes of binary data but shape {shape} of {datatype} needs {count * wire.itemsize}.")
        values = np.frombuffer(raw, dtype=wire).reshape(shape[0], width)  # a view of the body (writable: a bytearray)
        if not values.flags.aligned:  # split_body aligns the binary part; a copy only if it could not
            values = values.copy()
        if datatype == "FP32":  # used where it lies; only checked
            if not np.isfinite(values).all():
                finite_float32(values, what)  # raises the one sentence for NaN / inf
            return values
        if datatype == "BF16":
            values = (values.astype(np.uint32) << 16).view(np.float32)
        return finite_float32(values, what)
    data = tensor.data or []
    if data and isinstance(data[0], str):
        raise InputError(f"input '{name}' has datatype {datatype}, so its data should be numbers, not strings.")
    try:
        array = finite_float32(data, what)
    except InputError:
        raise
    except ValueError:  # nested lists of different lengths
        raise InputError(f"{what} are nested lists of different lengths; nest them as the shape {shape} or send them flat.") from None
    if array.size != count:
        raise InputError(f"input '{name}' has {array.size} values but its shape {shape} needs {count}.")
    if array.ndim == 2 and list(array.shape) != shape:
        raise InputError(f"input '{name}' data are nested as {list(array.shape)} but its shape is {shape}.")
    return array.reshape(shape[0], width)


def byte_elements(tensor: InferInput, raw: memoryview | None, max_items: int) -> list[bytes]:
    """A BYTES input of shape [N] → its N elements: binary (length-prefixed) or JSON (base64 strings)."""
    name = tensor.name
    if tensor.datatype != "BYTES":
        raise InputError(f"input '{name}' should have datatype BYTES, found {tensor.datatype}.")
    if len(tensor.shape) != 1 or tensor.shape[0] < 1:
        raise InputError(f"input '{name}' should have shape [N], found {tensor.shape}.")
    count = tensor.shape[0]
    check_count("images", count, max_items, "max_images")
    if raw is None:
        data = tensor.data or []
        if not data or not isinstance(data[0], str):
            raise InputError(f"input '{name}' should have base64 strings as data.")
        if len(data) != count:
            raise InputError(f"input '{name}' should have shape [N] with N = {len(data)} (the number of strings), found {tensor.shape}.")
        return decode_base64([str(v) for v in data], f"inputs.{name}.data")
    items, offset = [], 0
    while offset < len(raw) and len(items) < count:
        size = int.from_bytes(raw[offset:offset + 4], "little") if offset + 4 <= len(raw) else -1
        if size < 0 or offset + 4 + size > len(raw):
            raise InputError(f"input '{name}' element {len(items)} runs past the end of its binary data.")
        items.append(bytes(raw[offset + 4:offset + 4 + size]))
        offset += 4 + size
    if len(items) != count or offset != len(raw):
        raise InputError(f"input '{name}' should hold {count} length-prefixed elements in {len(raw)} bytes of binary data.")
    return items


def encode_response(payload: dict[str, Any], outputs: list[OutputTensor]) -> tuple[bytes, int | None]:
    """The response body and, when an output is binary, the length of its JSON part.

    JSON outputs are written by orjson straight from the float32 arrays; binary outputs are their raw
    little-endian bytes after the JSON, with ``binary_data_size`` in the output's parameters.
    """
    entries, blobs = [], []
    for out in outputs:
        entry: dict[str, Any] = {"name": out.name, "datatype": "FP32", "shape": list(out.array.shape)}
        if out.binary:
            blob = memoryview(np.ascontiguousarray(out.array, dtype="<f4")).cast("B")  # copied once, by the join below
            entry["parameters"] = {"binary_data_size": blob.nbytes}
            blobs.append(blob)
        else:
            entry["data"] = out.array.reshape(-1)
        entries.append(entry)
    header = orjson.dumps({**payload, "outputs": entries}, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, None
    return b"".join((header, *blobs)), len(header)
