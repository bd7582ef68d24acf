"""Import a vanilla PyTorch nn.RNN / nn.LSTM / nn.GRU state_dict into a repository version.

A user who trained with plain PyTorch, e.g.

    class Net(nn.Module):
        def __init__(self):
            self.embedding = nn.Embedding(5000, 64)        # optional
            self.lstm = nn.LSTM(64, 128, num_layers=2, batch_first=True, bidirectional=True)
            self.fc = nn.Linear(256, 3)                     # optional head on the encoding

    torch.save(net.state_dict(), "net.pt")

gets a servable encode model with `rnnserve import-torch net.pt --repository repo --name net`
(or `import_state_dict("net.pt", "repo", "net")`). Cell, sizes, layers and directions are read
from the weight shapes; the recurrent keys may carry any prefix (`lstm.`, `rnn.`, none), and the
embedding and the head are found by their shapes whatever their names (`embedding.`, `emb.`,
`fc.`, `head.`...). The head must read rnnserve's "last" encoding (top layer's final h;
bidirectional: concat(forward final, backward final)) or the pooling you name. A missing bias
(`bias=False`) is imported as zeros. `.pt` files are read with `torch.load(weights_only=True)`:
no code from the file runs.
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from torch import Tensor

from models.checkpoint import CheckpointError, Model, build_model, load, save
from models.config import ModelConfig
from models.recurrent import GATES
from models.versions import discard, publish_version, staging_folder

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
CELL_BY_GATES = {gates: cell for cell, gates in GATES.items()}
# Terminal styling that torch puts in some of its messages.
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_PICKLED_CLASS = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
SAVE_STATE_DICT = "save the weights with torch.save(model.state_dict(), PATH) and import that file"
RNN_KEY = re.compile(
    r"^(?P<prefix>.*?)(?P<kind>weight_ih|weight_hh|bias_ih|bias_hh)_l(?P<layer>\d+)(?P<rev>_reverse)?$"
)


class TorchImportError(ValueError):
    """The state_dict cannot be mapped to an rnnserve checkpoint; the message says why."""


def read_state_dict(path: Path | str) -> dict[str, Tensor]:
    """Tensors of a `.safetensors` file or a `torch.save`d state_dict (weights_only: runs no code).

    A dict holding a "state_dict" entry (e.g. a Lightning checkpoint) is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise TorchImportError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        return dict(load_file(str(path)))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # NOTE: the refusal below is the one message to show
            loaded: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # NOTE: weights_only refusals and corrupt files alike
        raise TorchImportError(_load_refusal(path, exc)) from exc
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise TorchImportError(
            f"{path}: holds a {type(loaded).__name__}, not a state_dict; {SAVE_STATE_DICT}"
        )
    tensors = {str(k): v for k, v in loaded.items() if isinstance(v, Tensor)}
    others = sorted(str(k) for k, v in loaded.items() if not isinstance(v, Tensor))
    if others:
        raise TorchImportError(f"{path}: entries that are not tensors: {', '.join(others)}")
    return tensors


def _load_refusal(path: Path, exc: Exception) -> str:
    """Why `torch.load(weights_only=True)` refused `path`, in a sentence that says what to do."""
    text = _ANSI.sub("", str(exc))
    pickled = _PICKLED_CLASS.search(text)
    if pickled is not None:
        return (
            f"{path}: holds a pickled {pickled.group(1)} object (torch.save(model) stores the "
            f"whole module, and loading it would run code), not a state_dict; {SAVE_STATE_DICT}"
        )
    if isinstance(exc, pickle.UnpicklingError):
        return (
            f"{path}: not a plain state_dict (it holds objects other than tensors, which loading "
            f"would have to run code for); {SAVE_STATE_DICT}"
        )
    first = (text.strip().splitlines() or [type(exc).__name__])[0]
    sentence = first.split(". ")[0].rstrip(".")
    return f"{path}: not a PyTorch state_dict file, or a corrupt one ({sentence})"


