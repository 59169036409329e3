import gzip
import io
import os
import struct
import sys
import tarfile
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from hpqdeploy.data import DataRequest, dataset_names, load_data
from hpqdeploy.data import cifar10, fashion_mnist
from hpqdeploy.data.glue import TextDataset
from hpqdeploy.data.imagenet import FolderSubset
from hpqdeploy.data.images import ImageTensorDataset, random_crop_flip, split_indices, stratified_subset
from hpqdeploy.errors import UserError

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CLASS_COLOURS = [(25 * c, 250 - 25 * c, 128) for c in range(10)]
SST2_HEADER = ("sentence", "label")
QQP_HEADER = ("id", "qid1", "qid2", "question1", "question2", "is_duplicate")


# ---------------------------------------------------------------- builders of tiny data sets in the real layouts


def cifar_jpeg(label: int, rng: np.random.Generator) -> bytes:
    """Left half the class's colour (survives JPEG), right half noise (makes every image unique)."""
    pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    pixels[:, :16] = CLASS_COLOURS[label]
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


def cifar_files(per_split: dict[str, int]):
    rng = np.random.default_rng(0)
    for split, per_class in per_split.items():
        for label, name in enumerate(cifar10.CLASSES):
            for i in range(per_class):
                yield split, f"cifar10_jpg/{split}/{name}/{i:04d}.jpg", cifar_jpeg(label, rng)


def write_cifar_archives(root: Path, per_split=None) -> None:
    files = list(cifar_files(per_split or {"train": 6, "test": 3}))
    for split in {split for split, _, _ in files}:
        with tarfile.open(root / f"{split}.tar.xz", "w:xz") as tar:
            for _, name, data in (f for f in files if f[0] == split):
                member = tarfile.TarInfo(name)
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))


def write_cifar_folder(root: Path) -> None:
    for _, name, data in cifar_files({"train": 6, "test": 3}):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def write_tsv(path: Path, header, rows, newline="\n") -> None:
    lines = ["\t".join(header), *("\t".join(map(str, row)) for row in rows)]
    path.write_text(newline.join(lines) + newline, encoding="utf-8")


