"""The prepare stage and the batch loader, on real PNG folders (digits and self-made)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import CORRUPT_JPEGS, garbled_jpeg, jpeg_bytes, truncated_jpeg
from PIL import Image, ImageFile

from pipeline.config import FetchConfig, PrepareConfig
from pipeline.data.loader import ArrayBatches, load_split
from pipeline.errors import DataError
from pipeline.layout import SPLITS, data_card_file, images_file, labels_file
from pipeline.stages import fetch, prepare

# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def digits_raw(tmp_path_factory) -> Path:
    """scikit-learn's digits as fetch writes them: 1797 8x8 PNGs in 10 class folders."""
    raw = tmp_path_factory.mktemp("digits") / "raw"
    fetch.run(FetchConfig(), raw)
    return raw


def write_source(raw: Path, classes: list[str], num_images: int, splits: list[str]) -> None:
    """source.json with the keys fetch writes."""
    info = {
        "source": "archive",
        "url": "file:///made/by/test.tar.gz",
        "sha256": "",
        "num_images": num_images,
        "classes": classes,
        "splits": splits,
    }
    (raw / "source.json").write_text(json.dumps(info, indent=2))


def unique_image(index: int, size: int = 8) -> np.ndarray:
    """An 8-bit grayscale image no other index produces (index spelled in its first pixels)."""
    rng = np.random.default_rng(index)
    image = rng.integers(0, 256, size=(size, size), dtype=np.uint8)
    image.flat[0], image.flat[1] = index // 256, index % 256
    return image


def make_folder(root: Path, per_class: dict[str, int], start: int = 0) -> dict[str, list]:
    """`root/<class>/<n>.png` of unique images; returns class -> images in file-name order."""
    made: dict[str, list] = {}
    index = start
    for name, count in per_class.items():
        (root / name).mkdir(parents=True)
        made[name] = []
        for i in range(count):
            image = unique_image(index)
            Image.fromarray(image).save(root / name / f"{i:03d}.png")
            made[name].append(image)
            index += 1
    return made


def make_jpeg_folder(root: Path, per_class: dict[str, int]) -> None:
    """`root/<class>/<n>.jpg`, valid JPEGs of noise, unique per file."""
    seed = 0
    for name, count in per_class.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            (root / name / f"{i:03d}.jpg").write_bytes(jpeg_bytes(seed))
            seed += 1


