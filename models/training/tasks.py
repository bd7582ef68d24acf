"""The bundled training tasks: what data, which checkpoint config, how a batch is scored.

Each task builds a `ModelConfig` for the project's own model classes (`EncoderModel`,
`Seq2SeqModel`), yields training batches, computes a training step's loss, evaluates on a split
and computes its trivial baselines. The trainer (`trainer.py`) knows nothing task-specific.
Shapes: N = batch, T = source steps, V = target vocab.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sized
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from models.checkpoint import Model
from models.config import (
    FORMAT,
    CellType,
    DecoderSpec,
    EncoderSpec,
    FeaturesInput,
    HeadSpec,
    ModelConfig,
    TextInput,
)
from models.encoder import EncoderModel, collate
from models.seq2seq import Seq2SeqModel
from models.tokenizer import BOS, EOS, PAD, UNK, Tokenizer
from models.training import dates, metrics, series, surnames
from models.training.errors import TrainingError

Split = Literal["valid", "test"]
EVAL_BATCH = 512


@dataclass(frozen=True, kw_only=True)
class Hyper:
    """Architecture and optimisation settings of one training run."""

    cell: CellType
    layers: int
    hidden: int
    bidirectional: bool
    attention: bool = False  # seq2seq only
    embedding: int = 0  # text only
    attention_size: int = 0
    epochs: int
    batch_size: int
    learning_rate: float
    dropout: float = 0.0  # training only: on embeddings and between layers


@dataclass(frozen=True)
class Batch:
    """A padded training batch: inputs [N, T] int64 or [N, T, F] float, lengths [N] (CPU)."""

    inputs: Tensor
    lengths: Tensor
    targets: Tensor  # [N] labels, [N, U] target ids (seq2seq) or [N] values (regression)


@dataclass(frozen=True)
class StepResult:
    """A training step's loss and a running-metric contribution: `total` summed over `count`."""

    loss: Tensor
    total: float
    count: int


class Task(ABC):
    """One bundled task; construct, then `load(seed, limit)` before anything else."""

    name: ClassVar[str]
    summary: ClassVar[str]
    kind: ClassVar[Literal["encode", "seq2seq"]]
    metric: ClassVar[str]  # the headline held-out metric in `evaluate`'s result
    higher_is_better: ClassVar[bool]
    train_metric: ClassVar[str]  # what `StepResult.total / count` is, for the progress bar
    defaults: ClassVar[Hyper]

    @abstractmethod
    def load(self, seed: int, limit: int | None = None) -> None:
        """Read or generate the data; `limit` caps the training examples (smoke runs)."""

    @abstractmethod
    def config(self, hyper: Hyper) -> ModelConfig:
        """The checkpoint config of a model for this task."""

    @abstractmethod
    def train_size(self) -> int:
        """Number of training examples."""

    @abstractmethod
    def batches(self, generator: torch.Generator, batch_size: int) -> Iterator[Batch]:
        """One epoch of shuffled training batches."""

    @abstractmethod
    def step(self, model: Model, batch: Batch) -> StepResult:
        """Forward pass and loss of one training batch (train mode, gradients on)."""

    @abstractmethod
    def evaluate(self, model: Model, split: Split) -> dict[str, float]:
        """Metrics of the model on a held-out split (eval mode, no gradients)."""

    @abstractmethod
    def baselines(self) -> dict[str, float]:
        """Trivial baselines' metrics on the test split."""

    @abstractmethod
    def data_summary(self) -> dict[str, Any]:
        """Where the data comes from and the split sizes (for metrics.json)."""

    def vocabs(self) -> tuple[list[str] | None, list[str] | None]:
        """(input vocab, target vocab) for `checkpoint.save`."""
        return None, None

    def finish(self, model: Model) -> None:
        """Turn the trained model into the one that is saved (default: unchanged)."""
        return None

    def saved(self) -> None:
        """The models evaluated from now on are saved checkpoints, as `finish` leaves them."""
        return None


def char_vocab(texts: list[str], specials: list[str]) -> list[str]:
    """`specials` then every character of `texts`, sorted (deterministic ids)."""
    chars = sorted({c for text in texts for c in text} - set(specials))
    return [*specials, *chars]


def _shuffled(count: int, generator: torch.Generator, batch_size: int) -> Iterator[Tensor]:
    order = torch.randperm(count, generator=generator)
    for start in range(0, count, batch_size):
        yield order[start : start + batch_size]


