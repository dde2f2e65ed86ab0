"""``python -m iddpm_lightning evaluate``: end to end through the CLI's ``main()`` (in-process), the
reference kinds, and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from iddpm_lightning.data import DigitsDataModule
from iddpm_lightning.evaluation.evaluate import evaluate
from tests.conftest import REPO


def write_npz(path: Path, images: np.ndarray) -> Path:
    np.savez(path, arr_0=images)
    return path


def digits_u8(split: str = "val") -> np.ndarray:
    dm = DigitsDataModule()
    dm.setup("validate")
    return getattr(dm, f"{split}_set").images.permute(0, 2, 3, 1).numpy()  # (N, 8, 8, 1) uint8


def blurred(images: np.ndarray) -> np.ndarray:
    """Generated stand-ins for samples: the digits, each pixel averaged with its neighbours."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    x = torch.nn.functional.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
    return x.round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_evaluate_end_to_end_prints_the_table_writes_the_json_and_reuses_the_cached_reference(tmp_path, run_main):
    samples = write_npz(tmp_path / "samples_150x8x8x1.npz", blurred(digits_u8()))
    cache = tmp_path / "cache"
    args = ["evaluate", "--samples", str(samples), "--reference", str(REPO / "configs" / "digits.yaml"),
            "--cache_dir", str(cache)]
    _, first = run_main(args, cwd=tmp_path, ok=True)
    (ref_file,) = cache.glob("fid_ref_DigitsDataModule_train_*.pt")
    stamp = (ref_file.stat().st_mtime_ns, ref_file.stat().st_ino)
    _, second = run_main(args, cwd=tmp_path, ok=True)
    assert (ref_file.stat().st_mtime_ns, ref_file.stat().st_ino) == stamp  # read, not rewritten
    assert f"statistics cached in {ref_file}" in first and f"statistics read from {ref_file}" in second
    for out in (first, second):
        assert "150 images (8x8x1)" in out and "1497 images" in out and "NOT comparable with Inception FID" in out
        for name in ("fd_digits", "kid_digits", "precision", "recall", "confidence", "class_entropy"):
            assert f"\n{name} " in out, out
    result = json.loads((tmp_path / "samples_150x8x8x1_digits_train.json").read_text())
    assert result["num_samples"] == 150 and result["reference"]["num_images"] == 1497
    assert result["features"].startswith("digits-cnn-v1:64:") and result["reference"]["cache_hit"]
    m = result["metrics"]
    assert m["fd_digits"] > 0 and 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1
    assert f"{m['fd_digits']:12.5g}" in second


def test_references_as_images_as_a_png_folder_and_as_statistics_agree(tmp_path):
    """Three routes to the Fréchet distance of the same samples against the same training digits:
    an npz of the images, a folder of their PNGs, and a statistics file (mu, sigma) of their features."""
    from PIL import Image

    from iddpm_lightning.evaluation.metrics import ReferenceStats

    train = digits_u8("train")
    samples = write_npz(tmp_path / "s.npz", blurred(digits_u8()))
    by_npz = evaluate(str(samples), str(write_npz(tmp_path / "ref.npz", train)), features="digits",
                      cache_dir=str(tmp_path / "c"))
    folder = tmp_path / "png"
    folder.mkdir()
    for i, image in enumerate(train):
        Image.fromarray(image[..., 0]).save(folder / f"{i:05d}.png")
    by_png = evaluate(str(samples), str(folder), features="digits", cache_dir=str(tmp_path / "c"))
    assert by_png["metrics"] == by_npz["metrics"] and by_png["reference"]["num_images"] == 1497
    cached = ReferenceStats.load(by_npz["reference"]["cache"])
    stats = tmp_path / "stats.npz"
    np.savez(stats, mu=cached.mu.numpy(), sigma=cached.sigma.numpy())
    by_stats = evaluate(str(samples), str(stats), features="digits", out=str(tmp_path / "s_stats.json"))
    assert by_stats["metrics"]["fd_digits"] == pytest.approx(by_npz["metrics"]["fd_digits"], rel=1e-9)
    assert by_stats["metrics"]["kid_digits"] is None and by_stats["metrics"]["precision"] is None
    assert json.loads((tmp_path / "s_stats.json").read_text())["metrics"] == by_stats["metrics"]


