"""The stage registry and the pipeline's stage checks (no model: these fail or finish before one is built)."""

import dataclasses
import json
import re
import sys
import types
from pathlib import Path

import pytest

from megarope import RopeConfig
from megarope.run.config import Config, ConfigError, RunConfig, StageConfig
from megarope.run.pipeline import Pipeline, resolve_stages
from megarope.run.stages import STAGES

DOCS = Path(__file__).resolve().parents[2] / "docs" / "extending.md"


def test_every_kind_has_a_typed_config_and_a_run():
    assert {"train", "eval", "search", "export", "report"} <= set(STAGES)
    for kind in STAGES.values():
        assert issubclass(kind.config, StageConfig) and callable(kind.run) and callable(kind.check)
    typed = resolve_stages([{"name": "s", "kind": "search", "target_length": 256, "short": False}])
    assert type(typed[0]) is STAGES["search"].config and typed[0].target_length == 256
    assert [s.kind for s in resolve_stages([])] == ["train", "eval"]  # the default pair


@pytest.mark.parametrize("stages, field", [
    ([{"name": "a", "kind": "finetune"}], "stages[0].kind"),
    ([{"name": "a", "kind": "train", "short": True}], "stages[0].short"),  # a search stage's setting
    ([{"name": "a", "kind": "train"}, {"name": "a", "kind": "eval"}], "stages[1].name"),
    ([{"name": "a", "kind": "eval", "init": "b"}, {"name": "b", "kind": "train"}], "stages[0].init"),
    ([{"name": "a", "kind": "eval", "factors": "/no/such/factors.json"}], "stages[0].factors"),
    ([{"name": "a", "kind": "eval", "factors": "nothing"}], "stages[0].factors"),
], ids=["kind", "other-kinds-key", "duplicate", "init-later", "factor-file", "factors-stage"])
def test_stage_entries_fail_naming_the_field(stages, field):
    with pytest.raises(ConfigError) as err:
        resolve_stages(stages)
    assert err.value.field == field


@pytest.mark.parametrize("overrides, field", [
    ({"search": {"scale": 4.0}}, "search.scale"),
    ({"search": {"original_max_position_embeddings": 64}}, "search.original_max_position_embeddings"),
])
def test_search_stage_refuses_the_derived_settings(tmp_path, overrides, field):
    """scale and the original window come from the stage's target length and the model."""
    cfg = Config(run=RunConfig(dir=str(tmp_path / "run")),
                 stages=[{"name": "s", "kind": "search", "target_length": 256, "overrides": overrides}])
    with pytest.raises(ConfigError) as err:
        Pipeline(cfg).preflight()
    assert err.value.field == field and "stages.s.target_length" in err.value.message
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides, field, says", [
    ({"search": {"prior_scale": 4.0}}, "search.prior_scale", "stages.s.factors"),
    ({"search": {"prior_n_hat": 4}}, "search.prior_n_hat", "stages.s.factors"),
    ({"search": {"prior_bound": True}}, "search.prior_bound", "stages.s.factors"),
])
def test_search_stage_refuses_a_prior_without_its_factors_link(tmp_path, overrides, field, says):
    """The prior of a progressive search is the stage's `factors` link, never typed in."""
    cfg = Config(run=RunConfig(dir=str(tmp_path / "run")),
                 stages=[{"name": "s", "kind": "search", "target_length": 256, "overrides": overrides}])
    with pytest.raises(ConfigError) as err:
        Pipeline(cfg).preflight()
    assert err.value.field == field and says in err.value.message
    assert not (tmp_path / "run").exists()


def test_train_stage_init_optimizer_needs_init(tmp_path):
    cfg = Config(run=RunConfig(dir=str(tmp_path / "run")), stages=[{"name": "a", "kind": "train", "init_optimizer": True}])
    with pytest.raises(ConfigError) as err:
        Pipeline(cfg).preflight()
    assert err.value.field == "stages.a.init_optimizer"
    assert not (tmp_path / "run").exists()


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_docs_worked_example_stage(tmp_path, monkeypatch):
    """docs/extending.md's `rope` stage module and its test, as printed there."""
    module_code, test_code = _python_blocks(DOCS.read_text())[0], _python_blocks(DOCS.read_text())[-1]
    module = types.ModuleType("megarope.run.stages.rope")
    monkeypatch.setitem(sys.modules, module.__name__, module)  # dataclasses look their module up
    exec(compile(module_code, "docs/extending.md", "exec"), module.__dict__)
    monkeypatch.setitem(STAGES, "rope", module.KIND)
    namespace = {"Config": Config, "RunConfig": RunConfig, "Pipeline": Pipeline, "RopeConfig": RopeConfig,
                 "json": json}
    exec(compile(test_code, "docs/extending.md", "exec"), namespace)
    namespace["test_rope_stage_writes_the_stage_rope"](tmp_path)
    assert dataclasses.fields(module.RopeStage)[-1].name == "indent"
