"""Method grpo (SFT then RL with verifiable rewards): the rewards on hand-written replies, the settings, the processor TRL
gets, the questions it reads, and a tiny student trained by TRL's GRPOTrainer through the asset from an SFT student."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from pydantic import ValidationError
from test_student import RECIPE, TRAINING

from omnithought_dagster.config import ConfigError, GenerationConfig, GRPOSettings, StudentConfig, TrainingConfig, load_config
from omnithought_dagster.defs import FILTER_JOB, SUBSET_JOB, TRAIN_JOB
from omnithought_dagster.lineage import checkpoint_story
from omnithought_dagster.store import CorpusStore
from omnithought_dagster.train.grpo import answer_reward, completion_text, format_reward, prompt_dataset, reward_functions

from conftest import check_evaluations, materializations, plot_image, run_job, write_config
from curation_data import build_store

PATTERN = GenerationConfig().answer_pattern


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("<think>\nTwo plus two.\n</think>\n\nAnswer: 4", 1.0),
        ("<think>x</think>Answer: B", 1.0),
        ("  <think>\nsteps\n</think>\nAnswer: the blue one\n", 1.0),
        ("Answer: 4", 0.0),  # no reasoning block
        ("<think>\n</think>\n\nAnswer: 4", 0.0),  # an empty one
        ("<think>a</think><think>b</think>Answer: 4", 0.0),  # two blocks
        ("<think>steps</think>", 0.0),  # no answer line
        ("<think>steps</think>\nAnswer:", 0.0),  # an empty answer
        ("<think>steps</think>\nAnswer: 4\nand then more text", 0.0),  # something after the answer line
        ("I think it is 4", 0.0),
        ("", 0.0),
        (None, 0.0),
    ],
)
def test_format_reward_is_one_only_for_the_layout_sft_teaches(reply, expected):
    assert format_reward(reply) == expected


@pytest.mark.parametrize(
    "reply, reference, answer_type, choices, expected",
    [
        ("<think>count</think>\nAnswer: 4", "4", "numeric", [], 1.0),
        ("<think>count</think>\nAnswer: 4.0 apples", "4", "numeric", [], 1.0),  # the verifier's tolerance and units
        ("<think>count</think>\nAnswer: 5", "4", "numeric", [], 0.0),  # wrong
        ("<think>look</think>\nAnswer: (B)", "B", "multiple_choice", ["red", "blue"], 1.0),
        ("<think>look</think>\nAnswer: blue", "B", "multiple_choice", ["red", "blue"], 1.0),  # the option's text
        ("<think>look</think>\nAnswer: A", "B", "multiple_choice", ["red", "blue"], 0.0),
        ("The answer is 4", "4", "numeric", [], 1.0),  # no layout, still right: the format reward is the other one
        ("<think>count</think>", "4", "numeric", [], 0.0),  # malformed: no answer at all
        ("<think>4</think>\nAnswer: ", "4", "numeric", [], 0.0),  # an empty answer (the 4 is reasoning, not the answer)
        ("<think>s</think>\nAnswer: a cat", "a dog", "free_form", [], 0.0),  # undecided without a judge: no reward
        ("<think>s</think>\nAnswer: 4", None, None, [], 0.0),  # no reference
    ],
)
def test_answer_reward_is_the_projects_verifier_on_the_parsed_final_answer(reply, reference, answer_type, choices, expected):
    assert answer_reward(reply, reference, answer_type, choices, PATTERN) == expected


def test_reward_functions_take_trls_conversational_completions():
    answer, fmt = reward_functions(PATTERN)
    assert answer.__name__ == "answer" and fmt.__name__ == "format"  # TRL names the logged metrics after them
    completions = [
        [{"role": "assistant", "content": "<think>s</think>\nAnswer: 4"}],
        [{"role": "assistant", "content": [{"type": "text", "text": "<think>s</think>\nAnswer: 5"}]}],
        "Answer: 4",
        [],
        [{"role": "assistant", "content": None}],
    ]
    assert [completion_text(c) for c in completions] == ["<think>s</think>\nAnswer: 4", "<think>s</think>\nAnswer: 5", "Answer: 4", "", ""]
    columns = {"reference": ["4"] * 5, "answer_type": ["numeric"] * 5, "choices": [[]] * 5}
    assert answer(prompts=[None] * 5, completions=completions, **columns, trainer_state=None) == [1.0, 0.0, 1.0, 0.0, 0.0]
    assert fmt(prompts=[None] * 5, completions=completions, **columns) == [1.0, 1.0, 0.0, 0.0, 0.0]


def test_the_objective_check_reads_the_reward_for_grpo_and_warns_when_it_fell():
    import dagster as dg

    from omnithought_dagster.checks.student import objective_verdict

    row = {"initial_loss": 0.01, "final_loss": 0.02, "steps": 6}  # grpo's surrogate loss: not what is judged
    grpo = {"train_spec": {"method": {"name": "grpo"}}, "results": {"initial_reward": 0.2, "final_reward": 0.5}}
    assert objective_verdict(row, grpo)["passed"] and objective_verdict(row, grpo)["metadata"]["final_reward"] == 0.5
    fell = objective_verdict(row, {**grpo, "results": {"initial_reward": 0.5, "final_reward": 0.2}})
    assert not fell["passed"] and fell["severity"] == dg.AssetCheckSeverity.WARN and "reward did not rise" in fell["description"]
    assert not objective_verdict(row, {**grpo, "results": {}})["passed"]  # no rewards reported: not a pass
    sft = objective_verdict(row, {"train_spec": {"method": None}})
    assert not sft["passed"] and "loss did not decrease" in sft["description"] and "severity" not in sft  # an ERROR: it blocks
    assert objective_verdict({**row, "final_loss": 0.001}, None)["passed"]


def test_grpo_settings_are_checked(tmp_path):
    with pytest.raises(ValidationError, match="method grpo needs"):
        StudentConfig(name="s", method="grpo")
    with pytest.raises(ValidationError, match="method is 'sft'"):
        StudentConfig(name="s", grpo={"start_from": "a"})
    with pytest.raises(ValidationError, match="nothing to learn"):
        GRPOSettings(start_from="a", answer_weight=0, format_weight=0)
    sources = [{"name": "synthetic", "kind": "synthetic", "n_samples": 4}]
    sft = {"name": "sft", "model": "tiny:student"}

    def project(grpo: dict, students=(sft,), **training):
        path = write_config(
            tmp_path,
            sources,
            recipes=[RECIPE],
            training={**TRAINING, **training},
            students=[*students, {"name": "rl", "model": "tiny:student", "method": "grpo", "grpo": grpo}],
        )
        return load_config(path)

    assert project({"start_from": "sft"}).student("rl").grpo.num_generations == 4
    with pytest.raises(ConfigError, match="no other student named 'nobody'"):
        project({"start_from": "nobody"})
    with pytest.raises(ConfigError, match="no other student named 'rl'"):
        project({"start_from": "rl"})
    with pytest.raises(ConfigError, match="is itself a grpo student"):
        project({"start_from": "rl0"}, students=(sft, {"name": "rl0", "method": "grpo", "grpo": {"start_from": "sft"}}))
    with pytest.raises(ConfigError, match="same base model"):
        project({"start_from": "other"}, students=({"name": "other", "model": "tiny:teacher"},))
    with pytest.raises(ConfigError, match="must be a multiple of num_generations"):
        project({"start_from": "sft", "num_generations": 3})  # 4 answers a round
    assert project({"start_from": "sft", "num_generations": 3}, micro_batch_size=3).student("rl").grpo.num_generations == 3


def test_the_questions_carry_their_reference_and_records_without_one_are_set_aside(tmp_path, tiny_teacher):
    from omnithought_dagster.models.vl_chat import VLTokenizer
    from omnithought_dagster.train.data import build_index

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    Image.new("RGB", (56, 56), (200, 10, 10)).save(data / "images" / "a.png")
    user = "<image>\nHow many red squares?"
    records = [
        {
            "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": "<think>one</think>\n\nAnswer: 1"}],
            "images": ["images/a.png"],
            "reference": {"answer": "1", "answer_type": "numeric", "choices": []},
        },
        {
            "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": "<think>one</think>\n\nAnswer: 1"}],
            "images": ["images/a.png"],
        },
    ]  # an export from before references were exported
    (data / "data.json").write_text(json.dumps(records))
    index = build_index(data, tmp_path / "index", VLTokenizer.load(tiny_teacher), 1024, "skip")
    dataset, set_aside = prompt_dataset(index, None, tmp_path / "questions")
    assert len(dataset) == 1 and set_aside == {"no_reference_answer": 1}
    row = dataset[0]
    assert row["prompt"] == [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nHow many red squares?"}]}]
    assert row["reference"] == "1" and row["answer_type"] == "numeric" and row["choices"] == []
    assert [image.size for image in row["images"]] == [(56, 56)] and row["images"][0].mode == "RGB"
    assert "Answer" not in json.dumps(row["prompt"])  # the question only: the student writes the reply


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_the_processor_trl_gets_encodes_like_the_projects_own(family, tmp_path):
    """Without torchvision: the family's processor with the PIL image processor gives the tokens and pixels VLTokenizer gives."""
    import torch

    from omnithought_dagster.models.tiny import TinySpec, build_tiny_model
    from omnithought_dagster.models.vl_chat import VLTokenizer
    from omnithought_dagster.train.grpo import vl_processor

    folder = build_tiny_model(TinySpec(name=f"tiny-{family}", family=family, seed=2), tmp_path / family)
    processor, vl = vl_processor(folder), VLTokenizer.load(folder)
    image = Image.new("RGB", (64, 48), (0, 120, 200))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    theirs = processor(text=[text], images=[image], return_tensors="pt")
    ours = vl.encode_prompt(messages, [image])
    assert theirs["input_ids"].tolist() == ours["input_ids"].tolist()
    assert torch.equal(theirs["pixel_values"], ours["pixel_values"]) and torch.equal(theirs["image_grid_thw"], ours["image_grid_thw"])
    assert processor.tokenizer.padding_side == "left"


