"""Save and load checkpoints (DESIGN §2): config.json + model.safetensors (+ vocab files).

The only module that reads or writes checkpoint files. Loading never unpickles: weights are read
from safetensors only, and every tensor's name and shape is checked against the config (read from
the safetensors header) before any model is built. Every problem raises `CheckpointError`, whose
message names the file and the problem.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from models.config import FeaturesInput, ModelConfig, TextInput
from models.encoder import EncoderModel
from models.precision import DTYPES, Plan, plan_precision, uniform_dtype
from models.recurrent import GATES
from models.seq2seq import Seq2SeqModel
from models.tokenizer import BOS, EOS, PAD, UNK, Tokenizer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PICKLE_NAMES = ("model.pt", "model.pth", "model.bin", "pytorch_model.bin", "model.ckpt")
# Largest header safetensors itself accepts (100 MB); larger means a corrupt or hostile file.
MAX_HEADER = 100_000_000

Model = EncoderModel | Seq2SeqModel
Shape = tuple[int, ...]


class CheckpointError(Exception):
    """A checkpoint cannot be loaded: `path` is the offending file, `problem` says why."""

    def __init__(self, path: Path | str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = Path(path)
        self.problem = problem


@dataclass(frozen=True)
class LoadedModel:
    """A loaded checkpoint; `model` is in eval mode on the requested device, each part in the
    dtype(s) of `plan` (`models.precision`)."""

    config: ModelConfig
    model: Model
    input_tokenizer: Tokenizer | None
    output_tokenizer: Tokenizer | None
    path: Path
    plan: Plan


def build_model(config: ModelConfig) -> Model:
    """A freshly initialised model of the config's architecture."""
    return EncoderModel(config) if config.task == "encode" else Seq2SeqModel(config)


def _rnn_shapes(
    prefix: str, cell: str, input_size: int, hidden: int, layers: int, directions: int
) -> dict[str, Shape]:
    gates = GATES[cell] * hidden
    shapes: dict[str, Shape] = {}
    for layer in range(layers):
        layer_input = input_size if layer == 0 else hidden * directions
        for suffix in ["", "_reverse"][:directions]:
            name = f"l{layer}{suffix}"
            shapes[f"{prefix}weight_ih_{name}"] = (gates, layer_input)
            shapes[f"{prefix}weight_hh_{name}"] = (gates, hidden)
            shapes[f"{prefix}bias_ih_{name}"] = (gates,)
            shapes[f"{prefix}bias_hh_{name}"] = (gates,)
    return shapes


def expected_shapes(config: ModelConfig) -> dict[str, Shape]:
    """Every tensor name of model.safetensors and its shape, from the config (DESIGN §2)."""
    shapes: dict[str, Shape] = {}
    enc = config.encoder
    if isinstance(config.input, FeaturesInput):
        rnn_input = config.input.size
    else:
        rnn_input = config.input.embedding_size
        shapes["encoder.embedding.weight"] = (config.input.vocab_size, rnn_input)
    shapes.update(
        _rnn_shapes(
            "encoder.rnn.",
            enc.cell,
            rnn_input,
            enc.hidden_size,
            enc.num_layers,
            enc.num_directions,
        )
    )
    if config.head is not None:
        shapes["head.weight"] = (config.head.size, config.encoding_size)
        shapes["head.bias"] = (config.head.size,)
    dec = config.decoder
    if dec is not None:
        shapes["decoder.embedding.weight"] = (dec.vocab_size, dec.embedding_size)
        shapes.update(
            _rnn_shapes(
                "decoder.rnn.",
                enc.cell,
                dec.embedding_size + enc.output_size,
                dec.hidden_size,
                dec.num_layers,
                1,
            )
        )
        if dec.attention_size is not None:
            shapes["decoder.attention.W_q.weight"] = (dec.attention_size, dec.hidden_size)
            shapes["decoder.attention.W_k.weight"] = (dec.attention_size, enc.output_size)
            shapes["decoder.attention.w_v.weight"] = (1, dec.attention_size)
        shapes["decoder.output.weight"] = (dec.vocab_size, dec.hidden_size)
        shapes["decoder.output.bias"] = (dec.vocab_size,)
    return shapes


# ----------------------------------------------------------------------------------------- save


