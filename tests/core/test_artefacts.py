"""Saved artefacts: safetensors with a JSON description, atomic pairs, checked reads, never pickles."""
from __future__ import annotations

import json
import pickle

import pytest
import torch

from rulewriter.core.artefacts import load_described, read_safetensors, save_described, tensors_checksum
from rulewriter.errors import EditError


def test_a_described_artefact_round_trips_with_its_sidecar(tmp_path):
    t = {"lam": torch.arange(6.0).reshape(2, 3), "d": torch.ones(3, 1, dtype=torch.float64)}
    p = save_described(tmp_path / "e.safetensors", t, "test/1", {"layer": "fc", "n": 2})
    back, desc = load_described(p, "test/1", "a test artefact")
    assert desc == {"layer": "fc", "n": 2} and json.loads((tmp_path / "e.safetensors.json").read_text()) == desc
    assert all(torch.equal(back[k], t[k]) for k in t)
    save_described(tmp_path / "f.safetensors", t, "test/1", {}, sidecar=False)
    assert not (tmp_path / "f.safetensors.json").exists()
    with pytest.raises(EditError, match="not a test artefact"):
        load_described(p, "other/1", "a test artefact")


def test_pickles_and_broken_files_are_refused_without_unpickling(tmp_path):
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled')",))

    bad = tmp_path / "x.safetensors"
    bad.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(EditError, match="pickle"):
        read_safetensors(bad, EditError)
    (tmp_path / "y.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(EditError, match="not a valid safetensors"):
        read_safetensors(tmp_path / "y.safetensors", EditError)
    with pytest.raises(EditError, match="no such file"):
        read_safetensors(tmp_path / "missing.safetensors", EditError)


def test_the_checksum_sees_names_dtypes_shapes_and_bytes():
    base = tensors_checksum({"a": torch.zeros(2, 2)})
    assert base == tensors_checksum({"a": torch.zeros(2, 2)})
    for other in ({"b": torch.zeros(2, 2)}, {"a": torch.zeros(2, 2, dtype=torch.float64)}, {"a": torch.zeros(4)},
                  {"a": torch.tensor([[0.0, 0.0], [0.0, 1e-30]])}):
        assert tensors_checksum(other) != base