def import_state_dict(
    state_dict_or_path: Mapping[str, Tensor] | Path | str,
    out_repository: Path | str,
    name: str,
    version: int | None = None,
    *,
    cell: Literal["rnn", "lstm", "gru"] | None = None,
    input_size: int | None = None,
    vocab: list[str] | None = None,
    tokenizer: Literal["char", "whitespace"] = "char",
    rnn_prefix: str | None = None,
    embedding_prefix: str | None = None,
    head_prefix: str | None = None,
    labels: list[str] | None = None,
    pooling: Literal["last", "mean", "max"] = "last",
    nonlinearity: Literal["tanh", "relu"] | None = None,
    reset_after: bool | None = None,
) -> Path:
    """Write `out_repository/name/<version>` from a vanilla state_dict; returns the new folder.

    `version` None = the next free number; an existing version is never overwritten. `cell` and
    `input_size` are inferred from the shapes (given ones are checked). With an embedding the
    input is token ids, or text when `vocab` (JSON-array order, "<pad>" = 0, "<unk>" = 1) is given.
    The embedding and the head are found by their shapes unless their prefixes are given.
    With `labels` the head is a classifier: the server answers its softmax probabilities.
    `nonlinearity` is needed for a relu nn.RNN (shapes cannot tell); `reset_after=False` marks a
    GRU of the reset-before form (nn.GRU is reset-after). The written version is loaded back
    before this returns, so it is known to be servable.
    """
    if not NAME_PATTERN.match(name) or ".." in name:
        raise TorchImportError(
            f"model name {name!r}: use letters, digits, '-', '_', '.' (no path separators or '..')"
        )
    if isinstance(state_dict_or_path, (str, Path)):
        tensors = read_state_dict(state_dict_or_path)
    else:
        tensors = {k: v.detach().cpu() for k, v in state_dict_or_path.items()}
    rnn = _read_recurrent(tensors, rnn_prefix, cell, nonlinearity, reset_after)
    recurrent_keys = {rnn.prefix + key for key in rnn.weights}
    embedding_at, head_at = _find_layers(
        tensors,
        recurrent_keys,
        rnn.input_size,
        rnn.encoding_size,
        embedding_prefix,
        head_prefix,
        vocab,
    )
    inputs = _input_part(tensors, embedding_at, rnn, vocab, tokenizer, input_size)
    head = _head_part(tensors, head_at, rnn, labels)
    _check_all_mapped(tensors, recurrent_keys | inputs.sources | head.sources, rnn)
    raw: dict[str, Any] = {
        "format": "rnnserve/v1",
        "task": "encode",
        "pooling": pooling,
        "input": inputs.section,
        "encoder": rnn.section,
    }
    if head.section is not None:
        raw["head"] = head.section
    model = _build(raw, {**inputs.state, **head.state, **rnn.state()})
    return _write_version(Path(out_repository) / name, version, model, vocab)


def _build(raw: dict[str, Any], state: dict[str, Tensor]) -> Model:
    """The model of config `raw` holding `state` (float32), or why they do not fit."""
    try:
        config = ModelConfig.model_validate(raw)
    except ValidationError as exc:
        raise TorchImportError(f"the inferred config is invalid: {exc}") from exc
    model = build_model(config)
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as exc:
        raise TorchImportError(f"weights do not fit the inferred architecture: {exc}") from exc
    return model


@dataclass(frozen=True)
class _Recurrent:
    """The recurrent layer as its weights' shapes tell it, and its config section."""

    weights: dict[str, Tensor]  # keys without `prefix`, e.g. "weight_ih_l0_reverse"
    prefix: str
    hidden: int
    gates: int
    bidirectional: bool
    input_size: int  # what the first layer reads
    section: dict[str, Any]  # the config's "encoder"

    @property
    def encoding_size(self) -> int:
        return self.hidden * (2 if self.bidirectional else 1)

    def state(self) -> dict[str, Tensor]:
        """The checkpoint's `encoder.rnn.*` tensors; a missing bias (`bias=False`) is zeros."""
        state = {f"encoder.rnn.{key}": value for key, value in self.weights.items()}
        for key, shape in _expected_biases(self.weights, self.hidden * self.gates).items():
            state.setdefault(f"encoder.rnn.{key}", torch.zeros(shape))
        return state


@dataclass(frozen=True)
class _Part:
    """A config section (None: no such part), its checkpoint tensors and the keys they came from."""

    section: dict[str, Any] | None
    state: dict[str, Tensor]
    sources: set[str]