def save(
    model: Model,
    directory: Path | str,
    vocab: list[str] | None = None,
    target_vocab: list[str] | None = None,
) -> Path:
    """Write config.json, model.safetensors and the vocab files the config names into `directory`.

    `vocab` is required for text inputs, `target_vocab` when the config's decoder names a vocab.
    """
    config = model.config
    directory = Path(directory)
    vocab_name = config.input_vocab_path
    target_name = config.decoder.vocab if config.decoder is not None else None
    if vocab_name is not None and vocab is None:
        raise ValueError("this model reads text: save(..., vocab=[...]) is required")
    if target_name is not None and target_vocab is None:
        raise ValueError(
            "the decoder names a vocab file: save(..., target_vocab=[...]) is required"
        )
    directory.mkdir(parents=True, exist_ok=True)
    if vocab_name is not None and vocab is not None:
        write_json(_vocab_path(directory, vocab_name), vocab)
    if target_name is not None and target_vocab is not None:
        write_json(_vocab_path(directory, target_name), target_vocab)
    tensors = {
        name: tensor.detach().to("cpu", torch.float32).contiguous()
        for name, tensor in model.state_dict().items()
    }
    weights = directory / WEIGHTS_FILE
    save_file(tensors, str(weights), metadata={"format": "rnnserve/v1"})
    # NOTE: safetensors creates the file 0600; a server running as another user (the image's
    # non-root user over a mounted repository) must be able to read it.
    weights.chmod(0o644)
    # NOTE: config.json is written last so a half-written folder never looks complete.
    write_json(directory / CONFIG_FILE, config.model_dump(mode="json", exclude_none=True))
    return directory


def write_json(path: Path, value: Any) -> None:
    """Write pretty UTF-8 JSON with a trailing newline."""
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------- load


def load(
    path: Path | str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    root: Path | str | None = None,
    every_part: bool = False,
    capabilities: Mapping[str, Any] | None = None,
) -> LoadedModel:
    """Load and check the checkpoint in folder `path`.

    `dtype` is the precision asked for (None: float32) unless the config's `serving.dtype` asks
    its own; `models.precision.plan_precision(config, that, device, every_part, capabilities)`
    decides each part's dtype. Everything that leaves the model stays float32. With `root`, the
    folder and every file read must resolve (symbolic links followed) inside `root`.
    """
    folder = Path(path)
    confine = _confinement(root)
    confine(folder)
    if not folder.is_dir():
        raise CheckpointError(folder, "not a checkpoint folder (it does not exist or is a file)")
    confine(folder / CONFIG_FILE)
    config = read_config(folder / CONFIG_FILE)
    weights_path = folder / WEIGHTS_FILE
    confine(weights_path)
    header = _read_header(folder, weights_path)
    _check_shapes(weights_path, header, expected_shapes(config))
    for name in (config.input_vocab_path, config.decoder.vocab if config.decoder else None):
        if name is not None:
            confine(_vocab_path(folder, name))
    input_tokenizer = _input_tokenizer(folder, config)
    output_tokenizer = _output_tokenizer(folder, config)
    try:
        tensors = load_file(str(weights_path))
    except Exception as exc:  # NOTE: safetensors raises its own error types for corrupt data
        raise CheckpointError(weights_path, f"unreadable safetensors data ({exc})") from exc
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise CheckpointError(weights_path, f"tensor {name} has non-float dtype {tensor.dtype}")
        if not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(weights_path, f"tensor {name} has non-finite values (NaN or Inf)")
    model = build_model(config)
    model.load_state_dict(tensors, strict=True)
    place = torch.device(device)
    requested = DTYPES[config.serving.dtype] if config.serving.dtype else dtype or torch.float32
    plan = plan_precision(config, requested, place.type, every_part, capabilities)
    # NOTE: one dtype for every part casts the whole model, embeddings too (as on a GPU);
    # otherwise embeddings stay float32 and each part is cast (or copied) by its plan.
    model = model.to(device=place, dtype=uniform_dtype(plan) or torch.float32)
    model.eval()
    model.set_precision(plan)
    return LoadedModel(config, model, input_tokenizer, output_tokenizer, folder, plan)


def _confinement(root: Path | str | None) -> Callable[[Path], None]:
    """A check that a path resolves inside `root` (none without a root)."""
    if root is None:
        return lambda path: None
    real_root = Path(root).resolve()

    def confine(path: Path) -> None:
        # NOTE: the target is not named: reasons are shown to clients, host paths are not.
        if not path.resolve().is_relative_to(real_root):
            raise CheckpointError(
                path, "resolves outside the model repository (a symbolic link leads out of it)"
            )

    return confine


def read_config(path: Path) -> ModelConfig:
    """Parse and validate config.json; JSON and schema errors name the file and the field."""
    if not path.is_file():
        raise CheckpointError(path, "missing (every checkpoint needs a config.json)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise CheckpointError(path, f"not UTF-8 text ({exc})") from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(
            path, f"malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from exc
    try:
        return ModelConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}"
            for err in exc.errors()
        )
        raise CheckpointError(path, f"invalid config: {problems}") from exc


