"""SFT then RL with verifiable rewards (`method: grpo`): TRL's GRPOTrainer from another student's checkpoint.

The student starts from the checkpoint of the student named by `grpo.start_from` on the same
recipe (long-CoT SFT first: small VLMs need it before RL). For each question of the subset
(image(s) + question, no trace) it samples `num_generations` answers; each answer gets

- the answer reward: the project's own verifier (`curation/verify.py`, the one that decides a
  teacher trace's `correct`) on the final answer parsed as a trace's is (`teacher/prompt.py`):
  1 when it matches the reference answer, 0 when it does not, is missing, or is free-form text
  the verifier cannot decide without the judge (no judge runs inside training);
- the format reward: 1 when the whole reply is one `<think>...</think>` block with some reasoning
  in it, then `Answer: ...` on its own - the layout SFT taught - else 0;

weighted by `answer_weight` and `format_weight`. TRL takes the advantages within each question's
group, clips the ratio (`epsilon`), optionally penalises the KL to the starting weights (`beta`),
and logs the rewards per step: `rewards/answer/mean` is the pass rate.

The questions come from the same exported subset and example index as SFT (over-long prompts
set aside the same way), with the reference answer each export record carries; an example
without one is set aside (`no_reference_answer`). Images are read when a batch asks for them
(an Arrow file of paths, not of pixels).

The Qwen-VL processor classes need torchvision for their video processor (no CPU build here), so
TRL gets the family's processor class with the PIL image processor and no video processor: the
same token layout as `models/vl_chat.VLTokenizer` (pinned by a test). No Dagster here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

# The layout SFT teaches (curation/export.assistant_text): one reasoning block, then the answer line.
_FORMAT = re.compile(
    r"\A\s*<think>(?P<reasoning>(?:(?!</?think>).)*?\S(?:(?!</?think>).)*?)</think>\s*Answer:[ \t]*\S[^\n]*\s*\Z", re.DOTALL
)


def format_reward(text: str) -> float:
    """1.0 for `<think>reasoning</think>` then `Answer: ...` as the whole reply (one block, some reasoning), else 0.0."""
    return 1.0 if isinstance(text, str) and _FORMAT.match(text) else 0.0


def answer_reward(text: str, reference: str | None, answer_type: str | None, choices: list[str] | None, answer_pattern: str) -> float:
    """1.0 when the reply's final answer is the reference answer by the project's verifier, else 0.0 (wrong, missing,
    unparsable, or a free-form mismatch only the judge could decide)."""
    from omnithought_dagster.curation.verify import verify
    from omnithought_dagster.teacher.reply import parse_reply

    if not isinstance(text, str) or reference is None or answer_type is None:
        return 0.0
    parsed = parse_reply(text, answer_pattern)
    return 1.0 if verify(parsed.final_answer, reference, answer_type, choices or []).correct else 0.0


def completion_text(completion: Any) -> str:
    """A TRL completion's text: a string, or (conversational prompts) a list of messages whose last is the reply."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion:
        content = completion[-1].get("content") if isinstance(completion[-1], dict) else None
        if isinstance(content, list):
            return "".join(part.get("text") or "" for part in content if isinstance(part, dict))
        return content if isinstance(content, str) else ""
    return ""


def reward_functions(answer_pattern: str) -> list:
    """TRL reward functions (their names are the metrics' names: rewards/answer/mean, rewards/format/mean)."""

    def answer(prompts, completions, reference, answer_type, choices, **_) -> list[float]:
        return [
            answer_reward(completion_text(c), r, t, ch, answer_pattern)
            for c, r, t, ch in zip(completions, reference, answer_type, choices, strict=True)
        ]

    def format(prompts, completions, **_) -> list[float]:  # noqa: A001 - the metric's name
        return [format_reward(completion_text(c)) for c in completions]

    return [answer, format]


