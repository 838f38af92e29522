"""Salient reasoning-prefix masking (`method: prefix_mask_kd`, after "Hide to See", Masking-KD, arXiv 2605.11651).

White-box KD (train/distill.py) where the student does not see all of its reasoning so far: for each next-token
prediction in the reply, the attention mask hides - besides the future, as the causal mask does - the earlier reply tokens
that prediction leaned on most, so the student has to find the evidence elsewhere: in the image and the question. The
teacher reads the whole, unmasked sequence; the loss is kd's, (1 - weight) * SFT + weight * divergence.

- Saliency: the attention weights of the student's own text decoder (heads averaged, over `saliency_layers`), from a
  forward pass without gradients before the training pass, under the ordinary causal mask; or (`saliency: teacher`) the
  teacher's, recorded in the teacher pass the KD loss needs anyway (the teacher must run transformers' attention
  interface, as every Qwen-VL family does).
- Which keys can be hidden from the prediction at position i (of the token at i + 1, a reply token): reply tokens j with
  j < i - keep_recent - the prompt, the image tokens and the `keep_recent` tokens just before i (and i itself) never are.
  Of those n_i candidates the floor(budget * n_i) most salient are hidden (ties: the earlier token first).
- Self-paced budget: 0 for `warmup_steps` optimizer steps of plain KD; after that, each optimizer step raises it by
  `growth` (up to `max_budget`) while hiding tokens costs the student little: when the step's mean divergence to the
  teacher under the masks is at most `tolerance` x its divergence without them (the pass without gradients measures
  that too; means over the step's reply tokens and the ranks), and holds it otherwise - the student has to catch up
  first. A ratio rather than a level: the divergence's own trend (it rises while SFT pulls a student from a teacher
  that does not know the data) does not stall or drive the budget. Its state is saved in each training checkpoint.

The mask reaches the model through transformers' attention and mask interfaces: the student's text decoder runs under an
implementation registered here (PyTorch SDPA underneath, with an explicit boolean mask: no causal fast path), which
intersects the causal-and-padding mask with the hidden pairs while a `hiding(...)` block is open, and records attention
weights of chosen layers while a `capturing(...)` block is. The vision tower keeps its own implementation. No Dagster.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

ATTENTION = "omnithought_prefix_mask"
_HIDDEN: ContextVar = ContextVar("prefix_mask_hidden", default=None)
_CAPTURE: ContextVar = ContextVar("prefix_mask_capture", default=None)


def salient_prefix_mask(saliency, labels, image_tokens, budget: float, keep_recent: int = 1):
    """Which keys each query may not see beyond the causal mask: [B, L, L] bool (True: hidden).

    saliency [B, L, L]: how much query i attended to key j; labels [B, L] (-100 outside the reply); image_tokens [B, L]
    bool. A query i predicts the token at i + 1; where that is a reply token, the floor(budget * n) most salient of its n
    candidate keys (reply tokens before i - keep_recent, never image tokens) are hidden."""
    import torch

    batch, length = labels.shape
    reply = (labels != -100) & ~image_tokens
    predicts_reply = torch.zeros_like(reply)
    predicts_reply[:, :-1] = labels[:, 1:] != -100
    positions = torch.arange(length, device=labels.device)
    earlier = positions[None, :] < (positions[:, None] - keep_recent)  # [L(query), L(key)]
    candidates = predicts_reply[:, :, None] & reply[:, None, :] & earlier[None]
    counts = candidates.sum(-1)
    quota = torch.floor(counts.float() * budget + 1e-6).long()
    if quota.numel() == 0 or int(quota.max()) == 0:
        return torch.zeros(batch, length, length, dtype=torch.bool, device=labels.device)
    scores = saliency.float().masked_fill(~candidates, float("-inf"))
    order = scores.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, positions.expand_as(order).contiguous())
    return candidates & (rank < quota[..., None])


class BudgetSchedule:
    """The self-paced masking budget (see the module's docstring): `update(masked, unmasked)` once per optimizer step,
    with the step's mean divergence to the teacher under the masks and without them."""

    EPSILON = 1e-6  # keeps the ratio finite where the student already matches the teacher

    def __init__(self, max_budget: float, growth: float, warmup_steps: int, tolerance: float):
        self.max_budget, self.growth, self.warmup_steps, self.tolerance = max_budget, growth, warmup_steps, tolerance
        self.budget, self.steps, self.cost = 0.0, 0, 1.0

    def update(self, masked: float, unmasked: float) -> float:
        self.steps += 1
        self.cost = (masked + self.EPSILON) / (unmasked + self.EPSILON)
        if self.steps > self.warmup_steps and self.cost <= self.tolerance:
            self.budget = min(self.max_budget, round(self.budget + self.growth, 9))
        return self.budget

    def state(self) -> dict[str, Any]:
        return {"budget": self.budget, "steps": self.steps, "cost": self.cost}

    def load(self, state: dict[str, Any]) -> None:
        self.budget, self.steps, self.cost = state["budget"], state["steps"], state["cost"]


def use_prefix_masks(model) -> None:
    """Run `model`'s text decoder under ATTENTION, registered here with transformers (its vision tower keeps its own)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION, _attention)  # a mapping entry: registering again changes nothing
    AttentionMaskInterface.register(ATTENTION, _mask)
    base = _base_model(model)
    sub = "text_config" if "text_config" in getattr(type(base.config), "sub_configs", {}) else ""
    base.set_attn_implementation({sub: ATTENTION} if sub else ATTENTION)


def text_attention_layers(model) -> list:
    """The attention modules of the model's text decoder, in layer order."""
    text_config = _base_model(model).config.get_text_config()
    layers = [m for m in model.modules() if getattr(m, "layer_idx", None) is not None and getattr(m, "config", None) is text_config]
    if not layers:
        raise SystemExit(f"prefix_mask_kd: {type(_base_model(model)).__name__} has no text attention layers the mask can reach")
    return sorted(layers, key=lambda m: m.layer_idx)


def chosen_layers(model, indices: list[int]) -> list:
    layers = text_attention_layers(model)
    try:
        return [layers[i] for i in indices]
    except IndexError:
        raise SystemExit(f"prefix_mask_kd: saliency_layers {indices} out of range: the text decoder has {len(layers)} layers") from None


@contextmanager
def hiding(hidden):
    """Within: every ATTENTION mask also hides `hidden` ([B, L, L], True: hidden) (None: nothing more)."""
    token = _HIDDEN.set(hidden)
    try:
        yield
    finally:
        _HIDDEN.reset(token)


@contextmanager
def capturing(layers: list):
    """Within: the attention weights of `layers` (modules running under ATTENTION), heads and layers averaged, are summed
    into the yielded dict's "saliency" ([B, L, L], float32)."""
    record = {"modules": {id(m) for m in layers}, "count": 0, "saliency": None}
    token = _CAPTURE.set(record)
    try:
        yield record
    finally:
        _CAPTURE.reset(token)
        if record["count"]:
            record["saliency"] = record["saliency"] / record["count"]


def _mask(**kwargs):
    from transformers.masking_utils import sdpa_mask

    kwargs["allow_is_causal_skip"] = False  # an explicit mask, always: it is what the hidden pairs are added to
    mask = sdpa_mask(**kwargs)
    hidden = _HIDDEN.get()
    if hidden is None or mask is None:
        return mask
    queries, keys = mask.shape[-2:]
    if hidden.shape[-2:] != (queries, keys):
        raise RuntimeError(f"prefix mask for {tuple(hidden.shape[-2:])} query x key positions, the model attends {queries} x {keys}")
    return mask & ~hidden[:, None].to(mask.device)


def _attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    record = _CAPTURE.get()
    if record is not None and id(module) in record["modules"]:
        _record_weights(record, module, query, key, attention_mask, kwargs.get("scaling"))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _record_weights(record: dict, module, query, key, attention_mask, scaling) -> None:
    """Add this layer's attention probabilities, averaged over the heads, one head at a time (memory: [B, L, L])."""
    import torch

    with torch.no_grad():
        heads, kv_heads = query.shape[1], key.shape[1]
        scale = scaling if scaling is not None else getattr(module, "scaling", None) or 1 / math.sqrt(query.shape[-1])
        total = None
        for head in range(heads):
            scores = (query[:, head].float() @ key[:, head // (heads // kv_heads)].float().transpose(-1, -2)) * scale
            if attention_mask is not None:
                allowed = attention_mask[:, 0] if attention_mask.dtype == torch.bool else attention_mask[:, 0] > float("-inf")
                scores = scores.masked_fill(~allowed, float("-inf"))
            probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
            total = probs if total is None else total + probs
        layer = total / heads
        record["saliency"] = layer if record["saliency"] is None else record["saliency"] + layer
        record["count"] += 1


def _base_model(model):
    """The transformers model under a DeepSpeed engine or a peft wrapper."""
    model = getattr(model, "module", model)
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def build_trainer(counting_trainer, model, teacher, method: dict[str, Any], image_token_id: int, **trainer_kwargs):
    """The run's prefix_mask_kd trainer: the student's (and with `saliency: teacher` the teacher's) text decoder under
    ATTENTION, the layers whose attention ranks the tokens, the budget's schedule as a callback, kd's (teacher, settings)."""
    use_prefix_masks(model)
    ranker = model
    if method["saliency"] == "teacher":
        use_prefix_masks(teacher)
        ranker = teacher
    layers = chosen_layers(ranker, method["saliency_layers"])
    trainer = prefix_mask_trainer_class(counting_trainer)(model=model, **trainer_kwargs)
    trainer.distill = (teacher, method)
    trainer.prefix = (method, image_token_id, None, layers) if ranker is teacher else (method, image_token_id, layers, None)
    trainer.schedule = BudgetSchedule(method["max_budget"], method["growth"], method["warmup_steps"], method["tolerance"])
    trainer.add_callback(trainer.Schedule(trainer))
    return trainer


def prefix_mask_trainer_class(counting_trainer):
    """The KD trainer (`counting_trainer()`, sft.py's) whose student trains under salient-prefix masks (set up by
    build_trainer): `.prefix` is (settings, image token id, the student's saliency layers or None, the teacher's or None);
    its `.Schedule(trainer)` callback paces the budget once per optimizer step and keeps its state in the checkpoints."""
    import torch
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState

    from omnithought_dagster.train.distill import reply_divergence
    from omnithought_dagster.train.ranks import sum_across_ranks as _sum_across_ranks

    class PrefixMaskTrainer(counting_trainer()):
        prefix: tuple | None = None
        schedule: BudgetSchedule | None = None

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._step = {"masked": 0.0, "unmasked": 0.0, "tokens": 0}  # this optimizer step's, for the schedule
            self._window = {"hidden": 0, "predictions": 0}  # since the last log, for the metrics
            self._teacher = None  # the teacher's logits and (saliency: teacher) attention for the micro-batch
            self._in_force = 0.0  # the budget of the step being trained

        def teacher_logits(self, teacher, inputs):
            """kd's teacher pass, first: the unmasked pass measures against it, and with saliency from the teacher it
            records the teacher's attention."""
            _, _, _, teacher_layers = self.prefix
            if teacher_layers is None or self.schedule.budget <= 0:
                logits, saliency = super().teacher_logits(teacher, inputs), None
            else:
                with capturing(teacher_layers) as record:
                    logits = super().teacher_logits(teacher, inputs)
                saliency = record["saliency"]
            self._teacher = (logits, saliency)
            return logits

        def student_view(self, model, inputs):
            """Under a budget: a pass without gradients under the causal mask (the student's attention when it ranks the
            tokens, and its unmasked divergence, the pace's measure), then the masks for the training pass."""
            settings, image_token_id, student_layers, _ = self.prefix
            budget, labels = self.schedule.budget, inputs["labels"]
            self._in_force = budget
            self._window["predictions"] += int((labels[:, 1:] != -100).sum())
            teacher_logits, saliency = self._teacher
            self._teacher = None
            if budget <= 0:
                return hiding(None)
            with torch.no_grad(), capturing(student_layers or []) as record:
                logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
            _, values = reply_divergence(logits, teacher_logits, labels, settings)
            self._step["unmasked"] += float(values.sum())
            if student_layers is not None:
                saliency = record["saliency"]
            hidden = salient_prefix_mask(saliency, labels, inputs["input_ids"] == image_token_id, budget, settings["keep_recent"])
            self._window["hidden"] += int(hidden.sum())
            return hiding(hidden)

        def divergence_seen(self, values) -> None:
            """The masked pass's per-token divergences (without masks, also the unmasked ones)."""
            total = float(values.sum())
            self._step["masked"] += total
            self._step["tokens"] += values.numel()
            if self._in_force <= 0:
                self._step["unmasked"] += total

        def step_divergences(self) -> tuple[float, float]:
            """The mean per-token divergence of the optimizer step that ended under the masks and without them, over every
            rank (a collective)."""
            masked, unmasked = _sum_across_ranks(self._step["masked"]), _sum_across_ranks(self._step["unmasked"])
            tokens = _sum_across_ranks(float(self._step["tokens"]))
            self._step = {"masked": 0.0, "unmasked": 0.0, "tokens": 0}
            return (masked / tokens, unmasked / tokens) if tokens else (0.0, 0.0)

        def log(self, logs, *args, **kwargs):
            """The budget in force and the reply tokens hidden per prediction beside the KD parts."""
            if self.schedule is not None and "loss" in logs:
                logs["mask_budget"] = round(self._in_force, 6)  # the one the logged step trained under
                logs["masking_cost"] = round(self.schedule.cost, 6)  # its divergence under the masks / without them
                hidden, predictions = _sum_across_ranks(self._window["hidden"]), _sum_across_ranks(self._window["predictions"])
                logs["hidden_per_prediction"] = round(hidden / predictions, 4) if predictions else 0.0
                self._window = {"hidden": 0, "predictions": 0}
            super().log(logs, *args, **kwargs)

    class PrefixMaskSchedule(TrainerCallback, ExportableState):
        """Paces the budget after each optimizer step; its state rides in trainer_state.json's stateful_callbacks."""

        def __init__(self, trainer=None):
            self.trainer = trainer

        def on_train_begin(self, args, state, control, **kwargs):
            saved = (state.stateful_callbacks or {}).get(type(self).__name__)
            if isinstance(saved, dict) and saved.get("attributes", {}).get("schedule"):
                self.trainer.schedule.load(saved["attributes"]["schedule"])

        def on_step_end(self, args, state, control, **kwargs):
            self.trainer.schedule.update(*self.trainer.step_divergences())

        def state(self) -> dict:
            return {"args": {}, "attributes": {"schedule": self.trainer.schedule.state()}}

    PrefixMaskTrainer.Schedule = PrefixMaskSchedule
    return PrefixMaskTrainer
