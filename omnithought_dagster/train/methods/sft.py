"""Long-CoT SFT (`method: sft`, the default): what `Method` does."""

from omnithought_dagster.train.methods.base import Method

METHOD = Method()
