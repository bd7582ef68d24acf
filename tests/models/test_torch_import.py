"""Import from vanilla PyTorch: the same outputs after import, and clear refusals."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from models.checkpoint import load
from models.encoder import EncoderModel, collate
from models.torch_import import TorchImportError, import_state_dict
from service.process.cli import main


class VanillaNet(nn.Module):
    """What a user trains with plain PyTorch: embedding → LSTM → linear on the final state."""

    def __init__(self, bidirectional: bool = True) -> None:
        super().__init__()
        self.embedding = nn.Embedding(30, 6)
        self.lstm = nn.LSTM(6, 10, num_layers=2, batch_first=True, bidirectional=bidirectional)
        self.fc = nn.Linear(20 if bidirectional else 10, 3)

    def forward(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        packed = nn.utils.rnn.pack_padded_sequence(
            self.embedding(tokens), lengths, batch_first=True, enforce_sorted=False
        )
        _, (h, _) = self.lstm(packed)
        final = torch.cat([h[-2], h[-1]], dim=-1) if self.lstm.bidirectional else h[-1]
        out: Tensor = self.fc(final)
        return out


def test_vanilla_lstm_round_trip_through_cli(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = VanillaNet().eval()
    torch.save(net.state_dict(), tmp_path / "net.pt")
    repo = tmp_path / "repo"
    assert (
        main(["import-torch", str(tmp_path / "net.pt"), "--repository", str(repo), "--name", "net"])
        == 0
    )
    assert (
        main(["import-torch", str(tmp_path / "net.pt"), "--repository", str(repo), "--name", "net"])
        == 0
    )
    assert sorted(p.name for p in (repo / "net").iterdir()) == ["1", "2"]
    loaded = load(repo / "net" / "2")
    assert isinstance(loaded.model, EncoderModel)
    assert loaded.config.encoder.cell == "lstm" and loaded.config.encoder.num_layers == 2
    tokens, lengths = collate([torch.tensor([1, 5, 7, 2]), torch.tensor([3, 9])])
    with torch.no_grad():
        expected = net(tokens, lengths)
        scores = loaded.model(tokens, lengths).scores
    assert scores is not None
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("module", ["rnn", "gru"])
def test_features_model_with_prefix_and_text_vocab(tmp_path: Path, module: str) -> None:
    torch.manual_seed(1)
    rnn: nn.Module = nn.GRU(4, 5, bidirectional=True) if module == "gru" else nn.RNN(4, 5)
    state = {f"encoder.{k}": v for k, v in rnn.state_dict().items()}
    path = import_state_dict(state, tmp_path, "feat", cell=module, input_size=4)  # type: ignore[arg-type]
    loaded = load(path)
    inputs = torch.randn(1, 3, 4)
    with torch.no_grad():
        _, h = rnn(inputs.transpose(0, 1))
        encoding = loaded.model(inputs, torch.tensor([3])).encodings  # type: ignore[operator]
    expected = torch.cat([h[-2], h[-1]], dim=-1) if module == "gru" else h[-1]
    torch.testing.assert_close(encoding, expected, rtol=0, atol=1e-6)

    vocab = ["<pad>", "<unk>", "a", "b"]
    emb_state: dict[str, Any] = {"embedding.weight": torch.randn(4, 4), **rnn.state_dict()}
    text = import_state_dict(emb_state, tmp_path, "text", vocab=vocab, nonlinearity=None)
    assert load(text).input_tokenizer is not None


def test_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lstm = nn.LSTM(4, 5)
    with pytest.raises(TorchImportError, match="cell 'gru' was given but the weights have 4"):
        import_state_dict(lstm.state_dict(), tmp_path, "m", cell="gru")
    with pytest.raises(TorchImportError, match=r"map to nothing: decoder\.weight"):
        import_state_dict({**lstm.state_dict(), "decoder.weight": torch.zeros(2)}, tmp_path, "m")
    with pytest.raises(TorchImportError, match="model name"):
        import_state_dict(lstm.state_dict(), tmp_path, "../evil")
    published = import_state_dict(lstm.state_dict(), tmp_path, "m", version=3)
    # NOTE: the server may run as another user: the version is readable like any folder.
    assert published.stat().st_mode & 0o055 == 0o055
    assert (published / "model.safetensors").stat().st_mode & 0o044 == 0o044
    with pytest.raises(TorchImportError, match="never overwritten"):
        import_state_dict(lstm.state_dict(), tmp_path, "m", version=3)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["3"]  # no staging left

    class Exploit:
        def __reduce__(self) -> tuple[Any, ...]:
            return (print, ("ran",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"w": Exploit()}))
    argv = ["import-torch", str(tmp_path / "evil.pt"), "--repository", str(tmp_path), "--name", "e"]
    assert main(argv) == 1
    err = capsys.readouterr()
    assert "ran" not in err.out
    assert err.err.startswith("rnnserve import-torch: error:") and err.err.count("\n") == 1
    assert "Traceback" not in err.err
    (tmp_path / "bad_vocab.json").write_text(json.dumps({"a": 1}))
    assert main([*argv[:-1], "v", "--vocab", str(tmp_path / "bad_vocab.json")]) == 1


class HeadNet(nn.Module):
    """A classifier whose layers are named as many people name them: `emb`, `rnn`, `head`."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 6)
        self.rnn = nn.GRU(6, 10, batch_first=True)
        self.head = nn.Linear(10, 3)

    def forward(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        packed = nn.utils.rnn.pack_padded_sequence(
            self.emb(tokens), lengths, batch_first=True, enforce_sorted=False
        )
        _, h = self.rnn(packed)
        out: Tensor = self.head(h[-1])
        return out


def test_embedding_and_head_are_found_whatever_their_names(tmp_path: Path) -> None:
    torch.manual_seed(3)
    net = HeadNet().eval()
    torch.save(net.state_dict(), tmp_path / "net.pt")
    argv = ["import-torch", str(tmp_path / "net.pt"), "--repository", str(tmp_path / "repo")]
    assert main([*argv, "--name", "plain"]) == 0
    assert main([*argv, "--name", "labelled", "--labels", "a,b,c"]) == 0
    tokens, lengths = collate([torch.tensor([1, 5, 7, 2]), torch.tensor([3, 9])])
    with torch.no_grad():
        expected = net(tokens, lengths)
        plain = load(tmp_path / "repo" / "plain" / "1").model(tokens, lengths).scores
        labelled = load(tmp_path / "repo" / "labelled" / "1").model(tokens, lengths).scores
    assert plain is not None and labelled is not None
    torch.testing.assert_close(plain, expected, rtol=0, atol=1e-6)
    # --labels: the head is a classifier, answered as softmax probabilities.
    torch.testing.assert_close(labelled, expected.softmax(-1), rtol=0, atol=1e-6)


def test_a_prefix_without_its_dot_is_taken(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    net = HeadNet()
    torch.save(net.state_dict(), tmp_path / "net.pt")
    argv = ["import-torch", str(tmp_path / "net.pt"), "--repository", str(tmp_path / "repo")]
    assert main([*argv, "--name", "a", "--head-prefix", "head", "--embedding-prefix", "emb"]) == 0
    assert load(tmp_path / "repo" / "a" / "1").config.head is not None
    assert main([*argv, "--name", "b", "--head-prefix", "fc", "--labels", "x,y,z"]) == 1
    err = capsys.readouterr().err
    assert (
        err == "rnnserve import-torch: error: no tensor 'fc.weight' for the head (--head-prefix)\n"
    )


def test_an_ambiguous_layer_must_be_named(tmp_path: Path) -> None:
    gru = nn.GRU(6, 6)
    state = {**gru.state_dict(), "proj.weight": torch.zeros(4, 6)}  # bias-free, as wide as both
    with pytest.raises(TorchImportError, match=r"proj\.weight could be the embedding or the head"):
        import_state_dict(state, tmp_path, "m")
    path = import_state_dict(state, tmp_path, "m", head_prefix="proj.")
    assert load(path).config.head is not None
    two = {
        **nn.LSTM(4, 5).state_dict(),
        "a.weight": torch.zeros(2, 5),
        "b.weight": torch.zeros(3, 5),
    }
    with pytest.raises(TorchImportError, match=r"a\.weight, b\.weight; name it with --head-prefix"):
        import_state_dict(two, tmp_path, "two")


def test_a_whole_pickled_module_is_explained(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.save(HeadNet(), tmp_path / "model.pt")  # the whole module, not its state_dict
    argv = [
        "import-torch",
        str(tmp_path / "model.pt"),
        "--repository",
        str(tmp_path),
        "--name",
        "m",
    ]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "\x1b" not in err
    assert "HeadNet" in err and "torch.save(model.state_dict(), PATH)" in err
    assert err.rstrip().endswith("and import that file")
