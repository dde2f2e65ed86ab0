"""DataModules on real loading code: sklearn digits, a tiny generated CIFAR-10, a folder of PNG/JPGs."""

import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from iddpm_lightning.data import CIFAR10DataModule, DigitsDataModule, ImageFolderDataModule
from iddpm_lightning.errors import ConfigError

from .conftest import write_tiny_cifar


def to_u8(x: torch.Tensor) -> torch.Tensor:
    """Invert the [-1, 1] mapping, asserting the values lie exactly on the 256-level grid."""
    u = x * 127.5 + 127.5
    assert torch.allclose(u, u.round(), atol=1e-4)
    return u.round().to(torch.uint8)


def all_batches(loader):
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


# ----------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits():
    dm = DigitsDataModule(batch_size=100, val_size=150, test_size=150)
    dm.setup("fit")
    return dm


def test_digits_attributes_set_before_setup():
    dm = DigitsDataModule()
    assert (dm.image_size, dm.channels, dm.num_classes, dm.batch_size) == (8, 1, 10, 128)


def test_digits_splits_partition_the_dataset_with_exact_8bit_values(digits):
    raw = load_digits()
    expected = Counter(
        (bytes([round(v * 255 / 16) for v in img.ravel()]), int(t)) for img, t in zip(raw.images, raw.target)
    )
    got, sizes = Counter(), []
    for loader in (digits.train_dataloader(), digits.val_dataloader(), digits.test_dataloader()):
        loader = torch.utils.data.DataLoader(loader.dataset, batch_size=2000)  # every image, once
        x, y = all_batches(loader)
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape[1:] == (1, 8, 8) and x.min() >= -1 and x.max() <= 1
        sizes.append(len(x))
        got.update((bytes(u.flatten().tolist()), int(t)) for u, t in zip(to_u8(x), y))
    assert sizes == [1797 - 300, 150, 150]
    assert got == expected  # disjoint and complete splits, each value round(v * 255 / 16)
    first = bytes([0, 0, 80, 207, 143, 16, 0, 0])  # top row of sklearn's image 0: 0 0 5 13 9 1 0 0
    assert raw.images[0][0].tolist() == [0, 0, 5, 13, 9, 1, 0, 0]
    assert any(img[:8] == first and t == 0 for img, t in got)


def test_digits_split_depends_only_on_seed():
    def val_images(seed):
        dm = DigitsDataModule(split_seed=seed)
        dm.setup("validate")
        return all_batches(dm.val_dataloader())[0]

    assert torch.equal(val_images(0), val_images(0))
    assert not torch.equal(val_images(0), val_images(1))


