"""The fetch stage and its archive helpers, against real files, archives and a real HTTP server."""

from __future__ import annotations

import hashlib
import json
import stat
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import class_files, jpeg_bytes, make_tar, make_zip, mask_files, png_bytes, symlink
from PIL import Image

from pipeline.config import FetchConfig
from pipeline.data.archive import download, safe_extract
from pipeline.errors import DataError
from pipeline.stages import fetch

SHARED = Path(__file__).resolve().parents[3] / "shared/datasets"
CIFAR = SHARED / "cifar10-train.tar.gz"


# --------------------------------------------------------------------------- helpers


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def archive_cfg(url: str, sha256: str = "", timeout_s: float = 10) -> FetchConfig:
    return FetchConfig(source="archive", url=url, sha256=sha256, timeout_s=timeout_s)


def leftovers(parent: Path) -> list[str]:
    """Hidden temp/old siblings the fetch stage may have left behind."""
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def pngs(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.png"))


# --------------------------------------------------------------------------- digits


def test_digits_writes_1797_pngs_in_10_class_folders(tmp_path):
    out = tmp_path / "data" / "raw"
    info = fetch.run(FetchConfig(source="digits"), out)

    classes = [str(d) for d in range(10)]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == classes
    files = pngs(out)
    assert len(files) == 1797
    assert json.loads((out / "source.json").read_text()) == info
    assert info["source"] == "digits"
    assert info["url"] == "sklearn.datasets.load_digits"
    assert info["num_images"] == 1797
    assert info["classes"] == classes
    assert info["splits"] == []
    assert len(info["sha256"]) == 64

    from sklearn.datasets import load_digits

    digits = load_digits()
    first = np.asarray(Image.open(out / str(digits.target[0]) / "0000.png"))
    assert first.dtype == np.uint8 and first.shape == (8, 8)
    expected = np.array([[round(v * 255 / 16) for v in row] for row in digits.images[0]])
    np.testing.assert_array_equal(first, expected)
    assert leftovers(out.parent) == []


def test_digits_rerun_replaces_old_output_with_same_checksum(tmp_path):
    out = tmp_path / "raw"
    first = fetch.run(FetchConfig(), out)
    (out / "stale.txt").write_text("from an older run")
    second = fetch.run(FetchConfig(), out)
    assert second == first
    assert not (out / "stale.txt").exists()
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------- archive sources


def test_archive_over_http_with_checksum(tmp_path, server):
    archive = make_tar(server.root / "pets.tar.gz", class_files())
    out = tmp_path / "raw"
    info = fetch.run(archive_cfg(f"{server.url}/pets.tar.gz", sha256_of(archive).upper()), out)

    assert info == {
        "source": "archive",
        "url": f"{server.url}/pets.tar.gz",
        "sha256": sha256_of(archive),
        "task": "classification",
        "num_images": 6,
        "classes": ["cat", "dog"],
        "splits": [],
    }
    assert json.loads((out / "source.json").read_text()) == info
    assert sorted(p.name for p in out.iterdir()) == ["cat", "dog", "source.json"]
    assert len(pngs(out / "cat")) == 3 and len(pngs(out / "dog")) == 3


def test_checksum_mismatch_leaves_existing_output_untouched(tmp_path, server):
    make_tar(server.root / "pets.tar.gz", class_files())
    out = tmp_path / "raw"
    out.mkdir()
    (out / "keep.txt").write_text("previous data")

    with pytest.raises(DataError, match="checksum mismatch") as err:
        fetch.run(archive_cfg(f"{server.url}/pets.tar.gz", "0" * 64), out)

    assert "\n" not in str(err.value)
    assert f"{server.url}/pets.tar.gz" in str(err.value)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "previous data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw", "www"]


def test_http_404_is_a_data_error(tmp_path, server):
    out = tmp_path / "raw"
    with pytest.raises(DataError, match="HTTP 404"):
        fetch.run(archive_cfg(f"{server.url}/missing.tar.gz"), out)
    assert not out.exists()
    assert leftovers(tmp_path) == []


