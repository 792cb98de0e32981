"""Real-format file loaders for the paper's target data sets, read from local files.

Nothing is downloaded: put the official release files under `data_root()`
($ROBUST_TRANSFER_DATA, default ~/.robust_transfer/data), in these directories:

- MNIST (LeCun et al. 1998) in `mnist/`, Fashion-MNIST (Xiao et al. 2017) in
  `fashion-mnist/`, KMNIST (Clanuwat et al. 2018) in `kmnist/`: the four IDX files
  `train-images-idx3-ubyte.gz`, `train-labels-idx1-ubyte.gz`, `t10k-images-idx3-ubyte.gz`,
  `t10k-labels-idx1-ubyte.gz` of each release;
- CIFAR-100 (Krizhevsky 2009): `cifar-100-binary/train.bin` and `test.bin` (extracted), or
  the release archive `cifar-100-binary.tar.gz` itself;
- SVHN (Netzer et al. 2011): `svhn/train_32x32.mat` and `svhn/test_32x32.mat`;
- any ImageFolder tree, anywhere: `<dir>/<class>/<image>`, or `<dir>/train/<class>/...` and
  `<dir>/test/<class>/...` (task `imagefolder:<dir>` or `imagefolder:<dir>@<size>`).

IDX files may be gzipped (the release) or gunzipped (`train-images-idx3-ubyte`).

Checksums: the MD5 of every release file whose official value is published (the gzipped IDX
files, the SVHN .mat files, the CIFAR-100 archive; torchvision's tables) is checked before it
is read, and a mismatch is an error. Files without a published MD5 (gunzipped IDX, CIFAR-100's
extracted .bin files — only the archive's MD5 is published) are checked for structure and
counts instead. Set ROBUST_TRANSFER_VERIFY=0 to skip the MD5 check for files that are not the
release (subsets, files written by tests); the structural checks always run.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from robust_transfer.data.datasets import (
    DATA_ENV,
    ImageSet,
    data_root,
    parse_cifar_records,
    read_cifar_records,
)
from robust_transfer.errors import UserError

VERIFY_ENV = "ROBUST_TRANSFER_VERIFY"

IDX_FILES = {  # split -> (images, labels), the release's names
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

# Official MD5s (as published with each release and in torchvision's dataset tables).
MD5: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
    "kmnist": {
        "train-images-idx3-ubyte.gz": "bdb82020997e1d708af4cf47b453dcf7",
        "train-labels-idx1-ubyte.gz": "e144d726b3acfaa3e44228e80efcd344",
        "t10k-images-idx3-ubyte.gz": "5c965bf0a639b31b8f53240b1b52f4d7",
        "t10k-labels-idx1-ubyte.gz": "7320c461ea6c1c855c0b718fb2a4b134",
    },
    "cifar100": {"cifar-100-binary.tar.gz": "03b5dce01913d631647c71ecec9e9cb8"},
    "svhn": {
        "train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373",
        "test_32x32.mat": "eb5a983be6a315427106f1b164d9cef3",
    },
}
IDX_SETS = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST", "kmnist": "KMNIST"}
CIFAR100_DIR = "cifar-100-binary"
CIFAR100_ARCHIVE = "cifar-100-binary.tar.gz"
SVHN_DIR = "svhn"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}


def _root(root: Path | None) -> Path:
    return root or data_root()


def _where(root: Path | None) -> str:
    return f"{str(_root(root))!r} (set ${DATA_ENV} to change)"


def verify_md5(path: Path, expected: str | None) -> None:
    """Raise `UserError` when `path`'s MD5 is not the release's (skipped when `expected` is
    None or ROBUST_TRANSFER_VERIFY=0)."""
    if expected is None or os.environ.get(VERIFY_ENV, "1") == "0":
        return
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        raise UserError(f"{str(path)!r} is not the official release file: MD5 "
                        f"{digest.hexdigest()} != {expected}; replace it (or set "
                        f"{VERIFY_ENV}=0 to use a file that is deliberately different)")


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (LeCun's format, gzipped or not) as a uint8 array: 2 zero bytes, the type
    byte (0x08 = unsigned byte), the number of dimensions, big-endian int32 sizes, data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"cannot read IDX file {str(path)!r}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise UserError(f"{str(path)!r} is not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, ">i4", ndim, offset=4))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise UserError(f"corrupt IDX file {str(path)!r}: header says {dims}, "
                        f"found {data.size} bytes")
    return data.reshape(dims)


def _idx_file(directory: Path, name: str, dataset: str) -> Path | None:
    """The release file, or its gunzipped form; checksum-verified when it is the .gz."""
    gz, plain = directory / name, directory / name.removesuffix(".gz")
    if gz.is_file():
        verify_md5(gz, MD5[dataset].get(name))
        return gz
    return plain if plain.is_file() else None


def idx_dataset(dataset: str, root: Path | None = None) -> tuple[ImageSet, ImageSet]:
    """MNIST, Fashion-MNIST or KMNIST from the four IDX files in `root/<dataset>/`, as
    (train, test): 60,000 and 10,000 images 1x28x28 in [0,1], labels 0-9 as in the files."""
    directory = _root(root) / dataset
    parts = []
    for split, (images_name, labels_name) in IDX_FILES.items():
        images, labels = (_idx_file(directory, n, dataset) for n in (images_name, labels_name))
        if images is None or labels is None:
            missing = images_name if images is None else labels_name
            raise UserError(
                f"{IDX_SETS[dataset]} not found: {str(directory / missing)!r} is missing; put "
                f"{', '.join(n for pair in IDX_FILES.values() for n in pair)} (gzipped or "
                f"not) in {str(directory)!r} under {_where(root)}"
            )
        x, y = read_idx(images), read_idx(labels)
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y) or (len(y) and y.max() > 9):
            raise UserError(f"corrupt {IDX_SETS[dataset]} {split} files in {str(directory)!r}: "
                            f"images {x.shape}, labels {y.shape}")
        parts.append(ImageSet(torch.from_numpy(x.astype(np.float32) / 255.0).unsqueeze(1),
                              torch.from_numpy(y.astype(np.int64))))
    return parts[0], parts[1]


def cifar100(root: Path | None = None, coarse: bool = False) -> tuple[ImageSet, ImageSet]:
    """CIFAR-100 from its binary release, as (train, test): 50,000 and 10,000 images 3x32x32
    in [0,1] with the 100 fine labels (or the 20 coarse ones). Each record is a coarse-label
    byte, a fine-label byte, then 3,072 pixel bytes (R, G, B planes).

    Reads the extracted `cifar-100-binary/` directory, or else the release archive
    `cifar-100-binary.tar.gz` itself (MD5-checked; read in memory, nothing is extracted)."""
    directory = _root(root) / CIFAR100_DIR
    archive = _root(root) / CIFAR100_ARCHIVE
    names = ("train.bin", "test.bin")
    label, classes = (0, 20) if coarse else (1, 100)
    if all((directory / n).is_file() for n in names):
        return tuple(read_cifar_records([directory / n], label_bytes=2, label_index=label,
                                        num_classes=classes, name="CIFAR-100") for n in names)
    if not archive.is_file():
        missing = next(directory / n for n in names if not (directory / n).is_file())
        raise UserError(f"CIFAR-100 not found: {str(missing)!r} is missing; extract "
                        f"{CIFAR100_ARCHIVE} into (or put it in) {_where(root)}")
    verify_md5(archive, MD5["cifar100"][CIFAR100_ARCHIVE])
    import tarfile

    parts = []
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for n in names:
                member = tar.extractfile(f"{CIFAR100_DIR}/{n}")
                raw = np.frombuffer(member.read(), dtype=np.uint8)
                parts.append(parse_cifar_records(raw, 2, label, classes,
                                                 f"CIFAR-100 {n} in {str(archive)!r}"))
    except (tarfile.TarError, KeyError, OSError, AttributeError) as e:
        raise UserError(f"corrupt CIFAR-100 archive {str(archive)!r}: {e}") from None
    return parts[0], parts[1]


def svhn(root: Path | None = None) -> tuple[ImageSet, ImageSet]:
    """SVHN cropped digits (format 2) from `train_32x32.mat` and `test_32x32.mat`, as (train,
    test): 73,257 and 26,032 images 3x32x32 in [0,1]. The files store `X` as (32, 32, 3, N)
    and `y` as (N, 1) with digit 0 labelled 10; labels come back as the digit, 0-9."""
    from scipy.io import loadmat

    directory = _root(root) / SVHN_DIR
    parts = []
    for name in ("train_32x32.mat", "test_32x32.mat"):
        path = directory / name
        if not path.is_file():
            raise UserError(f"SVHN not found: {str(path)!r} is missing; put train_32x32.mat "
                            f"and test_32x32.mat in {str(directory)!r} under {_where(root)}")
        verify_md5(path, MD5["svhn"][name])
        try:
            mat = loadmat(path, variable_names=["X", "y"])
            x, y = mat["X"], mat["y"].reshape(-1).astype(np.int64)
        except (ValueError, KeyError, OSError, TypeError) as e:
            raise UserError(f"corrupt SVHN file {str(path)!r}: {e}") from None
        if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != len(y) or (
                len(y) and (y.min() < 1 or y.max() > 10)):
            raise UserError(f"corrupt SVHN file {str(path)!r}: X {x.shape}, y {y.shape}")
        images = torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1)))
        parts.append(ImageSet(images.float() / 255.0, torch.from_numpy(y % 10)))
    return parts[0], parts[1]


def _read_folder(directory: Path, size: int | None) -> tuple[ImageSet, list[str]]:
    from PIL import Image, UnidentifiedImageError

    classes = sorted(p.name for p in directory.iterdir() if p.is_dir())
    if not classes:
        raise UserError(f"image folder {str(directory)!r} has no class subdirectories; "
                        "expected <dir>/<class>/<image>")
    images, labels, shape = [], [], None
    for label, name in enumerate(classes):
        files = sorted(p for p in (directory / name).iterdir()
                       if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise UserError(f"class folder {str(directory / name)!r} has no images")
        for path in files:
            try:
                with Image.open(path) as img:
                    img = img.convert("RGB")
                    if size is not None and img.size != (size, size):
                        img = img.resize((size, size), Image.Resampling.BILINEAR)
                    array = np.asarray(img, dtype=np.uint8)
            except (UnidentifiedImageError, OSError) as e:
                raise UserError(f"cannot read image {str(path)!r}: {e}") from None
            if shape is None:
                shape = array.shape
            elif array.shape != shape:
                raise UserError(f"image {str(path)!r} is {array.shape[1]}x{array.shape[0]}, "
                                f"the first is {shape[1]}x{shape[0]}; add @SIZE to the task "
                                "name (imagefolder:<dir>@32) to resize every image")
            images.append(array)
            labels.append(label)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    return ImageSet(x.contiguous(), torch.tensor(labels, dtype=torch.long)), classes


def image_folder(directory: str | Path, size: int | None = None
                 ) -> ImageSet | tuple[ImageSet, ImageSet]:
    """Images in class subfolders (torchvision's ImageFolder layout), RGB in [0,1]; labels are
    the class folders' indices in sorted order. `<dir>/train/` + `<dir>/test/` with the same
    class folders is an official split, returned as (train, test); otherwise the whole set
    (the task layer gives it the fixed 70/30 split). `size` resizes every image to
    size x size (bilinear); without it all images must share one size."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise UserError(f"image folder {str(directory)!r} does not exist or is not a directory")
    train_dir, test_dir = directory / "train", directory / "test"
    if train_dir.is_dir() and test_dir.is_dir():
        (train, classes), (test, test_classes) = (_read_folder(d, size)
                                                  for d in (train_dir, test_dir))
        if classes != test_classes:
            raise UserError(f"image folder {str(directory)!r}: train/ and test/ have different "
                            f"class folders ({classes} vs {test_classes})")
        if train.x.shape[1:] != test.x.shape[1:]:
            raise UserError(f"image folder {str(directory)!r}: train/ and test/ images differ "
                            "in size; add @SIZE to the task name to resize every image")
        return train, test
    return _read_folder(directory, size)[0]