def _text_batches(
    ids: list[Tensor], targets: Tensor, generator: torch.Generator, batch_size: int
) -> Iterator[Batch]:
    """One epoch of shuffled, padded batches of token-id sequences and their targets."""
    for rows in _shuffled(len(ids), generator, batch_size):
        inputs, lengths = collate([ids[i] for i in rows.tolist()])
        yield Batch(inputs, lengths, targets[rows])


def _eval_batches(
    tokenizer: Tokenizer, texts: list[str], device: torch.device
) -> Iterator[tuple[Tensor, Tensor]]:
    """(inputs [N, T] on `device`, lengths [N]) of `texts`, EVAL_BATCH texts at a time."""
    for start in range(0, len(texts), EVAL_BATCH):
        # NOTE: a text with no known character still needs one step: <unk>.
        ids = [torch.tensor(tokenizer.encode(t) or [1]) for t in texts[start : start + EVAL_BATCH]]
        inputs, lengths = collate(ids)
        yield inputs.to(device), lengths


def device_of(model: Model) -> torch.device:
    """The device the model's weights are on."""
    return next(model.parameters()).device


def _encoder_spec(hyper: Hyper) -> EncoderSpec:
    return EncoderSpec(
        cell=hyper.cell,
        hidden_size=hyper.hidden,
        num_layers=hyper.layers,
        bidirectional=hyper.bidirectional,
    )


def _char_input(vocab: list[str], hyper: Hyper) -> TextInput:
    """Text read character by character through an embedding."""
    return TextInput(
        type="text", vocab_size=len(vocab), embedding_size=hyper.embedding, tokenizer="char"
    )


def _encode_config(inputs: TextInput | FeaturesInput, hyper: Hyper, head: HeadSpec) -> ModelConfig:
    """An encode model that pools the last step into `head`."""
    return ModelConfig(
        format=FORMAT,
        task="encode",
        input=inputs,
        encoder=_encoder_spec(hyper),
        pooling="last",
        head=head,
    )


def _split_sizes(train: Sized, valid: Sized, test: Sized) -> dict[str, int]:
    """The examples in each split, for `data_summary`."""
    return {"train": len(train), "valid": len(valid), "test": len(test)}


# ------------------------------------------------------------------------------------ surnames


class SurnamesTask(Task):
    """Surname → language of origin: char text in, encoding + label probabilities out."""

    name = "surnames"
    summary = "text classifier: surname → language of origin (Faker's per-locale name lists)"
    kind = "encode"
    metric = "accuracy"
    higher_is_better = True
    train_metric = "acc"
    defaults = Hyper(
        cell="gru",
        layers=1,
        hidden=128,
        bidirectional=True,
        embedding=32,
        epochs=12,
        batch_size=64,
        learning_rate=3e-3,
        dropout=0.3,
    )

    def load(self, seed: int, limit: int | None = None) -> None:
        splits = surnames.load_surnames(seed)
        self.labels = splits.labels
        self.train = splits.train[:limit] if limit else splits.train
        self.valid, self.test = splits.valid, splits.test
        self.vocab = char_vocab([name for name, _ in self.train], [PAD, UNK])
        self.tokenizer = Tokenizer(self.vocab, "char")
        self._train_ids = [torch.tensor(self.tokenizer.encode(n)) for n, _ in self.train]
        self._train_labels = torch.tensor([label for _, label in self.train])

    def config(self, hyper: Hyper) -> ModelConfig:
        head = HeadSpec(size=len(self.labels), labels=self.labels)
        return _encode_config(_char_input(self.vocab, hyper), hyper, head)

    def vocabs(self) -> tuple[list[str] | None, list[str] | None]:
        return self.vocab, None

    def train_size(self) -> int:
        return len(self.train)

    def batches(self, generator: torch.Generator, batch_size: int) -> Iterator[Batch]:
        return _text_batches(self._train_ids, self._train_labels, generator, batch_size)

    def logits(self, model: Model, inputs: Tensor, lengths: Tensor) -> Tensor:
        """Head logits [N, labels] (the model's own scores are softmax probabilities)."""
        assert isinstance(model, EncoderModel) and model.head is not None
        encodings = model(inputs, lengths).encodings  # [N, E], the config's pooling
        logits: Tensor = model.head(encodings)
        return logits

    def step(self, model: Model, batch: Batch) -> StepResult:
        logits = self.logits(model, batch.inputs, batch.lengths)
        loss = F.cross_entropy(logits, batch.targets)
        correct = (logits.argmax(-1) == batch.targets).sum().item()
        return StepResult(loss, float(correct), len(batch.targets))

    def predict(self, model: Model, names: list[str]) -> list[int]:
        """Top label index of each name (the served scores: the head in its planned dtype)."""
        assert isinstance(model, EncoderModel)
        predicted: list[int] = []
        with torch.inference_mode():
            for inputs, lengths in _eval_batches(self.tokenizer, names, device_of(model)):
                scores = model(inputs, lengths).scores
                assert scores is not None
                predicted.extend(scores.argmax(-1).tolist())
        return predicted

    def evaluate(self, model: Model, split: Split) -> dict[str, float]:
        examples = self.valid if split == "valid" else self.test
        predicted = self.predict(model, [name for name, _ in examples])
        return {"accuracy": metrics.accuracy(predicted, [label for _, label in examples])}

    def baselines(self) -> dict[str, float]:
        top = metrics.majority([label for _, label in self.train])
        expected = [label for _, label in self.test]
        return {"majority_class_accuracy": metrics.accuracy([top] * len(expected), expected)}

    def data_summary(self) -> dict[str, Any]:
        return {
            "source": "Faker's per-locale last-name lists (faker.providers.person.*)",
            "labels": {label: list(surnames.LOCALES[label]) for label in self.labels},
            "split": "by name; names listed under two labels dropped",
            **_split_sizes(self.train, self.valid, self.test),
        }


