"""Behaviour lock for the package's reorganisation (issue #12): every config in configs/ and every
driver tool, run through the CLI on fixed inputs, writes what the golden fingerprint says (exact
bytes, with float arrays within a tolerance that only absorbs CPU rounding). See output_digests.py."""
from __future__ import annotations

import os

import numpy as np
import pytest
from output_digests import build_outputs, fingerprint, load, save

pytestmark = pytest.mark.ray
GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "output_digests")


def test_every_config_writes_the_recorded_outputs(tmp_path, ray_local, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = str(tmp_path / "w")
    got = fingerprint(build_outputs(root), root, str(tmp_path))
    if os.environ.get("REINFORGE_UPDATE_GOLDEN"):
        save(got, GOLDEN)
        pytest.skip("golden rewritten")
    want = load(GOLDEN)
    assert sorted(got.digests) == sorted(want.digests), set(got.digests) ^ set(want.digests)
    changed = [k for k in want.digests if got.digests[k] != want.digests[k]]
    assert not changed, changed[:20]
    for name, array in want.arrays.items():
        assert got.arrays[name].shape == array.shape, name
        assert np.allclose(got.arrays[name], array, rtol=1e-3, atol=1e-4, equal_nan=True), name