def _read_recurrent(
    tensors: Mapping[str, Tensor],
    rnn_prefix: str | None,
    cell: str | None,
    nonlinearity: str | None,
    reset_after: bool | None,
) -> _Recurrent:
    """Cell, sizes, layers and directions from the recurrent weights (a given `cell` is checked)."""
    weights, prefix = _recurrent_weights(tensors, rnn_prefix)
    hidden = weights["weight_hh_l0"].shape[1]
    gates, remainder = divmod(weights["weight_hh_l0"].shape[0], hidden)
    found_cell = CELL_BY_GATES.get(gates) if remainder == 0 else None
    if found_cell is None:
        raise TorchImportError(
            f"{prefix}weight_hh_l0 has shape {list(weights['weight_hh_l0'].shape)}: "
            "not the 1, 3 or 4 gate blocks of nn.RNN, nn.GRU or nn.LSTM"
        )
    if cell is not None and cell != found_cell:
        raise TorchImportError(
            f"cell {cell!r} was given but the weights have {gates} gate block(s): a {found_cell}"
        )
    bidirectional = "weight_ih_l0_reverse" in weights
    section: dict[str, Any] = {
        "cell": found_cell,
        "hidden_size": hidden,
        "num_layers": 1 + max(int(m["layer"]) for m in map(RNN_KEY.match, weights) if m),
        "bidirectional": bidirectional,
    }
    if nonlinearity is not None:
        section["nonlinearity"] = nonlinearity
    if reset_after is not None:
        section["reset_after"] = reset_after
    return _Recurrent(
        weights, prefix, hidden, gates, bidirectional, weights["weight_ih_l0"].shape[1], section
    )


def _input_part(
    tensors: Mapping[str, Tensor],
    embedding_at: str | None,
    rnn: _Recurrent,
    vocab: list[str] | None,
    tokenizer: str,
    input_size: int | None,
) -> _Part:
    """The config's "input": tokens or text through the embedding, else features."""
    if embedding_at is not None:
        embedding = tensors[f"{embedding_at}weight"]
        section: dict[str, Any] = {
            "type": "tokens",
            "vocab_size": embedding.shape[0],
            "embedding_size": embedding.shape[1],
        }
        if vocab is not None:
            section.update(type="text", tokenizer=tokenizer, vocab="vocab.json")
        return _Part(section, {"encoder.embedding.weight": embedding}, {f"{embedding_at}weight"})
    if vocab is not None:
        raise TorchImportError(
            "a vocab was given but there is no embedding (a 2-D weight without bias of "
            f"width {rnn.input_size}, the recurrent layer's input size)"
        )
    if input_size is not None and input_size != rnn.input_size:
        raise TorchImportError(
            f"input_size {input_size} was given but {rnn.prefix}weight_ih_l0 reads {rnn.input_size}"
        )
    return _Part({"type": "features", "size": rnn.input_size}, {}, set())


def _head_part(
    tensors: Mapping[str, Tensor], head_at: str | None, rnn: _Recurrent, labels: list[str] | None
) -> _Part:
    """The config's "head" (a classifier with `labels`); a missing bias is zeros."""
    if head_at is None:
        if labels is not None:
            raise TorchImportError(
                f"labels were given but there is no head (a 2-D weight of width "
                f"{rnn.encoding_size}, the encoding size, with an optional bias)"
            )
        return _Part(None, {}, set())
    weight = tensors[f"{head_at}weight"]
    size = weight.shape[0]
    return _Part(
        {"size": size} if labels is None else {"size": size, "labels": labels},
        {"head.weight": weight, "head.bias": tensors.get(f"{head_at}bias", torch.zeros(size))},
        {k for k in (f"{head_at}weight", f"{head_at}bias") if k in tensors},
    )


def _check_all_mapped(tensors: Mapping[str, Tensor], used: set[str], rnn: _Recurrent) -> None:
    leftover = sorted(set(tensors) - used)
    if leftover:
        shapes = ", ".join(f"{k} {list(tensors[k].shape)}" for k in leftover)
        raise TorchImportError(
            f"tensors that map to nothing: {shapes} (an embedding is a 2-D weight of width "
            f"{rnn.input_size} without bias, a head a 2-D weight of width {rnn.encoding_size} "
            "with an optional bias; name them with --embedding-prefix / --head-prefix)"
        )