def test_server_that_never_answers_times_out(tmp_path, server):
    out = tmp_path / "raw"
    with pytest.raises(DataError, match=r"did not answer within 1s \(fetch.timeout_s\)"):
        fetch.run(archive_cfg(f"{server.url}/slow/pets.tar.gz", timeout_s=1), out)
    assert not out.exists()
    assert leftovers(tmp_path) == []


def test_unreachable_server_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="cannot reach"):
        download("http://127.0.0.1:9/x.tar.gz", tmp_path / "x.tar.gz", timeout_s=2)
    assert list(tmp_path.iterdir()) == []


def test_absolute_and_relative_paths_both_work(tmp_path, monkeypatch):
    archive = make_zip(tmp_path / "pets.zip", class_files())
    by_url = fetch.run(archive_cfg(str(archive)), tmp_path / "a")
    monkeypatch.chdir(tmp_path)
    by_path = fetch.run(archive_cfg("pets.zip"), Path("b"))
    assert by_url["num_images"] == by_path["num_images"] == 6
    assert by_url["sha256"] == by_path["sha256"] == sha256_of(archive)
    assert by_path["url"] == "pets.zip"
    assert len(pngs(tmp_path / "a")) == len(pngs(tmp_path / "b")) == 6


def test_missing_local_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no such file: .*nowhere.tar.gz"):
        fetch.run(archive_cfg(str(tmp_path / "nowhere.tar.gz")), tmp_path / "raw")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_unsupported_extension_lists_supported_ones(tmp_path):
    (tmp_path / "pets.rar").write_bytes(b"whatever")
    with pytest.raises(DataError, match=r"unsupported archive type; supported: .*\.tar\.gz.*\.zip"):
        fetch.run(archive_cfg(str(tmp_path / "pets.rar")), tmp_path / "raw")


def test_download_failure_leaves_no_partial_file(tmp_path, server):
    dest = tmp_path / "dl" / "x.bin"
    dest.parent.mkdir()
    (server.root / "x.bin").write_bytes(b"abc" * 1000)
    digest = download(f"{server.url}/x.bin", dest)
    assert digest == hashlib.sha256(b"abc" * 1000).hexdigest()
    assert dest.read_bytes() == b"abc" * 1000

    dest.unlink()
    with pytest.raises(DataError, match="checksum mismatch"):
        download(f"{server.url}/x.bin", dest, sha256="f" * 64)
    assert list(dest.parent.iterdir()) == []


# --------------------------------------------------------------------------- layouts


def test_split_layout_detected_and_validation_renamed(tmp_path):
    files = class_files("pets/train/") | class_files("pets/validation/", per_class=1)
    files["pets/classes.txt"] = b"cat\ndog\n"
    files["pets/README"] = b"hello"
    archive = make_tar(tmp_path / "pets.tgz", files)
    out = tmp_path / "raw"
    info = fetch.run(archive_cfg(str(archive)), out)

    assert info["splits"] == ["train", "val"]
    assert info["classes"] == ["cat", "dog"]
    assert info["num_images"] == 8
    assert sorted(p.name for p in out.iterdir()) == ["classes.txt", "source.json", "train", "val"]
    assert len(pngs(out / "val" / "dog")) == 1
    assert (out / "classes.txt").read_text() == "cat\ndog\n"


def test_single_top_folder_is_descended(tmp_path):
    files = class_files("outer/inner/", classes=("a", "b", "c"))
    files["outer/inner/.hidden/x.png"] = png_bytes()
    files["__MACOSX/outer/._junk"] = b""
    archive = make_zip(tmp_path / "nested.zip", files)
    out = tmp_path / "raw"
    info = fetch.run(archive_cfg(str(archive)), out)
    assert info["classes"] == ["a", "b", "c"]
    assert info["splits"] == []
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["a", "b", "c"]


def test_empty_class_folder_is_refused(tmp_path):
    files = class_files()
    files["bird/notes.txt"] = b"no images here"
    archive = make_tar(tmp_path / "pets.tar", files)
    out = tmp_path / "raw"
    with pytest.raises(DataError, match=r"class folder bird/ .* has no images"):
        fetch.run(archive_cfg(str(archive)), out)
    assert not out.exists()
    assert leftovers(tmp_path) == []