# --------------------------------------------------------------------------------------- dates


class DatesTask(Task):
    """Human-written dates in many formats and languages → ISO YYYY-MM-DD (seq2seq)."""

    name = "dates"
    summary = "seq2seq with attention: human-written dates (17 languages) → ISO YYYY-MM-DD"
    kind = "seq2seq"
    metric = "exact_match"
    higher_is_better = True
    train_metric = "tok_acc"
    defaults = Hyper(
        cell="gru",
        layers=1,
        hidden=64,
        bidirectional=True,
        attention=True,
        embedding=32,
        attention_size=64,
        epochs=2,
        batch_size=64,
        learning_rate=3e-3,
    )
    TARGET_CHARS = "0123456789-"

    def load(self, seed: int, limit: int | None = None) -> None:
        splits = dates.load_dates(seed, train_size=limit or 60_000)
        self.train, self.valid, self.test = splits.train, splits.valid, splits.test
        self.vocab = char_vocab([source for source, _ in self.train], [PAD, UNK])
        self.target_vocab = [PAD, UNK, BOS, EOS, *self.TARGET_CHARS]
        self.tokenizer = Tokenizer(self.vocab, "char")
        self.target_tokenizer = Tokenizer(self.target_vocab, "char")
        self._train_ids = [torch.tensor(self.tokenizer.encode(s)) for s, _ in self.train]
        eos = self.target_vocab.index(EOS)
        # NOTE: every ISO date has 10 characters, so targets need no padding.
        self._train_targets = torch.tensor(
            [[*self.target_tokenizer.encode(t), eos] for _, t in self.train]
        )  # [examples, 11]

    def config(self, hyper: Hyper) -> ModelConfig:
        encoder = _encoder_spec(hyper)
        return ModelConfig(
            format=FORMAT,
            task="seq2seq",
            input=_char_input(self.vocab, hyper),
            encoder=encoder,
            decoder=DecoderSpec(
                hidden_size=encoder.output_size,
                num_layers=hyper.layers,
                embedding_size=hyper.embedding,
                vocab_size=len(self.target_vocab),
                attention="additive" if hyper.attention else "none",
                attention_size=hyper.attention_size if hyper.attention else None,
                bos_id=self.target_vocab.index(BOS),
                eos_id=self.target_vocab.index(EOS),
                max_length=16,
                vocab="target_vocab.json",
            ),
        )

    def vocabs(self) -> tuple[list[str] | None, list[str] | None]:
        return self.vocab, self.target_vocab

    def train_size(self) -> int:
        return len(self.train)

    def batches(self, generator: torch.Generator, batch_size: int) -> Iterator[Batch]:
        return _text_batches(self._train_ids, self._train_targets, generator, batch_size)

    def step(self, model: Model, batch: Batch) -> StepResult:
        assert isinstance(model, Seq2SeqModel)
        state = model.encode(batch.inputs, batch.lengths)
        targets = batch.targets  # [N, U]
        previous = torch.full_like(targets[:, 0], self.target_vocab.index(BOS))
        losses: list[Tensor] = []
        hits: list[Tensor] = []
        # NOTE: teacher forcing through the model's own `step`, the computation serving runs.
        for position in range(targets.shape[1]):
            log_probs, state = model.step(state, previous)  # [N, V]
            expected = targets[:, position]
            losses.append(F.nll_loss(log_probs, expected))
            hits.append(log_probs.argmax(-1) == expected)
            previous = expected
        loss = torch.stack(losses).mean()
        # NOTE: one device sync per batch, not one per target position.
        correct = float(torch.stack(hits).sum().item())
        return StepResult(loss, correct, targets.numel())

    def translate(self, model: Model, sources: list[str]) -> list[str]:
        """Greedy outputs of the model for `sources`."""
        assert isinstance(model, Seq2SeqModel)
        outputs: list[str] = []
        with torch.inference_mode():
            for inputs, lengths in _eval_batches(self.tokenizer, sources, device_of(model)):
                for tokens in model.generate(inputs, lengths):
                    outputs.append(self.target_tokenizer.decode(tokens))
        return outputs

    def evaluate(self, model: Model, split: Split) -> dict[str, float]:
        pairs = self.valid if split == "valid" else self.test
        predicted = self.translate(model, [source for source, _ in pairs])
        expected = [target for _, target in pairs]
        chars = [
            sum(a == b for a, b in zip(p.ljust(10), e, strict=False)) / 10
            for p, e in zip(predicted, expected, strict=True)
        ]
        return {
            "exact_match": metrics.accuracy(predicted, expected),
            "char_accuracy": sum(chars) / len(chars),
        }

    def baselines(self) -> dict[str, float]:
        expected = [target for _, target in self.test]
        top = metrics.majority([target for _, target in self.train])
        return {
            "copy_exact_match": metrics.accuracy([s for s, _ in self.test], expected),
            "most_common_date_exact_match": metrics.accuracy([top] * len(expected), expected),
        }

    def data_summary(self) -> dict[str, Any]:
        return {
            "source": "Babel (CLDR) full/long/medium date formats + numeric/English forms",
            "locales": list(dates.LOCALES),
            "numeric_formats": len(dates.NUMERIC),
            "split": "by calendar day 1000-01-01..2999-12-31 (test 10%, valid 5% of days); "
            "half of each split's examples drawn from its days in 1900..2099",
            **_split_sizes(self.train, self.valid, self.test),
        }


