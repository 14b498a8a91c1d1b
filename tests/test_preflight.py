"""Bad input is named before any cluster time: every job checks its paths and data files
right after parsing its config, before it imports torch or Ray (rayalign/preflight.py).

Each case runs the real job script in a fresh interpreter and records, at the moment it
exits, whether torch / Ray were imported or a Ray started; the wall time is printed (run with
-s to see it), not asserted: this machine is shared."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rayalign.config import ConfigError, ModelConfig
from rayalign.config_ldalign import LDAlignConfig
from rayalign.preflight import check_inputs
from rayalign.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import json, runpy, sys, time
start = time.time()
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
    code = 0
except SystemExit as exit:
    code = exit.code
ray = sys.modules.get("ray")
print(json.dumps({"code": code, "seconds": round(time.time() - start, 2),
                  "torch": "torch" in sys.modules, "ray_imported": ray is not None,
                  "ray_started": bool(ray and ray.is_initialized())}))
"""
GOOD = {"prompt": "sort: 2 1 =>", "completion": " 1 2"}


def _run(job: str, *sets: str) -> tuple[dict, str]:
    args = [a for s in sets for a in ("--set", s)]
    out = subprocess.run([sys.executable, "-c", PROBE, str(ROOT / "jobs" / job), *args],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{job} {sets}: exit {probe['code']} after {probe['seconds']} s")
    return probe, out.stderr


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    bad = tmp_path / "bad_utf8.jsonl"
    bad.write_bytes((json.dumps(GOOD) + "\n").encode() * 2 + b'{"prompt": "caf\xe9", "completion": "x"}\n')
    no_config = tmp_path / "not_a_checkpoint"
    no_config.mkdir()
    (no_config / "model.safetensors").write_bytes(b"")
    wizard = {"prompt": [{"role": "wizard", "content": "q"}], "chosen": "a", "rejected": "b"}
    return {"bad": bad, "good": _jsonl(tmp_path / "good.jsonl", [GOOD] * 4),
            "wizard": _jsonl(tmp_path / "wizard.jsonl", [wizard]), "no_config": no_config,
            "run": tmp_path / "run"}


def _before_any_heavy_import(probe: dict) -> None:
    assert probe["code"] == 2
    assert not (probe["torch"] or probe["ray_imported"]), probe


def test_invalid_utf8_in_ld_align_data_names_file_and_row(files):
    probe, err = _run("ld_align.py", f"data.path={files['bad']}",
                      f"eval_data.path={files['good']}", f"run_dir={files['run']}")
    _before_any_heavy_import(probe)
    assert f"error: {files['bad']}, row 3: not UTF-8: byte 0xe9" in err
    assert "Traceback" not in err


def test_nonexistent_policy_path_names_the_key(files):
    probe, err = _run("dpo.py", "policy.path=/nonexistent/ckpt", f"output_dir={files['run']}")
    _before_any_heavy_import(probe)
    assert "error: policy.path: '/nonexistent/ckpt' does not exist" in err
    assert "Repo id" not in err


def test_directory_without_config_json_names_the_key(files):
    probe, err = _run("sft.py", f"policy.path={files['no_config']}",
                      f"output_dir={files['run']}")
    _before_any_heavy_import(probe)
    assert "error: policy.path:" in err and "no config.json" in err


def test_unknown_chat_role_in_hbat_preference_data(files):
    probe, err = _run("hbat.py", f"hpa.path={files['wizard']}", "hpa.kind=preference",
                      f"run_dir={files['run']}")
    _before_any_heavy_import(probe)
    assert f"{files['wizard']}, row 1, field 'prompt': message 0: unknown role 'wizard'" in err


def test_guide_job_checks_its_base_model(files):
    probe, err = _run("train_guide.py", f"sft.path={files['good']}",
                      f"samples={files['good']}", "base_model=/nope", f"out_dir={files['run']}")
    _before_any_heavy_import(probe)
    assert "error: base_model: '/nope' does not exist" in err


def test_changed_config_on_a_run_dir_names_the_keys_before_ray_starts(files):
    cfg = LDAlignConfig(run_dir=str(files["run"]))
    RunDir(cfg.run_dir, cfg.model_dump(mode="json", exclude={"run_dir", "iterations"}))
    probe, err = _run("ld_align.py", f"run_dir={files['run']}", "train.beta=0.3",
                      "guide.latent_dim=8", "iterations=5")
    assert probe["code"] == 2 and not probe["ray_started"], probe
    assert "different configuration; changed:" in err and "Traceback" not in err
    assert "  train.beta: 0.1 -> 0.3" in err and "  guide.latent_dim: 32 -> 8" in err
    assert "iterations" not in err  # more iterations resume the same run


def test_uris_are_left_to_their_readers_and_nested_models_are_checked(files):
    check_inputs(LDAlignConfig(policy=ModelConfig(path="s3://bucket/ckpt"), sft=None))
    with pytest.raises(ConfigError, match=r"^guide\.model: '/gone' does not exist"):
        check_inputs(LDAlignConfig(guide={"model": "/gone"}))
    with pytest.raises(ConfigError, match=r"^eval\.sentence_encoder: '/gone' does not exist"):
        check_inputs(LDAlignConfig(eval={"sentence_encoder": "/gone"}))
    with pytest.raises(ConfigError, match=r"^eval\.reward_model: .* \(no config.json\)"):
        check_inputs(LDAlignConfig(eval={"reward_model": str(files["no_config"])}))
