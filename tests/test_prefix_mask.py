"""Method prefix_mask_kd (salient reasoning-prefix masking): which keys a prediction loses for a given saliency and budget
(the future always, the prompt and image never), the self-paced budget, the mask reaching each Qwen-VL family's text
decoder (and only it), the saliency read from its attention, and a tiny student distilled through the asset."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from test_student import RECIPE, SFT_STUDENT, SOURCES, TRAINING, sft_first

from omnithought_dagster.config import ConfigError, StudentConfig, load_config
from omnithought_dagster.defs import TRAIN_JOB
from omnithought_dagster.lineage import checkpoint_story
from omnithought_dagster.store import CorpusStore
from omnithought_dagster.train.launch import method_hash, run_method
from omnithought_dagster.train.prefix_mask import (
    ATTENTION,
    BudgetSchedule,
    capturing,
    chosen_layers,
    hiding,
    salient_prefix_mask,
    use_prefix_masks,
)

from conftest import materializations, plot_image, run_job, write_config

IMAGE = 99


def _labels(length: int, reply_from: int) -> torch.Tensor:
    labels = torch.full((1, length), -100)
    labels[0, reply_from:] = torch.arange(reply_from, length)
    return labels


def _hidden_keys(hidden: torch.Tensor, query: int) -> list[int]:
    return hidden[0, query].nonzero().flatten().tolist()


def test_each_prediction_loses_its_most_salient_earlier_reply_tokens():
    """Prompt 0-2, reply 3-9. Query i predicts token i + 1; its candidates are the reply tokens before i - keep_recent, of
    which floor(budget x n) are hidden, the most salient first."""
    labels = _labels(10, 3)
    saliency = torch.zeros(1, 10, 10)
    saliency[0, :, :] = torch.tensor([9.0, 9.0, 9.0, 1.0, 5.0, 3.0, 4.0, 2.0, 0.0, 0.0])  # the prompt is the most attended
    hidden = salient_prefix_mask(saliency, labels, torch.zeros(1, 10, dtype=torch.bool), budget=0.5, keep_recent=1)
    assert _hidden_keys(hidden, 8) == [4, 6]  # candidates 3, 4, 5, 6 (n 4, two hidden): the two most salient
    assert _hidden_keys(hidden, 7) == [4]  # candidates 3, 4, 5 (n 3, one hidden)
    assert _hidden_keys(hidden, 6) == [4]  # candidates 3, 4
    assert _hidden_keys(hidden, 5) == []  # one candidate: floor(0.5) = 0
    assert _hidden_keys(hidden, 9) == []  # predicts nothing (the end of the sequence)
    assert not hidden[0, :, :3].any()  # the prompt never
    assert not torch.triu(hidden[0]).any()  # only earlier keys: the future is the causal mask's, the query itself stays

    everything = salient_prefix_mask(saliency, labels, torch.zeros(1, 10, dtype=torch.bool), budget=1.0, keep_recent=0)
    assert _hidden_keys(everything, 8) == [3, 4, 5, 6, 7]  # keep_recent 0: all reply tokens before the query itself
    assert not salient_prefix_mask(saliency, labels, torch.zeros(1, 10, dtype=torch.bool), budget=0.0).any()


def test_image_tokens_are_never_hidden_and_ties_go_to_the_earlier_token():
    labels = _labels(8, 1)  # an image token inside the labelled span, as a malformed export might have
    image = torch.zeros(1, 8, dtype=torch.bool)
    image[0, 2] = True
    saliency = torch.ones(1, 8, 8)
    saliency[0, :, 2] = 100.0  # the image token is what the query attends to most
    hidden = salient_prefix_mask(saliency, labels, image, budget=0.5, keep_recent=1)
    assert 2 not in hidden[0].nonzero()[:, 1].tolist()
    assert _hidden_keys(hidden, 6) == [1]  # candidates 1, 3, 4 (the image token is not one), equally salient: the earliest


def test_the_budget_grows_while_the_masks_cost_little_and_holds_when_they_cost_more():
    schedule = BudgetSchedule(max_budget=0.25, growth=0.1, warmup_steps=2, tolerance=1.5)
    assert [schedule.update(1.0, 1.0), schedule.update(3.0, 3.0)] == [0.0, 0.0]  # warm-up: plain KD
    assert schedule.update(0.5, 0.5) == 0.1  # no masks yet: they cost nothing
    assert schedule.update(2.0, 1.0) == 0.1 and schedule.cost == pytest.approx(2.0)  # twice the unmasked divergence: holds
    assert schedule.update(1.4, 1.0) == 0.2  # within 1.5x: grows
    assert schedule.update(3.0, 2.9) == 0.25  # a rising level is no obstacle, only the masks' cost; capped at max_budget
    resumed = BudgetSchedule(max_budget=0.25, growth=0.1, warmup_steps=2, tolerance=1.5)
    resumed.load(json.loads(json.dumps(schedule.state())))  # as trainer_state.json carries it
    assert resumed.state() == schedule.state()
    matched = BudgetSchedule(max_budget=1.0, growth=0.5, warmup_steps=0, tolerance=1.0)
    assert matched.update(0.0, 0.0) == 0.5  # a student that matches its teacher exactly: no cost, no division by zero


def test_prefix_mask_settings_default_are_checked_and_name_the_checkpoint(tmp_path):
    student = StudentConfig(name="s", method="prefix_mask_kd", prefix_mask_kd={"teacher": "tiny:teacher"})
    settings = student.prefix_mask_kd
    assert (settings.saliency, settings.saliency_layers, settings.max_budget, settings.tolerance, settings.keep_recent) == (
        "student",
        [-1],
        0.3,
        1.25,
        1,
    )
    assert settings.divergence == "forward_kl" and settings.weight == 0.5  # kd's settings, with kd's defaults
    with pytest.raises(ValueError, match="at least `teacher`"):
        StudentConfig(name="s", method="prefix_mask_kd")
    with pytest.raises(ValueError, match="method is 'kd'"):
        StudentConfig(name="s", method="kd", kd={"teacher": "tiny:teacher"}, prefix_mask_kd={"teacher": "tiny:teacher"})
    with pytest.raises(ValueError, match="max_budget"):
        StudentConfig(name="s", method="prefix_mask_kd", prefix_mask_kd={"teacher": "tiny:teacher", "max_budget": 1.5})
    kd = StudentConfig(name="s", method="kd", kd={"teacher": str(tmp_path)})
    masked = StudentConfig(name="s", method="prefix_mask_kd", prefix_mask_kd={"teacher": str(tmp_path)})
    assert method_hash(run_method(kd, tmp_path)) != method_hash(run_method(masked, tmp_path))
    grown = StudentConfig(name="s", method="prefix_mask_kd", prefix_mask_kd={"teacher": str(tmp_path), "growth": 0.05})
    assert method_hash(run_method(grown, tmp_path)) != method_hash(run_method(masked, tmp_path))
    path = write_config(
        tmp_path,
        [{"name": "synthetic", "kind": "synthetic", "n_samples": 4}],
        recipes=[RECIPE],
        students=[{"name": "m", "method": "prefix_mask_kd", "prefix_mask_kd": {"teacher": "tiny:teacher"}}],
        training={"zero_stage": 3},
    )
    with pytest.raises(ConfigError, match="zero_stage 3"):
        load_config(path)


def _tiny_batch(family: str, folder):
    from omnithought_dagster.models.tiny import TinySpec, build_tiny_model
    from omnithought_dagster.models.vl_chat import VLTokenizer

    folder = build_tiny_model(TinySpec(name=f"tiny-{family}", family=family, seed=2), folder)
    vl = VLTokenizer.load(folder)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many red squares?"}]},
        {"role": "assistant", "content": "<think>\nThree red squares, one blue one.\n</think>\n\nAnswer: 3"},
    ]
    batch = vl.collate([vl.encode_example(messages, [Image.new("RGB", (56, 56), (200, 10, 10))])])
    return folder, vl, batch, {k: v for k, v in batch.items() if k != "labels"}


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_the_mask_reaches_the_text_decoder_and_the_saliency_is_its_attention(family, tmp_path):
    """Without hidden pairs the model computes what it computes under SDPA; a hidden pair changes that prediction and no
    earlier one; the vision tower keeps its own attention; the recorded saliency is the eager attention's, heads averaged."""
    from transformers import AutoModelForImageTextToText

    folder, vl, batch, inputs = _tiny_batch(family, tmp_path / family)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        plain = model(**inputs).logits
    use_prefix_masks(model)
    assert model.config.get_text_config()._attn_implementation == ATTENTION
    assert model.config.vision_config._attn_implementation == "sdpa"
    length = inputs["input_ids"].shape[1]
    with torch.no_grad(), hiding(None):
        same = model(**inputs).logits
    torch.testing.assert_close(same, plain, atol=1e-5, rtol=1e-4)

    query, key = length - 2, length - 6  # a late reply prediction loses one earlier reply token
    hidden = torch.zeros(1, length, length, dtype=torch.bool)
    hidden[0, query, key] = True
    with torch.no_grad(), hiding(hidden):
        masked = model(**inputs).logits
    torch.testing.assert_close(masked[0, :query], plain[0, :query], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(masked[0, query], plain[0, query], atol=1e-4)
    with torch.no_grad():  # outside the block the model is itself again
        torch.testing.assert_close(model(**inputs).logits, plain, atol=1e-5, rtol=1e-4)

    with torch.no_grad(), capturing(chosen_layers(model, [-1])) as record:
        model(**inputs)
    eager = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        attentions = eager(**inputs, output_attentions=True).attentions
    torch.testing.assert_close(record["saliency"], attentions[-1].mean(1), atol=1e-5, rtol=1e-4)

    image = inputs["input_ids"] == vl.image_token_id
    chosen = salient_prefix_mask(record["saliency"], batch["labels"], image, budget=0.5, keep_recent=1)
    prompt = batch["labels"][0] == -100
    assert chosen.any() and not chosen[0][:, prompt].any()  # reply tokens only: never the prompt or the image
    with pytest.raises(SystemExit, match="out of range"):
        chosen_layers(model, [7])


def test_a_mask_for_another_shape_is_refused(tmp_path):
    from transformers import AutoModelForImageTextToText

    folder, _, _, inputs = _tiny_batch("qwen2_vl", tmp_path / "m")
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    use_prefix_masks(model)
    with torch.no_grad(), hiding(torch.zeros(1, 3, 3, dtype=torch.bool)), pytest.raises(RuntimeError, match="prefix mask for"):
        model(**inputs)


def _in_process_trainer(tmp_path, model_dir, settings: dict, steps: int, save_steps: int = 0):
    """sft.train's prefix_mask_kd trainer, built in this process on eight one-image examples (the model its own teacher)."""
    from transformers import AutoModelForImageTextToText, TrainingArguments

    from omnithought_dagster.models.vl_chat import VLTokenizer
    from omnithought_dagster.train.data import LazyExamples, build_index
    from omnithought_dagster.train.prefix_mask import build_trainer
    from omnithought_dagster.train.trainer import counting_trainer as _counting_trainer

    data = tmp_path / "data"
    if not data.exists():
        (data / "images").mkdir(parents=True)
        Image.new("RGB", (56, 56), (200, 10, 10)).save(data / "images" / "a.png")
        records = [
            {
                "messages": [
                    {"role": "user", "content": f"<image>\nHow many red squares in row {i}?"},
                    {"role": "assistant", "content": f"<think>\nRow {i} has {i} red squares and one blue one.\n</think>\n\nAnswer: {i}"},
                ],
                "images": ["images/a.png"],
            }
            for i in range(8)
        ]
        (data / "data.json").write_text(json.dumps(records))
    vl = VLTokenizer.load(model_dir)
    examples = LazyExamples(build_index(data, tmp_path / "index", vl, 1024, "skip"), vl, 1024)
    method = StudentConfig(
        name="s", method="prefix_mask_kd", prefix_mask_kd={"teacher": str(model_dir), **settings}
    ).prefix_mask_kd.model_dump()
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    teacher = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval().requires_grad_(False)
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=steps,
        save_steps=save_steps or steps,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        remove_unused_columns=False,
    )
    return build_trainer(
        _counting_trainer, model, teacher, method, vl.image_token_id, args=args, train_dataset=examples, data_collator=vl.collate
    )


