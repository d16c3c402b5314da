"""Golden codec vectors: regenerate byte-identically, and hold in both directions."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import msgpack
import numpy as np
import pytest

from p2pfm.core.codecs import CodecSpec, decode, encode
from p2pfm.core.errors import REJECT_TYPES, RejectReason

VECTORS = Path(__file__).resolve().parents[1] / "protocols" / "vectors"
CASES_DIR = VECTORS / "codecs"
CASES = sorted(p.name for p in CASES_DIR.iterdir() if p.is_dir())
ACCEPT = [c for c in CASES if c.startswith("accept_")]
REJECT = [c for c in CASES if c.startswith("reject_")]


def load_generator():
    spec = importlib.util.spec_from_file_location("generate_codecs", VECTORS / "generate_codecs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building
    spec.loader.exec_module(module)
    return module


def read_json(case: str, name: str):
    return json.loads((CASES_DIR / case / name).read_text())


def read_wire(case: str) -> bytes:
    return bytes.fromhex((CASES_DIR / case / "wire.hex").read_text().strip())


def test_vectors_cover_accepts_and_every_codec_reject_reason():
    """There are accept cases for every codec and reject cases for each codec-level reason."""
    assert {read_json(c, "context.json")["spec"]["name"] for c in ACCEPT} == {"none", "fp16", "int8", "topk"}
    reasons = {read_json(c, "expected.json")["reason"] for c in REJECT}
    assert reasons == {
        r.value
        for r in (
            RejectReason.SCHEMA,
            RejectReason.UNKNOWN_CODEC,
            RejectReason.OVERSIZE,
            RejectReason.SHAPE_MISMATCH,
            RejectReason.BAD_INDEX,
            RejectReason.NON_FINITE,
        )
    }


def test_generator_regenerates_vectors_byte_identically(tmp_path):
    """Running the generator into a fresh folder reproduces every committed file exactly."""
    load_generator().write_vectors(tmp_path)
    fresh = {
        p.relative_to(tmp_path / "codecs"): p.read_bytes()
        for p in (tmp_path / "codecs").rglob("*")
        if p.is_file()
    }
    committed = {p.relative_to(CASES_DIR): p.read_bytes() for p in CASES_DIR.rglob("*") if p.is_file()}
    assert sorted(map(str, fresh)) == sorted(map(str, committed))
    assert [str(p) for p in fresh if fresh[p] != committed[p]] == []


@pytest.mark.parametrize("case", ACCEPT)
def test_accept_vector_encodes_input_to_wire_bytes(case):
    """encode(input.json, spec) packed with sorted keys equals wire.hex."""
    context = read_json(case, "context.json")
    x = np.array(read_json(case, "input.json"), np.float32)
    wire = encode(x, CodecSpec(**context["spec"]))
    packed = msgpack.packb({k: wire[k] for k in sorted(wire)}, use_bin_type=True)
    assert packed.hex() == read_wire(case).hex()


@pytest.mark.parametrize("case", ACCEPT)
def test_accept_vector_decodes_wire_to_expected_vector(case):
    """decode(wire.hex) equals decoded.json bit for bit (signed zeros included)."""
    context = read_json(case, "context.json")
    assert read_json(case, "expected.json")["outcome"] == "accept"
    y = decode(
        msgpack.unpackb(read_wire(case), raw=False),
        expected_numel=context["expected_numel"],
        max_numel=context["max_numel"],
    )
    expected = np.array(read_json(case, "decoded.json"), np.float32)
    assert y.tobytes() == expected.tobytes()


@pytest.mark.parametrize("case", REJECT)
def test_reject_vector_raises_its_reason(case):
    """decode(wire.hex) raises exactly the Reject subclass named in expected.json."""
    context = read_json(case, "context.json")
    expected = read_json(case, "expected.json")
    assert expected["outcome"] == "reject"
    reject = REJECT_TYPES[RejectReason(expected["reason"])]
    with pytest.raises(reject) as info:
        decode(
            msgpack.unpackb(read_wire(case), raw=False),
            expected_numel=context["expected_numel"],
            max_numel=context["max_numel"],
        )
    assert type(info.value) is reject