def test_single_class_is_refused(tmp_path):
    archive = make_tar(tmp_path / "one.tar", class_files("top/train/", classes=("cat",)))
    with pytest.raises(DataError, match="only one class folder"):
        fetch.run(archive_cfg(str(archive)), tmp_path / "raw")


def test_archive_without_class_folders_is_refused(tmp_path):
    archive = make_tar(tmp_path / "flat.tar", {"a.png": png_bytes(), "b.png": png_bytes()})
    with pytest.raises(DataError, match="no class folders found"):
        fetch.run(archive_cfg(str(archive)), tmp_path / "raw")


def test_splits_with_different_classes_are_refused(tmp_path):
    files = class_files("train/") | class_files("test/", classes=("cat", "cow"))
    archive = make_tar(tmp_path / "pets.tar", files)
    with pytest.raises(DataError, match="different classes: .*lacks"):
        fetch.run(archive_cfg(str(archive)), tmp_path / "raw")


# --------------------------------------------------------------------------- unsafe archives


def test_tar_with_dotdot_member_is_refused(tmp_path):
    dest = tmp_path / "a" / "b" / "dest"
    archive = make_tar(tmp_path / "bad.tar.gz", {"ok/1.png": png_bytes(), "../evil.txt": b"x"})
    with pytest.raises(DataError, match=r"refusing archive member '\.\./evil\.txt' in .*bad"):
        safe_extract(archive, dest)
    assert not (dest.parent / "evil.txt").exists()
    assert list(dest.rglob("*")) == []


def test_tar_with_absolute_member_is_refused(tmp_path):
    target = tmp_path / "abs-evil.txt"
    archive = make_tar(tmp_path / "bad.tar", {str(target): b"x"})
    with pytest.raises(DataError, match="absolute path"):
        safe_extract(archive, tmp_path / "dest")
    assert not target.exists()
    assert list((tmp_path / "dest").rglob("*")) == []


@pytest.mark.parametrize("link", ["/etc/passwd", "../../x"])
def test_tar_with_symlink_outside_is_refused(tmp_path, link):
    archive = make_tar(
        tmp_path / "bad.tar", {"a/1.png": png_bytes()}, extra=[symlink("a/link", link)]
    )
    with pytest.raises(DataError, match=r"refusing archive member 'a/link' .*link"):
        safe_extract(archive, tmp_path / "dest")
    assert list((tmp_path / "dest").rglob("*")) == []


@pytest.mark.parametrize("target", ["/etc/passwd", "../../x"])
def test_tar_with_hard_link_outside_is_refused(tmp_path, target):
    """A hard link to a file outside the destination would let a later member (or the user)
    overwrite that file through it."""
    link = tarfile.TarInfo("a/link")
    link.type = tarfile.LNKTYPE
    link.linkname = target
    archive = make_tar(tmp_path / "bad.tar", {"a/1.png": png_bytes()}, extra=[link])
    with pytest.raises(DataError, match=r"refusing archive member 'a/link'"):
        safe_extract(archive, tmp_path / "dest")
    assert list((tmp_path / "dest").rglob("*")) == []


def test_tar_with_device_file_is_refused(tmp_path):
    dev = tarfile.TarInfo("null")
    dev.type = tarfile.CHRTYPE
    archive = make_tar(tmp_path / "bad.tar", {}, extra=[dev])
    with pytest.raises(DataError, match="special file"):
        safe_extract(archive, tmp_path / "dest")


def test_zip_with_dotdot_member_is_refused(tmp_path):
    dest = tmp_path / "dest"
    archive = make_zip(tmp_path / "bad.zip", {"ok.png": png_bytes(), "../evil.txt": b"x"})
    with pytest.raises(DataError, match=r"'\.\./evil\.txt' in .*bad\.zip \(path outside"):
        safe_extract(archive, dest)
    assert not (tmp_path / "evil.txt").exists()
    assert list(dest.rglob("*")) == []


