"""E2E NLG data: meaning representations (MR) paired with human references.

Reads the official CSV format (columns ``mr``, ``ref``) from a file or a folder, and makes an
E2E-style synthetic data set (project-made, offline) for the default job and the tests.
"""

from __future__ import annotations

import csv
import random
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

_SLOT = re.compile(r"\s*([^\[\],]+?)\s*\[([^\]]*)\]")


@dataclass(frozen=True)
class Example:
    mr: str
    ref: str

    def slots(self) -> dict[str, str]:
        """``name[Blue Spice], eatType[pub]`` -> ``{"name": "Blue Spice", "eatType": "pub"}``."""
        return {k.strip(): v.strip() for k, v in _SLOT.findall(self.mr)}


def read_e2e_csv(path: str | Path) -> list[Example]:
    """Rows of an E2E CSV file, in order. One-line UserErrors for missing/empty/malformed files."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        if not columns:
            raise UserError(f"data file {path} is empty")
        if "mr" not in columns or "ref" not in columns:
            raise UserError(f"data file {path} needs columns 'mr' and 'ref' (found: {', '.join(columns)})")
        reader.fieldnames = columns
        rows = [Example(r["mr"].strip(), (r["ref"] or "").strip()) for r in reader if (r.get("mr") or "").strip()]
    if not rows:
        raise UserError(f"data file {path} has no rows")
    return rows


def load_e2e(path: str | Path) -> list[Example]:
    """An E2E CSV file, or the training CSVs of a folder: every ``*.csv`` but ``testset*.csv``,
    which ``splitlora eval`` keeps for testing (so a folder never leaks the test set into training)."""
    path = Path(path)
    if path.is_dir():
        files = [f for f in sorted(path.glob("*.csv")) if not f.name.startswith("testset")]
        if not files:
            raise UserError(f"data folder {path} holds no training .csv files")
        return [ex for f in files for ex in read_e2e_csv(f)]
    return read_e2e_csv(path)


# ---- synthetic E2E-style data -----------------------------------------------------------------

_NAMES = ["The Eagle", "Blue Spice", "The Mill", "Zizzi", "Giraffe", "The Punter", "Aromi", "Cotto",
          "The Phoenix", "Wildwood", "Loch Fyne", "Strada", "Browns Cambridge", "The Rice Boat",
          "Fitzbillies", "Alimentum", "Midsummer House", "The Wrestlers", "Clowns", "Bibimbap House"]
_NEAR = ["Burger King", "Café Rouge", "The Sorrento", "Express by Holiday Inn", "Crowne Plaza Hotel",
         "Raja Indian Cuisine", "All Bar One", "The Portland Arms", "Avalon", "Ranch"]
_EAT = ["restaurant", "pub", "coffee shop"]
_FOOD = ["Italian", "French", "English", "Chinese", "Indian", "Japanese", "Fast food"]
_PRICE = ["cheap", "moderate", "high", "less than £20", "£20-25", "more than £30"]
_RATING = ["low", "average", "high", "1 out of 5", "3 out of 5", "5 out of 5"]
_AREA = ["city centre", "riverside"]


def synthetic_e2e(n: int, seed: int = 0) -> list[Example]:
    """``n`` E2E-style examples from templates; deterministic in ``seed``.

    Realistic enough that a model visibly learns the MR-to-text mapping within a few dozen steps.
    """
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        slots = {"name": rng.choice(_NAMES), "eatType": rng.choice(_EAT)}
        for key, values in (("food", _FOOD), ("priceRange", _PRICE), ("customer rating", _RATING),
                            ("area", _AREA), ("familyFriendly", ["yes", "no"]), ("near", _NEAR)):
            if rng.random() < 0.6:
                slots[key] = rng.choice(values)
        out.append(Example(", ".join(f"{k}[{v}]" for k, v in slots.items()), _realise(slots, rng)))
    return out


def _realise(s: dict[str, str], rng: random.Random) -> str:
    first = f"{s['name']} is a {s.get('food', '').lower() + ' ' if 'food' in s else ''}{s['eatType']}"
    if "area" in s:
        first += f" in the {s['area']}"
    if "near" in s:
        first += f" near {s['near']}"
    parts = [first + "."]
    if "priceRange" in s:
        price = s["priceRange"]
        parts.append(f"It has a {price} price range." if price in ("cheap", "moderate", "high")
                     else f"Prices are {price}.")
    if "customer rating" in s:
        parts.append(f"Customers rate it {s['customer rating']}.")
    if "familyFriendly" in s:
        parts.append("It is family friendly." if s["familyFriendly"] == "yes" else "It is not family friendly.")
    if rng.random() < 0.5 and len(parts) > 2:
        parts[1:] = rng.sample(parts[1:], len(parts) - 1)
    return " ".join(parts)
