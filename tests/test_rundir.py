import os
import signal
import subprocess
import sys

import pytest

from rayalign.io import atomic_file, remove_stray_temps
from rayalign.rundir import ResumeMismatchError, RunDir, config_hash


def test_record_resume_and_mismatch(tmp_path):
    fp = {"a": 1}
    run = RunDir(tmp_path / "run", fp)
    out = run.path("iter_000", "pairs.parquet")
    out.parent.mkdir()
    out.write_text("x")
    run.start("iter_000/pairs")
    assert not run.done("iter_000/pairs")
    run.record("iter_000/pairs", {"pairs": out}, {"n": 3}, 1.23456)
    again = RunDir(tmp_path / "run", fp)
    assert again.done("iter_000/pairs") and again.stages == ["iter_000/pairs"]
    rec = again.get("iter_000/pairs")
    assert rec.outputs == {"pairs": str(out)} and rec.metrics == {"n": 3} and rec.seconds == 1.235
    with pytest.raises(ResumeMismatchError, match="different configuration"):
        RunDir(tmp_path / "run", {"a": 2})


def test_a_changed_config_is_refused_naming_the_keys_that_changed(tmp_path):
    old = {"train": {"beta": 0.1, "lr": 1e-5}, "weights": "latent", "stop": ["x"]}
    RunDir(tmp_path / "run", old)
    new = {"train": {"beta": 0.2, "lr": 1e-5}, "weights": "latent", "stop": ("x",),
           "extra": {"k": 1}}
    with pytest.raises(ResumeMismatchError) as err:
        RunDir(tmp_path / "run", new)
    lines = str(err.value).splitlines()
    assert "  train.beta: 0.1 -> 0.2" in lines and "  extra.k: (unset) -> 1" in lines
    assert not any("stop" in line or "lr" in line for line in lines)  # a tuple equals its list
    assert "hash" not in str(err.value)
    RunDir(tmp_path / "run", {**old, "stop": ("x",)})  # the same config resumes


def test_config_hash_is_order_independent():
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 1.5})


def test_a_writer_killed_mid_write_leaves_litter_that_the_next_start_removes(tmp_path):
    target = tmp_path / "iter_000" / "samples.parquet"
    writer = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from rayalign.io import atomic_file\n"
        f"with atomic_file({str(target)!r}) as tmp:\n"
        "    tmp.write_bytes(b'half'); print('writing', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert writer.stdout.readline().strip() == "writing"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    (stray,) = target.parent.glob(".samples.parquet.tmp-*")
    keep = [tmp_path / "manifest.json", tmp_path / ".ray_train" / "ckpt" / "x", tmp_path / ".hidden"]
    for path in keep:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("k")
    with atomic_file(tmp_path / "guide") as unused:  # a finished write leaves nothing
        unused.write_text("g")
    assert remove_stray_temps(tmp_path) == [stray]
    assert not stray.exists() and all(p.exists() for p in keep)
