"""Surname → language data, from the per-locale last-name lists that Faker ships (offline).

Each language label reads one or more Faker locales. A name listed under two different labels is
dropped everywhere: it says nothing about origin. Large lists are capped so that no label
dominates. The split is by name, so no held-out name is ever seen in training.
"""

from __future__ import annotations

import importlib
import random
from dataclasses import dataclass

from models.training.errors import TrainingError

# label → Faker locales whose `last_names` it reads (Latin script only, so the script alone
# never gives the answer away).
LOCALES: dict[str, tuple[str, ...]] = {
    "Croatian": ("hr_HR",),
    "Czech/Slovak": ("cs_CZ", "sk_SK"),
    "Dutch": ("nl_NL",),
    "English": ("en_US", "en_GB"),
    "Estonian": ("et_EE",),
    "Finnish": ("fi_FI",),
    "French": ("fr_FR", "fr_CA", "fr_CH"),
    "German": ("de_DE", "de_AT", "de_CH"),
    "Indian": ("en_IN",),
    "Irish": ("ga_IE",),
    "Italian": ("it_IT",),
    "Kenyan": ("en_KE",),
    "Spanish": ("es_ES", "es_MX"),
    "Swedish": ("sv_SE",),
    "Zulu": ("zu_ZA",),
}
MAX_PER_LABEL = 1000


@dataclass(frozen=True)
class SurnameSplits:
    """(name, label index) pairs per split; `labels[i]` names label i."""

    labels: list[str]
    train: list[tuple[str, int]]
    valid: list[tuple[str, int]]
    test: list[tuple[str, int]]


def _last_names(locale: str) -> set[str]:
    try:
        module = importlib.import_module(f"faker.providers.person.{locale}")
    except ModuleNotFoundError as exc:
        raise TrainingError(
            f"task 'surnames' needs Faker ({exc.name} is missing): pip install 'rnnserve[train]'"
        ) from exc
    names = module.Provider.last_names
    return {str(name).strip() for name in names if str(name).strip()}


def load_surnames(
    seed: int, valid_fraction: float = 0.1, test_fraction: float = 0.15
) -> SurnameSplits:
    """Deduplicated, capped, shuffled surnames split into train / valid / test by name."""
    labels = sorted(LOCALES)
    by_label = {
        label: set().union(*(_last_names(loc) for loc in LOCALES[label])) for label in labels
    }
    seen: dict[str, int] = {}
    for names in by_label.values():
        for name in names:
            seen[name] = seen.get(name, 0) + 1
    rng = random.Random(seed)
    examples: list[tuple[str, int]] = []
    for index, label in enumerate(labels):
        unique = sorted(name for name in by_label[label] if seen[name] == 1)
        rng.shuffle(unique)
        examples.extend((name, index) for name in unique[:MAX_PER_LABEL])
    rng.shuffle(examples)
    n_test = round(len(examples) * test_fraction)
    n_valid = round(len(examples) * valid_fraction)
    return SurnameSplits(
        labels=labels,
        test=examples[:n_test],
        valid=examples[n_test : n_test + n_valid],
        train=examples[n_test + n_valid :],
    )