def test_zip_with_absolute_or_drive_member_is_refused(tmp_path):
    for name in ("/tmp/evil.txt", "C:/evil.txt", "a\\..\\..\\evil.txt"):
        archive = make_zip(tmp_path / "bad.zip", {name: b"x"})
        with pytest.raises(DataError, match="refusing archive member"):
            safe_extract(archive, tmp_path / "dest")


def test_zip_with_symlink_entry_is_refused(tmp_path):
    info = zipfile.ZipInfo("link")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(tmp_path / "bad.zip", "w") as zf:
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(DataError, match="symbolic link"):
        safe_extract(tmp_path / "bad.zip", tmp_path / "dest")
    assert not (tmp_path / "dest" / "link").exists()


def test_declared_size_over_limit_is_refused(tmp_path):
    tar = make_tar(tmp_path / "big.tar", {"a/1.bin": b"x" * 1000})
    zipped = make_zip(tmp_path / "big.zip", {"a/1.bin": b"x" * 1000})
    for archive in (tar, zipped):
        with pytest.raises(DataError, match="over the limit of 999 bytes"):
            safe_extract(archive, tmp_path / "dest", max_bytes=999)
    safe_extract(tar, tmp_path / "ok", max_bytes=1000)
    assert (tmp_path / "ok" / "a" / "1.bin").stat().st_size == 1000