# -------------------------------------------------------------------------------------- elnino


class ElninoTask(Task):
    """Next-month El Niño sea-surface temperature (°C) from the previous 24 months."""

    name = "elnino"
    summary = "feature-sequence forecaster: El Niño monthly sea temperature (statsmodels data)"
    kind = "encode"
    metric = "mae"
    higher_is_better = False
    train_metric = "mae"
    defaults = Hyper(
        cell="lstm",
        layers=1,
        hidden=32,
        bidirectional=False,
        epochs=100,
        batch_size=32,
        learning_rate=1e-2,
    )

    def load(self, seed: int, limit: int | None = None) -> None:
        splits = series.load_series()
        self.window = splits.window
        self.first_test_month = splits.first_test_month
        self.train = splits.train[:limit] if limit else splits.train
        self.valid, self.test = splits.valid, splits.test
        targets = [target for _, target in self.train]
        self.mean = sum(targets) / len(targets)
        self.std = math.sqrt(sum((t - self.mean) ** 2 for t in targets) / len(targets))
        self.folded = False
        self._train_x = self._tensor([w for w, _ in self.train], normalise=True)  # [N, T, 1]
        self._train_y = (torch.tensor(targets) - self.mean) / self.std  # [N]

    def _tensor(self, windows: list[list[float]], normalise: bool) -> Tensor:
        x = torch.tensor(windows, dtype=torch.float32)[:, :, None]  # [N, T, 1]
        return (x - self.mean) / self.std if normalise else x

    def config(self, hyper: Hyper) -> ModelConfig:
        return _encode_config(FeaturesInput(type="features", size=1), hyper, HeadSpec(size=1))

    def train_size(self) -> int:
        return len(self.train)

    def batches(self, generator: torch.Generator, batch_size: int) -> Iterator[Batch]:
        full = torch.full((batch_size,), self.window, dtype=torch.int64)
        for rows in _shuffled(len(self.train), generator, batch_size):
            yield Batch(self._train_x[rows], full[: len(rows)], self._train_y[rows])

    def step(self, model: Model, batch: Batch) -> StepResult:
        assert isinstance(model, EncoderModel)
        scores = model(batch.inputs, batch.lengths).scores
        assert scores is not None
        predicted = scores[:, 0]  # [N], normalised units
        loss = F.mse_loss(predicted, batch.targets)
        error = float((predicted - batch.targets).abs().sum().item()) * self.std
        return StepResult(loss, error, len(batch.targets))

    def forecast(self, model: Model, windows: list[list[float]]) -> list[float]:
        """Next-value forecasts (°C) for raw windows (°C)."""
        assert isinstance(model, EncoderModel)
        with torch.inference_mode():
            x = self._tensor(windows, normalise=not self.folded).to(device_of(model))
            lengths = torch.full((len(windows),), x.shape[1], dtype=torch.int64)
            scores = model(x, lengths).scores
            assert scores is not None
            out = scores[:, 0].cpu()
            if not self.folded:
                out = out * self.std + self.mean
        return [float(v) for v in out.tolist()]

    def evaluate(self, model: Model, split: Split) -> dict[str, float]:
        pairs = self.valid if split == "valid" else self.test
        predicted = self.forecast(model, [w for w, _ in pairs])
        expected = [t for _, t in pairs]
        return {"mae": metrics.mae(predicted, expected), "rmse": metrics.rmse(predicted, expected)}

    def baselines(self) -> dict[str, float]:
        expected = [t for _, t in self.test]
        last = [w[-1] for w, _ in self.test]
        seasonal = [w[-12] for w, _ in self.test]
        linear = self._linear_forecast([w for w, _ in self.test])
        return {
            "last_value_mae": metrics.mae(last, expected),
            "last_value_rmse": metrics.rmse(last, expected),
            "same_month_last_year_mae": metrics.mae(seasonal, expected),
            "linear_ar24_mae": metrics.mae(linear, expected),
            "linear_ar24_rmse": metrics.rmse(linear, expected),
        }

    def _linear_forecast(self, windows: list[list[float]]) -> list[float]:
        """A least-squares linear autoregression on the training windows (a strong baseline)."""
        x = torch.tensor([[*w, 1.0] for w, _ in self.train], dtype=torch.float64)
        y = torch.tensor([t for _, t in self.train], dtype=torch.float64)[:, None]
        coef = torch.linalg.lstsq(x, y).solution  # [window + 1, 1]
        test = torch.tensor([[*w, 1.0] for w in windows], dtype=torch.float64)
        return [float(v) for v in (test @ coef)[:, 0].tolist()]

    def finish(self, model: Model) -> None:
        """Fold the input/output normalisation into the weights: the saved model reads and
        writes °C directly (exact: it only rescales the first layer's inputs and the head)."""
        assert isinstance(model, EncoderModel) and model.head is not None
        rnn = model.encoder.rnn
        with torch.no_grad():
            for suffix in ("", "_reverse"):
                weight = getattr(rnn, f"weight_ih_l0{suffix}", None)
                if weight is None:
                    continue
                bias = getattr(rnn, f"bias_ih_l0{suffix}")
                # W (x − m)/s + b = (W/s) x + (b − W m/s)
                bias.sub_(weight.sum(dim=1) * self.mean / self.std)
                weight.div_(self.std)
            # s (W h + b) + m
            model.head.weight.mul_(self.std)
            model.head.bias.mul_(self.std).add_(self.mean)
        self.folded = True

    def saved(self) -> None:
        self.folded = True  # NOTE: a saved model reads and writes °C (`finish` folded them in)

    def data_summary(self) -> dict[str, Any]:
        return {
            "source": "statsmodels/datasets/elnino/elnino.csv (monthly sea temperature, °C)",
            "input": f"the previous {self.window} monthly temperatures in °C, oldest first",
            "output": "the next month's temperature in °C (head output 0)",
            "split": f"by time: targets from {self.first_test_month} on are test, the 6 years "
            "before valid, the rest train",
            **_split_sizes(self.train, self.valid, self.test),
        }


TASKS: dict[str, type[Task]] = {task.name: task for task in (SurnamesTask, DatesTask, ElninoTask)}


def make_task(name: str) -> Task:
    """A fresh task object by name; unknown names raise `TrainingError` listing the known ones."""
    if name not in TASKS:
        raise TrainingError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)}")
    return TASKS[name]()
