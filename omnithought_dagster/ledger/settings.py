"""The project file's `costs:` section: prices per model, in one currency, versioned with every ledger row."""

from __future__ import annotations

from pydantic import Field

from omnithought_dagster.ids import content_id
from omnithought_dagster.settings_model import SettingsModel


class Price(SettingsModel):
    """What one model costs. A price left out stays unknown: the ledger's money is null where it would be needed."""

    input_per_million: float | None = Field(default=None, ge=0, description="per million prompt tokens")
    output_per_million: float | None = Field(default=None, ge=0, description="per million completion tokens")
    batch_discount: float = Field(default=0.0, ge=0, lt=1, description="share off token prices for requests sent through a batch API")
    gpu_hour: float | None = Field(default=None, ge=0, description="per hour of one leased GPU (self-hosted serving, training, evaluation)")


class CostsConfig(SettingsModel):
    """Prices keyed by a teacher's or judge's name (else its model), a student's name, or a model id."""

    currency: str = Field(default="USD", min_length=1, max_length=8)
    prices: dict[str, Price] = Field(default_factory=dict)

    @property
    def version(self) -> str:
        """The price table's id, stored in every ledger row priced with it (a changed price is a new version)."""
        return content_id("prices", self.model_dump(mode="json"))

    def price(self, *names: str | None) -> Price | None:
        """The first of `names` the table prices (a teacher's label, then its model, ...); None when none is."""
        for name in names:
            if name is not None and name in self.prices:
                return self.prices[name]
        return None
