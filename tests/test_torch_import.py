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
from service.cli import main


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
