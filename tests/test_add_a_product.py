"""ARCHITECTURE.md's worked example, run: a new product is one new folder. The folder below is written to a
temporary directory added to reinforge.products' search path; nothing else in the package changes, and
the registry, the runner, status and validate all work with it."""
from __future__ import annotations

import json
import textwrap

import pytest
from click.testing import CliRunner
from conftest import tree_state, write_shard

import reinforge.products
from reinforge.cli.main import cli
from reinforge.formats.wds import iter_samples
from reinforge.products import registry

RECIPE = '''
from typing import ClassVar, Literal

from pydantic import Field

from reinforge.formats.recipe import Recipe


class CaptionStatsRecipe(Recipe):
    """Caption lengths of a webdataset pool, one output shard per input shard."""
    product: Literal["caption_stats"] = "caption_stats"
    pipeline: ClassVar[str] = "reinforge.products.caption_stats.pipeline:CaptionStatsPipeline"
    path: str = Field(description="input shards")
'''
PIPELINE = '''
from reinforge.formats.sources import WebDatasetSource
from reinforge.runtime.pipeline import Pipeline
from reinforge.stages.base import MapStage, SkipSample


class CountWords(MapStage):
    name = "count_words"

    def process(self, sample: dict) -> dict:
        if "txt" not in sample:
            raise SkipSample("no_caption")
        words = len(sample["txt"].decode().split())
        return {"__key__": sample["__key__"], "members": {"words.txt": str(words).encode()}}


class CaptionStatsPipeline(Pipeline):
    libraries = ("numpy",)  # no model: the workers never import torch

    def __init__(self, recipe):
        self.recipe = recipe
        self.source = WebDatasetSource(recipe.path)

    def samples_per_batch(self) -> int:
        return 4

    def build_stages(self):
        return [CountWords()]
'''


@pytest.fixture
def caption_stats_product(tmp_path, monkeypatch):
    folder = tmp_path / "products" / "caption_stats"
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text("")
    (folder / "recipe.py").write_text(textwrap.dedent(RECIPE))
    (folder / "pipeline.py").write_text(textwrap.dedent(PIPELINE))
    monkeypatch.setattr(reinforge.products, "__path__", [*reinforge.products.__path__, str(folder.parent)])
    registry.recipes.cache_clear()
    yield
    registry.recipes.cache_clear()


def test_a_new_product_is_one_folder(caption_stats_product, tmp_path):
    assert "caption_stats" in registry.recipes()
    (tmp_path / "in").mkdir()
    write_shard(tmp_path / "in" / "a.tar", [(f"s{i}", {"txt": " ".join(["w"] * i).encode()}) for i in range(1, 4)]
                + [("bad", {"jpg": b"x"})])
    (tmp_path / "recipe.yaml").write_text(json.dumps({
        "product": "caption_stats", "path": str(tmp_path / "in" / "*.tar"), "output": str(tmp_path / "run"),
        "max_error_fraction": 0.5, "resources": {"runner": "local"}}))
    run = CliRunner().invoke(cli, ["run", str(tmp_path / "recipe.yaml"), "--no-progress"], catch_exceptions=False)
    assert run.exit_code == 0, run.output
    with open(tmp_path / "run" / "shards" / "a.tar", "rb") as f:
        got = {s["__key__"]: s["words.txt"] for s in iter_samples(f)}
    assert got == {"s1": b"1", "s2": b"2", "s3": b"3"}
    errors = (tmp_path / "run" / "errors" / "a.jsonl").read_text().splitlines()
    assert [json.loads(e)["reason"] for e in errors] == ["no_caption"]
    before = tree_state(tmp_path / "run")
    for args in (["status", str(tmp_path / "run")], ["validate", str(tmp_path / "run")]):
        result = CliRunner().invoke(cli, args, catch_exceptions=False)
        assert result.exit_code == 0, result.output
    assert tree_state(tmp_path / "run") == before
