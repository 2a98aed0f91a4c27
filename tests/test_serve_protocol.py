"""The infer-request parser piece by piece (serve/protocol.py): the binary extension's split, the request's shape,
each input's name/datatype/shape and data, the inputs together (binary bytes used up, batch size), the outputs.
tests/test_serve.py sends the same mistakes over HTTP."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edge_tl.device.serve.protocol import (
    HEADER_LENGTH,
    ProtocolError,
    RequestedOutput,
    Signature,
    TensorSig,
    input_data,
    input_signature,
    parse_infer_request,
    parse_inputs,
    parse_outputs,
    request_object,
    split_body,
)

SIG = Signature("m", (TensorSig("a", "FP32", (-1, 2)), TensorSig("b", "INT32", (-1, 1))),
                (TensorSig("y", "FP32", (-1, 3)), TensorSig("p", "FP32", (-1, 3))), max_batch=4)


def refused(fn, *args, needle: str, status: int = 400) -> None:
    with pytest.raises(ProtocolError) as exc:
        fn(*args)
    assert exc.value.status == status and needle in exc.value.message, exc.value.message


def tensor(name: str, datatype: str, shape: list, **kw) -> dict:
    return {"name": name, "datatype": datatype, "shape": shape, **kw}


def test_split_body_by_the_header_length():
    head, binary = split_body(b'{"x":1}abcd', None)
    assert (bytes(head), bytes(binary)) == (b'{"x":1}abcd', b"")
    head, binary = split_body(b'{"x":1}abcd', "7")
    assert (bytes(head), bytes(binary)) == (b'{"x":1}', b"abcd")
    refused(split_body, b"{}", "two", needle=f"{HEADER_LENGTH} must be an integer")
    refused(split_body, b"{}", "0", needle="outside the body's 2 bytes")
    refused(split_body, b"{}", "3", needle="outside the body's 2 bytes")


def test_request_object_needs_an_object_with_inputs():
    assert request_object(b'{"inputs": [{}]}') == {"inputs": [{}]}
    refused(request_object, b"[1]", needle="must be a JSON object")
    refused(request_object, b'{"inputs": []}', needle="non-empty 'inputs' list")
    refused(request_object, b'{"inputs": {}}', needle="non-empty 'inputs' list")
    refused(request_object, b"{nope", needle="not valid JSON")
    refused(request_object, b"[" * 100_000 + b"]" * 100_000, needle="nested too deeply")


def test_input_signature_checks_name_datatype_and_shape():
    assert input_signature(tensor("a", "FP32", [3, 2]), SIG, {}) == ("a", (3, 2))  # any size on a -1 axis
    refused(input_signature, ["a"], SIG, {}, needle="an object with a 'name'")
    refused(input_signature, tensor("z", "FP32", [1, 2]), SIG, {}, needle="unexpected inference input 'z'")
    refused(input_signature, tensor("a", "FP32", [1, 2]), SIG, {"a": np.zeros((1, 2))}, needle="given twice")
    refused(input_signature, tensor("a", "FP16", [1, 2]), SIG, {}, needle="data-type is 'FP16'")
    refused(input_signature, tensor("a", "FP32", [1, 3]), SIG, {}, needle="Expected [-1, 2], got [1, 3]")
    refused(input_signature, tensor("a", "FP32", [1, 2, 1]), SIG, {}, needle="unexpected shape")
    refused(input_signature, tensor("a", "FP32", [1, True]), SIG, {}, needle="non-negative integers")


def test_input_data_from_json_or_binary_finite_only():
    raw = tensor("a", "FP32", [2, 2], data=[[1, 2], [3, 4]])
    arr, used = input_data(raw, "a", (2, 2), memoryview(b""), 0)
    assert used == 0 and arr.dtype == np.float32 and arr.tolist() == [[1, 2], [3, 4]]
    blob = np.arange(6, dtype=np.float32).tobytes()
    raw = tensor("a", "FP32", [1, 2], parameters={"binary_data_size": 8})
    arr, used = input_data(raw, "a", (1, 2), memoryview(blob), 8)  # the second 8 bytes
    assert used == 8 and arr.tolist() == [[2, 3]]
    refused(input_data, raw, "a", (1, 2), memoryview(blob), 20, needle="binary data ends before input 'a'")
    bad_size = tensor("a", "FP32", [1, 2], parameters={"binary_data_size": 4})
    refused(input_data, bad_size, "a", (1, 2), memoryview(blob), 0, needle="needs 8 bytes")
    refused(input_data, tensor("a", "FP32", [1, 2]), "a", (1, 2), memoryview(b""), 0, needle="neither 'data'")
    for values, needle in (([1, 2, 3], "3 values in 'data'"), (["x", "y"], "not numbers"),
                           ([1e39, 0], "NaN or Inf"), ([float("nan"), 0], "NaN or Inf")):
        refused(input_data, tensor("a", "FP32", [1, 2], data=values), "a", (1, 2), memoryview(b""), 0,
                needle=needle)
    nan = np.array([np.nan, 0], np.float32).tobytes()
    refused(input_data, raw, "a", (1, 2), memoryview(nan), 0, needle="NaN or Inf")


def test_parse_inputs_uses_all_binary_bytes_and_one_batch():
    a = tensor("a", "FP32", [2, 2], data=[0, 1, 2, 3])
    b = tensor("b", "INT32", [2, 1], parameters={"binary_data_size": 8})
    blob = np.array([5, 6], np.int32).tobytes()
    inputs, batch = parse_inputs([a, b], SIG, memoryview(blob))
    assert batch == 2 and inputs["b"].tolist() == [[5], [6]] and inputs["a"].shape == (2, 2)
    refused(parse_inputs, [a, b], SIG, memoryview(blob + b"xx"), needle="2 bytes of binary data belong to no input")
    refused(parse_inputs, [a], SIG, memoryview(b""), needle="missing ['b']")
    b1 = tensor("b", "INT32", [1, 1], data=[7])
    refused(parse_inputs, [a, b1], SIG, memoryview(b""), needle="same batch size")
    refused(parse_inputs, [tensor("a", "FP32", [0, 2], data=[]), tensor("b", "INT32", [0, 1], data=[])], SIG,
            memoryview(b""), needle="same batch size (>= 1)")
    a5, b5 = tensor("a", "FP32", [5, 2], data=[0] * 10), tensor("b", "INT32", [5, 1], data=[0] * 5)
    refused(parse_inputs, [a5, b5], SIG, memoryview(b""), needle="batch-size must be <= 4")


def test_parse_outputs():
    assert parse_outputs(None, SIG, True) == [RequestedOutput("p", True), RequestedOutput("y", True)]
    assert parse_outputs([], SIG, False) == []
    asked = [{"name": "y", "parameters": {"classification": 2}}, {"name": "p", "parameters": {"binary_data": True}}]
    assert parse_outputs(asked, SIG, False) == [RequestedOutput("y", False, 2), RequestedOutput("p", True, 0)]
    refused(parse_outputs, {"name": "y"}, SIG, False, needle="'outputs' must be a list")
    refused(parse_outputs, [{"name": "q"}], SIG, False, needle="unexpected inference output 'q'")
    refused(parse_outputs, ["y"], SIG, False, needle="unexpected inference output 'y'")
    for k in (True, -1, 1.5, "2"):
        refused(parse_outputs, [{"name": "y", "parameters": {"classification": k}}], SIG, False,
                needle="non-negative integer")
    refused(parse_outputs, [{"name": "y", "parameters": [1]}], SIG, False, needle="'parameters' of output 'y'")
    for name in (["y"], {"y": 1}, None, 3):  # issue 24: a list as the name was a 500 (unhashable in the lookup)
        refused(parse_outputs, [{"name": name}], SIG, False, needle="'name' of each requested output must be a string")


def test_parse_infer_request_puts_the_pieces_together():
    head = json.dumps({"id": 12, "parameters": {"binary_data_output": True},
                       "inputs": [tensor("b", "INT32", [1, 1], data=[3]),
                                  tensor("a", "FP32", [1, 2], parameters={"binary_data_size": 8})]}).encode()
    req = parse_infer_request(head + np.array([1, 2], np.float32).tobytes(), str(len(head)), SIG)
    assert req.id == "12" and req.batch == 1 and req.parameters == {"binary_data_output": True}
    assert req.inputs["a"].tolist() == [[1, 2]] and req.inputs["b"].tolist() == [[3]]
    assert req.outputs == [RequestedOutput("p", True), RequestedOutput("y", True)]
    bad_params = json.dumps({"parameters": 3, "inputs": [tensor("a", "FP32", [1, 2], data=[1, 2]),
                                                         tensor("b", "INT32", [1, 1], data=[3])]}).encode()
    refused(parse_infer_request, bad_params, None, SIG, needle="'parameters' of the request")
    bad_id = json.dumps({"id": [1], "inputs": [tensor("a", "FP32", [1, 2], data=[1, 2]),
                                               tensor("b", "INT32", [1, 1], data=[3])]}).encode()
    refused(parse_infer_request, bad_id, None, SIG, needle="'id' of the request must be a string")
