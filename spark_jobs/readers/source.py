"""What every reader yields: the raw interactions, texts or vectors of one source."""

from __future__ import annotations

from dataclasses import dataclass, field

from pyspark.sql import DataFrame


@dataclass
class RawSource:
    """What every reader yields.

    interactions: user, item (string raw ids), rating (double), timestamp (a number, only its order within a user is used:
        decimal(38,18) from the tables, long from the generator), split (train/val/test or null)
    item_text: item, title, text (or None); user_text: user, text (or None)
    user_text_is_profile: True when user texts are finished profiles (use as is); False when they are
        demographics that the profile stage extends with the user's train items.
    """

    name: str
    interactions: DataFrame
    numeric_ids: bool
    has_split: bool
    files: list[str]
    item_text: DataFrame | None = None
    user_text: DataFrame | None = None
    user_text_is_profile: bool = False
    # file -> {"rows": n, "malformed": m}: what the malformed-row policy counted (and dropped, if tolerated)
    malformed: dict[str, dict[str, int]] = field(default_factory=dict)
    # kind -> (raw, vector): LLM-side vectors the source brings itself (embedding.encoder=source)
    vectors: dict[str, DataFrame] | None = None
