"""Registry: version policies, repository scan, model names; validation properties."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.core.errors import InvalidInput
from service.core.registry import select_versions
from service.core.validation import check_model_name, sequences
from tests.factories import make_config, write_model
from tests.support import StartEngine

versions_st = st.lists(st.integers(1, 50), unique=True, max_size=12)


@given(versions_st)
def test_latest_and_all(available: list[int]) -> None:
    assert select_versions(available, "all") == sorted(available)
    assert select_versions(available, "latest") == sorted(available)[-1:]


@given(versions_st, st.integers(1, 15))
def test_latest_n_is_the_n_highest(available: list[int], n: int) -> None:
    chosen = select_versions(available, f"latest:{n}")
    assert len(chosen) == min(n, len(available))
    assert all(v > u for v in chosen for u in set(available) - set(chosen))


@given(versions_st, st.lists(st.integers(1, 50), min_size=1, max_size=5))
def test_specific_is_the_intersection(available: list[int], wanted: list[int]) -> None:
    policy = "specific:" + ",".join(map(str, wanted))
    assert select_versions(available, policy) == sorted(set(available) & set(wanted))


@pytest.mark.parametrize("name", ["..", ".", "a/b", "a b", "", "x\\y", "é", "a" * 201])
def test_bad_model_names(name: str) -> None:
    with pytest.raises(InvalidInput, match=r"^model: a model name is 1–200 letters"):
        check_model_name(name, "model")  # as the registry checks names it loads


async def test_scan_skips_bad_folders(repository: Path, start_engine: StartEngine) -> None:
    write_model(repository, "ok.model-1_a", input_size=8)
    (repository / "bad name").mkdir()
    (repository / "ok.model-1_a" / "notes").mkdir()
    engine = await start_engine()
    assert engine.registry.scan() == {"ok.model-1_a": [1]}
    assert engine.ready


@given(
    st.lists(st.integers(-5, 30), min_size=1, max_size=20),
)
def test_token_ids_outside_the_vocabulary_are_named(ids: list[int]) -> None:
    config = make_config(input_type="tokens", vocab_size=20)
    bad = [i for i, t in enumerate(ids) if not 0 <= t < 20]
    if not bad:
        (array,) = sequences(config, None, "tokens", [ids], max_sequences=4, max_text_length=9)
        assert array.tolist() == ids
        return
    with pytest.raises(InvalidInput) as caught:
        sequences(config, None, "tokens", [ids], max_sequences=4, max_text_length=9)
    assert caught.value.field == f"tokens[0][{bad[0]}]"
    assert "[0, 20)" in str(caught.value)


@given(st.integers(1, 12), st.integers(1, 12), st.integers(1, 40))
def test_feature_width_and_length_limits(width: int, size: int, steps: int) -> None:
    config = make_config(input_size=size, serving={"max_sequence_length": 20})
    array = np.zeros((steps, width), np.float32)
    if width != size:
        with pytest.raises(InvalidInput, match=f"must have {size} features"):
            sequences(config, None, "features", [array], max_sequences=4, max_text_length=9)
    elif steps > 20:
        with pytest.raises(InvalidInput, match="max_sequence_length is 20"):
            sequences(config, None, "features", [array], max_sequences=4, max_text_length=9)
    else:
        (out,) = sequences(config, None, "features", [array], max_sequences=4, max_text_length=9)
        assert out.shape == (steps, size) and out.dtype == np.float32