def _find_layers(
    tensors: Mapping[str, Tensor],
    used: set[str],
    input_size: int,
    encoding_size: int,
    embedding_prefix: str | None,
    head_prefix: str | None,
    vocab: list[str] | None,
) -> tuple[str | None, str | None]:
    """The key prefixes (`"embedding."`, `"head."`) of the embedding and the head, or None.

    A given prefix must exist (a missing final dot is added); otherwise each is found by shape
    among the 2-D `<prefix>weight` tensors the recurrent layer does not use: the embedding has no
    bias and is as wide as the recurrent input, the head is as wide as the encoding.
    """
    linear = {
        key[: -len("weight")]: value
        for key, value in tensors.items()
        if key.endswith("weight") and key not in used and value.dim() == 2
    }

    embedding = None
    if embedding_prefix is not None:
        embedding = _given_prefix(tensors, embedding_prefix, "embedding", "--embedding-prefix")
    head = None
    if head_prefix is not None:
        head = _given_prefix(tensors, head_prefix, "head", "--head-prefix")
    embeddings = [
        p
        for p, w in linear.items()
        if w.shape[1] == input_size and f"{p}bias" not in tensors and p != head
    ]
    heads = [p for p, w in linear.items() if w.shape[1] == encoding_size and p != embedding]
    if embedding_prefix is None and head_prefix is None:
        either = sorted(set(embeddings) & set(heads))
        if either and vocab is None:
            raise TorchImportError(
                f"{either[0]}weight could be the embedding or the head (no bias, width "
                f"{input_size} = the encoding size); name it with --embedding-prefix or "
                "--head-prefix"
            )
        heads = [p for p in heads if p not in either]  # NOTE: a vocab means an embedding
    if embedding_prefix is None:
        embedding = _only(embeddings, "embedding", "--embedding-prefix")
    if head_prefix is None:
        head = _only(heads, "head", "--head-prefix")
    return embedding, head


def _given_prefix(tensors: Mapping[str, Tensor], prefix: str, role: str, flag: str) -> str:
    """A prefix named with `flag`, its missing final dot added; it must hold a weight."""
    if prefix and not prefix.endswith(".") and f"{prefix}weight" not in tensors:
        prefix += "."
    if f"{prefix}weight" not in tensors:
        raise TorchImportError(f"no tensor {prefix + 'weight'!r} for the {role} ({flag})")
    return prefix


def _only(found: list[str], role: str, flag: str) -> str | None:
    """The one candidate prefix for `role`, None for none; several must be named with `flag`."""
    if len(found) > 1:
        raise TorchImportError(
            f"more than one tensor could be the {role}: "
            f"{', '.join(p + 'weight' for p in sorted(found))}; name it with {flag}"
        )
    return found[0] if found else None


def _recurrent_weights(
    tensors: Mapping[str, Tensor], rnn_prefix: str | None
) -> tuple[dict[str, Tensor], str]:
    """The recurrent tensors without their prefix, and that prefix."""
    prefixes = {m["prefix"] for m in map(RNN_KEY.match, tensors) if m}
    if rnn_prefix is not None:
        prefixes &= {rnn_prefix}
    if len(prefixes) != 1:
        found = ", ".join(sorted(repr(p) for p in prefixes)) or "none"
        raise TorchImportError(
            f"expected the weights of exactly one nn.RNN/LSTM/GRU (keys like 'weight_ih_l0'); "
            f"found prefixes: {found}"
        )
    prefix = prefixes.pop()
    weights = {
        key[len(prefix) :]: value
        for key, value in tensors.items()
        if key.startswith(prefix) and RNN_KEY.match(key[len(prefix) :]) and RNN_KEY.match(key)
    }
    for needed in ("weight_ih_l0", "weight_hh_l0"):
        if needed not in weights:
            raise TorchImportError(f"missing {prefix}{needed}")
    return weights, prefix


def _expected_biases(weights: Mapping[str, Tensor], rows: int) -> dict[str, tuple[int]]:
    biases: dict[str, tuple[int]] = {}
    for key in weights:
        if key.startswith("weight_ih_"):
            suffix = key[len("weight_ih_") :]
            biases[f"bias_ih_{suffix}"] = (rows,)
            biases[f"bias_hh_{suffix}"] = (rows,)
    return biases


