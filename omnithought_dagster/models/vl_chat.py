"""Chat-formatted Qwen-VL inputs, for generation and for training, without torchvision.

The Qwen-VL processor classes need torchvision (their video processor), which has no CPU
build here; the PIL image processor works alone. So the chat template renders one
`<|image_pad|>` per image and it is expanded here to the image's visual token count
(grid_thw.prod() // merge_size**2), and `mm_token_type_ids` marks the image tokens (Qwen2-VL
and Qwen3-VL refuse to run without it; Qwen2.5-VL silently skips M-RoPE).

Text is data, never markup (README "Text is data"): a message's content is a string or a list of
parts - `{"type": "image"}`, `{"type": "text", "text": ...}` - and every such text is encoded as
plain text: the tokens of its characters, never a special or added token, whatever it holds
(`<|im_end|>`, `<|image_pad|>`, `<think>`). Only the chat template's own text and `{"type":
"markup", "text": ...}` parts, which our code writes (the `<think>` / `</think>` of the reply
format), are read as markup. The template is rendered with a sentinel where each text goes; its
pieces are tokenized as usual, each text through `plain_ids`.

Used by the transformers teacher backend, the SFT trainer (which masks everything but the
assistant's reply out of the loss) and the lmms-eval model plugin, so all three see exactly
the same token layout. No torch or transformers import at module level.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omnithought_dagster.markup import IMAGE_PLACEHOLDER

IMAGE_PAD = "<|image_pad|>"
IGNORE_INDEX = -100
# Where a text goes in a rendered template: private-use characters no template writes, around the text's number.
_SENTINEL_OPEN, _SENTINEL_CLOSE = "\U000f0000", "\U000f0001"
_SENTINEL = re.compile(f"{_SENTINEL_OPEN}(\\d+){_SENTINEL_CLOSE}")


class MarkupError(ValueError):
    """A text that cannot be encoded as plain text (the tokenizer still finds one of its added tokens in it), or markup
    where a format has text."""


# A Qwen-VL config's media token ids: its forward takes these positions for image or video features, or looks for
# images after a vision start.
MEDIA_TOKEN_FIELDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


class ImageTokensError(ValueError):
    """An example whose image tokens do not come out as many as its images give."""


@dataclass
class VLTokenizer:
    """A model folder's tokenizer and image processor, loaded once."""

    tokenizer: Any
    image_processor: Any
    image_token_id: int
    media_ids: frozenset[int] = frozenset()  # the tokens the model's forward reads as media: never to be sampled

    @classmethod
    def load(cls, model_dir: str | Path) -> VLTokenizer:
        from transformers import AutoConfig, AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        config = AutoConfig.from_pretrained(model_dir)
        media = {getattr(config, name, None) for name in MEDIA_TOKEN_FIELDS} - {None}
        return cls(
            AutoTokenizer.from_pretrained(model_dir),
            Qwen2VLImageProcessorPil.from_pretrained(model_dir),
            config.image_token_id,
            frozenset(int(i) for i in media | {config.image_token_id}),
        )

    def __post_init__(self) -> None:
        added = {int(i): str(token) for i, token in self.tokenizer.added_tokens_decoder.items()}
        self.added_ids = frozenset(added)
        self.added_tokens = sorted({token for token in added.values() if token}, key=len, reverse=True)  # matched in text as a whole
        self._added = re.compile("|".join(map(re.escape, self.added_tokens))) if self.added_tokens else None

    def plain_ids(self, text: str) -> list[int]:
        """`text` as the tokens of its characters: no special or added token, whatever the text holds. The text is cut
        right after the first character of every added token's string in it (the cut pieces cannot form one) and each
        piece tokenized with special tokens split; for byte-level BPE tokenizers (the Qwen family) the ids decode to
        `text` again. MarkupError if an added token still comes out, or the text holds a one-character added token
        (no cut can break it)."""
        pieces = [text]
        while self._added is not None and any(self._added.search(piece) for piece in pieces):
            cut = []
            for piece in pieces:
                last = 0
                for match in self._added.finditer(piece):
                    if len(match.group()) < 2:
                        raise MarkupError(f"text holds {match.group()!r}, a one-character added token of the tokenizer")
                    cut.append(piece[last : match.start() + 1])
                    last = match.start() + 1
                cut.append(piece[last:])
            pieces = [piece for piece in cut if piece]
        ids: list[int] = []
        for piece in pieces:
            ids += self.tokenizer(piece, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        if self.added_ids.intersection(ids):
            found = sorted({self.tokenizer.convert_ids_to_tokens(i) for i in self.added_ids.intersection(ids)})
            raise MarkupError(f"text the tokenizer reads as its added tokens {found} even when told not to")
        return ids

    def encode_prompt(self, messages: list[dict], images: list) -> dict[str, Any]:
        """Model inputs (batch of one, torch tensors) for generating the next assistant turn."""
        rendered, texts = self._render(messages, add_generation_prompt=True)
        vision, rendered = self._vision(rendered, images)
        return self._tensors([self._ids(rendered, texts)], vision)

    def encode_example(self, messages: list[dict], images: list, max_length: int | None = None) -> dict[str, Any] | None:
        """One training example: labels only on the last (assistant) turn, its end-of-turn token included.

        Returns None when the prompt alone is longer than max_length (the example cannot be
        trained on without cutting its images); a long reply is cut at max_length.
        """
        (prompt, reply), texts = self._prompt_and_reply(messages)
        vision, prompt = self._vision(prompt, images)
        prompt_ids, reply_ids = self._ids(prompt, texts), self._ids(reply, texts)
        if max_length is not None and len(prompt_ids) >= max_length:
            return None
        ids = (prompt_ids + reply_ids)[:max_length] if max_length else prompt_ids + reply_ids
        labels = ([IGNORE_INDEX] * len(prompt_ids) + reply_ids)[: len(ids)]
        return {"input_ids": ids, "labels": labels, "vision": vision}

    def example_length(self, messages: list[dict], image_sizes: list[tuple[int, int]]) -> tuple[int, int]:
        """(prompt tokens, prompt + reply tokens) of encode_example's output before any cut, from the images' (width,
        height) alone: no pixel is decoded. MarkupError when a text cannot be encoded as plain text, ImageTokensError when
        the image tokens do not come out as many as the images give."""
        (prompt, reply), texts = self._prompt_and_reply(messages)
        merge = self.image_processor.merge_size**2
        counts = [self.image_processor.get_number_of_image_patches(height, width, {}) // merge for width, height in image_sizes]
        prompt_ids = self._ids(self._expand(prompt, counts), texts)
        if prompt_ids.count(self.image_token_id) != sum(counts):
            raise ImageTokensError(f"{prompt_ids.count(self.image_token_id)} image tokens but the images give {sum(counts)}")
        return len(prompt_ids), len(prompt_ids) + len(self._ids(reply, texts))

    def _prompt_and_reply(self, messages: list[dict]) -> tuple[tuple[str, str], list[str]]:
        if not messages or messages[-1]["role"] != "assistant":
            raise ValueError("a training example must end with the assistant's turn")
        prompt, texts = self._render(messages[:-1], add_generation_prompt=True)
        full, texts = self._render(messages, add_generation_prompt=False)
        if not full.startswith(prompt):
            raise ValueError("the chat template does not render the prompt as a prefix of the conversation")
        return (prompt, full[len(prompt) :]), texts

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> tuple[str, list[str]]:
        """The chat template's text with a sentinel (private-use characters around a number) where each text of the
        messages goes, and those texts: the template never sees a character of them."""
        texts: list[str] = []

        def slot(text: str) -> str:
            texts.append(text)
            return f"{_SENTINEL_OPEN}{len(texts) - 1}{_SENTINEL_CLOSE}"

        shown = []
        for message in messages:
            content = message["content"]
            if isinstance(content, str):
                content = slot(content)
            else:
                parts = [
                    {"type": "text", "text": slot(part["text"]) if part.get("type") == "text" else part["text"]}
                    if part.get("type") in ("text", "markup")
                    else part
                    for part in content
                ]
                # Text and markup alone: one string (every template renders string content; some only that).
                content = "".join(part["text"] for part in parts) if all(p.get("type") == "text" for p in parts) else parts
            shown.append({**message, "content": content})
        return self.tokenizer.apply_chat_template(shown, tokenize=False, add_generation_prompt=add_generation_prompt), texts

    def _ids(self, rendered: str, texts: list[str]) -> list[int]:
        """Token ids of a rendered template: its own pieces as markup, each sentinel's text as plain text."""
        ids: list[int] = []
        for position, piece in enumerate(_SENTINEL.split(rendered)):
            if position % 2:
                ids += self.plain_ids(texts[int(piece)])
            elif piece:
                ids += self.tokenizer(piece, add_special_tokens=False)["input_ids"]
        return ids

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
        batch = self._tensors(
            [e["input_ids"] + [pad] * (width - len(e["input_ids"])) for e in examples], _concat([e["vision"] for e in examples])
        )
        batch["attention_mask"] = torch.tensor([[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"])) for e in examples])
        batch["labels"] = torch.tensor([e["labels"] + [IGNORE_INDEX] * (width - len(e["labels"])) for e in examples])
        return batch

    def _vision(self, text: str, images: list) -> tuple[dict | None, str]:
        """Image features and the text with each image pad expanded to its visual token count."""
        if not images:
            return None, self._expand(text, [])
        features = self.image_processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
        merge = self.image_processor.merge_size**2
        text = self._expand(text, [int(grid.prod()) // merge for grid in features["image_grid_thw"]])
        return {"pixel_values": features["pixel_values"], "image_grid_thw": features["image_grid_thw"]}, text

    def _tensors(self, rows: list[list[int]], vision: dict | None) -> dict[str, Any]:
        import torch

        input_ids = torch.tensor(rows)
        out: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "mm_token_type_ids": (input_ids == self.image_token_id).long(),
        }
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
    pieces = text.split(IMAGE_PLACEHOLDER)
    if n_images is not None and len(pieces) - 1 != n_images:
        raise ImageTokensError(f"{len(pieces) - 1} {IMAGE_PLACEHOLDER} placeholders but {n_images} images")
    parts: list[dict] = []
    for index, piece in enumerate(pieces):
        if index:
            parts.append({"type": "image"})
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def content_text(content: str | list[dict]) -> str:
    """A message's text as written: its text and markup parts joined (images left out)."""
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content if part.get("type") in ("text", "markup"))


def _concat(visions: list[dict | None]) -> dict | None:
    import torch

    present = [v for v in visions if v]
    if not present:
        return None
    return {key: torch.cat([v[key] for v in present]) for key in ("pixel_values", "image_grid_thw")}
