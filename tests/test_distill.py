"""Distillation methods: the mathematics on hand-sized tensors (train/distill.py), the settings and ids, and a tiny
student distilled from the tiny teacher through the asset beside an SFT student on the same recipe."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from pydantic import ValidationError
from test_student import RECIPE, SFT_STUDENT, SOURCES, TRAINING, sft_first

from omnithought_dagster.config import ConfigError, StudentConfig, load_config
from omnithought_dagster.defs import TRAIN_JOB
from omnithought_dagster.lineage import checkpoint_story
from omnithought_dagster.store import CorpusStore
from omnithought_dagster.train.distill import check_teacher, reply_divergence, token_divergence
from omnithought_dagster.train.launch import checkpoint_id, method_hash

from conftest import materializations, plot_image, run_job, write_config

TEACHER = [0.5, 0.5]
STUDENT = [0.9, 0.1]


def _logits(*rows: list[float]) -> torch.Tensor:
    return torch.tensor([[math.log(p) for p in row] for row in rows])


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=False))


def test_the_divergences_of_known_distributions():
    teacher, student = _logits(TEACHER), _logits(STUDENT)
    assert token_divergence(student, teacher, "forward_kl").item() == pytest.approx(_kl(TEACHER, STUDENT), abs=1e-6)  # 0.5108
    assert token_divergence(student, teacher, "reverse_kl").item() == pytest.approx(_kl(STUDENT, TEACHER), abs=1e-6)  # 0.3681
    for beta in (0.5, 0.2):
        mixture = [beta * t + (1 - beta) * s for t, s in zip(TEACHER, STUDENT, strict=False)]
        expected = beta * _kl(TEACHER, mixture) + (1 - beta) * _kl(STUDENT, mixture)
        assert token_divergence(student, teacher, "jsd", beta=beta).item() == pytest.approx(expected, abs=1e-6)
    assert token_divergence(student, teacher, "jsd").item() == pytest.approx(0.10174, abs=1e-4)  # the symmetric JSD, by hand
    for kind in ("forward_kl", "reverse_kl", "jsd"):  # equal distributions: nothing to learn
        assert token_divergence(teacher, teacher, kind).item() == pytest.approx(0.0, abs=1e-7)


def test_temperature_softens_both_and_scales_by_its_square():
    teacher, student = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[0.0, 1.0, 0.5]])
    soft_t, soft_s = torch.softmax(teacher / 2, -1)[0].tolist(), torch.softmax(student / 2, -1)[0].tolist()
    assert token_divergence(student, teacher, "forward_kl", temperature=2.0).item() == pytest.approx(4 * _kl(soft_t, soft_s), abs=1e-6)


def test_top_k_compares_only_the_teachers_most_likely_tokens():
    teacher, student = _logits([0.6, 0.3, 0.1]), _logits([0.2, 0.2, 0.6])
    # k=2: the teacher's tokens 0 and 1, both renormalised over them: teacher [2/3, 1/3], student [1/2, 1/2].
    assert token_divergence(student, teacher, "forward_kl", top_k=2).item() == pytest.approx(_kl([2 / 3, 1 / 3], [0.5, 0.5]), abs=1e-6)
    assert token_divergence(student, teacher, "forward_kl", top_k=1).item() == pytest.approx(0.0, abs=1e-7)
    assert token_divergence(student, teacher, "forward_kl", top_k=3).item() == pytest.approx(
        _kl([0.6, 0.3, 0.1], [0.2, 0.2, 0.6]), abs=1e-6
    )


def test_bad_divergence_settings_are_refused():
    with pytest.raises(ValueError, match="unknown divergence"):
        token_divergence(_logits(STUDENT), _logits(TEACHER), "wasserstein")
    with pytest.raises(ValueError, match="0 < beta < 1"):
        token_divergence(_logits(STUDENT), _logits(TEACHER), "jsd", beta=1.0)


def test_only_reply_positions_count_and_padded_vocabularies_are_aligned():
    """Position i's logits predict token i+1: the divergence is taken where that token is a label (the reply), never at
    the prompt or its image tokens."""
    settings = {"divergence": "forward_kl", "beta": 0.5, "temperature": 1.0, "top_k": None}
    labels = torch.tensor([[-100, -100, -100, 7, 8, 9]])  # three prompt tokens (an image among them), a three-token reply
    teacher = torch.zeros(1, 6, 4)
    student = torch.zeros(1, 6, 4)
    student[0, :2] = torch.tensor([5.0, -5.0, 0.0, 0.0])  # differs only where the next token is still the prompt
    value, per_token = reply_divergence(student, teacher, labels, settings)
    assert value.item() == pytest.approx(0.0, abs=1e-7) and per_token.numel() == 3
    student[0, 4] = torch.tensor([5.0, -5.0, 0.0, 0.0])  # predicts reply token 9: counted
    value, per_token = reply_divergence(student, teacher, labels, settings)
    assert per_token[2] > 0 and per_token[:2].abs().max() < 1e-7 and value.item() == pytest.approx(per_token.sum().item() / 3)
    assert reply_divergence(student, teacher, labels, settings, num_items=6)[0].item() == pytest.approx(per_token.sum().item() / 6)
    padded = torch.cat([teacher, torch.full((1, 6, 60), -30.0)], dim=-1)  # the teacher's vocabulary padded to 64
    assert reply_divergence(student, padded, labels, settings)[0].item() == pytest.approx(value.item(), abs=1e-6)


def test_a_teacher_that_reads_other_inputs_is_refused():
    def vl(vocab, patch=14, image_token=5):
        processor = SimpleNamespace(
            patch_size=patch,
            merge_size=2,
            temporal_patch_size=2,
            min_pixels=3136,
            max_pixels=50176,
            image_mean=[0.5] * 3,
            image_std=[0.5] * 3,
        )
        return SimpleNamespace(
            tokenizer=SimpleNamespace(get_vocab=lambda: dict(vocab)), image_processor=processor, image_token_id=image_token
        )

    vocab = {"a": 0, "b": 1}
    check_teacher(vl(vocab), vl(vocab), "teacher")  # the same: accepted
    with pytest.raises(SystemExit, match="another vocabulary"):
        check_teacher(vl(vocab), vl({"a": 0, "c": 1}), "teacher")
    with pytest.raises(SystemExit, match="patch_size"):
        check_teacher(vl(vocab), vl(vocab, patch=16), "teacher")


def test_method_settings_are_checked_and_name_the_checkpoint():
    with pytest.raises(ValidationError, match="method kd needs"):
        StudentConfig(name="s", method="kd")
    with pytest.raises(ValidationError, match="method is 'sft'"):
        StudentConfig(name="s", kd={"teacher": "tiny:teacher"})
    with pytest.raises(ValidationError, match="beta"):
        StudentConfig(name="s", method="kd", kd={"teacher": "tiny:teacher", "beta": 1.5})
    kd = {
        "name": "kd",
        "teacher": "tiny:teacher",
        "divergence": "jsd",
        "beta": 0.5,
        "temperature": 1.0,
        "top_k": None,
        "weight": 0.5,
        "teacher_dir": "/a",
        "teacher_fingerprint": "f" * 32,
    }
    base = ("b" * 32, "v" * 32, "h" * 32)
    assert checkpoint_id(*base) == checkpoint_id(*base, method_hash(None))  # sft's ids are what they were
    assert checkpoint_id(*base, method_hash(kd)) != checkpoint_id(*base)
    assert method_hash(kd) == method_hash({**kd, "teacher_dir": "/elsewhere"})  # where the teacher lies is not what it is
    assert method_hash(kd) != method_hash({**kd, "beta": 0.3}) and method_hash(kd) != method_hash({**kd, "teacher_fingerprint": "e" * 32})


def test_kd_with_zero3_is_refused(tmp_path):
    path = write_config(
        tmp_path,
        [{"name": "synthetic", "kind": "synthetic", "n_samples": 4}],
        students=[{"name": "kd", "method": "kd", "kd": {"teacher": "tiny:teacher"}}],
        training={"zero_stage": 3},
    )
    with pytest.raises(ConfigError, match="zero_stage 3"):
        load_config(path)


@pytest.mark.slow
def test_sft_and_kd_students_train_on_one_recipe_through_the_asset(tmp_path, instance):
    """An SFT student first; then a second student distils from that fine-tuned one (a teacher that knows the data) on
    the same recipe, beside it in the same project."""
    training = {**TRAINING, "max_steps": 12}
    sft, teacher = sft_first(tmp_path, instance, training)
    kd_student = {
        "name": "kd",
        "model": "tiny:student",
        "method": "kd",
        "kd": {"teacher": str(teacher), "divergence": "jsd", "temperature": 2.0, "top_k": 32, "weight": 0.7},
    }
    config = load_config(write_config(tmp_path, SOURCES, recipes=[RECIPE], students=[SFT_STUDENT, kd_student], training=training))
    store = CorpusStore(config.store.root)
    result = run_job(config, instance, TRAIN_JOB, "even|kd")
    assert result.success
    kd = materializations(result)["student_checkpoints"]
    assert sft["checkpoint_id"] != kd["checkpoint_id"]  # the same base, subset and settings; another method
    assert "method" not in sft and kd["method"] == "kd" and kd["teacher"] == str(teacher)
    assert kd["final_kd_loss"] < kd["initial_kd_loss"] and kd["final_loss"] < kd["initial_loss"]  # it moves towards the teacher
    assert plot_image(kd["plot/kd_loss"])

    manifest = store.checkpoints.manifest(kd["checkpoint_id"])
    assert manifest["train_spec"]["method"]["name"] == "kd" and manifest["train_spec"]["method"]["divergence"] == "jsd"
    log = json.loads((store.checkpoints.local_dir(kd["checkpoint_id"], tmp_path / "dl") / "train_log.json").read_text())
    assert len(log["kd_losses"]) == len(log["ce_losses"]) == 12 and log["method"] == "kd"
    for total, ce, part in zip(log["losses"], log["ce_losses"], log["kd_losses"], strict=False):  # each logged loss is the mix of its parts
        assert total == pytest.approx(0.3 * ce + 0.7 * part, rel=1e-3, abs=1e-4)
    story = checkpoint_story(store, store.catalog(), kd["checkpoint_id"])
    assert story["method"]["name"] == "kd" and story["method"]["teacher"] == str(teacher) and "teacher_dir" not in story["method"]
