"""Small raw datasets written to disk for tests: known counts, optional text, deliberate defects."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def interaction_rows(num_users: int = 40, num_items: int = 30, per_user: int = 8, seed: int = 0) -> list[tuple[int, int, float, int]]:
    rng = np.random.default_rng(seed)
    rows = []
    for user in range(num_users):
        for item in rng.choice(num_items, size=per_user, replace=False):
            rows.append((user + 100, int(item) + 500, float(rng.integers(1, 6)), int(rng.integers(10**8, 10**9))))
    return rows


def write_csv_source(directory: Path, rows=None, item_text: bool = True, user_text: bool = False, header: str = "user,item,rating,timestamp") -> dict:
    """Writes interactions.csv (+ items.csv / users.csv); returns the `source.*` overrides."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = interaction_rows() if rows is None else rows
    lines = [header] + [",".join(str(v) for v in row) for row in rows]
    (directory / "interactions.csv").write_text("\n".join(lines) + "\n")
    source = {
        "source.format": "csv",
        "source.interactions": str(directory / "interactions.csv"),
        "source.columns.rating": "rating",
        "source.columns.timestamp": "timestamp",
    }
    if item_text:
        items = sorted({row[1] for row in rows})
        text = ["item,text"] + [f'{i},"Item {i}, a ""thing"" of genre {i % 5}"' for i in items]
        (directory / "items.csv").write_text("\n".join(text) + "\n")
        source["source.item_text"] = str(directory / "items.csv")
    if user_text:
        users = sorted({row[0] for row in rows})
        text = ["user,text"] + [f"{u},User {u} likes genre {u % 5}" for u in users]
        (directory / "users.csv").write_text("\n".join(text) + "\n")
        source["source.user_text"] = str(directory / "users.csv")
    return source


def overrides(mapping: dict) -> list[str]:
    return [f"{key}={value}" for key, value in mapping.items()]
