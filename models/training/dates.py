"""Human-written dates → ISO `YYYY-MM-DD`, generated with Babel's CLDR date formats (offline).

Sources are written in the full / long / medium CLDR patterns of 17 languages, plus common
numeric and English ordinal forms, sometimes in all capitals or all lower case. Numeric forms
with slashes are day-first (`03/09/2021` is 3 September): the US month-first short form is
ambiguous and left out. Days run from 1000 to 2999, half of them drawn from 1900–2099. The
calendar days are split between train / valid / test, so no held-out day appears in training in
any format.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from models.training.errors import TrainingError

LOCALES = (
    "en_US",
    "en_GB",
    "de_DE",
    "fr_FR",
    "es_ES",
    "it_IT",
    "pt_PT",
    "nl_NL",
    "sv_SE",
    "pl_PL",
    "fi_FI",
    "cs_CZ",
    "da_DK",
    "hu_HU",
    "ro_RO",
    "tr_TR",
    "ru_RU",
)
CLDR_WIDTHS = ("full", "long", "medium")
FIRST_DAY = dt.date(1000, 1, 1)
LAST_DAY = dt.date(2999, 12, 31)
MODERN_FIRST = dt.date(1900, 1, 1)
MODERN_LAST = dt.date(2099, 12, 31)

Pair = tuple[str, str]
Formatter = Callable[[dt.date], str]


@dataclass(frozen=True)
class DateSplits:
    """(source text, ISO target) pairs per split."""

    train: list[Pair]
    valid: list[Pair]
    test: list[Pair]


def _ordinal(day: int) -> str:
    if day in (11, 12, 13):
        return f"{day}th"
    return f"{day}{ {1: 'st', 2: 'nd', 3: 'rd'}.get(day % 10, 'th') }"


_MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)

NUMERIC: tuple[Formatter, ...] = (
    lambda d: d.isoformat(),
    lambda d: f"{d.day:02d}.{d.month:02d}.{d.year}",
    lambda d: f"{d.day}.{d.month}.{d.year}",
    lambda d: f"{d.day:02d}/{d.month:02d}/{d.year}",
    lambda d: f"{d.day}/{d.month}/{d.year}",
    lambda d: f"{d.year}/{d.month:02d}/{d.day:02d}",
    lambda d: f"{d.year}{d.month:02d}{d.day:02d}",
    lambda d: f"{d.day:02d}-{d.month:02d}-{d.year}",
    lambda d: f"{_ordinal(d.day)} {_MONTHS[d.month - 1]} {d.year}",
    lambda d: f"{_MONTHS[d.month - 1]} {_ordinal(d.day)}, {d.year}",
    lambda d: f"the {_ordinal(d.day)} of {_MONTHS[d.month - 1]}, {d.year}",
    lambda d: f"{d.day} {_MONTHS[d.month - 1][:3].upper()} {d.year}",
    lambda d: f"{d.year}-{_MONTHS[d.month - 1][:3]}-{d.day:02d}",
)


def _cldr_formatters() -> list[Formatter]:
    try:
        from babel import Locale
        from babel.dates import format_date
    except ModuleNotFoundError as exc:
        raise TrainingError(
            f"task 'dates' needs Babel ({exc.name} is missing): pip install 'rnnserve[train]'"
        ) from exc

    def formatter(locale: Any, width: str) -> Formatter:
        return lambda d: format_date(d, width, locale=locale)

    return [formatter(Locale.parse(name), width) for name in LOCALES for width in CLDR_WIDTHS]


def formatters() -> list[Formatter]:
    """Every source format: the CLDR ones of each locale, then the numeric/English ones."""
    return [*_cldr_formatters(), *NUMERIC]


def _pairs(
    days: list[dt.date], count: int, rng: random.Random, forms: list[Formatter]
) -> list[Pair]:
    pairs: list[Pair] = []
    modern = [d for d in days if MODERN_FIRST <= d <= MODERN_LAST]
    for _ in range(count):
        # NOTE: half from 1900–2099, where most real dates are; the rest teach copying any year.
        day = rng.choice(modern if rng.random() < 0.5 else days)
        # NOTE: CLDR output may hold narrow no-break spaces (ru "г."); plain spaces are what
        # people type, so normalise them.
        text = rng.choice(forms)(day).replace("\u202f", " ").replace("\xa0", " ")
        case = rng.random()
        # NOTE: people also write in all capitals or all lower case.
        text = text.upper() if case < 0.08 else text.lower() if case < 0.16 else text
        pairs.append((text, day.isoformat()))
    return pairs


def load_dates(
    seed: int, train_size: int = 60_000, valid_size: int = 1_000, test_size: int = 2_000
) -> DateSplits:
    """Source/target pairs on disjoint sets of calendar days (10% test, 5% valid)."""
    rng = random.Random(seed)
    span = (LAST_DAY - FIRST_DAY).days + 1
    days = [FIRST_DAY + dt.timedelta(days=i) for i in range(span)]
    rng.shuffle(days)
    n_test, n_valid = span // 10, span // 20
    test_days, valid_days = days[:n_test], days[n_test : n_test + n_valid]
    train_days = days[n_test + n_valid :]
    forms = formatters()
    return DateSplits(
        train=_pairs(train_days, train_size, rng, forms),
        valid=_pairs(valid_days, valid_size, rng, forms),
        test=_pairs(test_days, test_size, rng, forms),
    )
