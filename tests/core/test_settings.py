"""Settings: environment variables, validation messages, device and thread resolution."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from models.precision import check_cpu_dtype, cpu_bfloat16_missing, cpu_capabilities
from service.core.settings import Settings, is_model_name


def test_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RNNSERVE_REPOSITORY", "/tmp/repo")
    monkeypatch.setenv("RNNSERVE_HTTP_PORT", "9000")
    monkeypatch.setenv("RNNSERVE_MODELS", "tagger, seq.v2")
    monkeypatch.setenv("RNNSERVE_VERSION_POLICIES", '{"tagger": "specific:1,3"}')
    settings = Settings()
    assert settings.repository == Path("/tmp/repo")
    assert settings.http_port == 9000
    assert settings.models == ["tagger", "seq.v2"]
    assert settings.policy_for("tagger") == "specific:1,3"
    assert settings.policy_for("other") == "latest"


@pytest.mark.parametrize("policy", ["latest", "latest:2", "all", "specific:1", "specific:1,3"])
def test_good_version_policies(policy: str) -> None:
    assert Settings(version_policy=policy).version_policy == policy


@pytest.mark.parametrize("policy", ["newest", "latest:0", "specific:", "specific:a", "all:2"])
def test_bad_version_policy_names_the_forms(policy: str) -> None:
    with pytest.raises(ValidationError, match="latest:N"):
        Settings(version_policy=policy)


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "cpu0", ""])
def test_bad_device(device: str) -> None:
    with pytest.raises(ValidationError, match="device"):
        Settings(device=device)


def test_float16_is_refused_on_cpu() -> None:
    with pytest.raises(ValidationError, match="float16 needs a GPU"):
        Settings(device="cpu", dtype="float16")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="float16 needs a GPU"):
            Settings(device="auto", dtype="float16").torch_device()


# What torch.cpu.get_capabilities() reports on CPUs with and without native bfloat16.
SAPPHIRE_RAPIDS = {"architecture": "x86_64", "avx512_bf16": True, "amx_bf16": True}
ZEN_4 = {"architecture": "x86_64", "avx512_bf16": True, "amx_bf16": False}
SKYLAKE = {"architecture": "x86_64", "avx512_f": True, "avx512_bf16": False, "amx_bf16": False}
GRAVITON_3 = {"architecture": "aarch64", "bf16": True, "sve_bf16": True}
GRAVITON_2 = {"architecture": "aarch64", "bf16": False, "sve_bf16": False}


@pytest.mark.parametrize("capabilities", [SAPPHIRE_RAPIDS, ZEN_4, GRAVITON_3])
def test_bfloat16_on_a_cpu_that_has_it_is_accepted(capabilities: dict[str, object]) -> None:
    check_cpu_dtype("bfloat16", capabilities)
    check_cpu_dtype("float32", capabilities)


@pytest.mark.parametrize(
    ("capabilities", "missing"),
    [
        (SKYLAKE, "amx_bf16 or avx512_bf16"),
        (GRAVITON_2, "bf16 or sve_bf16"),
        ({"architecture": "riscv64"}, "architecture riscv64"),
        ({}, "architecture unknown"),
    ],
)
def test_bfloat16_on_a_cpu_without_it_is_refused_naming_the_feature(
    capabilities: dict[str, object], missing: str
) -> None:
    with pytest.raises(ValueError, match=f"bfloat16 .*lacks .*{missing}"):
        check_cpu_dtype("bfloat16", capabilities)
    check_cpu_dtype("float32", capabilities)


def test_bfloat16_on_this_cpu_follows_its_capabilities() -> None:
    """`make test` passes on CPUs with and without bfloat16: the answer follows the detection."""
    missing = cpu_bfloat16_missing(cpu_capabilities())
    if missing is None:
        assert Settings(device="cpu", dtype="bfloat16").torch_device().type == "cpu"
    else:
        with pytest.raises(ValidationError, match=f"lacks {re.escape(missing)}"):
            Settings(device="cpu", dtype="bfloat16")


def test_bad_model_name_is_refused() -> None:
    with pytest.raises(ValidationError, match="invalid model name"):
        Settings(models=["../etc"])


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("tagger", True),
        ("a-b_c.1", True),
        ("a" * 200, True),
        ("a" * 201, False),  # over the limit (and 256 is over a file name's 255 bytes)
        ("", False),
        (".", False),
        ("..", False),
        ("a/b", False),
        ("tagger\n", False),  # a trailing newline is no part of a name
        ("é", False),
    ],
)
def test_model_names(name: str, valid: bool) -> None:
    assert is_model_name(name) is valid


def test_unknown_setting_is_an_error() -> None:
    with pytest.raises(ValidationError):
        Settings(http_prot=1)  # type: ignore[call-arg]


def test_thread_default_leaves_a_core_for_the_loop() -> None:
    assert Settings().intra_op_threads(1) == 1
    assert Settings().intra_op_threads(2) == 1
    assert Settings().intra_op_threads(8) == 7
    assert Settings(cpu_threads=3).intra_op_threads(2) == 3


def test_every_field_is_documented() -> None:
    for name, info in Settings.model_fields.items():
        assert info.description, name
