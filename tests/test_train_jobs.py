"""jobs/sft.py, jobs/dpo.py, jobs/aot.py without a cluster: configs, the objective guard and
the tiny default's toy data (the Ray Train run itself is tests/test_train_ray.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from actors.trainer import toy_data
from rayalign.config import load_config
from rayalign.config_train import TrainJobConfig
from rayalign.data import PreferenceExample, UnpairedExample, load_dataset
from rayalign.train_batches import OBJECTIVE_DATA_KIND

ROOT = Path(__file__).resolve().parents[1]
JOBS = {"sft": ("sft",), "dpo": ("dpo", "weighted_dpo", "ipo", "kto"), "aot": ("aot", "aot_unpaired")}


def _job(name: str):
    spec = importlib.util.spec_from_file_location(f"job_{name}", ROOT / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", JOBS)
def test_job_default_config_trains_its_objective(name):
    job = _job(name)
    assert job.OBJECTIVES == JOBS[name]
    cfg = load_config(TrainJobConfig, ROOT / "configs" / f"{name}.yaml")
    assert cfg.train.objective == name and cfg.policy is None and cfg.data is None


def test_job_rejects_an_objective_it_does_not_train(capsys):
    assert _job("dpo").main(["--set", "train.objective=aot"]) == 2
    assert "trains dpo, weighted_dpo, ipo, kto; got train.objective='aot'" in capsys.readouterr().err


@pytest.mark.parametrize("objective", sorted(OBJECTIVE_DATA_KIND))
def test_tiny_default_data_fits_the_objective(tmp_path, tiny_gpt2, objective):
    from rayalign.models import load_tokenizer

    cfg = TrainJobConfig(output_dir=str(tmp_path), train={"objective": objective},
                         tiny={"train_rows": 6})
    data = toy_data(cfg, tmp_path / "data")
    examples = load_dataset(data, load_tokenizer(tiny_gpt2))
    assert data.kind == OBJECTIVE_DATA_KIND[objective]
    if data.kind == "preference":
        assert len(examples) == 6 and all(isinstance(e, PreferenceExample) and e.chosen !=
                                          e.rejected for e in examples)
    elif data.kind == "unpaired":
        assert len(examples) == 12 and all(isinstance(e, UnpairedExample) for e in examples)
        assert sum(e.label for e in examples) == 6
    else:
        assert len(examples) == 6
