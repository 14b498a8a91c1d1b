import pytest

from rayalign.config import ConfigError, DataConfig, Section, load_config
from rayalign.config_train import TrainConfig


class JobConfig(Section):
    train: TrainConfig = TrainConfig()
    data: DataConfig


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_load_with_overrides(tmp_path):
    p = write(tmp_path, "data: {path: d.jsonl}\ntrain: {beta: 0.2, objective: aot}\n")
    cfg = load_config(JobConfig, p, ["train.beta=0.05", "data.max_length=300"])
    assert cfg.train.beta == 0.05 and cfg.train.objective == "aot"
    assert cfg.data.max_length == 300 and cfg.data.path == "d.jsonl"


def test_unknown_key_names_the_path(tmp_path):
    p = write(tmp_path, "data: {path: d.jsonl}\ntrain: {betta: 0.2}\n")
    with pytest.raises(ConfigError, match=r"train\.betta: unknown key"):
        load_config(JobConfig, p)


def test_bad_value_names_the_path(tmp_path):
    p = write(tmp_path, "data: {path: d.jsonl}\n")
    with pytest.raises(ConfigError, match=r"train\.beta: Input should be greater than 0"):
        load_config(JobConfig, p, ["train.beta=-1"])
    with pytest.raises(ConfigError, match=r"train\.objective"):
        load_config(JobConfig, p, ["train.objective=ppo"])


def test_cross_field_rule_and_missing_key(tmp_path):
    p = write(tmp_path, "data: {path: d.jsonl, max_prompt_length: 64, max_length: 64}\n")
    with pytest.raises(ConfigError, match="max_length .* must exceed max_prompt_length"):
        load_config(JobConfig, p)
    with pytest.raises(ConfigError, match=r"data: Field required"):
        load_config(JobConfig, write(tmp_path, "train: {}\n"))


def test_bad_files_and_overrides(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(JobConfig, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(JobConfig, write(tmp_path, "data: [\n"))
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(JobConfig, write(tmp_path, "data: {path: x}\n"), ["train.beta"])


def test_frozen():
    cfg = TrainConfig()
    with pytest.raises(Exception):
        cfg.beta = 3.0


class Nested(Section):
    sft: TrainConfig = TrainConfig(objective="sft", lr=3e-3)
    other: TrainConfig | None = None


def test_partial_section_keeps_the_jobs_own_defaults(tmp_path):
    cfg = load_config(Nested, None, ["sft.max_steps=30"])
    assert (cfg.sft.objective, cfg.sft.lr, cfg.sft.max_steps) == ("sft", 3e-3, 30)
    cfg = load_config(Nested, write(tmp_path, "sft: {lr: 0.1}\n"))
    assert (cfg.sft.objective, cfg.sft.lr) == ("sft", 0.1)
    assert load_config(Nested, write(tmp_path, "sft: {lr: 0.1}\n"), ["other.lr=0.2"]).other.lr == 0.2
