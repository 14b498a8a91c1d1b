"""Step metrics while a stage runs: steps.jsonl, TensorBoard event files, report_to."""

import importlib.util
import json

import pytest

from rayalign.tracking import STEPS_FILE, ProgressTail, StepLogger, progress_line, shown


def _events(directory):
    return list(directory.glob("events.out.tfevents.*"))


def test_step_logger_writes_jsonl_and_tensorboard_and_the_tail_reads_new_lines(tmp_path):
    (tmp_path / STEPS_FILE).write_text('{"step": 1, "loss": 9.0}\n')  # an earlier attempt's
    tail = ProgressTail(tmp_path)
    logger = StepLogger(tmp_path, "iter_000-train")
    logger.log(1, {"loss": 0.5, "margin": 0.25, "note": "x", "bad": float("nan")}, steps=4)
    assert _events(tmp_path)  # written and flushed during the run, not at close
    assert tail.new_records() == [{"loss": 0.5, "margin": 0.25, "step": 1, "steps": 4}]
    with (tmp_path / STEPS_FILE).open("a") as f:
        f.write('{"step": 2, "lo')  # a line still being written is left for the next call
    assert tail.new_records() == []
    logger.close()


def test_tensorboard_scalars_read_back(tmp_path):
    """The event file holds the scalars under <stage>/<metric> at their steps (read with
    tensorboardX's own protobuf definitions, the file format TensorBoard reads)."""
    from tensorboardX.proto.event_pb2 import Event

    logger = StepLogger(tmp_path, "sft")
    for step, loss in ((1, 2.0), (2, 1.5)):
        logger.log(step, {"loss": loss}, steps=2)
    logger.close()
    data = _events(tmp_path)[0].read_bytes()
    seen, pos = [], 0
    while pos < len(data):  # TFRecord: u64 length, u32 crc, payload, u32 crc
        n = int.from_bytes(data[pos:pos + 8], "little")
        event = Event.FromString(data[pos + 12:pos + 12 + n])
        pos += 16 + n
        seen += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
    assert seen == [(1, "sft/loss", 2.0), (2, "sft/loss", 1.5)]


def test_progress_line():
    line = progress_line("iter_000/train", {"step": 3.0, "steps": 10, "loss": 0.693147,
                                            "margin": 0.0123, "tokens_per_s": 5.0})
    assert line == "[iter_000/train] step 3/10 loss=0.6931 margin=0.0123"


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is not None, reason="mlflow installed")
def test_report_to_a_missing_backend_is_skipped_with_a_message(tmp_path):
    said = []
    logger = StepLogger(tmp_path, "sft", report_to=("mlflow",), say=said.append)
    logger.log(1, {"loss": 1.0})
    logger.close()
    assert said == ["[sft] report_to includes 'mlflow' but mlflow is not installed (pip install "
                    "mlflow); skipping it, TensorBoard and steps.jsonl still log"]
    assert json.loads((tmp_path / STEPS_FILE).read_text()) == {"loss": 1.0, "step": 1}
    with pytest.raises(ValueError, match="unknown backend 'neptune'"):
        StepLogger(tmp_path, "sft", report_to=("neptune",))


def test_console_shows_about_20_lines_a_stage():
    """400 steps: 1, every ceil(400/20) = 20th, and 400 -> 1 + 20 lines; 3 steps: all."""
    assert [s for s in range(1, 401) if shown({"step": s, "steps": 400})] == \
        [1] + list(range(20, 401, 20))
    assert all(shown({"step": s, "steps": 3}) for s in (1, 2, 3))
    assert shown({"step": 7})