def test_the_budget_resumes_from_a_training_checkpoint(tmp_path, tiny_teacher):
    """The schedule's state rides in each training checkpoint's trainer_state.json: a run resumed at step 3 of 6 ends
    with the budget of the run that was not stopped (a fresh schedule would warm up again)."""
    settings = {"warmup_steps": 2, "growth": 0.1, "tolerance": 100.0}  # grows every step after the warm-up
    whole = _in_process_trainer(tmp_path, tiny_teacher, settings, steps=6, save_steps=3)
    whole.train()
    assert whole.schedule.steps == 6 and whole.schedule.budget == pytest.approx(0.3)  # warm-up 2, then 4 steps of growth
    saved = json.loads((tmp_path / "run" / "checkpoint-3" / "trainer_state.json").read_text())["stateful_callbacks"]
    assert saved["PrefixMaskSchedule"]["attributes"]["schedule"]["steps"] == 3
    resumed = _in_process_trainer(tmp_path, tiny_teacher, settings, steps=6, save_steps=3)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))
    assert (resumed.schedule.budget, resumed.schedule.steps) == (whole.schedule.budget, whole.schedule.steps)
    assert [e["mask_budget"] for e in resumed.state.log_history if "mask_budget" in e][-3:] == [0.1, 0.2, 0.3]