def _write_version(
    model_dir: Path, version: int | None, model: Model, vocab: list[str] | None
) -> Path:
    model_dir.mkdir(parents=True, exist_ok=True)
    existing = [int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    number = version if version is not None else max(existing, default=0) + 1
    if number < 1:
        raise TorchImportError(f"version must be ≥ 1, got {number}")
    target = model_dir / str(number)
    if target.exists():
        raise TorchImportError(f"{target} already exists; versions are never overwritten")
    staging = staging_folder(model_dir, number)
    try:
        save(model, staging, vocab=vocab)
        load(staging)  # NOTE: proves the version is servable before it becomes visible
        return publish_version(staging, model_dir, number)
    except FileExistsError:
        raise TorchImportError(f"{target} already exists; versions are never overwritten") from None
    finally:
        discard(staging)


# ------------------------------------------------------------------------------------------ CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `rnnserve import-torch` flags; `args.run(args)` does the import."""
    parser.add_argument(
        "state_dict", type=Path, help="a torch.save'd state_dict (.pt) or .safetensors"
    )
    parser.add_argument(
        "--repository", type=Path, required=True, help="model repository folder to write into"
    )
    parser.add_argument("--name", required=True, help="model name")
    parser.add_argument(
        "--version", type=int, default=None, help="version number (default: the next free one)"
    )
    parser.add_argument(
        "--cell",
        choices=["rnn", "lstm", "gru"],
        default=None,
        help="checked against the weights (default: read from the weights' gate blocks)",
    )
    parser.add_argument(
        "--input-size",
        type=int,
        default=None,
        help="features per step, checked against the weights (default: read from the weights)",
    )
    parser.add_argument(
        "--vocab",
        type=Path,
        default=None,
        help="JSON array of tokens ('<pad>', '<unk>' first): the model reads text (default: "
        "token ids with an embedding, features without)",
    )
    parser.add_argument(
        "--tokenizer",
        choices=["char", "whitespace"],
        default="char",
        help="how text is split into vocab tokens (default: char)",
    )
    parser.add_argument(
        "--rnn-prefix",
        default=None,
        help="key prefix of the nn.RNN/LSTM/GRU weights (default: found from the keys)",
    )
    parser.add_argument(
        "--embedding-prefix",
        default=None,
        help="key prefix of the nn.Embedding, e.g. 'emb.' (default: found from the shapes: the "
        "2-D weight without bias as wide as the recurrent layer's input)",
    )
    parser.add_argument(
        "--head-prefix",
        default=None,
        help="key prefix of the nn.Linear head, e.g. 'fc.' (default: found from the shapes: the "
        "2-D weight as wide as the encoding)",
    )
    parser.add_argument(
        "--labels",
        default=None,
        help="comma-separated class names, one per head output: the head becomes a "
        "classifier, answered as softmax probabilities ('scores') and the most probable name "
        "('labels') (default: none: the head's raw outputs, e.g. a regression)",
    )
    parser.add_argument(
        "--pooling",
        choices=["last", "mean", "max"],
        default="last",
        help="the encoding the head reads and encode answers by default (default: last: the "
        "final state; bidirectional: both directions' final states)",
    )
    parser.add_argument(
        "--nonlinearity",
        choices=["tanh", "relu"],
        default=None,
        help="an nn.RNN's nonlinearity, which the weights cannot tell (default: tanh)",
    )
    parser.add_argument(
        "--reset-before",
        action="store_true",
        help="the GRU applies the reset gate before the recurrent product (default: off, as "
        "nn.GRU)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run the import for parsed CLI arguments; one error line on stderr on failure."""
    try:
        vocab = None
        if args.vocab is not None:
            vocab = json.loads(Path(args.vocab).read_text(encoding="utf-8"))
            if not isinstance(vocab, list) or not all(isinstance(t, str) for t in vocab):
                raise TorchImportError(f"{args.vocab}: a vocab must be a JSON array of strings")
        target = import_state_dict(
            args.state_dict,
            args.repository,
            args.name,
            args.version,
            cell=args.cell,
            input_size=args.input_size,
            vocab=vocab,
            tokenizer=args.tokenizer,
            rnn_prefix=args.rnn_prefix,
            embedding_prefix=args.embedding_prefix,
            head_prefix=args.head_prefix,
            labels=args.labels.split(",") if args.labels else None,
            pooling=args.pooling,
            nonlinearity=args.nonlinearity,
            reset_after=False if args.reset_before else None,
        )
    except (TorchImportError, CheckpointError, OSError, json.JSONDecodeError) as exc:
        print(f"rnnserve import-torch: error: {exc}", file=sys.stderr)
        return 1
    print(target)
    return 0
