"""Data modules for data that ships inside packages: scikit-learn's digits, aeon's bundled UCR/UEA
sets and sktime's bundled PLAID. Nothing is downloaded."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from plugins.core.errors import ConfigError, is_number

__all__ = ["DigitsDataModule", "UCRDataModule", "UCR_DATASETS"]

# Classification sets whose files ship inside aeon (aeon/datasets/data) or sktime (SKTIME_LOADERS);
# anything else would need a download, which this project never does.
UCR_DATASETS = (
    "ACSF1",
    "ArrowHead",
    "BasicMotions",
    "GunPoint",
    "ItalyPowerDemand",
    "JapaneseVowels",
    "OSULeaf",
    "PickupGestureWiimoteZ",
    "PLAID",
)
# Sets read from sktime instead (bundled there, not in aeon): name -> loader in sktime.datasets.
# PLAID: appliance current, 11 classes, variable length (100 to 1,344), per-series amplitude
# over five orders of magnitude.
SKTIME_LOADERS = {"PLAID": "load_plaid"}


def _check_fraction(key: str, value: float, low: float = 0.0, high: float = 1.0) -> None:
    if not is_number(value) or not low <= value < high:
        raise ConfigError(key, value, f"a number in [{low}, {high})")


def _check_int(key: str, value: int, low: int, allowed: str | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(key, value, allowed or f"an integer >= {low}")


def _per_sample_gain(n: int, spread: float, seed: int) -> torch.Tensor:
    """Gains log-uniform in [1/spread, spread], one per sample, fixed by the seed."""
    g = torch.Generator().manual_seed(seed)
    return torch.exp((torch.rand(n, generator=g) * 2 - 1) * np.log(spread))


def _limited(batches: int, limit: int | float | None) -> int:
    """Lightning's ``limit_*_batches`` rule: a count caps the batches, a fraction keeps ``int(n * fraction)``."""
    return min(batches, limit) if isinstance(limit, int) else int(batches * (limit if limit is not None else 1.0))


class EpochSeededSampler(DistributedSampler):
    """A shuffle that depends only on (seed, epoch): a run resumed at epoch k sees the same order
    as the run that was never stopped. Lightning calls ``set_epoch`` before each epoch.

    Under DDP each process takes its own share of that order itself, as Lightning's
    ``DistributedSamplerWrapper`` would (the order padded to a multiple of the world size with its
    first indices, then every world-size-th from the rank): the same batches as before, and a run
    resumed mid-epoch skips the batches this process had trained (:attr:`start`, in its own share).
    A ``DistributedSampler`` is one Lightning does not wrap again. Costs one permutation per epoch."""

    def __init__(self, length: int, seed: int) -> None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        world = torch.distributed.get_world_size() if distributed else 1
        rank = torch.distributed.get_rank() if distributed else 0
        super().__init__(range(length), num_replicas=world, rank=rank, shuffle=False, drop_last=False)
        self.length = length
        self.seed = seed
        self.start = 0  # samples of this process's share already trained: a run resumed mid-epoch skips them once

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.length, generator=g).tolist()
        while len(order) < self.total_size:
            order += order[: self.total_size - len(order)]
        start, self.start = self.start, 0
        return iter(order[self.rank : self.total_size : self.num_replicas][start:])


