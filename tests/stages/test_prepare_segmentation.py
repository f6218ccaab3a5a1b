"""prepare on segmentation data: masks resized by nearest neighbour, void mapped, splits carved."""

from __future__ import annotations

import dataclasses
import itertools
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import cut_jpeg
from PIL import Image

from pipeline.config import FetchConfig, PrepareConfig
from pipeline.data.decode import VOID
from pipeline.errors import DataError
from pipeline.layout import images_file, labels_file
from pipeline.stages import fetch, prepare


def write_pairs(root: Path, masks: list[np.ndarray], mode: str = "L") -> None:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir(parents=True)
    for i, mask in enumerate(masks):
        image = (mask.astype(np.uint8) * 20 + 3 * i)[..., None].repeat(3, -1)  # unique per i
        Image.fromarray(image).save(root / "images" / f"{i:03d}.jpg")
        img = Image.fromarray(mask.astype(np.uint8))
        if mode == "P":
            img = img.convert("P")
            img.putpalette(list(range(256)) * 3)
        img.save(root / "masks" / f"{i:03d}.png")


def write_source(raw: Path, classes: list[str], splits: list[str], ignore_index: int) -> None:
    import json

    (raw / "source.json").write_text(
        json.dumps(
            {
                "source": "archive",
                "url": "test",
                "sha256": "",
                "task": "segmentation",
                "classes": classes,
                "splits": splits,
                "ignore_index": ignore_index,
            }
        )
    )


