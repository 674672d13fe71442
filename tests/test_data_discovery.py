"""Image/caption discovery, image sizes and integrity, metadata files."""

import json
import os

import numpy as np
import pytest

from library.data import discovery
from library.errors import UserInputError
from test_data_helpers import make_image, write


def test_scan_folder_sorted_images_case_insensitive(tmp_path):
    for name in ["b.png", "a.JPG", "c.webp", "d.bmp", "notes.txt", "e.jpeg", "f.PNG"]:
        if name.endswith(".txt"):
            write(str(tmp_path / name), "x")
        else:
            make_image(str(tmp_path / name), (8, 8))
    (tmp_path / "sub").mkdir()
    listing = discovery.scan_folder(str(tmp_path))
    assert [os.path.basename(p) for p in listing.images] == ["a.JPG", "b.png", "c.webp", "d.bmp", "e.jpeg", "f.PNG"]
    assert "notes.txt" in listing.names
    assert [os.path.basename(p) for p in listing.subfolders] == ["sub"]


def test_scan_missing_folder(tmp_path):
    with pytest.raises(UserInputError, match="image folder not found: .*missing"):
        discovery.scan_folder(str(tmp_path / "missing"))


def test_parse_repeat_folder_name():
    assert discovery.parse_repeat_folder_name("10_sks dog") == (10, "sks dog")
    assert discovery.parse_repeat_folder_name("3_a_b") == (3, "a_b")
    assert discovery.parse_repeat_folder_name("7") == (7, "")
    assert discovery.parse_repeat_folder_name("dog") is None
    assert discovery.parse_repeat_folder_name("x_1") is None


def test_caption_lookup_and_face_crop_fallback(tmp_path):
    folder = str(tmp_path)
    write(os.path.join(folder, "img.txt"), "caption")
    write(os.path.join(folder, "face.txt"), "face caption")
    listing_names = frozenset(os.listdir(folder))
    img = os.path.join(folder, "img.png")
    assert discovery.find_caption_file(img, ".txt", listing_names) == os.path.join(folder, "img.txt")
    assert discovery.find_caption_file(img, ".caption", listing_names) is None
    face = os.path.join(folder, "face_10_20_30_40.png")
    assert discovery.find_caption_file(face, ".txt", listing_names) == os.path.join(folder, "face.txt")
    # without a listing it stats the disk
    assert discovery.find_caption_file(face, ".txt") == os.path.join(folder, "face.txt")


def test_read_caption_first_line_and_wildcard_lines(tmp_path):
    p = write(str(tmp_path / "c.txt"), "\ufefffirst line  \n\n second \n")
    assert discovery.read_caption_file(p) == "first line"
    assert discovery.read_caption_file(p, enable_wildcard=True) == "first line\nsecond"


def test_read_caption_errors(tmp_path):
    empty = write(str(tmp_path / "e.txt"), "  \n")
    with pytest.raises(UserInputError, match=r"caption file .*e\.txt is empty"):
        discovery.read_caption_file(empty)
    bad = tmp_path / "b.txt"
    bad.write_bytes(b"caf\xe9\n")
    with pytest.raises(UserInputError, match=r"b\.txt is not UTF-8"):
        discovery.read_caption_file(str(bad))
    with pytest.raises(UserInputError, match="cannot read caption file"):
        discovery.read_caption_file(str(tmp_path / "none.txt"))


@pytest.mark.parametrize("ext", [".png", ".jpg", ".webp", ".bmp"])
def test_probe_image_sizes(tmp_path, ext):
    p = make_image(str(tmp_path / f"i{ext}"), (37, 21))
    assert discovery.probe_image(p) == (37, 21)


def test_probe_jpeg_with_exif_segment(tmp_path):
    from PIL import Image

    p = str(tmp_path / "exif.jpg")
    im = Image.fromarray(np.zeros((13, 29, 3), np.uint8))
    exif = Image.Exif()
    exif[0x010E] = "x" * 5000  # a large APP1 segment before the frame header
    im.save(p, exif=exif)
    assert discovery.probe_image(p) == (29, 13)


def test_truncated_and_corrupt_images_are_reported(tmp_path):
    png = make_image(str(tmp_path / "t.png"), (64, 64))
    data = open(png, "rb").read()
    open(png, "wb").write(data[: len(data) // 2])
    with pytest.raises(UserInputError, match=r"t\.png is corrupt or truncated"):
        discovery.probe_image(png)
    jpg = make_image(str(tmp_path / "t.jpg"), (64, 64))
    data = open(jpg, "rb").read()
    open(jpg, "wb").write(data[: len(data) // 2])
    with pytest.raises(UserInputError, match=r"t\.jpg is corrupt or truncated"):
        discovery.probe_image(jpg)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not an image at all")
    with pytest.raises(UserInputError, match=r"junk\.png is corrupt"):
        discovery.probe_image(str(junk))


def test_trailing_data_after_jpeg_is_accepted(tmp_path):
    jpg = make_image(str(tmp_path / "trail.jpg"), (20, 10))
    with open(jpg, "ab") as f:
        f.write(b"\x00" * 100)  # some cameras append data after the end marker
    assert discovery.probe_image(jpg) == (20, 10)


def test_sizes_from_cache_names():
    names = ["a_0512x0768_sd.npz", "b_c_1024x0064_flux.npz", "plain.npz", "x_12x34_sd.npz", "a.png"]
    assert discovery.sizes_from_cache_names(names) == {"a": (512, 768), "b_c": (1024, 64)}


def test_metadata_cache_roundtrip(tmp_path):
    folder = str(tmp_path)
    discovery.write_metadata_cache(folder, {os.path.join(folder, "a.png"): {"caption": "x", "resolution": [3, 4]}})
    got = discovery.read_metadata_cache(folder)
    assert got == {os.path.join(folder, "a.png"): {"caption": "x", "resolution": [3, 4]}}
    assert os.listdir(folder) == ["metadata_cache.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(os.path.join(folder, "metadata_cache.json")).st_mode & 0o777 == 0o666 & ~umask
    write(os.path.join(folder, "metadata_cache.json"), "{broken")
    with pytest.raises(UserInputError, match="metadata_cache.json: invalid JSON at line 1"):
        discovery.read_metadata_cache(folder)


def test_read_metadata_json_and_jsonl(tmp_path):
    p = write(str(tmp_path / "m.json"), json.dumps({"a.png": {"caption": "x"}}))
    assert discovery.read_metadata_file(p) == {"a.png": {"caption": "x"}}
    p = write(str(tmp_path / "m.jsonl"), '{"image_path": "a.png", "caption": "x"}\n\n{"image_path": "b.png"}\n')
    assert set(discovery.read_metadata_file(p)) == {"a.png", "b.png"}
    bad = write(str(tmp_path / "bad.jsonl"), '{"image_path": "a.png"}\n{"caption": 1}\n')
    with pytest.raises(UserInputError, match="line 2 needs an 'image_path'"):
        discovery.read_metadata_file(bad)
    bad = write(str(tmp_path / "bad.json"), '{\n "a": {\n}')
    with pytest.raises(UserInputError, match=r"bad\.json: invalid JSON at line 3"):
        discovery.read_metadata_file(bad)
    with pytest.raises(UserInputError, match="metadata file not found"):
        discovery.read_metadata_file(str(tmp_path / "nothing.json"))
