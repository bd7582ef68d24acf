"""The model registry: repository scan, version policy, load / unload / reload, states.

A version goes LOADING → READY (weights checked, placed on the device, its batcher or decode
scheduler started, one warm-up batch run) or → FAILED (the reason kept); UNLOADING while it
drains. Only READY versions take traffic. A new build of a version is made completely beside the
one serving and swapped in atomically; requests admitted by the old one finish on it. A failed
load leaves whatever was serving untouched; one bad checkpoint never stops the others.

A READY version whose batcher or decode scheduler stops on its own (a bug: its task ended) goes
FAILED with the reason (its waiting requests get NotReady), and is restarted: a fresh batcher or
scheduler over the same loaded weights (nothing is read from disk again), warmed up, then READY —
after RESTART_FIRST_S, doubling with each failure up to RESTART_MAX_S; a version that then served
RESTART_RESET_S starts again from the first delay.
"""

from __future__ import annotations

import asyncio
import difflib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models import checkpoint
from models.checkpoint import LoadedModel
from models.config import ModelConfig
from models.encoder import EncoderModel
from models.precision import Plan, uniform_dtype
from models.precision import describe as describe_plan
from service.core import validation
from service.core.decode_scheduler import DecodeLimits, DecodeScheduler
from service.core.encode_batcher import Batcher, BatchLimits, EncodeCompute
from service.core.errors import Conflict, NotFound, NotReady, shown
from service.core.executor import DeviceExecutor
from service.core.metrics import Metrics
from service.core.settings import MAX_MODEL_NAME_LENGTH, Settings, is_model_name
from service.core.types import Head, ModelInfo, VersionInfo, VersionState

log = logging.getLogger(__name__)
# Known model names an unknown-model refusal lists (the rest are counted).
KNOWN_NAMES_SHOWN = 10

# Restarts of a version whose batcher or decode scheduler stopped: the first delay, its doubling
# cap, and how long a restarted version must serve before its next failure counts as a first.
RESTART_FIRST_S = 0.1
RESTART_MAX_S = 30.0
RESTART_RESET_S = 60.0


def select_versions(available: list[int], policy: str) -> list[int]:
    """The versions a policy picks from `available` (ascending)."""
    ordered = sorted(available)
    if policy == "all":
        return ordered
    if policy == "latest":
        return ordered[-1:]
    kind, _, arg = policy.partition(":")
    if kind == "latest":
        return ordered[-int(arg) :]
    wanted = {int(v) for v in arg.split(",")}
    return [v for v in ordered if v in wanted]


@dataclass(eq=False)
class ModelVersion:
    """One build of one version of a model, and what serves it."""

    name: str
    version: int
    path: Path
    state: VersionState = "LOADING"
    reason: str | None = None
    load_seconds: float | None = None
    loaded: LoadedModel | None = None
    batcher: Batcher | None = None
    decoder: DecodeScheduler | None = None
    head: Head | None = None  # an encoder's linear head on the host, for streaming sessions
    architecture: dict[str, Any] = field(default_factory=dict)
    restarts: int = 0  # failures since it last served RESTART_RESET_S
    started_at: float = 0.0  # time.monotonic() when its batcher or scheduler last started
    restarting: asyncio.Task[None] | None = None

    @property
    def config(self) -> ModelConfig:
        assert self.loaded is not None
        return self.loaded.config

    def info(self) -> VersionInfo:
        """The public view of this version (load time in milliseconds' precision)."""
        seconds = None if self.load_seconds is None else round(self.load_seconds, 3)
        return VersionInfo(self.version, self.state, self.reason, seconds)


def architecture(config: ModelConfig, plan: Plan | None = None) -> dict[str, Any]:
    """What a client may know of a model's architecture (JSON-ready); with the load's `plan`,
    `precision`: the dtype each part computes in, and why (`models.precision`)."""
    arch: dict[str, Any] = {
        "task": config.task,
        "input": config.input.model_dump(),
        "encoder": config.encoder.model_dump(exclude_none=True),
        "pooling": config.pooling,
        "encoding_size": config.encoding_size,
        "serving": config.serving.model_dump(),
    }
    if config.head is not None:
        arch["head"] = config.head.model_dump(exclude_none=True)
    if config.decoder is not None:
        arch["decoder"] = config.decoder.model_dump(exclude_none=True)
    if plan is not None:
        arch["precision"] = describe_plan(plan)
    return arch