def stripes(n: int, size: int = 12, void: int = 11) -> list[np.ndarray]:
    """Vertical stripes of classes 0, 1, 2 and a void column, shifted per image."""
    masks = []
    for i in range(n):
        columns = (np.arange(size) // 3 + i) % 4
        mask = np.where(columns == 3, void, columns)
        masks.append(np.tile(mask, (size, 1)))
    return masks


def test_masks_resize_by_nearest_neighbour_and_void_becomes_255(tmp_path):
    raw = tmp_path / "raw"
    write_pairs(raw, stripes(10), mode="P")
    write_source(raw, ["a", "b", "c"], [], ignore_index=11)
    cfg = PrepareConfig(image_size=6, channels=3, val_fraction=0.2, test_fraction=0.2)
    card = prepare.run(cfg, raw, tmp_path / "prepared")

    assert card["task"] == "segmentation" and card["ignore_index"] == VOID
    assert card["counts"] == {"train": 6, "val": 2, "test": 2}
    masks = np.concatenate([np.load(labels_file(tmp_path / "prepared", s)) for s in card["counts"]])
    assert masks.shape == (10, 6, 6) and masks.dtype == np.uint8
    assert set(np.unique(masks)) == {0, 1, 2, VOID}  # no blend of two classes, no 11
    images = np.load(images_file(tmp_path / "prepared", "train"))
    assert images.shape == (6, 6, 6, 3)
    total = sum(sum(p.values()) for p in card["class_pixels"].values())
    assert total == 10 * 36 and card["class_pixels"]["train"]["void"] > 0


def test_height_and_width_are_kept_apart(tmp_path):
    raw = tmp_path / "raw"
    write_pairs(raw, stripes(4, void=255))  # vertical stripes, 12x12
    write_source(raw, ["a", "b", "c"], [], ignore_index=255)
    cfg = PrepareConfig(image_size=(6, 24), channels=3, test_fraction=0.25)
    card = prepare.run(cfg, raw, tmp_path / "prepared")
    assert card["image_shape"] == [6, 24, 3]
    images = np.load(images_file(tmp_path / "prepared", "train"))
    masks = np.load(labels_file(tmp_path / "prepared", "train"))
    assert images.shape[1:] == (6, 24, 3) and masks.shape[1:] == (6, 24)
    # stretched along the width only: every row is the same, each stripe now 6 pixels wide
    assert (masks == masks[:, :1]).all()
    assert [len(list(run)) for _, run in itertools.groupby(masks[0, 0])] == [6, 6, 6, 6]


def test_splits_are_seeded_disjoint_and_the_sources_own_are_kept(tmp_path):
    raw = tmp_path / "raw"
    write_pairs(raw / "train", stripes(10, void=255))
    write_pairs(raw / "val", stripes(3, void=255))
    write_source(raw, ["a", "b", "c"], ["train", "val"], ignore_index=255)
    cfg = PrepareConfig(image_size=12, channels=1, test_fraction=0.3)
    first = prepare.run(cfg, raw, tmp_path / "one")
    again = prepare.run(cfg, raw, tmp_path / "two")
    assert first["counts"] == {"train": 7, "val": 3, "test": 3}
    assert first["data_hash"] == again["data_hash"]
    other = prepare.run(
        PrepareConfig(image_size=12, channels=1, test_fraction=0.3, seed=1), raw, tmp_path / "three"
    )
    assert other["sha256"]["test"] != first["sha256"]["test"]
    train = np.load(images_file(tmp_path / "one", "train"))
    test = np.load(images_file(tmp_path / "one", "test"))
    assert not {t.tobytes() for t in train} & {t.tobytes() for t in test}


def test_mask_value_beyond_the_classes_is_refused_by_file(tmp_path):
    raw = tmp_path / "raw"
    masks = stripes(4, void=255)
    masks[2][0, 0] = 7
    write_pairs(raw, masks)
    write_source(raw, ["a", "b", "c"], [], ignore_index=255)
    with pytest.raises(DataError, match=r"002.png has value 7, but there are 3 classes"):
        prepare.run(PrepareConfig(image_size=12, test_fraction=0.25), raw, tmp_path / "prepared")
    assert not (tmp_path / "prepared").exists()


def test_mask_of_another_size_than_its_image_is_refused_by_file(tmp_path):
    raw = tmp_path / "raw"
    write_pairs(raw, stripes(4, void=255))
    Image.fromarray(stripes(1, size=10, void=255)[0].astype(np.uint8)).save(
        raw / "masks" / "001.png"
    )
    write_source(raw, ["a", "b", "c"], [], ignore_index=255)
    with pytest.raises(DataError, match=r"mask .*001.png is 10x10 but its image 001.jpg is 12x12"):
        prepare.run(PrepareConfig(image_size=12, test_fraction=0.25), raw, tmp_path / "prepared")
    assert not (tmp_path / "prepared").exists()


def test_image_without_a_mask_is_refused_naming_it(tmp_path):
    raw = tmp_path / "raw"
    write_pairs(raw, stripes(4, void=255))
    (raw / "masks" / "002.png").unlink()
    write_source(raw, ["a", "b", "c"], [], ignore_index=255)
    with pytest.raises(DataError, match=r"^prepare: image '002' in .*raw has no match in masks/$"):
        prepare.run(PrepareConfig(image_size=12, test_fraction=0.25), raw, tmp_path / "prepared")
    assert not (tmp_path / "prepared").exists()


def test_rgb_masks_are_refused(tmp_path):
    raw = tmp_path / "raw"
    write_pairs(raw, stripes(4, void=255))
    Image.new("RGB", (12, 12)).save(raw / "masks" / "001.png")
    write_source(raw, ["a", "b", "c"], [], ignore_index=255)
    with pytest.raises(DataError, match="001.png is RGB"):
        prepare.run(PrepareConfig(image_size=12, test_fraction=0.25), raw, tmp_path / "prepared")


def test_digit_scenes_prepare_end_to_end(tmp_path):
    fetch.run(FetchConfig(source="digit_scenes"), tmp_path / "raw")
    card = prepare.run(PrepareConfig(image_size=64, channels=1), tmp_path / "raw", tmp_path / "p")
    assert card["counts"] == {"train": 1000, "val": 200, "test": 200}
    assert card["num_classes"] == 11 and card["classes"][0] == "background"
    assert all(card["class_pixels"]["test"][str(d)] > 0 for d in range(10))


def test_corrupt_mask_fails_naming_it(tmp_path):
    raw = tmp_path / "raw"
    write_pairs(raw, stripes(6, void=255))
    png = (raw / "masks" / "004.png").read_bytes()
    (raw / "masks" / "004.png").write_bytes(png[: len(png) // 2])
    write_source(raw, ["a", "b", "c"], [], ignore_index=255)
    with pytest.raises(DataError) as err:
        prepare.run(PrepareConfig(image_size=12, test_fraction=0.25), raw, tmp_path / "prepared")
    message = str(err.value)
    assert message.startswith(f"prepare: cannot decode mask {raw / 'masks' / '004.png'}: ")
    assert message.endswith("; replace or delete it, or set prepare.on_corrupt: skip")
    assert not (tmp_path / "prepared").exists()


def test_skip_leaves_out_pairs_with_a_corrupt_image_or_mask(tmp_path, capsys):
    """on_corrupt skip: a pair whose image or mask does not decode goes, and the rest is
    carved as if the pair had never been there."""
    raw = tmp_path / "raw"
    write_pairs(raw, stripes(10, void=255))
    write_source(raw, ["a", "b", "c"], [], ignore_index=255)
    clean = tmp_path / "clean"
    shutil.copytree(raw, clean)
    (raw / "images" / "003.jpg").write_bytes(cut_jpeg((raw / "images" / "003.jpg").read_bytes()))
    png = (raw / "masks" / "006.png").read_bytes()
    (raw / "masks" / "006.png").write_bytes(png[: len(png) // 2])
    for name in ("003", "006"):
        (clean / "images" / f"{name}.jpg").unlink()
        (clean / "masks" / f"{name}.png").unlink()

    cfg = PrepareConfig(image_size=12, channels=3, val_fraction=0.2, test_fraction=0.2)
    card = prepare.run(dataclasses.replace(cfg, on_corrupt="skip"), raw, tmp_path / "skipped")
    expected = prepare.run(cfg, clean, tmp_path / "expected")
    assert card["skipped_corrupt"] == 2
    assert card["skipped_files"] == ["images/003.jpg", "masks/006.png"]
    assert card["counts"] == expected["counts"] and sum(card["counts"].values()) == 8
    assert card["data_hash"] == expected["data_hash"]
    assert card["class_pixels"] == expected["class_pixels"]
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("warning: prepare: skipped 2 corrupt file(s) (prepare.on_corrupt: skip)")
    assert str(raw / "images" / "003.jpg") in line and str(raw / "masks" / "006.png") in line


def test_skip_refuses_a_split_whose_pairs_are_all_corrupt(tmp_path):
    raw = tmp_path / "raw"
    write_pairs(raw / "train", stripes(6, void=255))
    write_pairs(raw / "val", stripes(2, void=255))
    for mask in (raw / "val" / "masks").iterdir():
        mask.write_bytes(mask.read_bytes()[:40])
    write_source(raw, ["a", "b", "c"], ["train", "val"], ignore_index=255)
    cfg = PrepareConfig(image_size=12, test_fraction=0.25, on_corrupt="skip")
    with pytest.raises(DataError) as err:
        prepare.run(cfg, raw, tmp_path / "prepared")
    assert str(err.value) == (
        f"prepare: every image or mask under {raw / 'val'} is corrupt; replace them"
    )
    assert not (tmp_path / "prepared").exists()
