"""White-box token-level distillation (`method: kd`): the losses, and the teacher beside the student.

The student sees the same batch as in SFT; a frozen teacher model reads the same inputs, and at
every reply position (where the SFT loss is taken: the `<think>` reasoning, the answer, the end of
turn) the student's next-token distribution is pulled towards the teacher's:

- `forward_kl`: KL(teacher || student), mode-covering (Hinton et al.'s KD);
- `reverse_kl`: KL(student || teacher), mode-seeking (MiniLLM);
- `jsd`: the generalized Jensen-Shannon divergence of GKD (Agarwal et al., 2024),
  beta KL(teacher || M) + (1 - beta) KL(student || M) with M = beta teacher + (1 - beta) student.

Both distributions are softened by `temperature` and the divergence is scaled by T^2 (so its
gradients keep their size); with `top_k` only the teacher's k most likely tokens are compared, each
distribution renormalised over them. The loss is (1 - weight) * SFT + weight * divergence, both
averaged over the same reply tokens. The divergences are written here rather than taken from TRL:
GKDTrainer's generalized_jsd_loss has no top-k, and it needs TRL's SFT data path, which the lazy VL
examples replace. No Dagster; torch is imported where used.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def token_divergence(
    student_logits, teacher_logits, kind: str = "forward_kl", beta: float = 0.5, temperature: float = 1.0, top_k: int | None = None
):
    """The divergence at each position between the teacher's and the student's next-token distributions: logits [N, V]
    (the same vocabulary) -> [N]."""
    import torch
    import torch.nn.functional as F

    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence {kind!r} (one of {', '.join(DIVERGENCES)})")
    student = student_logits.float() / temperature
    teacher = teacher_logits.float() / temperature
    if top_k is not None and top_k < teacher.shape[-1]:
        teacher, index = teacher.topk(top_k, dim=-1)
        student = student.gather(-1, index)
    log_s, log_t = F.log_softmax(student, dim=-1), F.log_softmax(teacher, dim=-1)
    if kind == "forward_kl":
        value = (log_t.exp() * (log_t - log_s)).sum(-1)
    elif kind == "reverse_kl":
        value = (log_s.exp() * (log_s - log_t)).sum(-1)
    else:
        if not 0 < beta < 1:
            raise ValueError(f"jsd needs 0 < beta < 1, not {beta}")
        log_m = torch.logsumexp(torch.stack([log_t + math.log(beta), log_s + math.log(1 - beta)]), dim=0)
        value = beta * (log_t.exp() * (log_t - log_m)).sum(-1) + (1 - beta) * (log_s.exp() * (log_s - log_m)).sum(-1)
    return value * temperature**2


def reply_divergence(student_logits, teacher_logits, labels, settings: dict[str, Any], num_items=None):
    """The divergence summed over a batch's reply positions (labels != -100, the next token's), divided by `num_items`
    (the Trainer's count of label tokens across the accumulated batches, as the SFT loss is) or by their own number."""
    vocab = min(student_logits.shape[-1], teacher_logits.shape[-1])  # padded vocabularies may differ in their padding
    targets = labels[:, 1:] != -100
    student = student_logits[:, :-1, :vocab][targets]
    teacher = teacher_logits[:, :-1, :vocab][targets]
    values = token_divergence(student, teacher, settings["divergence"], settings["beta"], settings["temperature"], settings["top_k"])
    total = values.sum()
    denominator = num_items if num_items is not None else max(1, values.numel())
    return total / denominator, values.detach()


def check_teacher(student_vl, teacher_vl, teacher_dir: str | Path) -> None:
    """Refuse a teacher that would see other inputs than the student: another vocabulary or image processing."""
    if student_vl.tokenizer.get_vocab() != teacher_vl.tokenizer.get_vocab():
        raise SystemExit(
            f"kd: the teacher {teacher_dir} has another vocabulary than the student; token-level distillation needs the same tokenizer"
        )
    keys = ("patch_size", "merge_size", "temporal_patch_size", "min_pixels", "max_pixels", "image_mean", "image_std")
    differ = [k for k in keys if _processor_value(student_vl.image_processor, k) != _processor_value(teacher_vl.image_processor, k)]
    if differ or student_vl.image_token_id != teacher_vl.image_token_id:
        raise SystemExit(
            f"kd: the teacher {teacher_dir} processes images differently ({', '.join(differ) or 'image token'}); "
            "the student's inputs would not be the teacher's"
        )


def _processor_value(processor, key: str):
    value = getattr(processor, key, None)
    if value is None and key in ("min_pixels", "max_pixels"):
        value = (getattr(processor, "size", None) or {}).get("shortest_edge" if key == "min_pixels" else "longest_edge")
    return list(value) if isinstance(value, (list, tuple)) else value


def load_teacher(method: dict[str, Any], student_vl, precision: str, device):
    """The method's teacher, checked to read the student's inputs, frozen in eval mode on the rank's device in the training
    precision (a whole copy per rank: ZeRO 0-2)."""
    import torch
    from transformers import AutoModelForImageTextToText

    from omnithought_dagster.models.vl_chat import VLTokenizer

    check_teacher(student_vl, VLTokenizer.load(method["teacher_dir"]), method["teacher"])
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    teacher = AutoModelForImageTextToText.from_pretrained(method["teacher_dir"], dtype=dtype)
    teacher.config.use_cache = False
    teacher.requires_grad_(False)
    return teacher.eval().to(device)
