"""The teacher stage: resumable checkpoints, SIGTERM, text windows, and the refusal of a teacher that never learned."""

import dataclasses
import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from flashmorph.config import TeacherConfig, validate_teacher
from flashmorph.data.stdlib_corpus import module_split, stdlib_documents
from flashmorph.errors import ConfigError
from flashmorph.errors import Preempted
from flashmorph.run_dir import CHECKPOINTS_DIR
from flashmorph.stages.teacher import TeacherNotReady, require_teacher, train_teacher

# 2 layers at hidden 32: a few steps take well under a second, enough to test the machinery, not the learning
TINY = dict(num_layers=2, hidden_size=32, num_heads=2, num_kv_heads=1, vocab_size=64, curriculum=[2, 3],
            max_steps_per_stage=6, advance_accuracy=1.0, batch_size=8, warmup_steps=2, eval_samples=16,
            log_every=1, device="cpu")


class StopAfter:
    """A PreemptionGuard stand-in whose stop signal 'arrives' once the stage asked `checks` times (once a step)."""

    reason = "SIGTERM"

    def __init__(self, checks: int):
        self.checks, self.asked = checks, 0

    @property
    def received(self):
        self.asked += 1
        return "SIGTERM" if self.asked > self.checks else None


def _weights(path):
    return load_file(str(path / "model.safetensors"))


def test_sigterm_then_rerun_gives_the_uninterrupted_teacher(tmp_path):
    teacher = TeacherConfig(**TINY, checkpoint_every=4)
    whole = train_teacher(teacher, tmp_path / "whole", show_progress=False)

    with pytest.raises(Preempted) as stop:
        train_teacher(teacher, tmp_path / "cut", show_progress=False, preemption=StopAfter(7))
    assert stop.value.step == 8 and stop.value.checkpoint.is_dir()
    assert not (tmp_path / "cut" / "teacher_report.json").exists()
    resumed = train_teacher(teacher, tmp_path / "cut", show_progress=False)

    assert resumed["stages"] == whole["stages"] and resumed["recall_accuracy"] == whole["recall_accuracy"]
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "cut" / CHECKPOINTS_DIR).exists()  # removed once the HF directory is complete


def test_checkpoint_of_another_teacher_config_is_refused(tmp_path):
    teacher = TeacherConfig(**TINY, checkpoint_every=2)
    with pytest.raises(Preempted):
        train_teacher(teacher, tmp_path, show_progress=False, preemption=StopAfter(3))
    other = dataclasses.replace(teacher, lr=5e-4)
    with pytest.raises(Exception, match=r"another teacher config \(differs in \['lr'\]\)"):
        train_teacher(other, tmp_path, show_progress=False)


def test_stalled_curriculum_is_reported_and_refused(tmp_path, caplog):
    teacher = TeacherConfig(**TINY)  # advance_accuracy=1.0 in 6 steps: no stage can advance
    report = train_teacher(teacher, tmp_path, show_progress=False)
    assert report["curriculum_complete"] is False
    assert [s["advanced"] for s in report["stages"]] == [False, False]
    assert [s["steps"] for s in report["stages"]] == [6, 6]
    with pytest.raises(TeacherNotReady, match="never finished its curriculum: stage with 2 pairs") as err:
        require_teacher(report, teacher, tmp_path)
    assert err.value.exit_code == 3
    with caplog.at_level(logging.WARNING):
        require_teacher(report, dataclasses.replace(teacher, require_complete=False), tmp_path)
    assert "require_complete=false" in caplog.text


def test_stage_advances_after_min_steps_and_not_before(tmp_path):
    teacher = TeacherConfig(**{**TINY, "advance_accuracy": 0.01, "curriculum": [2]})
    report = train_teacher(teacher, tmp_path, show_progress=False)  # 6 steps < MIN_STEPS_PER_STAGE=20
    assert report["stages"][0]["advanced"] is False and report["stages"][0]["steps"] == 6
    longer = dataclasses.replace(teacher, max_steps_per_stage=40)
    report = train_teacher(longer, tmp_path / "longer", show_progress=False)
    assert report["stages"][0]["advanced"] is True and report["stages"][0]["steps"] == 20
    assert report["curriculum_complete"] is True
    require_teacher(report, longer, tmp_path)  # no error


def test_text_windows_train_and_report_held_out_perplexity(tmp_path):
    teacher = TeacherConfig(**{**TINY, "vocab_size": 1542, "text_batch_size": 2, "text_seq_len": 24,
                               "text_steps": 3, "curriculum": [2], "max_steps_per_stage": 2})
    report = train_teacher(teacher, tmp_path, show_progress=False)
    assert report["train_steps"] == 3 + 2
    text = report["text"]
    assert text["split"] == "eval" and text["documents"] > 0 and text["bytes"] > 10_000
    # an untrained byte model is near uniform over the 1542 ids: its perplexity per byte is in the hundreds
    assert 50 < text["perplexity_per_byte"] < 5000


def test_stdlib_corpus_splits_are_disjoint_and_stable():
    train = {name for name, _ in stdlib_documents("train")}
    held_out = {name for name, _ in stdlib_documents("eval")}
    assert train and held_out and not train & held_out
    assert all(module_split(name) == "eval" for name in held_out)
    assert 0.03 < len(held_out) / (len(train) + len(held_out)) < 0.25


@pytest.mark.parametrize("field, value, message", [
    ("device", "tpu", "teacher.device='tpu' is unknown"),
    ("text_steps", 5, "needs teacher.text_batch_size >= 1"),
    ("text_batch_size", 4, "use >= 1542 with teacher text"),
    ("log_every", 0, "log_every >= 1"),
])
def test_bad_teacher_fields_are_refused(field, value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_teacher(TeacherConfig(**{**TINY, field: value}))


def test_gate_search_launcher_exits_3_on_a_teacher_that_never_learned(tmp_path, capsys):
    from flashmorph.cli.gate_search import main

    overrides = [f"run.run_dir={tmp_path / 'run'}", "teacher.num_layers=2", "teacher.hidden_size=32",
                 "teacher.num_heads=2", "teacher.num_kv_heads=1", "teacher.max_steps_per_stage=3",
                 "teacher.advance_accuracy=1.0", "teacher.batch_size=8", "teacher.eval_samples=16"]
    code = main(["--config", "recipes/embedded.yaml", "--no-progress", *sum((["--override", o] for o in overrides), [])])
    assert code == 3
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "never finished its curriculum" in errors[0]
    report = json.loads((tmp_path / "run" / "teacher" / "teacher_report.json").read_text())
    assert report["curriculum_complete"] is False
    assert not (tmp_path / "run" / "gates.safetensors").exists()