def test_the_teachers_attention_can_rank_the_tokens_instead(tmp_path, tiny_teacher):
    """saliency: teacher - no pass of the student's own; the teacher's, which the KD loss needs anyway, records its attention."""
    run = _in_process_trainer(tmp_path, tiny_teacher, {"saliency": "teacher", "warmup_steps": 0, "growth": 0.3, "tolerance": 1e9}, steps=3)
    passes = []
    run.distill[0].register_forward_hook(lambda *_: passes.append("teacher"))
    run.model.register_forward_hook(lambda *_: passes.append("student"))
    run.train()
    logged = [e for e in run.state.log_history if "mask_budget" in e]
    assert [e["mask_budget"] for e in logged] == [0.0, 0.3, 0.3]  # no warm-up: the first step's divergence is the reference
    assert logged[0]["hidden_per_prediction"] == 0 and logged[-1]["hidden_per_prediction"] > 0
    # The first step, unmasked: the teacher, then the student's training pass; masked steps add the unmasked pass between.
    assert passes == ["teacher", "student"] + ["teacher", "student", "student"] * 2


@pytest.mark.slow
def test_prefix_mask_kd_distils_a_student_under_a_growing_budget(tmp_path, instance):
    """An SFT student first (a teacher that knows the data), then a second one distilled from it under salient-prefix masks
    on the same recipe: the budget leaves zero after the warm-up, predictions lose tokens, the KD loss falls, and the
    checkpoint's lineage names the method and its teacher."""
    training = {**TRAINING, "max_steps": 12}
    _, teacher = sft_first(tmp_path, instance, training)
    masked = {
        "name": "masked",
        "model": "tiny:student",
        "method": "prefix_mask_kd",
        "prefix_mask_kd": {"teacher": str(teacher), "warmup_steps": 2, "growth": 0.1, "max_budget": 0.3, "tolerance": 3.0, "weight": 0.7},
    }  # a lenient pace: the tiny student's masks cost it up to ~2x
    config = load_config(write_config(tmp_path, SOURCES, recipes=[RECIPE], students=[SFT_STUDENT, masked], training=training))
    store = CorpusStore(config.store.root)
    result = run_job(config, instance, TRAIN_JOB, "even|masked")
    assert result.success
    meta = materializations(result)["student_checkpoints"]
    assert meta["method"] == "prefix_mask_kd" and meta["final_kd_loss"] < meta["initial_kd_loss"]
    assert 0 < meta["final_mask_budget"] <= 0.3 and meta["final_hidden_per_prediction"] > 0
    assert plot_image(meta["plot/mask_budget"]).size[0] > 0
    log = json.loads((store.checkpoints.local_dir(meta["checkpoint_id"], tmp_path / "out") / "train_log.json").read_text())
    assert log["mask_budgets"][:3] == [0.0, 0.0, 0.0] and log["mask_budgets"][-1] > 0  # plain KD in the warm-up and the step after
    assert all(b <= a for a, b in zip(log["mask_budgets"][1:], log["mask_budgets"], strict=False)) and log["hidden_per_prediction"][0] == 0
    assert log["masking_costs"][:3] == [1.0, 1.0, 1.0] and max(log["masking_costs"]) > 1  # the masks make the teacher harder to follow
    story = checkpoint_story(store, store.catalog(), meta["checkpoint_id"])
    assert story["method"]["name"] == "prefix_mask_kd" and story["method"]["teacher"] == str(teacher)
    assert "teacher_dir" not in story["method"]
