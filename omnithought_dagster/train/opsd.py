"""On-policy self-distillation with privileged context (`method: opsd`, after Visual-OPSD).

The student answers each question (image(s) + question) itself: a sample of up to
`max_new_tokens` from its current weights. A teacher with the student's own weights - a frozen
copy of where training started, an exponential moving average of the student (`ema_decay`), or
the live student itself - reads the same images and question plus privileged context the
student never sees (`context: trace`, the curated teacher trace of that question, or `context:
answer`, its reference answer), then the same sampled tokens. At each sampled position the
student's next-token distribution is pulled towards the teacher's by the generalized JSD of
`train/distill.py` (`beta`; `top_k` restricts it to the teacher's k most likely tokens;
`clip` caps each token's divergence), averaged over the sampled tokens. The teacher knows the
solution, so its distribution over the student's own trajectory says which of the student's
tokens lead towards it: dense, on-policy supervision without a second model.

The loss is written here: TRL's DistillationTrainer is on-policy but has no privileged context
for its teacher, and its SDFT trainer has the context but no images. No Dagster here; torch is
imported where used.
"""

from __future__ import annotations

import copy
from typing import Any

from omnithought_dagster.train.data import IndexRecords, open_images

PRIVILEGED_HEADER = {
    "trace": "\n\n(Privileged context, for the teacher only) A worked solution to this question:\n",
    "answer": "\n\n(Privileged context, for the teacher only) The correct answer is: ",
}


def teacher_messages(messages: list[dict], context: str) -> list[dict]:
    """The teacher's conversation: the student's user turn with the privileged context appended to its text (the trace or
    the reference answer), no assistant turn. `messages` is an exported example's [user, assistant]."""
    from omnithought_dagster.models.vl_chat import content_text

    user, reply = messages[0], content_text(messages[-1]["content"])
    if context == "trace":
        extra = reply
    else:
        from omnithought_dagster.teacher.reply import parse_reply

        extra = parse_reply(reply, r"(?is)(?:final answer|answer)\s*(?:is\b|[:：])\s*(.+?)[\s.]*$").final_answer or ""
    content = [dict(part) for part in user["content"]]
    text = PRIVILEGED_HEADER[context] + extra
    if content and content[-1].get("type") == "text":
        content[-1]["text"] = content[-1]["text"] + text
    else:
        content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


class PrivilegedPrompts(IndexRecords):
    """A map-style dataset of the index's examples as (student prompt, teacher prompt) pairs, encoded when asked for: the
    student's is the question alone, the teacher's the question plus the privileged context; the same images."""

    def __init__(self, index, vl, context: str, positions: list[int] | None = None):
        super().__init__(index, positions)
        self.vl, self.context = vl, context

    def __getitem__(self, item: int) -> dict[str, Any]:
        record = self.record(item)
        images = open_images(record["images"])
        student = self.vl.encode_prompt(record["messages"][:1], images)
        teacher = self.vl.encode_prompt(teacher_messages(record["messages"], self.context), images)
        return {"student": dict(student), "teacher": dict(teacher)}


def collate(examples: list[dict]) -> dict[str, list]:
    """No padding: each example's prompts keep their own length (the loss goes one example at a time)."""
    return {"examples": examples}


def with_completion(prompt: dict, completion) -> dict:
    """A prompt's model inputs followed by sampled tokens [1, n] (text tokens: mm_token_type_ids 0, attended)."""
    import torch

    out = dict(prompt)
    out["input_ids"] = torch.cat([prompt["input_ids"], completion], dim=1)
    out["attention_mask"] = torch.cat([prompt["attention_mask"], torch.ones_like(completion)], dim=1)
    if "mm_token_type_ids" in prompt:
        out["mm_token_type_ids"] = torch.cat([prompt["mm_token_type_ids"], torch.zeros_like(completion)], dim=1)
    return out


def completion_logits(model, prompt: dict, completion):
    """The model's logits predicting each sampled token: [n, V] for a completion [1, n] after the prompt."""
    logits = model(**with_completion(prompt, completion)).logits
    start = prompt["input_ids"].shape[1]
    return logits[0, start - 1 : start - 1 + completion.shape[1]]


def trim_after_end(tokens, end_ids: set[int]):
    """A sampled row [n] cut after its first end-of-turn token (kept: the student learns to stop), as [1, m]."""
    row = tokens.tolist()
    for i, token in enumerate(row):
        if token in end_ids:
            return tokens[: i + 1].unsqueeze(0)
    return tokens.unsqueeze(0)


def sample(policy, prompt: dict[str, Any], settings: dict[str, Any], pad_id: int | None, media_ids) -> Any:
    """The policy's sampled answer to a prompt ([1, n] token ids, the prompt not included), in eval mode and without
    gradients. Media tokens (`media_ids`: image and video placeholders, vision start and end) are never sampled: the
    next forward over prompt + answer would read a sampled image token as an image that is not there."""
    import torch

    with torch.no_grad():
        training = policy.training
        policy.eval()
        try:
            sampled = policy.generate(
                **prompt,
                max_new_tokens=settings["max_new_tokens"],
                do_sample=True,
                temperature=settings["temperature"],
                top_p=1.0,
                top_k=0,
                use_cache=True,
                pad_token_id=pad_id,
                suppress_tokens=sorted(media_ids) or None,
            )
        finally:
            policy.train(training)
    return sampled[:, prompt["input_ids"].shape[1] :]


