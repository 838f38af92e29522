"""The project file's seed sections: `seed:` (how records are checked) and each source's kind and fields."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, PrivateAttr, ValidationInfo, field_validator, model_serializer, model_validator

from omnithought_dagster.settings_model import SOURCE_NAME_PATTERN, SettingsModel, resolve_path


class SeedSettings(SettingsModel):
    """Limits applied to every seed record; a record over a limit is quarantined with a reason."""

    max_image_pixels: int = Field(default=40_000_000, gt=0, description="width x height above this is oversized_image")
    max_image_bytes: int = Field(default=50 * 1024 * 1024, gt=0)
    max_question_chars: int = Field(default=8000, gt=0)
    max_images_per_sample: int = Field(default=16, gt=0)
    require_image: bool = Field(default=True, description="a record with no image is quarantined (no_image)")
    near_duplicate_max_distance: int = Field(
        default=4, ge=-1, le=32, description="perceptual-hash Hamming distance marking near duplicates; -1 turns marking off"
    )
    workers: int = Field(
        default=0,
        ge=0,
        le=1024,
        description=(
            "processes that read, decode and hash a source's images: 0 = one per CPU core the step may use; 1 = the step's "
            "own process. A source under 256 records per worker uses fewer (starting a process costs ~1-2 s)"
        ),
    )

    def output_settings(self) -> dict[str, Any]:
        """What changes seed_pool's rows (hashed into its code version): how many processes read them does not."""
        return self.model_dump(mode="json", exclude={"workers"})


class FieldMap(SettingsModel):
    """Where a record keeps each field: a dotted path into nested objects (`meta.id`), or a JMESPath
    expression for lists and filters (`texts[0].user`, `conversations[?from=='human'] | [0].value`)."""

    id: str | None = "id"
    question: str = "question"
    answer: str = "answer"
    image: str = "image"
    choices: str | None = "choices"
    answer_type: str | None = "answer_type"
    question_type: str | None = "question_type"  # MathVista's multi_choice / free_form; multi_choice wins over answer_type
    tags: str | None = "tags"
    difficulty: str | None = "difficulty"

    @field_validator("*")
    @classmethod
    def _valid_path(cls, value: str | None) -> str | None:
        if value:
            from omnithought_dagster.fieldpath import get_path

            try:
                get_path({}, value)
            except Exception as exc:  # jmespath's ParseError / LexerError name the position
                raise ValueError(f"{value!r} is neither a dotted path nor a valid JMESPath expression: {exc}") from None
        return value


class _SourceBase(SettingsModel):
    name: str = Field(pattern=SOURCE_NAME_PATTERN, description="partition key of this source")
    description: str = ""


# The synthetic source's task families (sources/synthetic.py draws each; a test holds the two together).
SYNTHETIC_FAMILIES = ("counting", "bar_chart", "arithmetic", "geometry", "table", "spatial")


