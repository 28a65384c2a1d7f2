"""The model zoo: models a researcher brings, from real libraries where one exists (Hugging Face
``transformers`` built from small configs with random weights, nothing downloaded), each with a
batch of inputs and the plugin settings that fit it. Shared by ``tests/test_zoo.py`` and
``benchmarks/zoo.py`` (the "Your model" table, docs/reference/your-model.md)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

VOCAB, LENGTH, CLASSES = 64, 12, 3


class Task(L.LightningModule):
    """Trains any ``net`` on ``(x, y)``: a class per input; a language model's logits at the last
    position are taken as the class scores (enough to move every weight)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        out = self.net(x)
        return out.logits if hasattr(out, "logits") else out

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self(x)
        return F.cross_entropy(out[:, -1] if out.dim() == 3 else out, y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


class QKVO(nn.Module):
    """A hand-written attention block: q/k/v/o Linear layers and ``F.scaled_dot_product_attention``."""

    def __init__(self, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Linear(8, dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.head = nn.Linear(dim, CLASSES)

    def forward(self, x):
        h = self.embed(x)
        b, t, _ = h.shape

        def split(z):
            return z.view(b, t, self.heads, -1).transpose(1, 2)

        a = F.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)))
        return self.head(self.o(a.transpose(1, 2).reshape(b, t, -1)).mean(1))


class TextLSTM(nn.Module):
    """Embedding + LSTM text classifier: the last hidden state goes to a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, 8)
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.head = nn.Linear(8, CLASSES)

    def forward(self, x):
        return self.head(self.lstm(self.embedding(x))[0][:, -1])


def _encoder() -> nn.Module:
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True)
    return nn.Sequential(
        nn.Embedding(VOCAB, 16), nn.TransformerEncoder(layer, num_layers=2), nn.Flatten(), nn.Linear(16 * LENGTH, CLASSES)
    )


def _bert() -> nn.Module:
    import transformers

    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=16, num_labels=CLASSES,
    )
    return transformers.BertForSequenceClassification(config)


def _gpt2() -> nn.Module:
    import transformers

    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=32, n_layer=2, n_head=2)
    return transformers.GPT2LMHeadModel(config)


def _vit() -> nn.Module:
    import transformers

    config = transformers.ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=CLASSES,
    )
    return transformers.ViTForImageClassification(config)


def _resnet18() -> nn.Module:
    import transformers

    config = transformers.ResNetConfig(  # ResNet-18's layout (basic blocks, 2-2-2-2), narrow
        num_channels=3, embedding_size=16, hidden_sizes=[16, 32, 64, 64], depths=[2, 2, 2, 2], layer_type="basic",
        num_labels=CLASSES,
    )
    return transformers.ResNetForImageClassification(config)


def _tokens(n: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, LENGTH), generator=torch.Generator().manual_seed(0))


@dataclass
class ZooModel:
    """A model of the zoo: how to build it, a batch of its inputs, and what the plugins select."""

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int], torch.Tensor]
    #: module types for 80% unstructured sparsity over every weight matrix of the model
    sparse_types: list[str] = field(default_factory=lambda: ["Linear", "Conv2d", "MultiheadAttention"])
    #: globs structured pruning leaves out (the output layer)
    head: list[str] = field(default_factory=lambda: ["*classifier*", "*head*"])


ZOO = [
    ZooModel("bert", _bert, _tokens),
    ZooModel("gpt2", _gpt2, _tokens, ["Linear", "transformers.pytorch_utils.Conv1D"], ["*lm_head*"]),
    ZooModel("vit", _vit, lambda n: torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(0))),
    ZooModel("resnet18", _resnet18, lambda n: torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))),
    ZooModel("transformer_encoder", _encoder, _tokens, head=["net.3.*"]),
    ZooModel("qkvo_attention", QKVO, lambda n: torch.randn(n, 5, 8, generator=torch.Generator().manual_seed(0))),
    ZooModel("embedding_lstm", TextLSTM, _tokens, ["Embedding", "LSTM", "Linear"]),
]


def fit_zoo(
    model: ZooModel, plugin: L.Callback, root: str | Path, epochs: int = 1, extra: list[L.Callback] = ()
) -> tuple[Task, L.Trainer, torch.Tensor]:
    """Train ``model`` with ``plugin`` (and ``extra`` callbacks after it) for ``epochs`` of 2
    batches of 8 on CPU (no logger, no checkpoints); returns the task, the trainer and two example
    inputs."""
    from torch.utils.data import DataLoader, TensorDataset

    from tests.helpers import quiet_trainer

    torch.manual_seed(0)
    x = model.inputs(16)
    y = torch.randint(0, CLASSES, (16,), generator=torch.Generator().manual_seed(1))
    task = Task(model.build())
    task.example_input_array = x[:2]
    trainer = quiet_trainer([plugin, *extra], max_epochs=epochs, limit_train_batches=2, default_root_dir=str(root))
    trainer.fit(task, DataLoader(TensorDataset(x, y), batch_size=8))
    return task, trainer, x[:2]