def end_token_ids(tokenizer, model) -> set[int]:
    """The tokens that end a sampled answer: the tokenizer's end of sequence and the model's generation config's."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured] if configured is not None else [])
    return ids


def example_divergence(student_logits, teacher_logits, settings: dict[str, Any]):
    """Per-token generalized JSD between the student's and the privileged teacher's next-token distributions over one
    sampled completion ([n, V] each -> [n]), each token's capped at `clip` when set."""
    from omnithought_dagster.train.distill import token_divergence

    vocab = min(student_logits.shape[-1], teacher_logits.shape[-1])
    values = token_divergence(student_logits[:, :vocab], teacher_logits[:, :vocab], "jsd", settings["beta"], 1.0, settings["top_k"])
    if settings.get("clip") is not None:
        values = values.clamp(max=settings["clip"])
    return values


def make_teacher(model, kind: str):
    """The teacher beside the student: a frozen copy (`frozen`, `ema`) in eval mode without gradients, or None for `live`
    (the student itself, read without gradients)."""
    if kind == "live":
        return None
    teacher = copy.deepcopy(model).eval()
    teacher.requires_grad_(False)
    return teacher


def ema_update(teacher, student, decay: float) -> None:
    """teacher <- decay * teacher + (1 - decay) * student, parameter by parameter."""
    import torch

    with torch.no_grad():
        for t, s in zip(teacher.parameters(), student.parameters(), strict=False):
            t.mul_(decay).add_(s.detach().to(t.dtype), alpha=1 - decay)


def build_trainer(counting_base, model, method: dict[str, Any], vl, **trainer_kwargs):
    """The run's opsd trainer: the teacher beside the student (none for `live`, on the student's device), the sampling's
    end and pad tokens, and for an ema teacher the callback that moves it after each optimizer step."""
    teacher = make_teacher(model, method["teacher"])
    trainer = opsd_trainer_class(counting_base)(model=model, data_collator=collate, **trainer_kwargs)
    if teacher is not None:
        teacher.to(trainer.args.device)
    trainer.opsd = (teacher, method, end_token_ids(vl.tokenizer, model), vl.tokenizer.pad_token_id, vl.media_ids)
    if method["teacher"] == "ema":
        trainer.add_callback(trainer.EMATeacher(trainer))
    return trainer


def opsd_trainer_class(counting_base):
    """The run's counting Trainer with the OPSD loss: per example, the student samples, then both read the sample."""
    from transformers import TrainerCallback

    class OPSDTrainer(counting_base()):
        opsd: tuple | None = None  # (teacher model or None for live, method settings, end-of-turn token ids, pad id, media ids)

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.loss_is_scaled_for_ga = False  # the loss is a mean per micro-batch: the Trainer scales it for accumulation

        def count(self, inputs) -> None:
            pass  # counted once sampled, in compute_loss

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            import torch

            teacher, settings, end_ids, pad_id, media_ids = self.opsd
            policy = self.accelerator.unwrap_model(model)
            values, lengths = [], []
            for example in inputs["examples"]:
                student_prompt, teacher_prompt = example["student"], example["teacher"]
                completion = trim_after_end(sample(policy, student_prompt, settings, pad_id, media_ids)[0], end_ids)
                if completion.shape[1] == 0:
                    continue
                student_logits = completion_logits(model, student_prompt, completion)
                with torch.no_grad():
                    teacher_logits = completion_logits(teacher if teacher is not None else policy, teacher_prompt, completion)
                values.append(example_divergence(student_logits, teacher_logits, settings))
                lengths.append(completion.shape[1])
                self.samples += 1
                self.tokens += int(student_prompt["attention_mask"].sum()) + completion.shape[1]
            if not values:  # nothing sampled: a zero loss that still touches the graph
                loss = sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0
            else:
                flat = torch.cat(values)
                loss = flat.sum() / flat.numel()
            scale = self.current_gradient_accumulation_steps
            parts = self._parts = self._parts or {"opsd_divergence": 0.0, "sample_length": 0.0}
            parts["opsd_divergence"] += float(loss.detach()) / scale
            parts["sample_length"] += (sum(lengths) / len(lengths) if lengths else 0.0) / scale
            return (loss, None) if return_outputs else loss

    class EMATeacher(TrainerCallback):
        """After each optimizer step, the ema teacher moves towards the student."""

        def __init__(self, trainer):
            self.trainer = trainer

        def on_step_end(self, args, state, control, **kwargs):
            teacher, settings, _, _ = self.trainer.opsd
            ema_update(teacher, self.trainer.accelerator.unwrap_model(self.trainer.model), settings["ema_decay"])

    OPSDTrainer.EMATeacher = EMATeacher
    return OPSDTrainer