def idx_bytes(array: np.ndarray) -> bytes:
    magic = 0x800 | array.ndim
    return struct.pack(f">{1 + array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def write_fashion(root: Path, compress=True) -> None:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 50), ("t10k", 20)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 256, (n, 28, 28))
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            data = idx_bytes(array)
            name = f"{prefix}-{kind}-ubyte"
            (root / (f"{name}.gz" if compress else name)).write_bytes(gzip.compress(data) if compress else data)


def write_image_folder(root: Path, split: str, classes=("ant", "bee", "cat"), per_class=4) -> None:
    for c, name in enumerate(classes):
        (root / split / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (40, 30), (60 * c, 10 * i, 0)).save(root / split / name / f"{i}.png")


# Each case builds its data under tmp_path and returns (request, training items incl. calibration, eval items).
def digits_case(tmp_path):
    return DataRequest(calib_size=50), 1437, 360


def cifar10_case(tmp_path):
    write_cifar_archives(tmp_path)
    return DataRequest(data_dir=tmp_path, calib_size=20, cache_dir=tmp_path / "cache"), 60, 30


def fashion_case(tmp_path):
    write_fashion(tmp_path)
    return DataRequest(data_dir=tmp_path, calib_size=10), 50, 20


def imagenet_case(tmp_path):
    write_image_folder(tmp_path, "train")
    write_image_folder(tmp_path, "val", per_class=2)
    return DataRequest(data_dir=tmp_path, calib_size=3), 12, 6


def sst2_case(tmp_path):
    write_tsv(tmp_path / "train.tsv", SST2_HEADER, [(f"train sentence {i} .", i % 2) for i in range(40)], "\r\n")
    write_tsv(tmp_path / "dev.tsv", SST2_HEADER, [(f"dev sentence {i} .", i % 2) for i in range(12)], "\r\n")
    return DataRequest(data_dir=tmp_path, calib_size=10), 40, 12


def qqp_rows(n: int, prefix: str):
    return [(i, 2 * i, 2 * i + 1, f"{prefix} question {i}?", f"{prefix} other {i}?", int(i % 3 == 0)) for i in range(n)]


def qqp_case(tmp_path):
    write_tsv(tmp_path / "train.tsv", QQP_HEADER, qqp_rows(30, "train"))
    write_tsv(tmp_path / "dev.tsv", QQP_HEADER, qqp_rows(10, "dev"))
    return DataRequest(data_dir=tmp_path, calib_size=6), 30, 10


CASES = {
    "cifar10": cifar10_case,
    "digits": digits_case,
    "fashion-mnist": fashion_case,
    "imagenet": imagenet_case,
    "qqp": qqp_case,
    "sst2": sst2_case,
}


def item_keys(dataset) -> set:
    """What identifies an item independently of augmentation, to check that splits are disjoint."""
    if isinstance(dataset, ImageTensorDataset):
        return {image.numpy().tobytes() for image in dataset.images}
    if isinstance(dataset, FolderSubset):
        return {dataset.folder.samples[i][0] for i in dataset.indices}
    assert isinstance(dataset, TextDataset)
    return set(dataset.items)


# ---------------------------------------------------------------- the contract, for every registered loader


def test_every_registered_loader_has_a_contract_case():
    assert dataset_names() == sorted(CASES)


def test_unknown_data_set_is_a_user_error():
    with pytest.raises(UserError, match="unknown data set 'mnist'"):
        load_data("mnist")


@pytest.mark.parametrize("name", sorted(CASES))
def test_loader_contract(name, tmp_path):
    request, n_train, n_eval = CASES[name](tmp_path)
    splits = load_data(name, request)
    info = splits.info

    assert info.name == name
    assert len(splits.calib) == request.calib_size
    assert len(splits.train) + len(splits.calib) == n_train
    assert len(splits.eval) == n_eval
    assert not item_keys(splits.train) & item_keys(splits.calib)
    for dataset in (splits.train, splits.calib, splits.eval):
        for i in range(min(len(dataset), 5)):
            x, label = dataset[i]
            assert isinstance(label, int) and 0 <= label < info.num_classes
            if info.modality == "image":
                assert x.dtype == torch.float32 and tuple(x.shape) == info.input_shape
            elif info.text_pair:
                assert isinstance(x, tuple) and len(x) == 2 and all(isinstance(s, str) for s in x)
            else:
                assert isinstance(x, str) and not x.endswith("\r")
    calib_labels = {splits.calib[i][1] for i in range(len(splits.calib))}
    assert calib_labels == set(range(info.num_classes))  # stratified: every class is calibrated


@pytest.mark.parametrize("name", sorted(CASES))
def test_loader_limits_and_seeds(name, tmp_path):
    request, _, _ = CASES[name](tmp_path)
    limited_request = replace(request, train_limit=5, eval_limit=4)
    limited = load_data(name, limited_request)
    assert (len(limited.train), len(limited.calib), len(limited.eval)) == (5, request.calib_size, 4)

    same_seed = load_data(name, limited_request)
    other_seed = load_data(name, replace(limited_request, seed=1))
    assert item_keys(same_seed.calib) == item_keys(limited.calib)
    assert item_keys(same_seed.train) == item_keys(limited.train)
    assert item_keys(other_seed.calib) != item_keys(limited.calib)
    assert item_keys(other_seed.eval) == item_keys(limited.eval)  # every seed is scored on the same items


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("field, value", [("calib_size", "all"), ("calib_size", -1), ("train_limit", -1)])
def test_loader_rejects_bad_sizes(name, field, value, tmp_path):
    request, n_train, _ = CASES[name](tmp_path)
    with pytest.raises(UserError, match=field):
        load_data(name, replace(request, **{field: n_train if value == "all" else value}))


@pytest.mark.parametrize("name", ["cifar10", "fashion-mnist", "imagenet", "qqp", "sst2"])
def test_missing_data_dir_is_a_user_error(name, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_data(name, DataRequest(data_dir=tmp_path / "nowhere"))


# ---------------------------------------------------------------- splitting helpers


def test_stratified_subset_keeps_class_proportions():
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    rng = np.random.default_rng(0)
    assert np.bincount(labels[stratified_subset(labels, 10, rng)]).tolist() == [5, 3, 2]
    assert np.bincount(labels[stratified_subset(labels, 7, rng)]).tolist() == [4, 2, 1]  # largest remainder
    assert len(set(stratified_subset(labels, 100, rng))) == 100


def test_split_indices_are_disjoint_and_complete():
    train_labels, eval_labels = np.arange(100) % 4, np.arange(40) % 4
    train, calib, evaluation = split_indices(train_labels, eval_labels, DataRequest(calib_size=12), "x")
    assert not set(train) & set(calib)
    assert sorted([*train, *calib]) == list(range(100))
    assert evaluation.tolist() == list(range(40))
    assert np.bincount(train_labels[calib]).tolist() == [3, 3, 3, 3]


def test_split_indices_limits():
    train_labels, eval_labels = np.arange(100) % 4, np.arange(40) % 4
    request = DataRequest(calib_size=12, train_limit=20, eval_limit=8)
    train, calib, evaluation = split_indices(train_labels, eval_labels, request, "x")
    assert len(train) == 20 and not set(train) & set(calib)
    assert np.bincount(eval_labels[evaluation]).tolist() == [2, 2, 2, 2]
    other_seed = split_indices(train_labels, eval_labels, replace(request, seed=1), "x")
    assert not np.array_equal(other_seed[1], calib) and np.array_equal(other_seed[2], evaluation)
    big = split_indices(train_labels, eval_labels, replace(request, train_limit=1000, eval_limit=1000), "x")
    assert (len(big[0]), len(big[2])) == (88, 40)


# ---------------------------------------------------------------- images and augmentation


def test_random_crop_flip_is_a_padded_crop_or_its_mirror():
    image = torch.arange(3 * 8 * 8, dtype=torch.uint8).view(3, 8, 8)
    padded = F.pad(image, (4, 4, 4, 4))
    candidates = [padded[:, i : i + 8, j : j + 8] for i in range(9) for j in range(9)]
    candidates += [c.flip(-1) for c in candidates]
    torch.manual_seed(0)
    outputs = [random_crop_flip(image) for _ in range(30)]
    assert all(any(torch.equal(out, c) for c in candidates) for out in outputs)
    assert len({out.numpy().tobytes() for out in outputs}) > 5


def test_cifar10_archive_splits(tmp_path):
    request, _, _ = cifar10_case(tmp_path)
    splits = load_data("cifar10", request)
    mean, std = torch.tensor(cifar10.INFO.mean).view(3, 1, 1), torch.tensor(cifar10.INFO.std).view(3, 1, 1)
    for i in range(len(splits.eval)):
        x, label = splits.eval[i]
        colour = (x * std + mean)[:, :, :16].mean(dim=(1, 2)) * 255
        assert torch.allclose(colour, torch.tensor(CLASS_COLOURS[label], dtype=torch.float32), atol=4)
    assert np.bincount(splits.eval.labels.numpy()).tolist() == [3] * 10

    torch.manual_seed(0)
    reads = lambda dataset: {dataset[0][0].numpy().tobytes() for _ in range(20)}  # noqa: E731
    assert len(reads(splits.train)) > 1  # augmented
    assert len(reads(splits.calib)) == 1 and len(reads(splits.eval)) == 1  # never augmented


@pytest.mark.parametrize("under", ["", "cifar10_jpg"])
def test_cifar10_image_folder_matches_archives(tmp_path, under):
    (tmp_path / "archives").mkdir()
    write_cifar_archives(tmp_path / "archives")
    write_cifar_folder(tmp_path / "folder")
    request = DataRequest(calib_size=20, cache_dir=tmp_path / "cache")
    from_archives = load_data("cifar10", replace(request, data_dir=tmp_path / "archives"))
    from_folder = load_data("cifar10", replace(request, data_dir=tmp_path / "folder" / under))
    for split in ("train", "calib", "eval"):
        a, b = getattr(from_archives, split), getattr(from_folder, split)
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


def test_cifar10_cache_is_reused_and_keyed_by_the_archive(tmp_path, monkeypatch):
    request, _, _ = cifar10_case(tmp_path)
    first = load_data("cifar10", request)
    assert sorted(p.name.split("-")[1] for p in request.cache_dir.iterdir()) == ["test", "train"]  # no temp files

    def no_decoding(*args):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(cifar10, "_read_archive", no_decoding)
    cached = load_data("cifar10", request)
    assert torch.equal(first.eval.images, cached.eval.images)

    archive = tmp_path / "test.tar.xz"
    os.utime(archive, ns=(archive.stat().st_atime_ns, archive.stat().st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="decoded although cached"):
        load_data("cifar10", request)


def test_cifar10_bad_inputs(tmp_path):
    request = DataRequest(data_dir=tmp_path, cache_dir=tmp_path / "cache", calib_size=5)
    with pytest.raises(UserError, match="neither"):
        load_data("cifar10", request)

    write_cifar_archives(tmp_path, {"test": 1})
    with pytest.raises(UserError, match="train.tar.xz is missing"):
        load_data("cifar10", request)

    (tmp_path / "train.tar.xz").write_bytes(b"not an archive at all")
    with pytest.raises(UserError, match="cannot read archive .*train.tar.xz"):
        load_data("cifar10", request)


def test_cifar10_rejects_wrong_classes_and_broken_images(tmp_path):
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            (tmp_path / split / name).mkdir(parents=True)
            Image.new("RGB", (32, 32)).save(tmp_path / split / name / "0.jpg")
    with pytest.raises(UserError, match="expected class folders"):
        load_data("cifar10", DataRequest(data_dir=tmp_path, calib_size=1))

    write_cifar_folder(tmp_path / "ok")
    (tmp_path / "ok" / "cifar10_jpg" / "test" / "cat" / "0001.jpg").write_bytes(b"garbage")
    with pytest.raises(UserError, match="cannot decode image .*0001.jpg"):
        load_data("cifar10", DataRequest(data_dir=tmp_path / "ok", calib_size=1))


def hub_module(monkeypatch, load_dataset) -> None:
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))


@pytest.mark.parametrize("name", ["cifar10", "sst2", "qqp"])
def test_hub_unavailable_is_a_user_error(name, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(UserError, match="hpqdeploy\\[hub\\].*--data-dir"):
        load_data(name)

    def offline(*args):
        raise ConnectionError("offline")

    hub_module(monkeypatch, offline)
    with pytest.raises(UserError, match="ConnectionError"):
        load_data(name)


def test_hub_rows_become_items(monkeypatch):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(20)]
    cifar = {
        "train": {"img": images, "label": list(range(10)) * 2},
        "test": {"img": images[:10], "label": list(range(10))},
    }
    qqp = {
        split: [{"question1": f"{split} a{i}", "question2": f"b{i}", "label": i % 2} for i in range(8)]
        for split in ("train", "validation")
    }
    hub_module(monkeypatch, lambda *names: cifar if names == ("cifar10",) else qqp)

    splits = load_data("cifar10", DataRequest(calib_size=10))
    assert len(splits.eval) == 10 and tuple(splits.eval[0][0].shape) == (3, 32, 32)
    splits = load_data("qqp", DataRequest(calib_size=2))
    assert splits.eval[1] == (("validation a1", "b1"), 1)


# ---------------------------------------------------------------- GLUE


def test_sst2_skips_malformed_rows_and_reads_crlf(tmp_path):
    sst2_case(tmp_path)
    with open(tmp_path / "train.tsv", "a", encoding="utf-8", newline="") as f:
        f.write("no label column\r\ntoo\tmany\tcolumns\r\nbad label\tpositive\r\nout of range\t2\r\n\r\n")
    with pytest.warns(UserWarning, match="skipped 4 malformed rows"):
        splits = load_data("sst2", DataRequest(data_dir=tmp_path, calib_size=10))
    assert len(splits.train) + len(splits.calib) == 40
    assert splits.eval[0] == ("dev sentence 0 .", 0)
    assert splits.info.eval_split_name == "dev" and not splits.info.text_pair


def test_qqp_items_are_question_pairs(tmp_path):
    request, _, _ = qqp_case(tmp_path)
    splits = load_data("qqp", request)
    assert splits.info.text_pair
    assert splits.eval[3] == (("dev question 3?", "dev other 3?"), 1)


@pytest.mark.parametrize("name, header", [("sst2", QQP_HEADER), ("qqp", SST2_HEADER), ("sst2", ("text", "label"))])
def test_glue_unknown_header_is_a_user_error(name, header, tmp_path):
    write_tsv(tmp_path / "train.tsv", header, [])
    with pytest.raises(UserError, match="train.tsv: expected the header"):
        load_data(name, DataRequest(data_dir=tmp_path))


def test_glue_missing_file_is_a_user_error(tmp_path):
    sst2_case(tmp_path)
    (tmp_path / "dev.tsv").unlink()
    with pytest.raises(UserError, match="dev.tsv is missing"):
        load_data("sst2", DataRequest(data_dir=tmp_path, calib_size=10))


# ---------------------------------------------------------------- Fashion-MNIST and digits


def test_fashion_mnist_reads_plain_idx_and_normalises(tmp_path):
    write_fashion(tmp_path, compress=False)
    splits = load_data("fashion-mnist", DataRequest(data_dir=tmp_path, calib_size=10))
    labels = np.frombuffer((tmp_path / "t10k-labels-idx1-ubyte").read_bytes()[8:], dtype=np.uint8)  # after header
    pixels = np.frombuffer((tmp_path / "t10k-images-idx3-ubyte").read_bytes()[16:], dtype=np.uint8)
    x, label = splits.eval[0]
    assert label == labels[0]
    expected = (torch.from_numpy(pixels[: 28 * 28].copy()).float().view(1, 28, 28) / 255 - 0.2860) / 0.3530
    assert torch.allclose(x, expected)
    assert torch.equal(splits.train[0][0], splits.train[0][0])  # no augmentation


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("train-images-idx3-ubyte.gz", b"not gzip", "cannot read .*train-images-idx3-ubyte.gz"),
        ("train-labels-idx1-ubyte.gz", gzip.compress(idx_bytes(np.zeros((50, 28, 28)))), "bad magic number"),
        ("t10k-images-idx3-ubyte.gz", gzip.compress(idx_bytes(np.zeros((20, 28, 28)))[:-5]), "header promises"),
        ("t10k-labels-idx1-ubyte.gz", gzip.compress(idx_bytes(np.zeros(19))), "do not hold matching"),
        ("t10k-labels-idx1-ubyte.gz", None, "t10k-labels-idx1-ubyte\\(.gz\\) is missing"),
    ],
)
def test_fashion_mnist_bad_files(tmp_path, name, content, message):
    write_fashion(tmp_path)
    if content is None:
        (tmp_path / name).unlink()
    else:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(UserError, match=message):
        load_data("fashion-mnist", DataRequest(data_dir=tmp_path, calib_size=10))


