"""Datasets for examples/train.py and examples/train_lm.py.

``digits`` (the default) is real data that works offline: the 1,797 8x8 handwritten digits
bundled with scikit-learn (UCI ML hand-written digits), split 80/20 stratified with a fixed
seed. MNIST, Fashion-MNIST and CIFAR-10 go through torchvision when it is installed.
``synthetic`` is random images labelled by a fixed random teacher (for speed benchmarks).

``load_text`` (examples/train_lm.py) is text that ships with CPython, offline, encoded character
by character: ``pydoc``, English prose, the pydoc topic pages (``pydoc_data.topics``, about 465K
characters), or ``stdlib``, Python code, the standard library's top-level modules.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Tuple

import torch
from torch.utils.data import Dataset, TensorDataset


@dataclass
class Data:
    train: Dataset
    test: Dataset
    input_shape: Tuple[int, int, int]  # (C, H, W)
    num_classes: int


def load_digits_dataset(data_dir: str = "", seed: int = 0) -> Data:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)  # (1797, 64) in 0..16, (1797,)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, stratify=y, random_state=seed)

    def tensors(xs, ys):
        xs = torch.tensor(xs, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
        return TensorDataset((xs - 0.3) / 0.4, torch.tensor(ys, dtype=torch.long))

    return Data(tensors(x_tr, y_tr), tensors(x_te, y_te), (1, 8, 8), 10)


def _torchvision(name: str, data_dir: str) -> Data:
    try:
        import torchvision
        from torchvision import transforms
    except Exception as e:  # missing, or a wheel that does not match this torch
        raise SystemExit(
            f"--dataset {name} needs torchvision ({type(e).__name__}: {e}). Install a torchvision "
            "that matches your torch, or use the offline default --dataset digits.") from None
    root = data_dir or "./data"
    spec = {
        "mnist": (torchvision.datasets.MNIST, (0.1307,), (0.3081,), (1, 28, 28)),
        "fashion_mnist": (torchvision.datasets.FashionMNIST, (0.2860,), (0.3530,), (1, 28, 28)),
        "cifar10": (torchvision.datasets.CIFAR10, (0.4914, 0.4822, 0.4465),
                    (0.2470, 0.2435, 0.2616), (3, 32, 32)),
    }[name]
    cls, mean, std, shape = spec
    norm = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    aug = []
    if name == "cifar10":
        aug = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]
    try:
        train = cls(root, train=True, download=True, transform=transforms.Compose(aug + norm))
        test = cls(root, train=False, download=True, transform=transforms.Compose(norm))
    except Exception as e:
        raise SystemExit(f"could not load {name} from {root!r} ({e}); download it there or pass "
                         "--data-dir") from None
    return Data(train, test, shape, 10)


def load_synthetic(data_dir: str = "", seed: int = 0, n_train: int = 4096, n_test: int = 1024,
                   shape=(3, 32, 32)) -> Data:
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(shape[0] * shape[1] * shape[2], 10, generator=g)

    def make(n):
        x = torch.randn(n, *shape, generator=g)
        return TensorDataset(x, (x.flatten(1) @ teacher).argmax(1))

    return Data(make(n_train), make(n_test), tuple(shape), 10)


DATASETS = {
    "digits": load_digits_dataset,
    "mnist": lambda data_dir, seed=0: _torchvision("mnist", data_dir),
    "fashion_mnist": lambda data_dir, seed=0: _torchvision("fashion_mnist", data_dir),
    "cifar10": lambda data_dir, seed=0: _torchvision("cifar10", data_dir),
    "synthetic": load_synthetic,
}


@dataclass
class TextData:
    train: torch.Tensor  # (N_train,) int64 character ids
    val: torch.Tensor  # (N_val,) int64
    vocab: str  # the characters, sorted; id i is vocab[i]


def _pydoc_text() -> str:
    """CPython's pydoc topic pages (English prose about Python), joined in sorted key order."""
    from pydoc_data.topics import topics

    return "".join(topics[k] for k in sorted(topics))


def _stdlib_text() -> str:
    """Python source code: the top-level modules of this interpreter's standard library
    (``Lib/*.py``), joined in sorted file-name order (about 4.7 MB on CPython 3.11)."""
    import glob
    import sysconfig

    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    if not files:
        raise RuntimeError("no standard library sources found (a Python installed without them)")
    parts = []
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            parts.append(fh.read())
    return "".join(parts)


#: The corpora ``load_text`` offers: both ship with Python, so every machine has them offline.
CORPORA = {"pydoc": _pydoc_text, "stdlib": _stdlib_text}


def load_text(corpus: str = "pydoc", val_fraction: float = 0.1) -> TextData:
    """A character-level corpus (``CORPORA``: ``pydoc``, English prose; ``stdlib``, Python
    code); the first 90% train, the rest validation."""
    if corpus not in CORPORA:
        raise ValueError(f"corpus must be one of {sorted(CORPORA)}, got {corpus!r}")
    text = CORPORA[corpus]()
    vocab = "".join(sorted(set(text)))
    ids = {ch: i for i, ch in enumerate(vocab)}
    data = torch.tensor([ids[ch] for ch in text], dtype=torch.long)  # (N,)
    n_train = int(len(data) * (1 - val_fraction))
    return TextData(data[:n_train], data[n_train:], vocab)


def sample_windows(data: torch.Tensor, batch: int, context: int,
                   generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """``batch`` random windows of ``data``: inputs and the next characters, both (batch, context)."""
    starts = torch.randint(len(data) - context, (batch,), generator=generator)  # (B,)
    windows = data[starts[:, None] + torch.arange(context + 1)]  # (B, context + 1)
    return windows[:, :-1], windows[:, 1:]


def load_dataset(name: str, data_dir: str = "", seed: int = 0) -> Data:
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {name!r}")
    return DATASETS[name](data_dir, seed=seed)