def read_split(prepared: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = load_split(prepared, split)
    return np.array(images), labels


def rows(images: np.ndarray) -> set[bytes]:
    return {image.tobytes() for image in images}


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# --------------------------------------------------------------------------- splitting


def test_same_seed_same_split_other_seed_other_split(digits_raw: Path, tmp_path: Path) -> None:
    cfg = PrepareConfig(seed=7)
    card_a = prepare.run(cfg, digits_raw, tmp_path / "a")
    card_b = prepare.run(cfg, digits_raw, tmp_path / "b")
    card_c = prepare.run(dataclasses.replace(cfg, seed=8), digits_raw, tmp_path / "c")
    for split in SPLITS:
        images_a, labels_a = read_split(tmp_path / "a", split)
        images_b, labels_b = read_split(tmp_path / "b", split)
        assert np.array_equal(images_a, images_b), split
        assert np.array_equal(labels_a, labels_b), split
    assert card_a["data_hash"] == card_b["data_hash"]

    images_a, labels_a = read_split(tmp_path / "a", "test")
    images_c, labels_c = read_split(tmp_path / "c", "test")
    # Another seed picks other images; the per-class counts (and so the class-sorted
    # label arrays) stay the same because the split is stratified.
    assert not np.array_equal(images_a, images_c)
    assert rows(images_a) != rows(images_c)
    assert np.array_equal(np.bincount(labels_a), np.bincount(labels_c))
    assert card_c["data_hash"] != card_a["data_hash"]


def test_split_is_stratified_and_complete(digits_raw: Path, tmp_path: Path) -> None:
    cfg = PrepareConfig(val_fraction=0.2, test_fraction=0.25, seed=3)
    card = prepare.run(cfg, digits_raw, tmp_path / "prepared")
    total = {c: len(list((digits_raw / c).glob("*.png"))) for c in card["classes"]}
    assert sum(total.values()) == 1797
    for name, count in total.items():
        assert card["counts"]["test"][name] == pytest.approx(0.25 * count, abs=1), name
        # val is carved second, from what test left: still within rounding of its share
        assert card["counts"]["val"][name] == pytest.approx(0.2 * count, abs=1.5), name
        assert sum(card["counts"][s][name] for s in SPLITS) == count, name
    assert sum(card["totals"].values()) == 1797
    # The arrays on disk agree with the card.
    for split in SPLITS:
        images, labels = read_split(tmp_path / "prepared", split)
        assert len(images) == card["totals"][split]
        per_class = np.bincount(labels, minlength=card["num_classes"])
        assert per_class.tolist() == [card["counts"][split][c] for c in card["classes"]]


def test_splits_are_disjoint(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    made = make_folder(raw, {"a": 30, "b": 20, "c": 25})
    write_source(raw, ["a", "b", "c"], 75, [])
    cfg = PrepareConfig(image_size=8, val_fraction=0.2, test_fraction=0.2, seed=1)
    prepare.run(cfg, raw, tmp_path / "prepared")
    split_rows = {s: rows(read_split(tmp_path / "prepared", s)[0]) for s in SPLITS}
    assert not split_rows["train"] & split_rows["val"]
    assert not split_rows["train"] & split_rows["test"]
    assert not split_rows["val"] & split_rows["test"]
    everything = rows(np.stack([im[..., None] for ims in made.values() for im in ims]))
    assert split_rows["train"] | split_rows["val"] | split_rows["test"] == everything
    assert sum(len(r) for r in split_rows.values()) == 75
    # Every image kept its label.
    label_of = {im[..., None].tobytes(): i for i, ims in enumerate(made.values()) for im in ims}
    for split in SPLITS:
        images, labels = read_split(tmp_path / "prepared", split)
        assert [label_of[im.tobytes()] for im in images] == labels.tolist()


def test_archive_splits_are_kept(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    train = make_folder(raw / "train", {"cat": 20, "dog": 20})
    test = make_folder(raw / "test", {"cat": 4, "dog": 6}, start=1000)
    write_source(raw, ["cat", "dog"], 50, ["test", "train"])
    cfg = PrepareConfig(image_size=8, val_fraction=0.25, test_fraction=0.3, seed=0)
    card = prepare.run(cfg, raw, tmp_path / "prepared")

    test_images, test_labels = read_split(tmp_path / "prepared", "test")
    expected = np.stack([im[..., None] for im in test["cat"] + test["dog"]])
    assert np.array_equal(test_images, expected)
    assert test_labels.tolist() == [0] * 4 + [1] * 6

    train_rows = rows(np.stack([im[..., None] for im in train["cat"] + train["dog"]]))
    val_images, _ = read_split(tmp_path / "prepared", "val")
    kept_images, _ = read_split(tmp_path / "prepared", "train")
    assert rows(val_images) <= train_rows
    assert not rows(val_images) & rows(kept_images)  # val images left train
    assert rows(kept_images) | rows(val_images) == train_rows
    assert card["totals"] == {"train": 30, "val": 10, "test": 10}
    assert card["counts"]["val"] == {"cat": 5, "dog": 5}


@pytest.mark.parametrize("small", [1, 2, 3])
def test_a_class_too_small_for_the_default_fractions_is_refused(tmp_path: Path, small) -> None:
    """With 3 images (or fewer) of a class, the default 15 % val and test carve none of it:
    refused, naming the split, the class, its count and the count it needs; with that
    count, every split gets the class."""
    raw = tmp_path / "raw"
    make_folder(raw, {"a": 30, "b": 30, "c": small})
    write_source(raw, ["a", "b", "c"], 60 + small, [])
    with pytest.raises(DataError) as err:
        prepare.run(PrepareConfig(image_size=8), raw, tmp_path / "prepared")
    assert str(err.value) == (
        f"prepare: split test would have no image of class 'c': it has {small} image(s) in "
        "all, and carving stratified splits (prepare.test_fraction 0.15, "
        "prepare.val_fraction 0.15) from them needs at least 5; add images of 'c' or raise "
        "the fraction"
    )
    assert not (tmp_path / "prepared").exists()

    shutil.rmtree(raw / "c")
    make_folder(raw, {"c": 5}, start=100)
    card = prepare.run(PrepareConfig(image_size=8), raw, tmp_path / "prepared")
    assert all(card["counts"][split]["c"] >= 1 for split in SPLITS)


def test_a_given_split_without_a_class_is_refused(tmp_path: Path) -> None:
    """The data's own test/ split lacks a class train has: refused naming both, not a
    test split that silently scores one class fewer."""
    raw = tmp_path / "raw"
    make_folder(raw / "train", {"a": 20, "b": 20, "c": 20})
    make_folder(raw / "test", {"a": 4, "b": 4}, start=1000)
    write_source(raw, ["a", "b", "c"], 68, ["test", "train"])
    with pytest.raises(DataError) as err:
        prepare.run(PrepareConfig(image_size=8), raw, tmp_path / "prepared")
    assert str(err.value) == (
        "prepare: split test (the data's own test/ folder) has no images of class 'c' "
        "(20 in train); it needs at least 1: add some to test/c/ and rerun fetch"
    )
    assert not (tmp_path / "prepared").exists()


def test_a_fraction_of_zero_leaves_its_split_empty(tmp_path: Path) -> None:
    """prepare.val_fraction: 0 asks for no val split: no class is missing from it."""
    raw = tmp_path / "raw"
    make_folder(raw, {"a": 10, "b": 10})
    write_source(raw, ["a", "b"], 20, [])
    card = prepare.run(PrepareConfig(image_size=8, val_fraction=0), raw, tmp_path / "prepared")
    assert card["totals"] == {"train": 17, "val": 0, "test": 3}


# --------------------------------------------------------------------------- data card


def test_data_card(digits_raw: Path, tmp_path: Path) -> None:
    cfg = PrepareConfig(image_size=16, channels=1, seed=42)
    out = tmp_path / "prepared"
    card = prepare.run(cfg, digits_raw, out)

    assert json.loads(data_card_file(out).read_text()) == card
    assert card["classes"] == [str(d) for d in range(10)]
    assert card["num_classes"] == 10
    assert card["image_shape"] == [16, 16, 1]
    assert card["source"] == json.loads((digits_raw / "source.json").read_text())
    assert card["source"]["source"] == "digits"
    assert card["prepare"] == dataclasses.asdict(cfg)
    assert set(card["counts"]) == set(SPLITS)
    for split in SPLITS:
        assert set(card["counts"][split]) == set(card["classes"])
        assert card["totals"][split] == sum(card["counts"][split].values())
    assert sum(card["totals"].values()) == 1797

    # data_hash is the digest of what is on disk: recompute it from the arrays.
    digest = hashlib.sha256()
    for split in SPLITS:
        images = np.load(images_file(out, split))
        labels = np.load(labels_file(out, split))
        assert images.shape == (card["totals"][split], 16, 16, 1)
        split_digest = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
        digest.update(split_digest.encode())
    assert card["data_hash"] == digest.hexdigest()


# --------------------------------------------------------------------------- decoding


def mode_images(value8: int) -> dict[str, Image.Image]:
    """The same flat gray level as L, RGB, RGBA, palette and 16-bit grayscale."""
    palette = Image.new("P", (10, 10), 0)
    palette.putpalette([value8, value8, value8] * 256)
    return {
        "l": Image.new("L", (10, 10), value8),
        "rgb": Image.new("RGB", (10, 10), (value8,) * 3),
        "rgba": Image.new("RGBA", (10, 10), (value8,) * 3 + (255,)),
        "p": palette,
        "i16": Image.fromarray(np.full((10, 10), value8 * 257, np.uint16)),
    }


@pytest.mark.parametrize("channels", [1, 3])
def test_image_modes_become_uint8(tmp_path: Path, channels: int) -> None:
    raw = tmp_path / "raw"
    levels = {"gray": 128, "white": 255}
    for name, level in levels.items():
        (raw / name).mkdir(parents=True)
        for mode, image in mode_images(level).items():
            image.save(raw / name / f"{mode}.png")
    assert Image.open(raw / "gray" / "i16.png").mode.startswith("I")  # really 16-bit on disk
    write_source(raw, list(levels), 10, [])
    cfg = PrepareConfig(image_size=12, channels=channels, val_fraction=0.2, test_fraction=0.2)
    card = prepare.run(cfg, raw, tmp_path / "prepared")
    assert card["image_shape"] == [12, 12, channels]
    seen = 0
    for split in SPLITS:
        images, labels = read_split(tmp_path / "prepared", split)
        assert images.dtype == np.uint8
        assert images.shape[1:] == (12, 12, channels)
        for image, label in zip(images, labels, strict=True):
            level = levels[card["classes"][label]]
            assert (image == level).all(), f"class {card['classes'][label]}: {np.unique(image)}"
            seen += 1
    assert seen == 10


def test_resize_digits(digits_raw: Path, tmp_path: Path) -> None:
    card = prepare.run(PrepareConfig(image_size=12), digits_raw, tmp_path / "prepared")
    for split in SPLITS:
        images, _ = read_split(tmp_path / "prepared", split)
        assert images.shape == (card["totals"][split], 12, 12, 1)
        assert images.dtype == np.uint8
    assert images.max() > 200  # pixel scale survives resizing (digits are 0..255 after fetch)


def test_corrupt_image_keeps_previous_output(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    make_folder(raw, {"a": 10, "b": 10})
    write_source(raw, ["a", "b"], 20, [])
    out = tmp_path / "out" / "prepared"
    cfg = PrepareConfig(image_size=8, val_fraction=0.2, test_fraction=0.2)
    prepare.run(cfg, raw, out)
    before = snapshot(out)

    bad = raw / "b" / "x.png"
    bad.write_bytes(np.random.default_rng(0).bytes(300))
    with pytest.raises(DataError, match="x.png"):
        prepare.run(cfg, raw, out)
    assert snapshot(out) == before
    assert [p.name for p in out.parent.iterdir()] == ["prepared"]  # no temp dirs left


def test_decompression_bomb_is_refused_naming_the_file(tmp_path: Path, monkeypatch) -> None:
    """PIL refuses images over twice MAX_IMAGE_PIXELS; prepare says so in one line (a
    small limit here stands in for a real 200-megapixel bomb)."""
    raw = tmp_path / "raw"
    make_folder(raw, {"a": 10, "b": 10})
    write_source(raw, ["a", "b"], 20, [])
    Image.new("L", (200, 200)).save(raw / "b" / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    with pytest.raises(DataError, match=r"refusing image .*bomb.png: .*decompression bomb"):
        prepare.run(PrepareConfig(image_size=8), raw, tmp_path / "prepared")
    assert not (tmp_path / "prepared").exists()


def test_missing_source_json_says_run_fetch(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    make_folder(raw, {"a": 5, "b": 5})
    with pytest.raises(DataError, match="source.json.*pipeline fetch"):
        prepare.run(PrepareConfig(image_size=8), raw, tmp_path / "prepared")
    assert not (tmp_path / "prepared").exists()


# --------------------------------------------------------------------------- class folders


@pytest.mark.parametrize("layout", ["classes", "splits"])
def test_empty_class_folder_is_refused_naming_it(tmp_path: Path, layout: str) -> None:
    """A class folder without images stops prepare: dropped silently, it would shift the
    label of every class after it. A folder with only non-image files is empty too."""
    raw = tmp_path / "raw"
    root = raw if layout == "classes" else raw / "test"
    make_folder(raw if layout == "classes" else raw / "train", {"a": 10, "c": 10})
    if layout == "splits":
        make_folder(root, {"a": 2, "c": 2}, start=100)
    write_source(raw, ["a", "b", "c"], 20, [] if layout == "classes" else ["test", "train"])
    cfg = PrepareConfig(image_size=8, val_fraction=0.2, test_fraction=0.2)
    out = tmp_path / "prepared"
    prepare.run(cfg, raw, out)
    before = snapshot(out)

    (root / "b").mkdir()
    (root / "b" / "notes.txt").write_text("images to come")
    with pytest.raises(DataError) as err:
        prepare.run(cfg, raw, out)
    assert str(err.value) == (
        f"prepare: class folder {root / 'b'} has no images "
        "(.bmp, .gif, .jpeg, .jpg, .png, .webp); add some or remove the folder"
    )
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared", "raw"]


def test_single_class_is_refused(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    make_folder(raw, {"cat": 10})
    write_source(raw, ["cat"], 10, [])
    with pytest.raises(DataError) as err:
        prepare.run(PrepareConfig(image_size=8), raw, tmp_path / "prepared")
    assert str(err.value) == (
        f"prepare: {raw} has one class folder (cat); a classifier needs at least 2"
    )
    assert not (tmp_path / "prepared").exists()


def test_split_folder_missing_says_rerun_fetch(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    make_folder(raw / "train", {"a": 10, "b": 10})
    write_source(raw, ["a", "b"], 24, ["test", "train"])  # test/ deleted since fetch
    with pytest.raises(DataError) as err:
        prepare.run(PrepareConfig(image_size=8), raw, tmp_path / "prepared")
    assert str(err.value) == (
        f"prepare: split folder {raw / 'test'} is missing ({raw / 'source.json'} lists it); "
        "rerun `python -m pipeline fetch`"
    )


def test_hidden_folders_and_files_are_not_data(tmp_path: Path) -> None:
    """As in fetch: `.ipynb_checkpoints/` is no class, `._0.png` (macOS litter) no image."""
    raw = tmp_path / "raw"
    make_folder(raw, {"a": 10, "b": 10})
    make_folder(raw / ".ipynb_checkpoints", {"x": 3}, start=100)
    (raw / "__MACOSX").mkdir()
    (raw / "a" / "._000.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    write_source(raw, ["a", "b"], 20, [])
    card = prepare.run(PrepareConfig(image_size=8), raw, tmp_path / "prepared")
    assert card["classes"] == ["a", "b"]
    assert sum(card["totals"].values()) == 20


# --------------------------------------------------------------------------- corrupt images


@pytest.mark.parametrize("kind", CORRUPT_JPEGS)
def test_corrupt_jpeg_fails_naming_the_file_and_keeps_previous_output(
    tmp_path: Path, kind: str
) -> None:
    raw = tmp_path / "raw"
    make_jpeg_folder(raw, {"a": 10, "b": 10})
    write_source(raw, ["a", "b"], 20, [])
    out = tmp_path / "prepared"
    cfg = PrepareConfig(image_size=8, channels=3)
    prepare.run(cfg, raw, out)
    before = snapshot(out)

    bad = raw / "b" / "005.jpg"  # replaces a good one
    bad.write_bytes(CORRUPT_JPEGS[kind]())
    with pytest.raises(DataError) as err:
        prepare.run(cfg, raw, out)
    message = str(err.value)
    assert message.startswith(f"prepare: cannot decode image {bad}: ")
    assert message.endswith("; replace or delete it, or set prepare.on_corrupt: skip")
    assert "\n" not in message
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared", "raw"]


@pytest.mark.parametrize("kind", CORRUPT_JPEGS)
@pytest.mark.parametrize("on_corrupt", ["fail", "skip"])
def test_damaged_jpeg_is_corrupt_even_when_pil_loads_truncated_images(
    tmp_path: Path, monkeypatch, kind: str, on_corrupt: str
) -> None:
    """Some library may set PIL's process-wide ImageFile.LOAD_TRUNCATED_IMAGES; PIL then
    decodes these files without an error, filling in grey. prepare still sees them."""
    raw = tmp_path / "raw"
    make_jpeg_folder(raw, {"a": 10, "b": 10})
    write_source(raw, ["a", "b"], 21, [])
    bad = raw / "a" / "bad.jpg"
    bad.write_bytes(CORRUPT_JPEGS[kind]())
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with Image.open(bad) as lenient:
        lenient.load()  # the trap: no error

    cfg = PrepareConfig(image_size=8, channels=3, on_corrupt=on_corrupt)
    if on_corrupt == "fail":
        with pytest.raises(DataError, match=f"cannot decode image {bad}"):
            prepare.run(cfg, raw, tmp_path / "prepared")
    else:
        card = prepare.run(cfg, raw, tmp_path / "prepared")
        assert card["skipped_files"] == ["a/bad.jpg"]
        assert sum(card["totals"].values()) == 20
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the process's setting is given back


def test_skip_leaves_corrupt_files_out_as_if_deleted(tmp_path: Path, capsys) -> None:
    """on_corrupt skip: the prepared data is what the folder without the corrupt files
    gives (same split, same arrays), and the card and a warning line name them."""
    raw = tmp_path / "raw"
    make_jpeg_folder(raw, {"a": 12, "b": 12})
    make_folder(raw, {"c": 12}, start=500)
    corrupt = {
        "a/cut.jpg": truncated_jpeg(1),
        "b/garbled.jpg": garbled_jpeg(2),
        "c/noise.png": np.random.default_rng(3).bytes(300),
    }
    for name, data in corrupt.items():
        (raw / name).write_bytes(data)
    write_source(raw, ["a", "b", "c"], 39, [])
    clean = tmp_path / "clean"
    shutil.copytree(raw, clean)
    for name in corrupt:
        (clean / name).unlink()

    cfg = PrepareConfig(image_size=8, channels=3, val_fraction=0.2, test_fraction=0.2, seed=5)
    card = prepare.run(dataclasses.replace(cfg, on_corrupt="skip"), raw, tmp_path / "skipped")
    expected = prepare.run(cfg, clean, tmp_path / "expected")

    assert card["skipped_corrupt"] == 3
    assert card["skipped_files"] == sorted(corrupt)
    assert json.loads(data_card_file(tmp_path / "skipped").read_text()) == card
    assert expected["skipped_corrupt"] == 0 and expected["skipped_files"] == []
    assert card["counts"] == expected["counts"]
    assert sum(card["totals"].values()) == 36
    assert card["data_hash"] == expected["data_hash"]
    for split in SPLITS:
        for read in (images_file, labels_file):
            assert np.array_equal(
                np.load(read(tmp_path / "skipped", split)),
                np.load(read(tmp_path / "expected", split)),
            ), (split, read.__name__)

    warning = capsys.readouterr().err.splitlines()
    assert warning == [
        "warning: prepare: skipped 3 corrupt file(s) (prepare.on_corrupt: skip): "
        + ", ".join(str(raw / name) for name in sorted(corrupt))
        + f"; all in {data_card_file(tmp_path / 'skipped')} (skipped_files)"
    ]


def test_skip_names_the_first_five_and_counts_the_rest(tmp_path: Path, capsys) -> None:
    raw = tmp_path / "raw"
    make_jpeg_folder(raw, {"a": 10, "b": 10})
    names = [f"a/bad{i}.jpg" for i in range(7)]
    for i, name in enumerate(names):
        (raw / name).write_bytes(truncated_jpeg(i))
    write_source(raw, ["a", "b"], 27, [])
    card = prepare.run(
        PrepareConfig(image_size=8, channels=3, on_corrupt="skip"), raw, tmp_path / "prepared"
    )
    assert card["skipped_corrupt"] == 7 and card["skipped_files"] == names
    (line,) = capsys.readouterr().err.splitlines()
    assert "skipped 7 corrupt file(s)" in line
    assert [name for name in names if str(raw / name) in line] == names[:5]
    assert " and 2 more; all in " in line


def test_skip_refuses_a_class_whose_images_are_all_corrupt(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    make_jpeg_folder(raw, {"a": 10})
    (raw / "b").mkdir()
    for i in range(3):
        (raw / "b" / f"{i}.jpg").write_bytes(garbled_jpeg(i))
    write_source(raw, ["a", "b"], 13, [])
    cfg = PrepareConfig(image_size=8, channels=3, on_corrupt="skip")
    with pytest.raises(DataError) as err:
        prepare.run(cfg, raw, tmp_path / "prepared")
    assert str(err.value) == (
        f"prepare: every image in class folder {raw / 'b'} is corrupt; "
        "replace them or remove the folder"
    )
    assert not (tmp_path / "prepared").exists()


# --------------------------------------------------------------------------- loader


def index_data(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Images whose pixels hold their row number, labels that are the row number."""
    images = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 3, 3, 1), np.uint8)
    return images, np.arange(n, dtype=np.int32)


def epoch_order(batches: ArrayBatches) -> list[int]:
    return [int(v) for i in range(len(batches)) for v in batches[i][1]]


def test_batches_cover_every_row_once() -> None:
    images, labels = index_data(103)
    batches = ArrayBatches(images, labels, 16)
    assert len(batches) == 7
    sizes = []
    for i in range(len(batches)):
        x, y = batches[i]
        assert x.dtype == np.float32
        assert x.shape[1:] == (3, 3, 1)
        assert np.array_equal(x[:, 0, 0, 0], y.astype(np.float32))  # images match labels
        sizes.append(len(y))
    assert sizes == [16] * 6 + [7]
    assert epoch_order(batches) == list(range(103))


def test_shuffle_follows_seed_and_epoch() -> None:
    images, labels = index_data(100)
    first = ArrayBatches(images, labels, 10, shuffle=True, seed=5)
    second = ArrayBatches(images, labels, 10, shuffle=True, seed=5)
    epoch0 = epoch_order(first)
    first.set_epoch(1)
    epoch1 = epoch_order(first)
    assert sorted(epoch0) == sorted(epoch1) == list(range(100))
    assert epoch0 != epoch1
    assert epoch_order(second) == epoch0
    second.set_epoch(1)
    assert epoch_order(second) == epoch1
    # a batch holds different rows from one epoch to the next, not just reordered ones
    first.set_epoch(0)
    batch0 = set(first[0][1].tolist())
    first.set_epoch(1)
    assert set(first[0][1].tolist()) != batch0
    other_seed = ArrayBatches(images, labels, 10, shuffle=True, seed=6)
    assert epoch_order(other_seed) != epoch0
