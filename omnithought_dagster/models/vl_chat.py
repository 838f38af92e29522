"""Chat-formatted Qwen-VL inputs, for generation and for training, without torchvision.

The Qwen-VL processor classes need torchvision (their video processor), which has no CPU
build here; the PIL image processor works alone. So the chat template renders one
`<|image_pad|>` per image and it is expanded here to the image's visual token count
(grid_thw.prod() // merge_size**2), and `mm_token_type_ids` marks the image tokens (Qwen2-VL
and Qwen3-VL refuse to run without it; Qwen2.5-VL silently skips M-RoPE).

Used by the transformers teacher backend, the SFT trainer (which masks everything but the
assistant's reply out of the loss) and the lmms-eval model plugin, so all three see exactly
the same token layout. No torch or transformers import at module level.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

IMAGE_PAD = "<|image_pad|>"
PLACEHOLDER = "<image>"  # what exported training data puts where an image goes
IGNORE_INDEX = -100


@dataclass
class VLTokenizer:
    """A model folder's tokenizer and image processor, loaded once."""

    tokenizer: Any
    image_processor: Any
    image_token_id: int

    @classmethod
    def load(cls, model_dir: str | Path) -> "VLTokenizer":
        from transformers import AutoConfig, AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        config = AutoConfig.from_pretrained(model_dir)
        return cls(AutoTokenizer.from_pretrained(model_dir), Qwen2VLImageProcessorPil.from_pretrained(model_dir), config.image_token_id)

    def encode_prompt(self, messages: list[dict], images: list) -> dict[str, Any]:
        """Model inputs (batch of one, torch tensors) for generating the next assistant turn."""
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        vision, text = self._vision(text, images)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._tensors([ids], vision)

    def encode_example(self, messages: list[dict], images: list, max_length: int | None = None) -> dict[str, Any] | None:
        """One training example: labels only on the last (assistant) turn, its end-of-turn token included.

        Returns None when the prompt alone is longer than max_length (the example cannot be
        trained on without cutting its images); a long reply is cut at max_length.
        """
        prompt, reply = self._prompt_and_reply(messages)
        vision, prompt = self._vision(prompt, images)
        prompt_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        reply_ids = self.tokenizer(reply, add_special_tokens=False)["input_ids"]
        if max_length is not None and len(prompt_ids) >= max_length:
            return None
        ids = (prompt_ids + reply_ids)[:max_length] if max_length else prompt_ids + reply_ids
        labels = ([IGNORE_INDEX] * len(prompt_ids) + reply_ids)[:len(ids)]
        return {"input_ids": ids, "labels": labels, "vision": vision}

    def example_length(self, messages: list[dict], image_sizes: list[tuple[int, int]]) -> tuple[int, int]:
        """(prompt tokens, prompt + reply tokens) of encode_example's output before any cut, from the images' (width,
        height) alone: no pixel is decoded."""
        prompt, reply = self._prompt_and_reply(messages)
        merge = self.image_processor.merge_size ** 2
        counts = [self.image_processor.get_number_of_image_patches(height, width, {}) // merge for width, height in image_sizes]
        prompt = self._expand(prompt, counts)
        n_prompt = len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        return n_prompt, n_prompt + len(self.tokenizer(reply, add_special_tokens=False)["input_ids"])

    def _prompt_and_reply(self, messages: list[dict]) -> tuple[str, str]:
        if not messages or messages[-1]["role"] != "assistant":
            raise ValueError("a training example must end with the assistant's turn")
        prompt = self.tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        full = self.tokenizer.apply_chat_template(messages, tokenize=False)
        if not full.startswith(prompt):
            raise ValueError("the chat template does not render the prompt as a prefix of the conversation")
        return prompt, full[len(prompt):]

    @staticmethod
    def _expand(text: str, counts: list[int]) -> str:
        """Each image pad repeated to its image's visual token count."""
        pieces = text.split(IMAGE_PAD)
        if len(pieces) - 1 != len(counts):
            raise ValueError(f"{len(pieces) - 1} image placeholders but {len(counts)} images")
        return pieces[0] + "".join(IMAGE_PAD * count + piece for count, piece in zip(counts, pieces[1:], strict=True))

    def collate(self, examples: list[dict]) -> dict[str, Any]:
        """Right-padded batch of encode_example outputs, images concatenated in order."""
        import torch

        width = max(len(e["input_ids"]) for e in examples)
        pad = self.tokenizer.pad_token_id
        batch = self._tensors([e["input_ids"] + [pad] * (width - len(e["input_ids"])) for e in examples],
                              _concat([e["vision"] for e in examples]))
        batch["attention_mask"] = torch.tensor([[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"])) for e in examples])
        batch["labels"] = torch.tensor([e["labels"] + [IGNORE_INDEX] * (width - len(e["labels"])) for e in examples])
        return batch

    def _vision(self, text: str, images: list) -> tuple[dict | None, str]:
        """Image features and the text with each image pad expanded to its visual token count."""
        if not images:
            return None, self._expand(text, [])
        features = self.image_processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
        merge = self.image_processor.merge_size ** 2
        text = self._expand(text, [int(grid.prod()) // merge for grid in features["image_grid_thw"]])
        return {"pixel_values": features["pixel_values"], "image_grid_thw": features["image_grid_thw"]}, text

    def _tensors(self, rows: list[list[int]], vision: dict | None) -> dict[str, Any]:
        import torch

        input_ids = torch.tensor(rows)
        out: dict[str, Any] = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                               "mm_token_type_ids": (input_ids == self.image_token_id).long()}
        if vision:
            out.update(vision)
        return out


def load_vl_model(folder: str | Path, device: str = "cpu") -> tuple[VLTokenizer, Any]:
    """A model folder's inputs builder and its model (fp32, eval mode, on `device`), without progress bars."""
    import torch
    from transformers import AutoModelForImageTextToText
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    return VLTokenizer.load(folder), model


def user_content(text: str, n_images: int | None = None) -> list[dict]:
    """An exported user turn ("<image>...question") as chat content parts, images where the placeholders were."""
    pieces = text.split(PLACEHOLDER)
    if n_images is not None and len(pieces) - 1 != n_images:
        raise ValueError(f"{len(pieces) - 1} {PLACEHOLDER} placeholders but {n_images} images")
    parts: list[dict] = []
    for index, piece in enumerate(pieces):
        if index:
            parts.append({"type": "image"})
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def _concat(visions: list[dict | None]) -> dict | None:
    import torch

    present = [v for v in visions if v]
    if not present:
        return None
    return {key: torch.cat([v[key] for v in present]) for key in ("pixel_values", "image_grid_thw")}
