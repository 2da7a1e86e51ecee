"""Behaviour lock for the package's reorganisation (issue #12): every config in configs/ and every
driver tool, run through the CLI on fixed inputs, writes what the golden fingerprint says (exact
bytes, with float arrays within a tolerance that only absorbs CPU rounding). See output_digests.py.
On the same runs: the read-only commands write nothing into any product's run directory."""
from __future__ import annotations

import os

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import tree_state
from output_digests import build_outputs, fingerprint, load, save

from reinforge.cli.main import cli as main

pytestmark = pytest.mark.ray
GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "output_digests")
RUNS = ("demo", "imagenet_plus", "mobileclip_dr", "reinforcement_only", "join", "embed_pool", "reshard")


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, ray_local):
    """Every config and tool run once (module scope: both tests read the same runs)."""
    work = tmp_path_factory.mktemp("digests")
    here = os.getcwd()
    os.chdir(work)  # relative outputs (report folders) land here, not in the repository
    try:
        yield build_outputs(str(work / "w")), str(work / "w"), str(work)
    finally:
        os.chdir(here)


def test_every_config_writes_the_recorded_outputs(outputs):
    out, root, work = outputs
    got = fingerprint(out, root, work)
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


@pytest.mark.parametrize("run", RUNS)
def test_read_only_commands_write_nothing_into_the_run(outputs, run, tmp_path):
    """status, validate, stats and report read a finished run of every product; the run directory's listing,
    sizes and mtimes are the same afterwards (no re-planning, no index or plan files, no status.json)."""
    folder = outputs[0][run]
    before = tree_state(folder)
    for args in (["status", folder], ["validate", folder], ["stats", folder], ["stats", folder, "--json"],
                 ["report", folder, "--out", str(tmp_path / "report"), "--max-samples", "16"]):
        result = CliRunner().invoke(main, args, catch_exceptions=False)
        assert result.exit_code == 0, (args, result.output)
    assert tree_state(folder) == before, f"a read-only command wrote into the {run} run"
