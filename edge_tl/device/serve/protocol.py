"""The Open Inference Protocol (KServe v2 REST) as Triton speaks it, including Triton's extensions:

* binary tensor data: the JSON header is followed by raw tensors; the header's length is in the HTTP header
  ``Inference-Header-Content-Length``; an input carries ``parameters.binary_data_size`` instead of ``data``;
  an output is sent binary when it asks (``parameters.binary_data``) or when the request says
  ``parameters.binary_data_output`` (what ``tritonclient.http`` sends when no outputs are named);
* classification: an output with ``parameters.classification = k`` comes back as BYTES ``"value:index:label"``.

Pure functions over bytes and NumPy (no web framework), raising :class:`ProtocolError` (an HTTP status and a
message that goes out as ``{"error": message}``).
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from math import prod
from typing import Any

import numpy as np

HEADER_LENGTH = "Inference-Header-Content-Length"

DATATYPES: dict[str, Any] = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}
NUMPY_TO_DATATYPE = {np.dtype(v).name: k for k, v in DATATYPES.items()}


class ProtocolError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class TensorSig:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1 for the batch axis

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class Signature:
    model: str
    inputs: tuple[TensorSig, ...]
    outputs: tuple[TensorSig, ...]
    max_batch: int


@dataclass
class RequestedOutput:
    name: str
    binary: bool
    classification: int = 0


@dataclass
class InferRequest:
    inputs: dict[str, np.ndarray]
    outputs: list[RequestedOutput]
    id: str | None = None
    batch: int = 1
    parameters: dict[str, Any] = field(default_factory=dict)


def _params(obj: dict[str, Any], where: str) -> dict[str, Any]:
    params = obj.get("parameters", {})
    if not isinstance(params, dict):
        raise ProtocolError(400, f"'parameters' of {where} must be an object")
    return params


def _shape(value: Any, name: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in value):
        raise ProtocolError(400, f"shape of input '{name}' must be a list of non-negative integers")
    return tuple(value)


# -- JSON bodies without holding the GIL for long ---------------------------------------------------------------
# json.loads of a 31 MB body holds the GIL for about a second: a thread doesn't help the event loop. Large numeric
# arrays (the "data" of an input) are therefore cut out of the JSON text and parsed in slices of FAST_CHUNK bytes,
# with the GIL free between slices; the small rest is parsed by json.loads. Anything unusual falls back to
# json.loads of the whole body (same result, only slower).
FAST_MIN = 1 << 20  # bodies smaller than this go to json.loads directly
FAST_CHUNK = 256 << 10
_DATA_KEY = re.compile(rb'"data"\s*:\s*\[')
_NOT_NUMERIC = re.compile(rb"[^0-9eE+\-.,\s\[\]]")
_PLACEHOLDER = "\u0000edge-tl-data-{}"


class _Numbers:
    """A numeric array in the JSON text (``body[start:stop]``, not copied), parsed on demand (float64, flat)."""

    def __init__(self, body: bytes | bytearray, start: int, stop: int):
        self.body, self.start, self.stop = body, start, stop

    def parse(self, dtype: Any = np.float64) -> np.ndarray | None:
        """Parsed as float64 slice by slice, each slice cast to ``dtype`` at once (values beyond its range become
        Inf, which the caller refuses), so only ``dtype``-sized arrays are kept."""
        text, stop, parts, pos, commas = self.body, self.stop, [], self.start, 0
        while pos < stop:
            end = stop if stop - pos <= FAST_CHUNK else text.rfind(b",", pos, pos + FAST_CHUNK) + 1
            if end <= pos:
                return None
            piece = bytes(text[pos:end]).translate(None, b"[]").strip().strip(b",")
            commas += piece.count(b",")
            if piece:
                try:
                    values = np.fromstring(piece.decode("ascii"), dtype=np.float64, sep=",")
                except (ValueError, DeprecationWarning):  # numpy stops at what it can't read
                    return None
                with np.errstate(over="ignore", invalid="ignore"):
                    parts.append(values.astype(dtype, copy=False))
                commas += 1  # the separator between this slice and the next
            pos = end
        arr = np.concatenate(parts) if parts else np.zeros(0)
        return arr if arr.size == commas else None  # a malformed number stops numpy early: let json.loads say why


def _cut_numbers(body: bytes | bytearray) -> tuple[bytes, list[_Numbers]] | None:
    """(the JSON with each large "data" array replaced by a placeholder string, the arrays), or None."""
    out, found, pos, look = [], [], 0, 0
    while (m := _DATA_KEY.search(body, look)) is not None:
        start = m.end() - 1  # at "["
        look = m.end()
        end, scan = None, start
        while end is None:  # the numeric run ends at the first character no number, bracket or comma has
            hit = _NOT_NUMERIC.search(body, scan, min(len(body), scan + FAST_CHUNK))
            if hit is not None:
                end = hit.start()
            elif scan + FAST_CHUNK >= len(body):
                return None
            else:
                scan += FAST_CHUNK
        while end > start and body[end - 1] in b" \t\r\n,":
            end -= 1
        if end - start < FAST_MIN // 4:
            continue
        if body[end - 1] != ord("]") or body.count(b"[", start, end) != body.count(b"]", start, end):
            return None
        out += [bytes(body[pos:start]), json.dumps(_PLACEHOLDER.format(len(found))).encode()]
        found.append(_Numbers(body, start, end))
        pos = look = end  # the next search starts after this array, not inside it
    if not found:
        return None
    out.append(bytes(body[pos:]))
    return b"".join(out), found


def loads_request(body: bytes | bytearray) -> Any:
    """``json.loads`` for a request body, with large numeric arrays parsed in GIL-friendly slices (see above).

    Nesting too deep for the parser is a 400, as is anything that isn't JSON."""
    cut = _cut_numbers(body) if len(body) >= FAST_MIN else None
    try:
        if cut is None:
            return json.loads(body)
        text, arrays = cut
        req = json.loads(text)
    except RecursionError:
        raise ProtocolError(400, "the request JSON is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(400, f"the request is not valid JSON: {exc}") from None
    placed = 0
    for raw in req.get("inputs", []) if isinstance(req, dict) and isinstance(req.get("inputs"), list) else []:
        data = raw.get("data") if isinstance(raw, dict) else None
        if isinstance(data, str) and data.startswith(_PLACEHOLDER[:-2]):
            idx = data[len(_PLACEHOLDER) - 2:]
            if not idx.isdecimal() or int(idx) >= len(arrays):
                return loads_request_slow(body)
            kind = DATATYPES.get(raw.get("datatype"), np.float64)
            parsed = arrays[int(idx)].parse(kind if np.dtype(kind).kind == "f" else np.float64)
            if parsed is None:
                return loads_request_slow(body)
            raw["data"] = parsed
            placed += 1
    return req if placed == len(arrays) else loads_request_slow(body)


def loads_request_slow(body: bytes) -> Any:
    try:
        return json.loads(body)
    except RecursionError:
        raise ProtocolError(400, "the request JSON is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(400, f"the request is not valid JSON: {exc}") from None


def _finite(arr: np.ndarray, name: str, datatype: str) -> np.ndarray:
    """Reject NaN and Inf (JSON can't carry them, and they poison the outputs), including values beyond the
    datatype's range that became Inf when cast (1e39 as FP32)."""
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ProtocolError(400, f"input '{name}' holds NaN or Inf (or values beyond {datatype}'s range); send "
                                 "finite numbers")
    return arr


def _json_tensor(data: Any, dtype: Any, shape: tuple[int, ...], name: str) -> np.ndarray:
    try:
        arr = np.asarray(data)
    except RecursionError:
        raise ProtocolError(400, f"'data' of input '{name}' is nested too deeply") from None
    except (ValueError, TypeError) as exc:
        raise ProtocolError(400, f"'data' of input '{name}' is not a (nested) list of numbers: {exc}") from exc
    kinds = "b" if dtype is np.bool_ else "biuf"
    if arr.dtype.kind not in kinds:
        raise ProtocolError(400, f"'data' of input '{name}' holds {arr.dtype.kind!r}-kind values, not numbers")
    if arr.size != prod(shape):
        raise ProtocolError(400, f"input '{name}' has {arr.size} values in 'data' but shape {list(shape)} "
                                 f"needs {prod(shape)}")
    return arr.astype(dtype, copy=False).reshape(shape)


def split_body(body: bytes, header_length: str | None) -> tuple[bytes | memoryview, memoryview]:
    """(JSON header, binary tensor data) by Triton's binary extension: the header is the first
    ``Inference-Header-Content-Length`` bytes; without that HTTP header the whole body is JSON."""
    if header_length is None:
        return body, memoryview(b"")
    try:
        hlen = int(header_length)
    except ValueError:
        raise ProtocolError(400, f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from None
    if not 0 < hlen <= len(body):
        raise ProtocolError(400, f"{HEADER_LENGTH} {hlen} is outside the body's {len(body)} bytes")
    return body[:hlen], memoryview(body)[hlen:]


def request_object(head: bytes | memoryview) -> dict[str, Any]:
    """The request's JSON: an object with a non-empty ``inputs`` list."""
    req = loads_request(head)
    if not isinstance(req, dict):
        raise ProtocolError(400, "the request must be a JSON object with 'inputs'")
    raw_inputs = req.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise ProtocolError(400, "the request needs a non-empty 'inputs' list")
    return req


def input_signature(raw: Any, sig: Signature, seen: dict[str, np.ndarray]) -> tuple[str, tuple[int, ...]]:
    """(name, shape) of one input object, checked against the model's signature: a known name given once, the
    model's datatype, and a shape that matches the model's (any size on its -1 axes)."""
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
        raise ProtocolError(400, "each input must be an object with a 'name'")
    expected = {t.name: t for t in sig.inputs}
    name = raw["name"]
    if name not in expected:
        raise ProtocolError(400, f"unexpected inference input '{name}' for model '{sig.model}' "
                                 f"(it takes {sorted(expected)})")
    if name in seen:
        raise ProtocolError(400, f"input '{name}' is given twice")
    want = expected[name]
    datatype = raw.get("datatype")
    if datatype != want.datatype:
        raise ProtocolError(400, f"inference input '{name}' data-type is '{datatype}', but model "
                                 f"'{sig.model}' expects '{want.datatype}'")
    shape = _shape(raw.get("shape"), name)
    if len(shape) != len(want.shape) or any(w not in (-1, s) for w, s in zip(want.shape, shape, strict=True)):
        raise ProtocolError(400, f"unexpected shape for input '{name}' for model '{sig.model}'. Expected "
                                 f"{list(want.shape)}, got {list(shape)}")
    return name, shape


def input_data(raw: dict[str, Any], name: str, shape: tuple[int, ...], binary: memoryview,
               offset: int) -> tuple[np.ndarray, int]:
    """(the input's array, binary bytes it took): from ``parameters.binary_data_size`` bytes of ``binary`` at
    ``offset``, or from its JSON ``data``; finite numbers only."""
    datatype = raw["datatype"]
    dtype = DATATYPES[datatype]
    size = _params(raw, f"input '{name}'").get("binary_data_size")
    if size is not None:
        nbytes = prod(shape) * np.dtype(dtype).itemsize
        if not isinstance(size, int) or size != nbytes:
            raise ProtocolError(400, f"input '{name}' has binary_data_size {size}, but shape {list(shape)} of "
                                     f"{datatype} needs {nbytes} bytes")
        if offset + size > len(binary):
            raise ProtocolError(400, f"the binary data ends before input '{name}' ({len(binary)} bytes)")
        arr = np.frombuffer(binary[offset:offset + size], dtype=dtype).reshape(shape)
        return _finite(arr, name, datatype), size
    if "data" in raw:
        with np.errstate(over="ignore", invalid="ignore"):  # out-of-range values become Inf: refused below
            return _finite(_json_tensor(raw["data"], dtype, shape, name), name, datatype), 0
    raise ProtocolError(400, f"input '{name}' has neither 'data' nor parameters.binary_data_size")


def parse_inputs(raw_inputs: list[Any], sig: Signature, binary: memoryview) -> tuple[dict[str, np.ndarray], int]:
    """(the inputs by name, their batch size): every input of the model once, the binary data used up exactly,
    one batch size (1 to the model's max_batch) on every input's first axis."""
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for raw in raw_inputs:
        name, shape = input_signature(raw, sig, inputs)
        inputs[name], used = input_data(raw, name, shape, binary, offset)
        offset += used
    if offset != len(binary):
        raise ProtocolError(400, f"{len(binary) - offset} bytes of binary data belong to no input")
    expected = {t.name for t in sig.inputs}
    missing = sorted(expected - set(inputs))
    if missing:
        raise ProtocolError(400, f"expected {len(expected)} inputs but got {len(inputs)}; missing {missing}")
    batches = {a.shape[0] for a in inputs.values()}
    batch = batches.pop()
    if batches or batch < 1:
        raise ProtocolError(400, "every input needs the same batch size (>= 1) on its first axis")
    if batch > sig.max_batch:
        raise ProtocolError(400, f"inference request batch-size must be <= {sig.max_batch} for '{sig.model}'")
    return inputs, batch


def parse_outputs(raw_outputs: Any, sig: Signature, binary_default: bool) -> list[RequestedOutput]:
    """The outputs asked for (all of the model's, sorted, when ``outputs`` is absent), each binary or JSON, with
    its ``parameters.classification`` k (a non-negative integer)."""
    known = {t.name for t in sig.outputs}
    if raw_outputs is None:
        return [RequestedOutput(n, binary_default) for n in sorted(known)]
    if not isinstance(raw_outputs, list):
        raise ProtocolError(400, "'outputs' must be a list")
    outputs = []
    for raw in raw_outputs:
        name = raw.get("name") if isinstance(raw, dict) else raw
        if isinstance(raw, dict) and not isinstance(name, str):  # a list or an object as the name was a 500
            raise ProtocolError(400, "the 'name' of each requested output must be a string")
        if not isinstance(raw, dict) or name not in known:
            raise ProtocolError(400, f"unexpected inference output '{name}' for model '{sig.model}'")
        p = _params(raw, f"output '{raw['name']}'")
        k = p.get("classification", 0)
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise ProtocolError(400, f"classification of output '{raw['name']}' must be a non-negative integer")
        outputs.append(RequestedOutput(raw["name"], bool(p.get("binary_data", binary_default)), k))
    return outputs


def parse_infer_request(body: bytes, header_length: str | None, sig: Signature) -> InferRequest:
    """Decode and validate an infer request against the model's signature (400 on anything wrong)."""
    head, binary = split_body(body, header_length)
    req = request_object(head)
    inputs, batch = parse_inputs(req["inputs"], sig, binary)
    params = _params(req, "the request")
    outputs = parse_outputs(req.get("outputs"), sig, bool(params.get("binary_data_output", False)))
    req_id = req.get("id")
    if isinstance(req_id, (list, dict)):  # the protocol's "id" is a string (a number is taken as its text)
        raise ProtocolError(400, "'id' of the request must be a string")
    return InferRequest(inputs, outputs, str(req_id) if req_id is not None else None, batch, params)


def classification_strings(values: np.ndarray, k: int, labels: list[str]) -> np.ndarray:
    """Triton's classification extension: per batch row the top k as ``"value:index[:label]"`` (BYTES)."""
    rows = values.reshape(values.shape[0], -1)
    k = min(k, rows.shape[1])
    out = np.empty((rows.shape[0], k), dtype=object)
    for r, row in enumerate(rows):
        for j, i in enumerate(np.argsort(-row, kind="stable")[:k]):
            label = f":{labels[i]}" if i < len(labels) else ""
            out[r, j] = f"{float(row[i]):f}:{int(i)}{label}".encode()
    return out


def _serialize_bytes(arr: np.ndarray) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in arr.ravel())


def encode_infer_response(model: str, version: str, request: InferRequest, outputs: dict[str, np.ndarray],
                          labels: list[str]) -> tuple[bytes, int | None]:
    """(body, JSON header length or None when the body is JSON only)."""
    out_json = []
    blobs: list[bytes] = []
    for want in request.outputs:
        arr = outputs[want.name]
        if want.classification:
            arr = classification_strings(arr, want.classification, labels)
            datatype = "BYTES"
        else:
            datatype = NUMPY_TO_DATATYPE.get(arr.dtype.name)
            if datatype is None:
                raise ProtocolError(500, f"output '{want.name}' has dtype {arr.dtype}, which v2 cannot carry")
        item: dict[str, Any] = {"name": want.name, "datatype": datatype, "shape": list(arr.shape)}
        if want.binary:
            blob = _serialize_bytes(arr) if datatype == "BYTES" else np.ascontiguousarray(arr).tobytes()
            item["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            flat = arr.ravel()
            item["data"] = [b.decode() for b in flat] if datatype == "BYTES" else flat.tolist()
        out_json.append(item)
    head: dict[str, Any] = {"model_name": model, "model_version": version}
    if request.id is not None:
        head["id"] = request.id
    head["outputs"] = out_json
    try:
        text = json.dumps(head, separators=(",", ":"), allow_nan=False).encode()
    except ValueError:  # NaN/Inf in an output: not JSON (the binary form would carry it, but say so instead)
        raise ProtocolError(500, "the model produced NaN or Inf outputs, which JSON cannot carry; request the "
                                 "outputs as binary_data to get the raw values") from None
    if not blobs:
        return text, None
    return b"".join([text, *blobs]), len(text)