@pytest.mark.slow
def test_grpo_starts_from_the_sft_checkpoint_and_reports_rewards(tmp_path, instance):
    """An SFT student, then GRPO from its checkpoint on the same recipe: TRL samples answers, the verifier and the format
    reward score them, the policy moves, and the run names where it started."""
    build_store(tmp_path / "store", n_samples=24, reasoning=lambda i: "count")  # short traces: the SFT student learns the layout
    sources = [{"name": "synthetic", "kind": "synthetic", "n_samples": 24}]
    students = [
        {"name": "sft", "model": "tiny:student"},
        {
            "name": "rl",
            "model": "tiny:student",
            "method": "grpo",
            "grpo": {"start_from": "sft", "num_generations": 4, "max_completion_length": 24, "learning_rate": 0.01, "max_steps": 6},
        },
    ]
    config = load_config(
        write_config(tmp_path, sources, recipes=[RECIPE], students=students, training={**TRAINING, "max_steps": 80, "learning_rate": 0.01})
    )
    assert run_job(config, instance, FILTER_JOB, "synthetic").success
    assert run_job(config, instance, SUBSET_JOB, "even").success
    early = run_job(config, instance, TRAIN_JOB, "even|rl")
    assert not early.success  # the SFT checkpoint comes first
    (failure,) = [e for e in early.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "materialise student_checkpoints[even|sft] first" in failure.step_failure_data.error.message + str(
        failure.step_failure_data.user_failure_data
    )

    first = run_job(config, instance, TRAIN_JOB, "even|sft")
    assert first.success
    sft = materializations(first)["student_checkpoints"]
    result = run_job(config, instance, TRAIN_JOB, "even|rl")
    assert result.success
    rl = materializations(result)["student_checkpoints"]
    assert rl["method"] == "grpo" and rl["start_checkpoint"] == sft["checkpoint_id"] and rl["steps"] == 6
    assert 0 <= rl["initial_pass_rate"] <= 1 and 0 <= rl["final_pass_rate"] <= 1 and 0 < rl["mean_completion_length"] <= 24
    assert rl["samples_seen"] == 6 * 4  # 6 steps of 4 answers (one question x num_generations)
    assert plot_image(rl["plot/reward"])

    store = CorpusStore(config.store.root)
    folder = store.checkpoints.local_dir(rl["checkpoint_id"], tmp_path / "dl")
    log = json.loads((folder / "train_log.json").read_text())
    assert log["method"] == "grpo" and len(log["rewards"]) == len(log["pass_rates"]) == len(log["format_rates"]) == 6
    for total, passed, formatted in zip(
        log["rewards"], log["pass_rates"], log["format_rates"], strict=False
    ):  # the weighted sum of the two
        assert total == pytest.approx(1.0 * passed + 0.5 * formatted, abs=1e-4)
    checks = check_evaluations(result)
    assert checks["loss_decreased"].metadata["initial_reward"].value == rl["initial_reward"]  # grpo's objective is its reward
    assert checks["loss_decreased"].passed == (rl["final_reward"] > rl["initial_reward"]) and checks["loads_and_generates"].passed

    import torch
    from transformers import AutoModelForImageTextToText

    start = AutoModelForImageTextToText.from_pretrained(store.checkpoints.local_dir(sft["checkpoint_id"], tmp_path / "s")).state_dict()
    tuned = AutoModelForImageTextToText.from_pretrained(folder).state_dict()
    assert any(not torch.equal(start[k], tuned[k]) for k in start)  # the policy moved from where it started

    story = checkpoint_story(store, store.catalog(), rl["checkpoint_id"])
    assert story["method"]["name"] == "grpo" and story["method"]["start_checkpoint"] == sft["checkpoint_id"]

    # The same trainer pieces (questions, processor, TRL's GRPO under the counting trainer) raise a reward the SFT student can
    # reach in a few steps: closing its reasoning block within 10 tokens. The log-probabilities TRL takes of the student's
    # image + question inputs are right, or this would not climb.
    rewards = _grpo_run(
        store.checkpoints.local_dir(sft["checkpoint_id"], tmp_path / "s"),
        store,
        tmp_path,
        lambda prompts, completions, **_: [1.0 if "</think>" in completion_text(c) else 0.0 for c in completions],
    )
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 and sum(rewards[-5:]) / 5 >= 0.9, rewards


def _grpo_run(model_dir, store, tmp_path, reward, steps: int = 20) -> list[float]:
    import torch
    from transformers import AutoModelForImageTextToText

    from omnithought_dagster.curation.export import export_subset
    from omnithought_dagster.models.vl_chat import VLTokenizer
    from omnithought_dagster.train.data import build_index
    from omnithought_dagster.train.grpo import grpo_arguments, grpo_trainer_class, vl_processor
    from omnithought_dagster.train.trainer import counting_trainer as _counting_trainer
    from omnithought_dagster.train.trainer import training_kwargs

    export_subset(store, "even", "llamafactory", tmp_path / "export")
    index = build_index(tmp_path / "export", tmp_path / "index", VLTokenizer.load(model_dir), 1024, "skip")
    questions, _ = prompt_dataset(index, None, tmp_path / "questions")
    settings = {
        **TrainingConfig(**{**TRAINING, "micro_batch_size": 8, "lr_scheduler": "constant", "seed": 1}).run_settings(),
        **TrainingConfig().process_settings(),
        "save_steps": 0,
        "dataloader_workers": 0,
    }
    common = {**training_kwargs(settings, tmp_path / "grpo"), "deepspeed": None, "ddp_backend": None}  # in this process: no launcher
    method = {
        **GRPOSettings(
            start_from="sft", num_generations=8, max_completion_length=10, learning_rate=0.003, max_steps=steps, answer_weight=0.0
        ).model_dump(),
        "answer_pattern": PATTERN,
    }
    args = grpo_arguments(common, method)
    args.reward_weights = None
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    trainer = grpo_trainer_class(_counting_trainer)(
        model=model, reward_funcs=[reward], args=args, train_dataset=questions, processing_class=vl_processor(model_dir)
    )
    trainer.train()
    return [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