def prompt_dataset(index, positions: list[int] | None, cache_dir: Path, added: tuple[str, ...] = ()):
    """The questions of the index's examples (no reply) as a datasets.Dataset for GRPOTrainer: `prompt` (the user turn,
    images where its placeholders were), `images` (decoded when read), `reference`, `answer_type`, `choices`. `added`: the
    student tokenizer's added tokens, markup beside markup.py's own. Returns (dataset, set-aside counts)."""
    import datasets

    from omnithought_dagster.markup import TOKEN_KINDS, find_markup
    from omnithought_dagster.train.data import IndexRecords

    skipped: dict[str, int] = {}
    records = IndexRecords(index, positions)

    def rows():
        for item in range(len(records)):
            record = records.record(item)
            reference = record.get("reference") or {}
            if not isinstance(reference.get("answer"), str) or not isinstance(reference.get("answer_type"), str):
                skipped["no_reference_answer"] = skipped.get("no_reference_answer", 0) + 1
                continue
            user = record["messages"][0]
            # TRL renders and tokenizes the prompt itself, markup and all: a question holding a special token, a placeholder
            # or a delimiter (the export lets none through) is set aside, never sent.
            if any(find_markup(part.get("text"), TOKEN_KINDS, added) for part in user["content"] if part.get("type") == "text"):
                skipped["markup_in_text"] = skipped.get("markup_in_text", 0) + 1
                continue
            yield {
                "prompt_json": json.dumps([{"role": "user", "content": user["content"]}]),
                "images": record["images"],
                "reference": reference["answer"],
                "answer_type": reference["answer_type"],
                "choices": [str(c) for c in reference.get("choices") or []],
            }
        records.close()

    features = datasets.Features(
        {
            "prompt_json": datasets.Value("string"),
            "images": datasets.Sequence(datasets.Image()),
            "reference": datasets.Value("string"),
            "answer_type": datasets.Value("string"),
            "choices": datasets.Sequence(datasets.Value("string")),
        }
    )
    cache_dir.mkdir(parents=True, exist_ok=True)
    dataset = datasets.Dataset.from_generator(rows, features=features, cache_dir=str(cache_dir), keep_in_memory=False)
    return dataset.with_transform(_with_prompt), skipped


def _with_prompt(batch: dict[str, list]) -> dict[str, list]:
    """Rows as GRPOTrainer reads them: the prompt as chat messages (stored as JSON: image parts have no text)."""
    out = {key: value for key, value in batch.items() if key != "prompt_json"}
    out["prompt"] = [json.loads(text) for text in batch["prompt_json"]]
    out["images"] = [[image.convert("RGB") for image in images] for images in batch["images"]]
    return out


def vl_processor(model_dir: str | Path):
    """The model family's processor (tokenizer + PIL image processor, no video processor), for TRL."""
    import transformers
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    config = AutoConfig.from_pretrained(model_dir)
    family = getattr(transformers, PROCESSOR_MAPPING_NAMES[config.model_type])

    class ImageOnlyProcessor(family):
        def check_argument_for_proper_class(self, name, value):
            if name == "video_processor" and value is None:
                return None  # images only: no video processor, so no torchvision
            return super().check_argument_for_proper_class(name, value)

        def save_pretrained(self, save_directory, **kwargs):  # with the Trainer's checkpoints and the model
            self.tokenizer.save_pretrained(save_directory)
            self.image_processor.save_pretrained(save_directory)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"  # TRL generates from left-padded prompts
    return ImageOnlyProcessor(
        image_processor=Qwen2VLImageProcessorPil.from_pretrained(model_dir),
        tokenizer=tokenizer,
        video_processor=None,
        chat_template=tokenizer.chat_template,
    )


def grpo_arguments(common: dict[str, Any], method: dict[str, Any]):
    """TRL's GRPOConfig: the run's Trainer arguments, the method's learning rate and steps when set, and its GRPO settings."""
    from trl import GRPOConfig

    kwargs = {**common, "eval_strategy": "no", "remove_unused_columns": False}
    if method.get("learning_rate"):
        kwargs["learning_rate"] = method["learning_rate"]
    if method.get("max_steps"):
        kwargs["max_steps"] = method["max_steps"]
    return GRPOConfig(
        **kwargs,
        num_generations=method["num_generations"],
        max_completion_length=method["max_completion_length"],
        temperature=method["temperature"],
        beta=method["beta"],
        epsilon=method["epsilon"],
        loss_type=method["loss_type"],
        reward_weights=[method["answer_weight"], method["format_weight"]],
        shuffle_dataset=True,
        log_completions=False,
    )


def grpo_trainer_class(counting_base):
    """GRPOTrainer under the run's counting trainer: what it counts is the generated batches (questions x answers), known
    only once generated."""
    from trl import GRPOTrainer

    class CountingGRPOTrainer(counting_base(GRPOTrainer)):
        def count(self, inputs) -> None:
            pass  # raw questions here; counted in compute_loss

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                self.samples += int(inputs["completion_ids"].shape[0])
                self.tokens += int(inputs["prompt_mask"].sum()) + int(inputs["completion_mask"].sum())
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    return CountingGRPOTrainer


def grpo_log(history: list[dict]) -> dict[str, list]:
    """The method's curves from the Trainer's log history, one point per logged step."""
    names = {
        "rewards": "reward",
        "pass_rates": "rewards/answer/mean",
        "format_rates": "rewards/format/mean",
        "completion_lengths": "completions/mean_length",
    }
    return {name: [entry[key] for entry in history if entry.get(key) is not None] for name, key in names.items()}
