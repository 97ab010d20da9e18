"""Real benchmark data and deterministic "systems" for checking the metrics against official numbers.

Helpers shared by the test modules. A plain module (no ``conftest.py`` here): other suites import
names from ``tests/conftest.py`` as module ``conftest``, which a second one would shadow.

The systems are built from the public test sets in ``../shared/data`` so that the numbers in
``data/official_scores.json`` (computed once with the official scripts, see that file) can be
reproduced exactly:

* E2E template: a fixed sentence plan filled from each MR's slots (a rule-based baseline).
* E2E human: for MRs with at least two references, the last reference is the output and the
  others are its references (real human text, like a strong system's output).
* WebNLG / DART human: the same leave-one-out split on a fixed sample of entries with at least
  two texts.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

DATA_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data"
OFFICIAL = Path(__file__).resolve().parent / "data" / "official_scores.json"
# Character repairs that the E2E script applies when it reads the reference CSV.
E2E_REPAIRS = (("Ł", "£"), ("Â£", "£"), ("Ã©", "é"), ("ã©", "é"))
WEBNLG_UNSEEN = frozenset(["MeanOfTransportation", "CelestialBody", "Politician", "Athlete", "Artist"])


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"benchmark data not found: {path}")
    return path


def e2e_template(mr: str) -> str:
    """A template realisation of an E2E MR such as ``name[X], eatType[pub], food[Thai]``."""
    slots = {key.strip(): value for key, value in re.findall(r"([^,\[]+)\[([^\]]*)\]", mr)}
    text = f"{slots.get('name', 'It')} is a {slots.get('eatType', 'place')}"
    if "food" in slots:
        text += f" serving {slots['food']} food"
    if "area" in slots:
        text += f" in the {slots['area']}"
    if "near" in slots:
        text += f" near {slots['near']}"
    text += "."
    if "priceRange" in slots:
        text += f" It has a {slots['priceRange']} price range."
    if "customer rating" in slots:
        text += f" Its customer rating is {slots['customer rating']}."
    if "familyFriendly" in slots:
        text += " It is " + ("" if slots["familyFriendly"] == "yes" else "not ") + "family-friendly."
    return text


def lex_entries(path: Path) -> list[tuple[str, list[str]]]:
    """(category, texts) of every ``entry`` of a WebNLG-style XML file, in file order."""
    root = ET.parse(require(path)).getroot()
    return [(entry.get("category", ""), [lex.text or "" for lex in entry.iter("lex")])
            for entry in root.iter("entry")]


def leave_one_out(entries: list[list[str]]) -> tuple[list[str], list[list[str]]]:
    """Last text as the output, the other texts as its references."""
    return [texts[-1] for texts in entries], [texts[:-1] for texts in entries]