def test_train_loader_shuffles_and_drops_last_val_keeps_all(digits):
    train = digits.train_dataloader()
    sizes = [len(x) for x, _ in train]
    assert sizes == [100] * (1497 // 100)  # 97 images dropped
    epoch0 = torch.cat([y for _, y in train])
    assert torch.equal(epoch0, torch.cat([y for _, y in train]))  # the order is a function of (seed, epoch)
    train.sampler.set_epoch(1)
    assert not torch.equal(epoch0, torch.cat([y for _, y in train]))
    assert [len(x) for x, _ in digits.val_dataloader()] == [100, 50]
    assert [len(x) for x, _ in digits.test_dataloader()] == [100, 50]
    assert not train.persistent_workers  # requested only with workers
    dm = DigitsDataModule(persistent_workers=True, num_workers=0)
    dm.setup("fit")
    assert not dm.train_dataloader().persistent_workers


def test_val_loader_is_deterministic(digits):
    a, b = all_batches(digits.val_dataloader()), all_batches(digits.val_dataloader())
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_batch_size_larger_than_train_set_raises_in_setup():
    dm = DigitsDataModule(batch_size=1498)  # 1497 training images
    with pytest.raises(ConfigError, match=r"data\.batch_size.*1497"):
        dm.setup("fit")
    dm.setup("test")  # no training loader needed


@pytest.mark.parametrize(
    "kwargs, setting",
    [({"val_size": 0}, "data.val_size"), ({"val_size": 900, "test_size": 900}, "data.val_size"),
     ({"batch_size": 0}, "data.batch_size"), ({"num_workers": -1}, "data.num_workers")],
)
def test_digits_bad_settings_raise(kwargs, setting):
    with pytest.raises(ConfigError, match=setting.replace(".", r"\.")):
        DigitsDataModule(**kwargs)


# ----------------------------------------------------------------------------- CIFAR-10

N_TRAIN, N_TEST = 20, 10


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    """20 train images over data_batch_1..5 and 10 test images, in torchvision's pickle layout."""
    root = tmp_path_factory.mktemp("cifar")
    data, labels = write_tiny_cifar(root, N_TRAIN, N_TEST)
    # Rewrite image 5 with two known pixels: red of (row 0, col 0), green of (row 1, col 2).
    data[5, 0] = 200
    data[5, 1024 + 32 * 1 + 2] = 17
    with open(root / "cifar-10-batches-py" / "data_batch_2", "wb") as f:
        pickle.dump({"data": data[4:8], "labels": labels[4:8]}, f)
    return root, torch.from_numpy(data.reshape(-1, 3, 32, 32)), torch.tensor(labels)


def test_cifar_round_trips_pixels_and_labels(cifar_root):
    root, images, labels = cifar_root
    dm = CIFAR10DataModule(root=str(root), val_size=4, batch_size=4)
    assert (dm.image_size, dm.channels, dm.num_classes) == (32, 3, 10)
    dm.setup("fit")
    train_x = torch.stack([dm.train_set[i][0] for i in range(N_TRAIN)])
    train_y = torch.stack([dm.train_set[i][1] for i in range(N_TRAIN)])
    assert train_x.dtype == torch.float32 and train_y.dtype == torch.int64
    assert torch.equal(to_u8(train_x), images[:N_TRAIN]) and torch.equal(train_y, labels[:N_TRAIN])
    assert to_u8(train_x)[5, 0, 0, 0] == 200 and to_u8(train_x)[5, 1, 1, 2] == 17  # HWC -> CHW kept right
    test_x, test_y = all_batches(dm.test_dataloader())
    assert torch.equal(to_u8(test_x), images[N_TRAIN:]) and torch.equal(test_y, labels[N_TRAIN:])
    val_x, _ = all_batches(dm.val_dataloader())
    assert len(val_x) == 4
    val_u8 = to_u8(val_x)
    assert len({bytes(v.flatten().tolist()) for v in val_u8}) == 4
    assert [len(x) for x, _ in dm.train_dataloader()] == [4] * 5  # all 20 training images train


def test_cifar_validation_comes_from_the_training_split_test_is_the_whole_test_split(cifar_root):
    root, images, _ = cifar_root
    dm = CIFAR10DataModule(root=str(root), val_size=6, batch_size=4)
    dm.setup("fit")
    key = lambda u: bytes(u.flatten().tolist())
    train = [key(u) for u in images[:N_TRAIN]]
    val = [key(u) for u in to_u8(all_batches(dm.val_dataloader())[0])]
    test = [key(u) for u in to_u8(all_batches(dm.test_dataloader())[0])]
    assert val == [train[i] for i in dm.val_indices.tolist()]  # validation indices are training indices
    assert not set(val) & set(test)  # never a test image
    assert test == [key(u) for u in images[N_TRAIN:]]  # every test image, once, in order


@pytest.mark.parametrize("flip", [False, True])
def test_cifar_random_flip(cifar_root, flip):
    root, images, _ = cifar_root
    dm = CIFAR10DataModule(root=str(root), val_size=2, batch_size=4, random_flip=flip)
    dm.setup("fit")
    seen = Counter()
    loader = dm.train_dataloader()
    for epoch in range(5):
        loader.sampler.set_epoch(epoch)
        for x, _ in loader:
            for u in to_u8(x):
                if any(torch.equal(u, im) for im in images[:N_TRAIN]):
                    seen["plain"] += 1
                else:
                    assert any(torch.equal(u, im.flip(-1)) for im in images[:N_TRAIN])  # a mirror, nothing else
                    seen["flipped"] += 1
    assert seen["plain"] > 0 and (seen["flipped"] > 0) == flip
    assert abs(seen["flipped"] - seen["plain"] * flip) < 30  # 100 fair coins when flipping
    val_x, _ = all_batches(dm.val_dataloader())
    assert all(any(torch.equal(v, t) for t in images[:N_TRAIN]) for v in to_u8(val_x))  # never flipped


def test_cifar_missing_dataset_names_root_and_download(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.root.*data\.download=true") as err:
        CIFAR10DataModule(root=str(tmp_path / "nowhere"))
    assert str(tmp_path / "nowhere" / "cifar-10-batches-py") in str(err.value)


def test_cifar_batch_and_val_size_checked_in_setup(cifar_root):
    root = str(cifar_root[0])
    with pytest.raises(ConfigError, match=r"data\.batch_size.*20 training images"):
        CIFAR10DataModule(root=root, val_size=2, batch_size=21).setup("fit")
    with pytest.raises(ConfigError, match=r"data\.val_size"):
        CIFAR10DataModule(root=root, val_size=21, batch_size=4).setup("fit")


# ----------------------------------------------------------------------------- image folder


def paper_resize_crop(path: Path, size: int) -> np.ndarray:
    """openai/improved-diffusion image_datasets.py, written out independently."""
    img = Image.open(path).convert("RGB")
    while min(*img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(*img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    arr = np.array(img)
    cy, cx = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[cy : cy + size, cx : cx + size]


def write_image(path: Path, w: int, h: int, seed: int, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).convert(mode).save(path)


@pytest.fixture
def folder(tmp_path):
    """Two classes (one with a nested folder, one with a jpg, upper-case extensions) plus a notes file."""
    root = tmp_path / "train"
    write_image(root / "cat" / "a.png", 40, 30, 1)
    write_image(root / "cat" / "nested" / "b.PNG", 16, 16, 2)
    write_image(root / "cat" / "c.png", 9, 12, 3, mode="L")
    write_image(root / "dog" / "d.jpg", 20, 50, 4)
    write_image(root / "dog" / "e.JPEG", 33, 17, 5)
    write_image(root / "dog" / "f.png", 64, 64, 6, mode="RGBA")
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


def test_image_folder_shapes_labels_and_splits(folder):
    dm = ImageFolderDataModule(root=str(folder), image_size=8, class_cond=True, val_size=2, test_size=1, batch_size=3)
    assert (dm.image_size, dm.channels, dm.num_classes) == (8, 3, 2)
    dm.setup("fit")
    sets = [dm.train_set, dm.val_set, dm.test_set]
    assert [len(s) for s in sets] == [3, 2, 1]
    names = [{f.name for f in s.files} for s in sets]
    assert set.union(*names) == {"a.png", "b.PNG", "c.png", "d.jpg", "e.JPEG", "f.png"}  # disjoint, complete
    for s in sets:
        for i in range(len(s)):
            x, y = s[i]
            assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and -1 <= x.min() <= x.max() <= 1
            assert y == (0 if s.files[i].relative_to(folder).parts[0] == "cat" else 1)
            to_u8(x)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (3, 3, 8, 8) and y.dtype == torch.int64
    assert len(dm.train_dataloader()) == 1


def test_image_folder_unlabeled_and_without_a_test_split(folder):
    dm = ImageFolderDataModule(root=str(folder), image_size=4, val_size=2, batch_size=2)
    assert dm.num_classes == 0
    dm.setup("fit")
    assert len(dm.train_set) == 4 and dm.test_set is None  # validation is never reported as test
    assert set(all_batches(dm.train_dataloader())[1].tolist()) == {0}
    with pytest.raises(ConfigError, match=r"data\.test_root.*data\.test_size"):
        dm.setup("test")


def test_image_folder_resize_crop_matches_paper_code(folder, tmp_path):
    write_image(tmp_path / "test" / "wide.png", 70, 40, 7)  # halved twice, then bicubic to 14x8, crop
    write_image(tmp_path / "test" / "xsmall.png", 5, 9, 8)  # upscaled
    dm = ImageFolderDataModule(root=str(folder), image_size=8, val_size=1, test_root=str(tmp_path / "test"),
                               batch_size=2)
    dm.setup("fit")
    assert len(dm.train_set) == 5 and len(dm.val_set) == 1  # validation held out of the training images
    x, _ = all_batches(dm.test_dataloader())
    for i, name in enumerate(["wide.png", "xsmall.png"]):
        expected = torch.from_numpy(paper_resize_crop(tmp_path / "test" / name, 8)).permute(2, 0, 1)
        assert torch.equal(to_u8(x[i]), expected)


def test_image_folder_random_flip_mirrors(tmp_path):
    write_image(tmp_path / "a.png", 8, 8, 9)
    write_image(tmp_path / "b.png", 8, 8, 10)
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=8, val_size=1, random_flip=True, batch_size=1)
    dm.setup("fit")
    plain = torch.from_numpy(paper_resize_crop(dm.train_set.files[0], 8)).permute(2, 0, 1)
    loader = dm.train_dataloader()
    outs = []
    for epoch in range(20):
        loader.sampler.set_epoch(epoch)
        outs += [to_u8(x[0]) for x, _ in loader]
    assert any(torch.equal(o, plain) for o in outs) and any(torch.equal(o, plain.flip(-1)) for o in outs)
    assert all(torch.equal(o, plain) or torch.equal(o, plain.flip(-1)) for o in outs)
    assert torch.equal(dm.train_set[0][0], dm.train_set[(0, False)][0])  # a plain index never flips


def test_image_folder_errors(folder, tmp_path):
    with pytest.raises(ConfigError, match=r"data\.root"):
        ImageFolderDataModule(root=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.txt").write_text("")
    with pytest.raises(ConfigError, match=r"no images.*\.png.*\.jpg.*\.jpeg.*data\.root"):
        ImageFolderDataModule(root=str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match=r"data\.test_root"):
        ImageFolderDataModule(root=str(folder), test_root=str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match=r"data\.val_size"):
        ImageFolderDataModule(root=str(folder), val_size=6)  # would leave no training image
    write_image(folder / "top.png", 8, 8, 11)
    with pytest.raises(ConfigError, match=r"data\.class_cond.*top\.png"):
        ImageFolderDataModule(root=str(folder), class_cond=True, val_size=1)
    with pytest.raises(ConfigError, match=r"data\.batch_size.*6 training images"):
        ImageFolderDataModule(root=str(folder), val_size=1, batch_size=7).setup("fit")


def test_image_folder_corrupt_files_reported_in_setup(folder):
    (folder / "dog" / "broken.png").write_bytes(b"definitely not a png")
    (folder / "cat" / "empty.jpg").write_bytes(b"")
    dm = ImageFolderDataModule(root=str(folder), val_size=1, batch_size=1)  # cheap __init__ passes
    with pytest.raises(ConfigError, match=r"2 of 8 image files under data\.root.*cat/empty\.jpg"):
        dm.setup("fit")


# ----------------------------------------------------------------------------- resumable order


def keys_of(loader, epochs, stop_after=None):
    """Every batch of ``epochs`` (calling set_epoch as Lightning does) as lists of image values."""
    out = []
    for epoch in epochs:
        loader.sampler.set_epoch(epoch)
        for x, _ in loader:
            out.append(x.flatten(1)[:, 0].tolist())
            if stop_after is not None and len(out) == stop_after:
                return out
    return out


@pytest.mark.parametrize("num_workers, resumed_workers", [(0, 0), (2, 2), (0, 2), (2, 0)])
@pytest.mark.parametrize("stop_after", [3, 7, 8, 13])  # 4 batches an epoch: mid-epoch, last batch, next
def test_train_loader_state_resumes_exactly_in_any_epoch(num_workers, resumed_workers, stop_after):
    """A loader restored from its state_dict continues with the batch the uninterrupted loader
    would have drawn, in the saved epoch, with or without workers; a finished epoch resumes
    at the start of the next, also with another number of workers. Lightning creates the
    iterator BEFORE it calls set_epoch."""
    images = torch.arange(18, dtype=torch.uint8).view(18, 1, 1, 1)
    make = lambda workers=num_workers: _loader(images, workers)
    straight = keys_of(make(), range(4))
    assert len(straight) == 16 and len({v for b in straight[:4] for v in b}) == 16  # 2 images dropped per epoch

    first = make()
    seen = keys_of(first, range(4), stop_after=stop_after)
    state = first.state_dict()
    resumed = make(resumed_workers)
    resumed.load_state_dict(state)
    iterator = iter(resumed)  # as Lightning on a restart: the iterator first, then set_epoch
    epoch = stop_after // 4
    resumed.sampler.set_epoch(epoch)
    rest = [x.flatten(1)[:, 0].tolist() for x, _ in iterator]
    rest += keys_of(resumed, range(epoch + 1, 4))
    assert seen + rest == straight


def _loader(images, num_workers):
    from iddpm_lightning.data import U8Images

    dm = DigitsDataModule(batch_size=4, num_workers=num_workers)
    dm.train_set = U8Images(images, torch.zeros(len(images)))
    return dm.train_dataloader()


def test_train_order_is_sharded_over_ranks_without_overlap():
    from iddpm_lightning.data import EpochOrder

    data = torch.arange(23)
    shards = [list(EpochOrder(data, seed=5, batch_size=2, num_replicas=3, rank=r)) for r in range(3)]
    assert [len(s) for s in shards] == [6, 6, 6]  # 23 // 3 = 7 each, whole batches of 2
    assert len(set().union(*map(set, shards))) == 18  # disjoint
    one = list(EpochOrder(data, seed=5, batch_size=1))
    assert sorted(one) == list(range(23))
