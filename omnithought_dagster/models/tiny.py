"""Tiny random-weight Qwen-VL models, built offline and deterministically (no hub exists here).

`build_tiny_model(spec, folder)` writes a complete Hugging Face model folder: config and
safetensors weights of a Qwen2-VL / Qwen2.5-VL / Qwen3-VL ForConditionalGeneration with a few
hundred thousand parameters, a byte-level BPE tokenizer trained here on a fixed corpus with
the Qwen special tokens and chat template, and the image processor config. vLLM serves it,
transformers loads it, DeepSpeed trains it. The weights are random: generated text is
gibberish, but structurally valid under constrained decoding, which is all the pipeline
needs to have real work to do. Real traces need a real teacher (see the README).

Building is idempotent: a folder whose manifest matches the spec is left alone; a new build
goes to a temporary sibling and is renamed into place, so a half-built model is never used.
"""

from __future__ import annotations

import json
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from omnithought_dagster.ids import content_id

MANIFEST = "omnithought_tiny_model.json"
BUILDER_VERSION = 1

IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD, VISION_PAD = (
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|vision_pad|>",
)
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, VISION_PAD, IMAGE_PAD, VIDEO_PAD]
# Reasoning delimiters are ordinary added tokens (not special): they must survive decoding.
ADDED_TOKENS = ["<think>", "</think>"]

# Qwen2-VL's chat template, reduced to text and images (what this pipeline sends).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    """Shape of a tiny model. The defaults give ~0.3M parameters, ~1.3 MB on disk."""

    name: str
    family: str = "qwen2_vl"  # qwen2_vl | qwen2_5_vl | qwen3_vl
    hidden_size: int = 64
    layers: int = 2
    heads: int = 2  # head_dim 32: vLLM's CPU attention supports head sizes >= 32
    kv_heads: int = 1
    intermediate_size: int = 128
    vision_depth: int = 2
    vision_hidden: int = 32
    vision_heads: int = 1
    bpe_vocab: int = 1024
    max_positions: int = 4096
    min_pixels: int = 28 * 28 * 4
    max_pixels: int = 224 * 224  # images are resized to at most ~64 visual tokens
    seed: int = 0

    @property
    def fingerprint(self) -> str:
        from omnithought_dagster.seed.sources.synthetic import GENERATOR_VERSION  # the tokenizer's corpus

        return content_id("tiny-model", {**asdict(self), "builder": BUILDER_VERSION, "corpus": GENERATOR_VERSION})


TINY_TEACHER = TinySpec(name="tiny-qwen2vl-teacher", family="qwen2_vl", seed=1)
# The student: one layer and a narrower MLP (~0.2M parameters), the same tokenizer as the
# teacher (same corpus and vocabulary size), so the teacher's traces tokenize identically.
TINY_STUDENT = TinySpec(name="tiny-qwen2vl-student", family="qwen2_vl", layers=1, intermediate_size=96, vision_depth=1, seed=2)
# A second teacher to compare with the first (`teachers:`): one layer more and its own random weights, the same tokenizer.
TINY_TEACHER_B = TinySpec(name="tiny-qwen2vl-teacher-b", family="qwen2_vl", layers=3, seed=3)
# `model: tiny:<key>` in the project file names one of these.
TINY_MODELS: dict[str, TinySpec] = {"teacher": TINY_TEACHER, "teacher-b": TINY_TEACHER_B, "student": TINY_STUDENT}