def test_fashion_mnist_default_dir_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "DEFAULT_DIR", tmp_path / "absent")
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
        load_data("fashion-mnist")


def test_digits_scaling_and_fixed_eval():
    splits = load_data("digits", DataRequest(calib_size=50, seed=3))
    pixels = splits.eval.images.float() / 16
    assert pixels.max() == 1.0 and pixels.min() == 0.0
    train = torch.stack([splits.train[i][0] for i in range(len(splits.train))])
    assert abs(train.mean()) < 0.05 and abs(train.std() - 1) < 0.05
    assert torch.equal(load_data("digits", DataRequest(calib_size=50)).eval.images, splits.eval.images)


# ---------------------------------------------------------------- ImageNet layout errors


def test_imagenet_layout_errors(tmp_path):
    with pytest.raises(UserError, match="--data-dir"):
        load_data("imagenet")
    write_image_folder(tmp_path, "train")
    with pytest.raises(UserError, match="val does not exist"):
        load_data("imagenet", DataRequest(data_dir=tmp_path, calib_size=3))
    write_image_folder(tmp_path, "val", classes=("ant", "bee"))
    with pytest.raises(UserError, match="different class folders"):
        load_data("imagenet", DataRequest(data_dir=tmp_path, calib_size=3))
    (tmp_path / "val" / "cat").mkdir()
    with pytest.raises(UserError, match="val:"):
        load_data("imagenet", DataRequest(data_dir=tmp_path, calib_size=3))


# ---------------------------------------------------------------- the real data in ../shared


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("hpqdeploy-cache")


@pytest.mark.e2e
def test_real_cifar10_jpeg(session_cache):
    data_dir = SHARED / "data" / "cifar10-jpeg"
    if not (data_dir / "test.tar.xz").is_file():
        pytest.skip(f"real CIFAR-10 archives not found at {data_dir}")
    splits = load_data("cifar10", DataRequest(data_dir=data_dir, cache_dir=session_cache))
    assert len(splits.eval) == 10_000
    assert np.bincount(splits.eval.labels.numpy()).tolist() == [1000] * 10
    assert len(splits.train) + len(splits.calib) == 50_000


@pytest.mark.e2e
def test_real_sst2_dev():
    data_dir = SHARED / "data" / "sst2"
    if not (data_dir / "dev.tsv").is_file():
        pytest.skip(f"real SST-2 files not found at {data_dir}")
    splits = load_data("sst2", DataRequest(data_dir=data_dir))
    assert len(splits.eval) == 872
    assert len(splits.train) + len(splits.calib) == 67_349
