"""Method opsd (on-policy self-distillation with privileged context): the teacher's prompt holds the context and the
student's does not, the logits are taken where the sampled tokens are predicted, the per-token divergence and its cap,
the EMA teacher, and a tiny student trained through the asset."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from test_student import RECIPE, SOURCES, TRAINING, sft_first

from omnithought_dagster.config import StudentConfig, load_config
from omnithought_dagster.defs import TRAIN_JOB
from omnithought_dagster.lineage import checkpoint_story
from omnithought_dagster.store import CorpusStore
from omnithought_dagster.train.opsd import (
    PRIVILEGED_HEADER,
    PrivilegedPrompts,
    completion_logits,
    ema_update,
    example_divergence,
    teacher_messages,
    trim_after_end,
)

from conftest import materializations, plot_image, run_job, write_config

TRACE = "<think>\nThree red squares and one blue.\n</think>\n\nAnswer: 3"
MESSAGES = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nHow many red squares?"}]},
    {"role": "assistant", "content": TRACE},
]


def test_the_teacher_alone_gets_the_privileged_context():
    trace = teacher_messages(MESSAGES, "trace")
    assert trace == [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "\nHow many red squares?" + PRIVILEGED_HEADER["trace"] + TRACE}],
        }
    ]
    answer = teacher_messages(MESSAGES, "answer")
    assert answer[0]["content"][-1]["text"].endswith(PRIVILEGED_HEADER["answer"] + "3") and TRACE not in json.dumps(answer)
    assert MESSAGES[0]["content"][-1]["text"] == "\nHow many red squares?"  # the student's turn is untouched
    image_last = [{"role": "user", "content": [{"type": "text", "text": "Which?"}, {"type": "image"}]}, MESSAGES[1]]
    assert teacher_messages(image_last, "answer")[0]["content"][-1] == {"type": "text", "text": PRIVILEGED_HEADER["answer"] + "3"}


def test_opsd_settings_default_and_are_checked():
    student = StudentConfig(name="s", method="opsd")
    assert student.opsd.teacher == "frozen" and student.opsd.context == "trace" and student.opsd.beta == 0.5
    with pytest.raises(ValueError, match="method is 'sft'"):
        StudentConfig(name="s", opsd={})
    with pytest.raises(ValueError, match="teacher"):
        StudentConfig(name="s", method="opsd", opsd={"teacher": "other"})


def test_the_encoded_prompts_differ_only_by_the_context(tmp_path, tiny_teacher):
    from omnithought_dagster.models.vl_chat import VLTokenizer
    from omnithought_dagster.train.data import build_index

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    Image.new("RGB", (56, 56), (200, 10, 10)).save(data / "images" / "a.png")
    record = {
        "messages": [{"role": "user", "content": "<image>\nHow many red squares?"}, {"role": "assistant", "content": TRACE}],
        "images": ["images/a.png"],
    }
    (data / "data.json").write_text(json.dumps([record]))
    vl = VLTokenizer.load(tiny_teacher)
    pair = PrivilegedPrompts(build_index(data, tmp_path / "index", vl, 1024, "skip"), vl, "trace")[0]
    student = vl.tokenizer.decode(pair["student"]["input_ids"][0])
    teacher = vl.tokenizer.decode(pair["teacher"]["input_ids"][0])
    assert "How many red squares?" in student and "worked solution" not in student and "Three red squares" not in student
    assert "worked solution" in teacher and "Three red squares and one blue." in teacher
    assert student.rstrip().endswith("assistant") and teacher.rstrip().endswith("assistant")  # both end where the reply starts
    assert torch.equal(pair["student"]["pixel_values"], pair["teacher"]["pixel_values"])  # the same image


def test_the_logits_are_those_that_predict_each_sampled_token(tiny_teacher):
    from omnithought_dagster.models.vl_chat import load_vl_model

    vl, model = load_vl_model(str(tiny_teacher))
    prompt = dict(vl.encode_prompt(MESSAGES[:1], [Image.new("RGB", (56, 56), (0, 0, 255))]))
    completion = torch.tensor([[5, 17, 42]])
    with torch.no_grad():
        ours = completion_logits(model, prompt, completion)
        whole = model(
            input_ids=torch.cat([prompt["input_ids"], completion], 1),
            attention_mask=torch.ones(1, prompt["input_ids"].shape[1] + 3, dtype=torch.long),
            pixel_values=prompt["pixel_values"],
            image_grid_thw=prompt["image_grid_thw"],
            mm_token_type_ids=torch.cat([prompt["mm_token_type_ids"], torch.zeros_like(completion)], 1),
        ).logits
    start = prompt["input_ids"].shape[1]
    assert ours.shape == (3, whole.shape[-1]) and torch.allclose(ours, whole[0, start - 1 : start + 2])


def test_a_sample_never_holds_a_media_token(tiny_teacher):
    """A model that would rather say <|image_pad|> than anything (measured on an H200: a sampled image token made the
    next forward fail, "Image features and image tokens do not match") samples none of the media tokens, and the
    sample reads back; without the suppression it samples them."""
    from omnithought_dagster.models.vl_chat import load_vl_model
    from omnithought_dagster.train.opsd import sample

    vl, model = load_vl_model(str(tiny_teacher))
    media = sorted(vl.media_ids)
    assert vl.image_token_id in media and len(media) == 4
    prompt = dict(vl.encode_prompt(MESSAGES[:1], [Image.new("RGB", (56, 56), (0, 0, 255))]))

    def prefer_media(module, inputs, output):
        output[..., media] += 100.0
        return output

    model.lm_head.register_forward_hook(prefer_media)
    settings = {"max_new_tokens": 12, "temperature": 1.0}
    torch.manual_seed(0)
    unsuppressed = sample(model, prompt, settings, vl.tokenizer.pad_token_id, frozenset())
    assert set(unsuppressed[0].tolist()) & set(media)
    suppressed = sample(model, prompt, settings, vl.tokenizer.pad_token_id, vl.media_ids)
    assert suppressed.shape[1] > 0 and not set(suppressed[0].tolist()) & set(media)
    assert completion_logits(model, prompt, suppressed).shape[0] == suppressed.shape[1]
    assert model.training is False  # load_vl_model's eval mode is given back


def test_a_sample_is_cut_after_its_end_of_turn_token():
    assert trim_after_end(torch.tensor([4, 5, 2, 7, 0]), {2}).tolist() == [[4, 5, 2]]  # the end token kept: stopping is learnt
    assert trim_after_end(torch.tensor([4, 5, 6]), {2}).tolist() == [[4, 5, 6]]
    assert trim_after_end(torch.tensor([2, 5]), {0, 2}).tolist() == [[2]]


def test_the_per_token_divergence_is_the_jsd_capped_by_clip():
    teacher = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    student = torch.tensor([[-1.0, 0.0, 2.0], [0.0, 0.0, 0.0]])
    settings = {"beta": 0.5, "top_k": None, "clip": None}
    values = example_divergence(student, teacher, settings)
    assert values[0] > 0.1 and values[1].abs() < 1e-7  # the same distribution: no divergence
    capped = example_divergence(student, teacher, {**settings, "clip": 0.05})
    assert capped[0] == pytest.approx(0.05) and capped[1].abs() < 1e-7
    wide = example_divergence(torch.zeros(1, 5), torch.zeros(1, 4), settings)  # a padded vocabulary: compared where both have tokens
    assert wide.abs().max() < 1e-7


def test_the_ema_teacher_moves_a_share_of_the_way():
    teacher, student = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    with torch.no_grad():
        teacher.weight.fill_(1.0), student.weight.fill_(3.0)
    ema_update(teacher, student, 0.75)
    assert torch.allclose(teacher.weight, torch.full((1, 2), 1.5))  # 0.75 x 1 + 0.25 x 3


@pytest.mark.slow
def test_opsd_trains_a_student_towards_its_privileged_self_through_the_asset(tmp_path, instance):
    """An SFT student first (a model that reads the context: the random base barely does); then opsd from that checkpoint,
    its frozen copy reading the trace: the student's own samples are pulled towards what it says with the solution in view."""
    training = {**TRAINING, "max_steps": 60, "learning_rate": 0.01}
    _, tuned = sft_first(tmp_path, instance, training, reasoning=lambda i: "count the red squares")
    student = {
        "name": "self",
        "model": str(tuned),
        "method": "opsd",
        "opsd": {"context": "trace", "teacher": "frozen", "max_new_tokens": 16, "clip": 5.0},
    }
    config = load_config(
        write_config(
            tmp_path, SOURCES, recipes=[RECIPE], students=[student], training={**training, "max_steps": 10, "learning_rate": 0.002}
        )
    )
    store = CorpusStore(config.store.root)
    result = run_job(config, instance, TRAIN_JOB, "even|self")
    assert result.success
    meta = materializations(result)["student_checkpoints"]
    assert meta["method"] == "opsd" and meta["steps"] == 10 and meta["samples_seen"] == 40  # 10 steps of 4 questions, each sampled
    assert 0 < meta["mean_sample_length"] <= 16
    assert meta["final_divergence"] < meta["initial_divergence"]  # the student moves towards its privileged self
    assert plot_image(meta["plot/opsd"])
    log = json.loads((store.checkpoints.local_dir(meta["checkpoint_id"], tmp_path / "dl") / "train_log.json").read_text())
    assert len(log["opsd_divergences"]) == len(log["sample_lengths"]) == 10
    assert log["losses"] == pytest.approx(log["opsd_divergences"], rel=1e-3, abs=1e-5)  # the loss is the divergence
    story = checkpoint_story(store, store.catalog(), meta["checkpoint_id"])
    assert story["method"]["name"] == "opsd" and story["method"]["context"] == "trace" and story["method"]["teacher"] == "frozen"