class Registry:
    """Every model version the server knows, and the only code that loads or unloads them."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        executor: DeviceExecutor,
        prefill: DeviceExecutor,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.settings = settings
        self.repository = Path(settings.repository)
        self._metrics = metrics
        self._executor = executor
        self._prefill = prefill
        self._dtype = dtype
        # name → version → the build serving it (READY or UNLOADING) or its failed/loading record
        self._versions: dict[str, dict[int, ModelVersion]] = {}
        self._building: dict[str, dict[int, ModelVersion]] = {}
        self._failures: dict[str, str] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._closing = False

    # -- the repository --------------------------------------------------------------------

    def scan(self) -> dict[str, list[int]]:
        """Model names → version numbers found on disk (invalid names are skipped, logged; a
        folder leading out of the repository is listed with no versions, and fails to load)."""
        found: dict[str, list[int]] = {}
        if not self.repository.is_dir():
            log.error("model repository %s is not a folder", self.repository)
            return found
        for folder in sorted(self.repository.iterdir()):
            if not folder.is_dir() or folder.name.startswith("."):
                continue
            if not is_model_name(folder.name):
                log.warning("skipping %s: not a valid model name", folder)
                continue
            found[folder.name] = [] if self._outside(folder) else self._versions_on_disk(folder)
        return found

    def _outside(self, path: Path) -> bool:
        """Whether `path` resolves (symbolic links followed) outside the repository's real path:
        only the repository is ever read. Links inside it (a Kubernetes ConfigMap's `..data`)
        are fine."""
        return not path.resolve().is_relative_to(self.repository.resolve())

    def _versions_on_disk(self, folder: Path) -> list[int]:
        if not folder.is_dir() or self._outside(folder):
            return []
        return sorted(
            int(child.name)
            for child in folder.iterdir()
            if child.is_dir() and child.name.isdigit() and int(child.name) > 0
        )

    def _reason(self, exc: Exception) -> str:
        """A load failure as clients may see it: paths relative to the repository (public
        listings show reasons; host paths are not theirs to know)."""
        if isinstance(exc, checkpoint.CheckpointError):
            try:
                where = str(exc.path.relative_to(self.repository))
            except ValueError:
                where = exc.path.name
            return f"{where}: {exc.problem}"
        reason = str(exc) or type(exc).__name__
        for root in {str(self.repository.resolve()), str(self.repository)}:
            reason = reason.replace(root + os.sep, "")
        return reason

    def wanted_versions(self, name: str) -> list[int]:
        """The versions of `name` on disk that its version policy selects."""
        return select_versions(
            self._versions_on_disk(self.repository / name), self.settings.policy_for(name)
        )

    # -- lookups ---------------------------------------------------------------------------

    def names(self) -> list[str]:
        """Every model name known (serving, loading, or failed)."""
        return sorted(set(self._versions) | set(self._building) | set(self._failures))

    def unknown(self, name: str) -> NotFound:
        """The refusal of a model name the server does not know, naming the closest known name
        (`Surnames` → `surnames`) or, failing one, the known names."""
        known = self.names()
        message = f"model {shown(name)} is not known"
        if not known:
            return NotFound(f"{message}: no models are loaded")
        # NOTE: a made-up name can be long; closeness is worth computing for real names only.
        if len(name) <= MAX_MODEL_NAME_LENGTH:
            folded = {n.casefold(): n for n in known}
            close = difflib.get_close_matches(name.casefold(), list(folded), n=1, cutoff=0.6)
            if close:
                return NotFound(f"{message}; did you mean {folded[close[0]]!r}?")
        listed = ", ".join(known[:KNOWN_NAMES_SHOWN])
        more = len(known) - KNOWN_NAMES_SHOWN
        return NotFound(f"{message} (known: {listed}{f' and {more} more' if more > 0 else ''})")

    def resolve(self, name: str, version: int | None = None) -> ModelVersion:
        """The READY build of `name` (its highest READY version when `version` is None)."""
        versions = self._versions.get(name)
        if version is None:
            ready = [v for v in (versions or {}).values() if v.state == "READY"]
            if ready:
                return max(ready, key=lambda v: v.version)
        else:
            entry = (versions or {}).get(version)
            if entry is not None and entry.state == "READY":
                return entry
        if name not in self.names():
            raise self.unknown(name)
        label = f"model {shown(name)}" + ("" if version is None else f" version {version}")
        entry = self._entry(name, version)
        if entry is None:
            raise NotFound(f"{label} is not loaded")
        reason = f": {entry.reason}" if entry.reason else ""
        raise NotReady(f"{label} is {entry.state}{reason}")

    def _entry(self, name: str, version: int | None) -> ModelVersion | None:
        merged = {**self._building.get(name, {}), **self._versions.get(name, {})}
        if not merged:
            return None
        if version is None:
            return merged[max(merged)]
        return merged.get(version)

    def model_info(self, name: str, version: int | None = None) -> ModelInfo:
        """Versions, states and architecture of `name` (NotFound when unknown)."""
        if name not in self.names():
            raise self.unknown(name)
        merged = {**self._building.get(name, {}), **self._versions.get(name, {})}
        if version is not None:
            if version not in merged:
                raise NotFound(f"model {shown(name)} has no version {version}")
            merged = {version: merged[version]}
        infos = [merged[v].info() for v in sorted(merged)]
        ready = [e for e in merged.values() if e.state == "READY"]
        candidates = ready or list(merged.values())
        arch = dict(max(candidates, key=lambda e: e.version).architecture) if candidates else {}
        if name in self._failures and not ready:
            arch.setdefault("error", self._failures[name])
        return ModelInfo(name=name, versions=infos, architecture=arch)

    def ready_names(self) -> set[str]:
        """Names with at least one READY version."""
        return {
            name
            for name, versions in self._versions.items()
            if any(v.state == "READY" for v in versions.values())
        }

    def serving(self) -> list[ModelVersion]:
        """Every READY build."""
        return [v for vs in self._versions.values() for v in vs.values() if v.state == "READY"]

    # -- lifecycle -------------------------------------------------------------------------

    def _lock(self, name: str) -> asyncio.Lock:
        if name not in self._locks:
            self._locks[name] = asyncio.Lock()
        return self._locks[name]

    async def load(self, name: str, version: int | None = None) -> None:
        """Load `version` of `name` (None: the versions its policy selects) beside what serves.

        Raises NotFound when nothing on disk matches, NotReady when every build failed.
        """
        validation.check_model_name(name, "model")
        async with self._lock(name):
            folder = self.repository / name
            if folder.exists() and self._outside(folder):
                problem = (
                    f"model {shown(name)}: its folder resolves outside the model repository "
                    "(a symbolic link leads out of it)"
                )
                self._failures[name] = problem
                log.error("%s: %s", folder, problem)
                raise NotReady(f"model {shown(name)} failed to load: {problem}")
            versions = [version] if version is not None else self.wanted_versions(name)
            on_disk = self._versions_on_disk(folder)
            if not versions or any(v not in on_disk for v in versions):
                missing = "any version" if not versions else f"version {versions}"
                problem = f"model {shown(name)} has no {missing} in the repository"
                # NOTE: a name only a management call made up is not listed for good: only a
                # model the server was told to serve, or one it knows, reports the problem.
                if name in (self.settings.models or []) or name in self.names():
                    self._failures[name] = problem
                raise NotFound(problem)
            results = [await self._build_and_swap(name, v) for v in versions]
            if not any(results):
                raise NotReady(f"model {shown(name)} failed to load: {self._failures.get(name)}")

    async def reload(self, name: str) -> None:
        """Rebuild the policy's versions of `name`, swap them in, then unload the others."""
        validation.check_model_name(name, "model")
        async with self._lock(name):
            versions = self.wanted_versions(name)
            if not versions:
                raise NotFound(f"model {shown(name)} has no version in the repository")
            results = [await self._build_and_swap(name, v) for v in versions]
            if not any(results):
                raise NotReady(f"model {shown(name)} failed to reload: {self._failures.get(name)}")
            stale = [v for v in self._versions.get(name, {}) if v not in versions]
            for version in stale:
                await self._unload(name, version)

    async def unload(self, name: str, version: int | None = None) -> None:
        """Drain and unload `version` of `name` (None: every version)."""
        validation.check_model_name(name, "model")
        async with self._lock(name):
            known = self._versions.get(name, {})
            if not known and version is None and self._failures.pop(name, None) is not None:
                return  # NOTE: a model that never loaded leaves the listing
            if not known:
                raise NotFound(f"model {shown(name)} is not loaded")
            if version is not None and version not in known:
                raise NotFound(f"model {shown(name)} version {version} is not loaded")
            for v in [version] if version is not None else list(known):
                await self._unload(name, v)
            self._failures.pop(name, None)

    async def close(self, deadline: float | None = None) -> None:
        """Drain and unload everything; work still running at `deadline` (loop time; None: no
        limit) fails with `Draining`."""
        self._closing = True
        for versions in self._versions.values():
            for entry in versions.values():
                if entry.restarting is not None:
                    entry.restarting.cancel()

        async def close_model(name: str) -> None:
            async with self._lock(name):
                await asyncio.gather(
                    *(self._unload(name, v, deadline) for v in list(self._versions.get(name, {})))
                )

        await asyncio.gather(*(close_model(name) for name in list(self._versions)))

    async def _unload(self, name: str, version: int, deadline: float | None = None) -> None:
        entry = self._versions[name][version]
        entry.state = "UNLOADING"
        self._metrics.set_model_state(name, version, "UNLOADING")
        await _drain(entry, deadline)
        del self._versions[name][version]
        if not self._versions[name]:
            del self._versions[name]
        self._metrics.set_model_state(name, version, None)
        log.info("unloaded model %s version %s", name, version)

    # -- restarts ----------------------------------------------------------------------------

    def _component_failed(self, entry: ModelVersion, component: object, reason: str) -> None:
        """A batcher or decode scheduler of `entry` stopped on its own (on the loop)."""
        current = self._versions.get(entry.name, {}).get(entry.version) is entry
        mine = component is entry.batcher or component is entry.decoder
        if self._closing or not current or not mine or entry.state == "UNLOADING":
            return  # being unloaded or replaced: nothing to bring back
        if entry.restarting is not None and not entry.restarting.done():
            return  # the restart under way sees it
        self._schedule_restart(entry, reason)

    def _schedule_restart(self, entry: ModelVersion, reason: str) -> None:
        if time.monotonic() - entry.started_at >= RESTART_RESET_S:
            entry.restarts = 0
        delay = min(RESTART_MAX_S, RESTART_FIRST_S * 2**entry.restarts)
        entry.restarts += 1
        entry.state = "FAILED"
        entry.reason = f"{reason}; restarting in {delay:g} s"
        self._metrics.set_model_state(entry.name, entry.version, "FAILED")
        self._metrics.model_restarts_total.labels(entry.name, str(entry.version)).inc()
        log.error("model %s version %s: %s", entry.name, entry.version, entry.reason)
        entry.restarting = asyncio.get_running_loop().create_task(
            self._restart(entry, delay), name=f"restart-{entry.name}-{entry.version}"
        )

    async def _restart(self, entry: ModelVersion, delay: float) -> None:
        await asyncio.sleep(delay)
        async with self._lock(entry.name):
            if self._closing or self._versions.get(entry.name, {}).get(entry.version) is not entry:
                return
            for old in (entry.batcher, entry.decoder):
                if old is not None:
                    await old.stop()
            entry.batcher = entry.decoder = None
            entry.state = "LOADING"
            self._metrics.set_model_state(entry.name, entry.version, "LOADING")
            try:
                await self._start_serving(entry)
                component = entry.batcher or entry.decoder
                if component is not None and component.failure is not None:
                    raise RuntimeError(component.failure)
            except Exception as exc:
                entry.restarting = None
                self._schedule_restart(entry, f"restart failed: {exc}")
                return
            entry.state = "READY"
            entry.reason = None
            entry.restarting = None
            self._metrics.set_model_state(entry.name, entry.version, "READY")
            log.info("model %s version %s restarted, READY", entry.name, entry.version)

    async def _build_and_swap(self, name: str, version: int) -> bool:
        if self._building.get(name, {}).get(version) is not None:
            raise Conflict(f"model {shown(name)} version {version} is already loading")
        entry = ModelVersion(name, version, self.repository / name / str(version))
        self._building.setdefault(name, {})[version] = entry
        previous = self._versions.get(name, {}).get(version)
        if previous is not None and previous.state == "FAILED":
            previous = None  # NOTE: a failed record is replaced by this attempt's outcome
        if previous is None:
            self._metrics.set_model_state(name, version, "LOADING")
        log.info("loading model %s version %s from %s", name, version, entry.path)
        start = time.perf_counter()
        try:
            await self._build(entry)
        except Exception as exc:
            entry.state = "FAILED"
            entry.reason = self._reason(exc)
            self._failures[name] = entry.reason
            log.error("model %s version %s failed to load: %s", name, version, exc)
            await _drain(entry)
            del self._building[name][version]
            if not self._building[name]:
                del self._building[name]
            if previous is None:
                # NOTE: a failed version with nothing serving is kept to report its reason.
                self._versions.setdefault(name, {})[version] = entry
                self._metrics.set_model_state(name, version, "FAILED")
            return False
        entry.load_seconds = time.perf_counter() - start
        entry.state = "READY"
        del self._building[name][version]
        if not self._building[name]:
            del self._building[name]
        # NOTE: the swap is one dict assignment on the loop: each request sees the old build or
        # the new one, never neither; the old one drains what it already admitted.
        self._versions.setdefault(name, {})[version] = entry
        self._failures.pop(name, None)
        self._metrics.set_model_state(name, version, "READY")
        self._metrics.model_load_duration.labels(name, str(version)).observe(entry.load_seconds)
        log.info("model %s version %s READY in %.3f s", name, version, entry.load_seconds)
        if previous is not None:
            previous.state = "UNLOADING"
            await _drain(previous)
            log.info("model %s version %s: previous build drained", name, version)
        return True

    async def _build(self, entry: ModelVersion) -> None:
        loaded = await asyncio.to_thread(
            checkpoint.load,
            entry.path,
            self._executor.device,
            self._dtype,
            root=self.repository,
        )
        entry.loaded = loaded
        entry.architecture = architecture(loaded.config, loaded.plan)
        if isinstance(loaded.model, EncoderModel):
            entry.head = _host_head(loaded.model, loaded.config)
        await self._start_serving(entry)

    async def _start_serving(self, entry: ModelVersion) -> None:
        """Start a fresh batcher (encoder) or decode scheduler (seq2seq) for `entry`'s loaded
        model and warm it up."""
        loaded = entry.loaded
        assert loaded is not None
        component: Batcher | DecodeScheduler
        if isinstance(loaded.model, EncoderModel):
            component = entry.batcher = self._batcher(entry, loaded.model)
        else:
            component = entry.decoder = DecodeScheduler(
                entry.name,
                entry.version,
                loaded.model,
                self._executor,
                self._prefill,
                self._metrics,
                DecodeLimits.of(self.settings, loaded.config.serving),
            )
        component.on_failure = lambda reason: self._component_failed(entry, component, reason)
        entry.started_at = time.monotonic()
        component.start()
        if self.settings.warmup:
            await component.warm_up(_warm_input(loaded.config))

    def _batcher(self, entry: ModelVersion, model: EncoderModel) -> Batcher:
        encoder = model.config.encoder
        device = self._executor.device
        # NOTE: on the CPU the model takes float32 whatever its parts compute in (each part
        # casts); on a GPU inputs are cast on the way in, to the one dtype of every part.
        input_dtype = torch.float32
        if device.type != "cpu":
            assert entry.loaded is not None
            input_dtype = uniform_dtype(entry.loaded.plan) or torch.float32
        sizes = (encoder.num_layers * encoder.num_directions, encoder.hidden_size)
        return Batcher(
            entry.name,
            entry.version,
            self._executor,
            EncodeCompute(model, device, input_dtype, sizes),
            self._metrics,
            BatchLimits.of(self.settings, model.config.serving, device),
        )


def _host_head(model: EncoderModel, config: ModelConfig) -> Head | None:
    """The model's linear head as numpy arrays: sessions score each chunk on the loop."""
    head = getattr(model, "head", None)
    if head is None or config.head is None:
        return None
    return Head(
        weight=head.weight.detach().float().cpu().numpy(),
        bias=head.bias.detach().float().cpu().numpy(),
        labels=config.head.labels,
    )


def _warm_input(config: ModelConfig) -> np.ndarray:
    size = getattr(config.input, "size", None)
    if size is not None:
        return np.zeros((2, size), dtype=np.float32)
    return np.zeros(2, dtype=np.int64)


async def _drain(entry: ModelVersion, deadline: float | None = None) -> None:
    if entry.restarting is not None:
        entry.restarting.cancel()
    if entry.batcher is not None:
        await entry.batcher.drain(deadline)
    if entry.decoder is not None:
        await entry.decoder.drain(deadline)