def test_corrupt_archives_are_data_errors(tmp_path):
    good = make_tar(tmp_path / "good.tar.gz", class_files(per_class=50)).read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(good[: len(good) // 2])
    (tmp_path / "junk.zip").write_bytes(b"not a zip at all")
    (tmp_path / "junk.tar").write_bytes(b"\x01" * 2000)
    for name in ("cut.tar.gz", "junk.zip", "junk.tar"):
        with pytest.raises(DataError, match=name):
            safe_extract(tmp_path / name, tmp_path / "dest")


def test_refusal_inside_fetch_names_the_url_not_the_temp_file(tmp_path):
    archive = make_tar(tmp_path / "bad.tar.gz", class_files() | {"../evil.png": png_bytes()})
    out = tmp_path / "work" / "raw"
    with pytest.raises(DataError) as err:
        fetch.run(archive_cfg(str(archive)), out)
    assert str(err.value) == (
        f"fetch: refusing archive member '../evil.png' in {archive} (path outside the destination)"
    )
    assert list((tmp_path / "work").iterdir()) == []
    assert not (tmp_path / "work" / "evil.png").exists()


# --------------------------------------------------------------------------- segmentation


def test_images_and_masks_archive_is_a_segmentation_layout(tmp_path):
    archive = make_tar(tmp_path / "seg.tar.gz", mask_files("scenes/"))
    cfg = FetchConfig(source="archive", url=str(archive), ignore_index=11)
    info = fetch.run(cfg, tmp_path / "raw")
    assert info["task"] == "segmentation" and info["ignore_index"] == 11
    assert info["classes"] == ["sky", "road", "car"]  # file order = mask values, not sorted
    assert info["splits"] == ["train", "val"] and info["num_images"] == 4
    raw = tmp_path / "raw"
    assert sorted(p.name for p in raw.iterdir()) == ["classes.txt", "source.json", "train", "val"]
    assert len(pngs(raw / "val" / "masks")) == 2


def test_unsplit_images_and_masks_are_kept_as_one_pool(tmp_path):
    archive = make_tar(tmp_path / "seg.tar", mask_files(splits=("",), per_split=3))
    info = fetch.run(FetchConfig(source="archive", url=str(archive)), tmp_path / "raw")
    assert info["splits"] == [] and info["num_images"] == 3 and info["ignore_index"] == 255
    assert len(pngs(tmp_path / "raw" / "images")) == 3


def test_image_without_mask_is_refused_by_name(tmp_path):
    files = mask_files()
    del files["val/masks/001.png"]
    archive = make_tar(tmp_path / "seg.tar", files)
    with pytest.raises(DataError, match="image '001' in val/ .*no match in masks/"):
        fetch.run(FetchConfig(source="archive", url=str(archive)), tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def test_masks_without_classes_file_are_refused(tmp_path):
    files = mask_files()
    del files["classes.txt"]
    archive = make_tar(tmp_path / "seg.tar", files)
    with pytest.raises(DataError, match="no classes.txt"):
        fetch.run(FetchConfig(source="archive", url=str(archive)), tmp_path / "raw")


# --------------------------------------------------------------------------- real data


@pytest.mark.slow
def test_real_cifar10_archive(tmp_path):
    if not CIFAR.is_file():
        pytest.skip(f"{CIFAR} not present")
    sums = dict(
        reversed(line.split())
        for line in (SHARED / "SHA256SUMS").read_text().splitlines()
        if line.strip()
    )
    out = tmp_path / "raw"
    info = fetch.run(archive_cfg(str(CIFAR), sums[CIFAR.name]), out)

    assert info["splits"] == ["train"]
    assert len(info["classes"]) == 10
    assert info["num_images"] == 50_000
    assert info["sha256"] == sums[CIFAR.name]
    assert (out / "classes.txt").is_file()
    for name in info["classes"]:
        assert len(list((out / "train" / name).glob("*.jpg"))) == 5000
    assert sorted(p.name for p in out.iterdir()) == ["classes.txt", "source.json", "train"]


@pytest.mark.slow
def test_real_camvid_archive(tmp_path):
    camvid = SHARED / "camvid-trainval.tar.gz"
    if not camvid.is_file():
        pytest.skip(f"{camvid} not present")
    info = fetch.run(FetchConfig(source="archive", url=str(camvid), ignore_index=11), tmp_path)
    assert info["task"] == "segmentation" and info["ignore_index"] == 11
    assert info["splits"] == ["train", "val"] and info["num_images"] == 367 + 101
    assert info["classes"][0] == "sky" and len(info["classes"]) == 11


def test_password_in_the_url_is_sent_as_basic_auth_and_stored_nowhere(
    tmp_path, server, monkeypatch, capsys
):
    """`https://user:password@host/...` fetches from a server that wants Basic auth; the
    password is in no file of data/raw (a DVC output, shared by `dvc push`) and not in the
    one-line error of a wrong one."""
    from pipeline.__main__ import main

    (server.root / "private").mkdir()
    make_tar(server.root / "private" / "pets.tar.gz", class_files())
    url = f"{server.url.replace('//', '//bob:s3cret@')}/private/pets.tar.gz?token=t0ken"
    out = tmp_path / "raw"

    info = fetch.run(archive_cfg(url), out)

    assert info["num_images"] == 6
    assert json.loads((out / "source.json").read_text())["url"] == (
        f"{server.url.replace('//', '//bob:***@')}/private/pets.tar.gz?token=***"
    )
    for path in out.rglob("*"):
        assert not path.is_file() or b"s3cret" not in path.read_bytes()
        assert not path.is_file() or b"t0ken" not in path.read_bytes()

    with pytest.raises(DataError, match="answered HTTP 401"):
        fetch.run(archive_cfg(url.replace("s3cret", "wrong")), tmp_path / "other")
    params = tmp_path / "params.yaml"
    params.write_text(
        f"fetch:\n  source: archive\n  url: {url.replace('s3cret', 'wr0ng')}\n  timeout_s: 5\n"
    )
    monkeypatch.chdir(tmp_path)  # the CLI fetches into ./data/raw
    assert main(["--params", str(params), "fetch"]) == 2
    (error,) = capsys.readouterr().err.splitlines()
    assert error == (
        f"error: fetch: {server.url.replace('//', '//bob:***@')}/private/pets.tar.gz?token=*** "
        "answered HTTP 401 (Unauthorized)"
    )


# ------------------------------------------------------------------ fetch counts, prepare reads


def folder_member(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


DISAGREEING_LAYOUTS = {
    # images in a subfolder of a class folder belong to the class (Keras, torchvision)
    "subfolder": ({"cat/indoor/8.png": png_bytes(1), "dog/a/b/8.png": png_bytes(2)}, [], 18),
    # suffixes in any case
    "upper-case-suffix": ({"cat/8.PNG": png_bytes(3), "dog/8.JPG": jpeg_bytes(1)}, [], 18),
    # a folder named like an image is a subfolder
    "folder-named-like-an-image": ({"cat/album.png/8.png": png_bytes(4)}, [], 17),
    # a link to an image that stays behind when the class folders move into data/raw
    "link-to-a-hidden-file": (
        {".cache/8.png": png_bytes(5)},
        [symlink("cat/8.png", "../.cache/8.png")],
        17,
    ),
    # hidden files and macOS litter are not data, for fetch and prepare alike
    "hidden": ({"cat/._0.png": b"\x00\x05\x16\x07", "dog/.thumbs/8.png": png_bytes(6)}, [], 16),
}


@pytest.mark.parametrize("layout", DISAGREEING_LAYOUTS)
def test_every_image_fetch_counts_is_an_image_prepare_reads(tmp_path, layout):
    """source.json's num_images is what the data card's splits hold, image for image: a
    class folder's images are all the image files under it, in subfolders too."""
    from pipeline.config import PrepareConfig
    from pipeline.stages import prepare

    files, extra, expected = DISAGREEING_LAYOUTS[layout]
    archive = make_tar(tmp_path / "pets.tar", class_files(per_class=8) | files, extra)
    info = fetch.run(archive_cfg(str(archive)), tmp_path / "raw")
    card = prepare.run(PrepareConfig(image_size=8), tmp_path / "raw", tmp_path / "prepared")
    assert info["num_images"] == expected
    assert sum(card["totals"].values()) == expected
    assert not [p for p in (tmp_path / "raw").rglob("*") if p.is_symlink()]


def test_segmentation_images_in_subfolders_pair_with_masks_at_the_same_path(tmp_path):
    """`images/a/1.jpg` pairs with `masks/a/1.png`; hidden files are no image for either
    stage; every pair fetch counts is one prepare reads."""
    from pipeline.config import PrepareConfig
    from pipeline.stages import prepare

    files = mask_files(per_split=4)
    for split in ("train/", "val/"):
        for i in range(2):
            files[f"{split}images/seq{i}/{i:03d}.png"] = png_bytes(i)
            files[f"{split}masks/seq{i}/{i:03d}.png"] = png_bytes(i % 3)
        files[f"{split}images/._000.png"] = b"\x00\x05\x16\x07 AppleDouble"
    archive = make_tar(tmp_path / "seg.tar", files)
    info = fetch.run(FetchConfig(source="archive", url=str(archive)), tmp_path / "raw")
    card = prepare.run(PrepareConfig(image_size=8), tmp_path / "raw", tmp_path / "prepared")
    assert info["num_images"] == 12
    assert card["totals"] == {"train": 5, "val": 6, "test": 1}  # test carved from train


@pytest.mark.parametrize(
    ("files", "extra", "error"),
    [
        pytest.param(
            mask_files() | {"train/images/000.jpg": jpeg_bytes(0)},
            [],
            r"fetch: train/images/000.jpg \(in .*\) and 000.png are one name twice",
            id="image-twice",
        ),
        pytest.param(
            class_files(per_class=8),
            [folder_member("cat/more"), symlink("cat/more/dogs", "../../dog")],
            r"fetch: cat/more/dogs/ \(in .*\) is a link to a folder; put the folder itself",
            id="link-to-a-folder",
        ),
        pytest.param(
            class_files("train/") | class_files("test/") | class_files("extra/"),
            [],
            r"fetch: the top level of .* has split folders \(test, train\) beside other "
            r"folders \(extra\)",
            id="splits-beside-classes",
        ),
    ],
)
def test_images_fetch_cannot_place_are_refused_by_name(tmp_path, files, extra, error):
    """What used to be counted by one stage and dropped by the other, or read as a class:
    one line naming it, and no data/raw."""
    archive = make_tar(tmp_path / "data.tar", files, extra)
    with pytest.raises(DataError, match=error):
        fetch.run(FetchConfig(source="archive", url=str(archive)), tmp_path / "raw")
    assert not (tmp_path / "raw").exists()