def build_tiny_model(spec: TinySpec, folder: str | Path) -> Path:
    """Build the model into `folder` unless a build of the same spec is already there."""
    folder = Path(folder)
    if is_built(spec, folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.parent / f".{folder.name}.{uuid.uuid4().hex}.tmp"
    try:
        _build(spec, staging)
        (staging / MANIFEST).write_text(json.dumps({"spec": asdict(spec), "fingerprint": spec.fingerprint}, indent=2))
        swap_into_place(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def is_built(spec: TinySpec, folder: str | Path) -> bool:
    return manifest_matches(folder, spec.fingerprint)


def manifest_matches(folder: str | Path, fingerprint: str) -> bool:
    """A built model's folder whose manifest names this fingerprint (a missing or unreadable one does not)."""
    try:
        return json.loads((Path(folder) / MANIFEST).read_text())["fingerprint"] == fingerprint
    except (OSError, ValueError, KeyError):
        return False


def swap_into_place(built: Path, folder: Path) -> None:
    """A finished build replaces what `folder` held (a reader finds the old model or the new one, never half of one)."""
    if folder.exists():
        shutil.rmtree(folder)
    built.rename(folder)


def _build(spec: TinySpec, out: Path) -> None:
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    tokenizer = _train_tokenizer(spec)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    vocab_size = -(-len(tokenizer) // 64) * 64
    config = _model_config(spec, vocab_size, ids)
    model_class = _model_class(spec.family)
    torch.manual_seed(spec.seed)
    model = model_class(config)
    model.generation_config.eos_token_id = [ids[IM_END], ids[ENDOFTEXT]]
    model.generation_config.pad_token_id = ids[ENDOFTEXT]
    model.generation_config.bos_token_id = None
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    _image_processor(spec).save_pretrained(out)
    (out / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2))


def _train_tokenizer(spec: TinySpec):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.bpe_vocab,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=None,
        additional_special_tokens=SPECIAL_TOKENS[1:],
        model_max_length=spec.max_positions,
        clean_up_tokenization_spaces=False,
    )
    fast.add_tokens(ADDED_TOKENS)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _corpus() -> list[str]:
    """A fixed text corpus: the synthetic source's questions and answers plus reasoning words."""
    from omnithought_dagster.seed.sources.synthetic import SyntheticReader

    lines = []
    for record in SyntheticReader(600, seed=0, image_size=128).records():
        lines.append(record.question)
        lines.append(f"The answer is {record.answer}.")
        lines.extend(record.choices or [])
    lines += [
        "Let me think step by step. First, I look at the image carefully. Then I count, compare and compute.",
        "So the final answer is",
        "Therefore,",
        "reasoning",
        "final_answer",
        '{"reasoning": "',
        '", "final_answer": "',
        '"}',
        "<think>",
        "</think>",
        "Answer:",
        "\\boxed{",
        "}",
        "0123456789",
        "+ - * / = ( ) . , % ?",
        "ABCDEFGHIJKLMNOPQRSTUVWXYZ",
        "abcdefghijklmnopqrstuvwxyz",
    ]
    return lines


def _model_config(spec: TinySpec, vocab_size: int, ids: dict[str, int]):
    head_dim = spec.hidden_size // spec.heads
    half = head_dim // 2
    mrope = [half - 2 * (half // 3), half // 3, half // 3]  # temporal, height, width; sums to head_dim / 2
    text = {
        "hidden_size": spec.hidden_size,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "intermediate_size": spec.intermediate_size,
        "vocab_size": vocab_size,
        "max_position_embeddings": spec.max_positions,
        "bos_token_id": None,
        "eos_token_id": ids[IM_END],
        "pad_token_id": ids[ENDOFTEXT],
        "tie_word_embeddings": True,
    }
    common = {
        "image_token_id": ids[IMAGE_PAD],
        "video_token_id": ids[VIDEO_PAD],
        "vision_start_token_id": ids[VISION_START],
        "vision_end_token_id": ids[VISION_END],
        "tie_word_embeddings": True,
    }
    if spec.family == "qwen2_vl":
        from transformers import Qwen2VLConfig

        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope}
        vision = {
            "depth": spec.vision_depth,
            "embed_dim": spec.vision_hidden,
            "hidden_size": spec.hidden_size,
            "num_heads": spec.vision_heads,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        }
        return Qwen2VLConfig(text_config=text, vision_config=vision, **common)
    if spec.family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig

        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope}
        vision = {
            "depth": spec.vision_depth,
            "hidden_size": spec.vision_hidden,
            "out_hidden_size": spec.hidden_size,
            "num_heads": spec.vision_heads,
            "intermediate_size": spec.vision_hidden * 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,
            "fullatt_block_indexes": [spec.vision_depth - 1],
        }
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **common)
    if spec.family == "qwen3_vl":
        from transformers import Qwen3VLConfig

        text["head_dim"] = head_dim
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope, "mrope_interleaved": True}
        vision = {
            "depth": spec.vision_depth,
            "hidden_size": spec.vision_hidden,
            "out_hidden_size": spec.hidden_size,
            "num_heads": spec.vision_heads,
            "intermediate_size": spec.vision_hidden * 2,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "num_position_embeddings": 256,
            "deepstack_visual_indexes": [0],
        }
        return Qwen3VLConfig(text_config=text, vision_config=vision, **common)
    raise ValueError(f"unknown tiny model family {spec.family!r}; choose qwen2_vl, qwen2_5_vl or qwen3_vl")


def _model_class(family: str):
    import transformers

    return {
        "qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
        "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
        "qwen3_vl": transformers.Qwen3VLForConditionalGeneration,
    }[family]


def _image_processor(spec: TinySpec):
    # The PIL flavour needs no torchvision (the main environment has none); the saved config
    # names the plain Qwen2VLImageProcessor, so each loader picks its own implementation.
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    patch = 16 if spec.family == "qwen3_vl" else 14
    return Qwen2VLImageProcessorPil(
        min_pixels=spec.min_pixels,
        max_pixels=spec.max_pixels,
        patch_size=patch,
        merge_size=2,
        temporal_patch_size=2,
        image_mean=[0.48145466, 0.4578275, 0.40821073] if patch == 14 else [0.5, 0.5, 0.5],
        image_std=[0.26862954, 0.26130258, 0.27577711] if patch == 14 else [0.5, 0.5, 0.5],
    )