def test_inception_features_name_the_extractor_and_give_the_inception_score(tmp_path, inception_weights):
    """Random weights in torch-fidelity's format (no network): the route, not the numbers."""
    rng = np.random.default_rng(0)
    samples = write_npz(tmp_path / "s.npz", rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8))
    reference = write_npz(tmp_path / "r.npz", rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8))
    out = evaluate(str(samples), str(reference), inception_weights=str(inception_weights), batch_size=3)
    assert out["feature_space"] == "inception" and out["features"].endswith(inception_weights.name)
    assert set(out["metrics"]) == {"fid", "kid", "kid_std", "precision", "recall", "is", "is_std"}
    assert out["metrics"]["is"] >= 1.0 - 1e-9  # exp of a KL divergence


@pytest.mark.parametrize("case, needles", [
    ("float images", ["holds float32 images", "must hold uint8"]),
    ("channels first", ["shape (10, 1, 8, 8)", "N x H x W x C"]),
    ("missing reference", ["--reference=", "does not exist"]),
    ("too few samples", ["holds 3 image(s)", "fewer than the 4", "--sampling.num_samples"]),
    ("other size", ["16x16x1 (H x W x C) images but the reference 8x8x1"]),
    ("no inception weights", ["weights-inception-2015-12-05-6726825d.pth", "nowhere/w.pth", "download it"]),
    ("corrupt npz", ["cannot be read as an npz"]),
    ("tiny reference", ["--reference=", "has 2 image(s), fewer than the 4"]),
    ("16-bit PNGs", ["is a I;16 image, not 8 bits per channel"]),
    ("reference not YAML", ["cannot be read as YAML"]),
])
def test_bad_inputs_are_one_sentence_before_any_work(tmp_path, run_main, case, needles):
    images = digits_u8()[:10]
    reference = str(REPO / "configs" / "digits.yaml")
    extra = []
    if case == "float images":
        samples = write_npz(tmp_path / "s.npz", images.astype(np.float32))
    elif case == "channels first":
        samples = write_npz(tmp_path / "s.npz", images.transpose(0, 3, 1, 2))
    elif case == "missing reference":
        samples, reference = write_npz(tmp_path / "s.npz", images), str(tmp_path / "nothing.npz")
    elif case == "too few samples":
        samples = write_npz(tmp_path / "s.npz", images[:3])
    elif case == "other size":
        samples = write_npz(tmp_path / "s.npz", np.zeros((10, 16, 16, 1), np.uint8))
    elif case == "tiny reference":
        samples, reference = write_npz(tmp_path / "s.npz", images), str(write_npz(tmp_path / "r.npz", images[:2]))
    elif case == "16-bit PNGs":
        from PIL import Image

        samples = tmp_path / "png16"
        samples.mkdir()
        for i in range(5):
            Image.fromarray(np.full((8, 8), 1000 * i, np.uint16)).save(samples / f"{i}.png")
    elif case == "reference not YAML":
        samples, reference = write_npz(tmp_path / "s.npz", images), str(tmp_path / "bad.yaml")
        (tmp_path / "bad.yaml").write_text("data: [unclosed\n")
    elif case == "corrupt npz":
        samples = tmp_path / "s.npz"
        samples.write_bytes(b"PK\x03\x04 not really a zip file")
    else:
        samples = write_npz(tmp_path / "s.npz", np.zeros((10, 8, 8, 1), np.uint8))
        extra = ["--features", "inception", "--inception_weights", "nowhere/w.pth"]
    code, err = run_main(["evaluate", "--samples", str(samples), "--reference", reference,
                          "--cache_dir", str(tmp_path / "cache"), *extra], tmp_path)
    assert code == 2
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert all(n in line for n in needles), line
    assert "Traceback" not in err
    assert not (tmp_path / "cache").exists() and not list(tmp_path.glob("*.json"))  # nothing computed or written