class _ArrayDataModule(L.LightningDataModule):
    """Shared plumbing: tensors in, three loaders out, with optional input transforms."""

    #: A run resumed mid-epoch goes on after the batches its checkpoint had trained (the sampler skips them).
    skips_trained_batches = True

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        denoise_lambda: float = 0.0,
        random_gain: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        _check_int("data.batch_size", batch_size, 1)
        if not is_number(denoise_lambda) or denoise_lambda < 0:
            raise ConfigError("data.denoise_lambda", denoise_lambda, "a number >= 0 (0 = off)")
        if not is_number(random_gain) or (random_gain != 0 and random_gain < 1):
            raise ConfigError("data.random_gain", random_gain, "0 (off) or a spread >= 1")
        _check_int("data.num_workers", num_workers, 0)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.denoise_lambda = float(denoise_lambda)
        self.random_gain = float(random_gain)
        self.seed = seed
        self.splits: dict[str, TensorDataset] = {}

    def _transform(self, x: torch.Tensor, split: str) -> torch.Tensor:
        if self.denoise_lambda > 0:
            x = F.hardshrink(x, self.denoise_lambda)
        if self.random_gain > 0:
            offset = {"train": 0, "val": 1, "test": 2}[split]
            gain = _per_sample_gain(len(x), self.random_gain, self.seed * 3 + offset)
            x = x * gain.view(-1, *([1] * (x.dim() - 1)))
        return x

    def _set(self, split: str, x: np.ndarray, y: np.ndarray) -> None:
        xt = self._transform(torch.as_tensor(x, dtype=torch.float32), split)
        self.splits[split] = TensorDataset(xt, torch.as_tensor(y, dtype=torch.long))

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        dataset = self.splits[split]
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochSeededSampler(len(dataset), self.seed) if shuffle else None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        loader = self._loader("train", shuffle=True)
        loader.sampler.start = self._batches_done_this_epoch(len(loader)) * self.batch_size
        return loader

    def _batches_done_this_epoch(self, batches: int) -> int:
        """Batches of the current epoch a checkpoint written mid-epoch (SIGTERM, Ctrl-C, every N
        steps) had trained on, in this process: Lightning restores that count and expects the
        loader to go on after them. Zero for a fresh run or an end-of-epoch checkpoint. ``batches``:
        this process's batches in one epoch, before Lightning's ``limit_train_batches``."""
        trainer = getattr(self, "trainer", None)
        loop = getattr(trainer, "fit_loop", None)
        if loop is None or not loop.restarting:
            return 0
        # processed, not completed: a checkpoint written in on_train_batch_end (every N steps) holds
        # its last batch as processed but not yet completed, and Lightning resumes after that batch.
        done = loop.epoch_loop.batch_progress.current.processed
        n = _limited(batches, trainer.limit_train_batches)
        return done % n if n else 0

    def batches(self, split: str, limit: int | float | None = None) -> int:
        """Batches of ``split`` in one epoch under Lightning's ``limit_*_batches`` rule (a count
        caps them, a fraction keeps ``int(n * fraction)``); after ``setup``. ``train.py`` checks a
        fraction against it before training (runner/validation.py)."""
        return _limited(-(-len(self.splits[split]) // self.batch_size), limit)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


class DigitsDataModule(_ArrayDataModule):
    """scikit-learn's 8x8 digits (1,797 images, 10 classes), pixels scaled to [0, 1], split
    stratified into train/val/test from the seed. Loads in milliseconds; no download."""

    in_channels = 1
    num_classes = 10

    def __init__(self, val_fraction: float = 0.15, test_fraction: float = 0.15, **kwargs) -> None:
        super().__init__(**kwargs)
        _check_fraction("data.val_fraction", val_fraction, 0.01, 0.5)
        _check_fraction("data.test_fraction", test_fraction, 0.01, 0.5)
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        x = (x / 16.0).reshape(-1, 1, 8, 8)
        x_rest, x_test, y_rest, y_test = train_test_split(
            x, y, test_size=self.test_fraction, stratify=y, random_state=self.seed
        )
        x_train, x_val, y_train, y_val = train_test_split(
            x_rest,
            y_rest,
            test_size=self.val_fraction / (1 - self.test_fraction),
            stratify=y_rest,
            random_state=self.seed,
        )
        self._set("train", x_train, y_train)
        self._set("val", x_val, y_val)
        self._set("test", x_test, y_test)


def _resample(series: list[np.ndarray], length: int) -> np.ndarray:
    """Linear interpolation of each (C, L_i) series onto ``length`` points."""
    out = np.empty((len(series), series[0].shape[0], length), dtype=np.float32)
    grid = np.linspace(0.0, 1.0, length)
    for i, s in enumerate(series):
        src = np.linspace(0.0, 1.0, s.shape[1])
        for c in range(s.shape[0]):
            out[i, c] = np.interp(grid, src, np.nan_to_num(s[c]))
    return out


class UCRDataModule(_ArrayDataModule):
    """A UCR/UEA classification set bundled in aeon (PLAID: in sktime). The official TRAIN split is divided
    (stratified, from the seed) into train and val; TEST is the test split. Variable-length sets
    are resampled by linear interpolation to the longest training series, or every set to
    ``length`` points when it is given (a budget knob for long series: the model's cost grows with
    the length). ``znorm`` standardizes each series channel on its own; otherwise values are left
    as recorded."""

    def __init__(
        self,
        name: str = "GunPoint",
        val_fraction: float = 0.2,
        znorm: bool = False,
        length: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if name not in UCR_DATASETS:
            raise ConfigError("data.name", name, f"one of the bundled sets: {', '.join(UCR_DATASETS)}")
        _check_fraction("data.val_fraction", val_fraction, 0.05, 0.5)
        if not isinstance(znorm, bool):
            raise ConfigError("data.znorm", znorm, "true or false")
        if length is not None:
            _check_int("data.length", length, 8, "null (the longest training series) or an integer >= 8")
        self.name = name
        self.val_fraction = val_fraction
        self.znorm = znorm
        self.length = length
        self._loaded = self._load()

    def _read(self, split: str) -> tuple[list[np.ndarray] | np.ndarray, np.ndarray]:
        """The official ``split`` as series ``(C, L_i)`` and labels, from aeon or sktime."""
        if self.name in SKTIME_LOADERS:
            import sktime.datasets

            load = getattr(sktime.datasets, SKTIME_LOADERS[self.name])
            x, y = load(split=split, return_X_y=True)  # nested DataFrame: one pd.Series per cell
            rows = x.itertuples(index=False)
            series = [np.stack([np.asarray(cell, dtype=np.float64) for cell in row]) for row in rows]
            return series, np.asarray(y)
        from aeon.datasets import load_classification

        return load_classification(self.name, split=split)

    def _load(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        raw = {split: self._read(split) for split in ("train", "test")}
        classes = sorted(set(raw["train"][1]) | set(raw["test"][1]))
        index = {c: i for i, c in enumerate(classes)}
        length = self.length or max(s.shape[-1] for s in raw["train"][0])
        out = {}
        for split, (x, y) in raw.items():
            series = list(x) if isinstance(x, list) else [s for s in x]
            arr = _resample(series, length)
            if self.znorm:
                arr = (arr - arr.mean(-1, keepdims=True)) / (arr.std(-1, keepdims=True) + 1e-8)
            out[split] = (arr, np.array([index[c] for c in y]))
        self.in_channels = out["train"][0].shape[1]
        self.num_classes = len(classes)
        return out

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        x, y = self._loaded["train"]
        counts = np.bincount(y)
        stratify = y if counts.min() >= 2 and len(y) * self.val_fraction >= len(counts) else None
        x_train, x_val, y_train, y_val = train_test_split(
            x, y, test_size=self.val_fraction, stratify=stratify, random_state=self.seed
        )
        self._set("train", x_train, y_train)
        self._set("val", x_val, y_val)
        self._set("test", *self._loaded["test"])