class SyntheticSourceConfig(_SourceBase):
    """Procedural visual reasoning questions rendered with PIL: the embedded default."""

    kind: Literal["synthetic"]
    n_samples: int = Field(default=400, gt=0, le=10_000_000)
    seed: int = 0
    start_index: int = Field(default=0, ge=0, description="first sample index (held-out benchmarks use a range of their own)")
    image_size: int = Field(default=320, ge=128, le=2048)
    families: list[str] | None = Field(default=None, description="task families to draw from; default all")
    question_text: Literal["image_only", "with_content"] = Field(  # dumped only when set: code versions stay as they were
        default="image_only",
        description=(
            "image_only: what a question is about is only in the image; with_content: the question also says it in text "
            "(expression, table rows, bar values, lengths; counting and spatial stay image-only) and the metadata holds a "
            "worked solution - the sandbox's variant, where a small model can learn some families"
        ),
    )

    @model_serializer(mode="wrap")
    def _without_new_defaults(self, handler):
        dumped = handler(self)
        if isinstance(dumped, dict) and self.question_text == "image_only":  # what every code version hashed before it existed
            dumped.pop("question_text", None)
        return dumped

    @field_validator("families")
    @classmethod
    def _known_families(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return value
        unknown = sorted(set(value) - set(SYNTHETIC_FAMILIES))
        if unknown or not value:
            raise ValueError(f"unknown task families {unknown}; choose from {sorted(SYNTHETIC_FAMILIES)}")
        return value


MultiTurn = Literal["first", "each"]


MULTI_TURN_DESCRIPTION = (
    "conversations with several user turns: `first` keeps the first question/answer pair (later turns go to "
    "metadata), `each` makes every user turn its own sample; either way a turn gets only the images its own <image> "
    "placeholders reference (a turn without any refers to the images shown before it)"
)


class _FileSourceBase(_SourceBase):
    """Sources read from files, whose records name image files."""

    @model_validator(mode="after")
    def _multi_turn_needs_conversations(self):
        if getattr(self, "multi_turn", "first") == "each" and getattr(self, "format", "llava") == "flat":
            raise ValueError("multi_turn: each splits conversations; a flat source has none (use format: llava)")
        return self

    # The folders a manifest's source may read (set by manifests.py, never from a file; None: anywhere).
    _read_roots: tuple[str, ...] | None = PrivateAttr(default=None)

    allowed_image_roots: list[str] = Field(
        default_factory=list,
        description=(
            "folders besides image_root that image paths may point into (absolute paths, e.g. those "
            "`datasets` writes into Parquet); any other path outside image_root is path_escape"
        ),
    )

    @field_validator("allowed_image_roots")
    @classmethod
    def _resolve_roots(cls, value: list[str], info: ValidationInfo) -> list[str]:
        return [resolve_path(root, info) for root in value]


class JsonSourceConfig(_FileSourceBase):
    """JSON (an array of records) or JSONL; `flat` question/answer/image records or LLaVA conversations."""

    kind: Literal["json"]
    path: str
    image_root: str | None = Field(default=None, description="folder image paths are relative to; default the file's folder")
    format: Literal["flat", "llava"] = "flat"
    fields: FieldMap = FieldMap()
    multi_turn: MultiTurn = Field(default="first", description=MULTI_TURN_DESCRIPTION + " (format: llava)")

    _resolve = field_validator("path", "image_root")(resolve_path)


class HFSourceConfig(_FileSourceBase):
    """Parquet files / HF `datasets.save_to_disk` folders; the image column is the HF Image struct."""

    kind: Literal["hf"]
    path: str
    split: str | None = Field(default=None, description="for a DatasetDict folder: which split; default all")
    image_root: str | None = Field(default=None, description="where Image structs with only a path look; default the data folder")
    format: Literal["flat", "llava"] = Field(
        default="flat",
        description=(
            "flat: one question/answer per row through `fields`; llava: a `conversations` column of {from, value} turns "
            "(LLaVA-OneVision's parquet), the id and image columns from `fields`"
        ),
    )
    fields: FieldMap = FieldMap()
    multi_turn: MultiTurn = Field(default="first", description=MULTI_TURN_DESCRIPTION + " (format: llava)")

    _resolve = field_validator("path", "image_root")(resolve_path)


class ShareGPTSourceConfig(_FileSourceBase):
    """ShareGPT / LLaMA-Factory records: a message list plus an images list (JSON or JSONL)."""

    kind: Literal["sharegpt"]
    path: str
    image_root: str | None = None
    messages_key: str = "messages"
    images_key: str = "images"
    role_key: str = "role"
    content_key: str = "content"
    user_role: str = "user"
    assistant_role: str = "assistant"
    system_role: str = "system"
    id_key: str | None = "id"
    multi_turn: MultiTurn = Field(default="first", description=MULTI_TURN_DESCRIPTION)

    _resolve = field_validator("path", "image_root")(resolve_path)


SourceConfig = Annotated[
    SyntheticSourceConfig | JsonSourceConfig | HFSourceConfig | ShareGPTSourceConfig,
    Field(discriminator="kind"),
]