def _read_header(folder: Path, path: Path) -> dict[str, Any]:
    """The safetensors header (name → dtype, shape, offsets), checked against the file size."""
    if not path.is_file():
        pickles = [name for name in PICKLE_NAMES if (folder / name).exists()]
        if pickles:
            raise CheckpointError(
                folder / pickles[0],
                "pickle checkpoints are refused (loading them can run code); "
                "convert the weights to model.safetensors",
            )
        raise CheckpointError(path, "missing (the weights must be in model.safetensors)")
    size = path.stat().st_size
    with path.open("rb") as handle:
        start = handle.read(8)
        if (
            start[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
            or start[:4] == b"PK\x03\x04"
        ):
            raise CheckpointError(
                path,
                "this is a pickle / torch.save file, not safetensors; pickles are refused "
                "(loading them can run code)",
            )
        if len(start) < 8:
            raise CheckpointError(
                path, f"truncated: {size} bytes, shorter than a safetensors header"
            )
        (header_size,) = struct.unpack("<Q", start)
        if header_size > MAX_HEADER or 8 + header_size > size:
            raise CheckpointError(
                path,
                f"truncated or not safetensors: {header_size}-byte header in a {size}-byte file",
            )
        try:
            header = json.loads(handle.read(header_size))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(path, f"not a safetensors file (bad header: {exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(path, "not a safetensors file (header is not a JSON object)")
    header.pop("__metadata__", None)
    data_size = size - 8 - header_size
    end = 0
    for name, info in header.items():
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError) as exc:
            raise CheckpointError(path, f"bad safetensors header entry for {name}") from exc
    if end > data_size:
        raise CheckpointError(
            path,
            f"truncated: the header promises {end} bytes of tensor data, the file has {data_size}",
        )
    return header


def _check_shapes(path: Path, header: dict[str, Any], expected: dict[str, Shape]) -> None:
    problems: list[str] = []
    missing = sorted(set(expected) - set(header))
    unexpected = sorted(set(header) - set(expected))
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected)}")
    wrong = [
        f"{name} is {list(header[name]['shape'])}, expected {list(shape)}"
        for name, shape in expected.items()
        if name in header and tuple(header[name].get("shape", ())) != shape
    ]
    if wrong:
        problems.append(f"wrong shapes: {'; '.join(wrong)}")
    if problems:
        raise CheckpointError(path, " | ".join(problems) + " (checked against config.json)")


def _vocab_path(folder: Path, name: str) -> Path:
    """`folder / name`, refusing names that leave the checkpoint folder."""
    path = folder / name
    if Path(name).name != name or name in ("", ".", ".."):
        raise CheckpointError(
            folder / CONFIG_FILE, f"vocab file {name!r} must be a plain file name in the folder"
        )
    return path


def read_vocab(path: Path, vocab_size: int) -> list[str]:
    """A vocab file: a JSON array of `vocab_size` distinct token strings (id = index)."""
    if not path.is_file():
        raise CheckpointError(path, "missing vocab file (named in config.json)")
    try:
        vocab = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(path, f"malformed vocab JSON ({exc})") from exc
    if not isinstance(vocab, list) or not all(isinstance(t, str) for t in vocab):
        raise CheckpointError(path, "a vocab must be a JSON array of strings")
    if len(vocab) != vocab_size:
        raise CheckpointError(
            path, f"vocab has {len(vocab)} tokens but config.json says vocab_size {vocab_size}"
        )
    if len(set(vocab)) != len(vocab):
        raise CheckpointError(path, "vocab has duplicate tokens")
    return vocab


def _input_tokenizer(folder: Path, config: ModelConfig) -> Tokenizer | None:
    spec = config.input
    if not isinstance(spec, TextInput):
        return None
    path = _vocab_path(folder, spec.vocab)
    vocab = read_vocab(path, spec.vocab_size)
    if vocab[:2] != [PAD, UNK]:
        raise CheckpointError(
            path, f'an input vocab must start with "{PAD}", "{UNK}" (ids 0 and 1)'
        )
    return Tokenizer(vocab, spec.tokenizer)


def _output_tokenizer(folder: Path, config: ModelConfig) -> Tokenizer | None:
    dec = config.decoder
    if dec is None or dec.vocab is None:
        return None
    path = _vocab_path(folder, dec.vocab)
    vocab = read_vocab(path, dec.vocab_size)
    for token in (PAD, UNK):
        if token not in vocab:
            raise CheckpointError(path, f'the target vocab has no "{token}" token')
    for token, index in ((BOS, dec.bos_id), (EOS, dec.eos_id)):
        if vocab[index] != token:
            raise CheckpointError(
                path,
                f'token {index} must be "{token}" (decoder.{token[1:4]}_id), not {vocab[index]!r}',
            )
    kind = config.input.tokenizer if isinstance(config.input, TextInput) else "char"
    return Tokenizer(vocab, kind)
