"""tools/cache_*.py, tools/resize_images_to_resolution.py and the finetune/ metadata scripts."""

import importlib.util
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
from PIL import Image

from library.data.latent_cache import npz_members
from library.data.text_encoder_cache import TextEncoderCacheStrategy
from library.errors import UserInputError
from test_data_helpers import make_image, make_tree, write

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(rel):
    spec = importlib.util.spec_from_file_location("script_" + rel.replace("/", "_")[:-3], os.path.join(ROOT, rel))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_script(rel, *argv):
    return subprocess.run([sys.executable, os.path.join(ROOT, rel), *argv], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


@pytest.fixture
def images(tmp_path):
    root = str(tmp_path / "imgs")
    for name, size in [("a", (64, 48)), ("b", (40, 40))]:
        make_image(f"{root}/{name}.png", size)
    write(f"{root}/a.caption", "a photo of a\nsecond line")
    write(f"{root}/a.txt", "long_hair, rating:safe, 1girl")
    write(f"{root}/b.txt", "tag_b")
    return root


def test_merge_captions_and_tags_then_train_from_metadata(images, tmp_path):
    out = str(tmp_path / "meta.json")
    load_script("finetune/merge_captions_to_metadata.py").main([images, out])
    assert json.load(open(out)) == {"a": {"caption": "a photo of a"}}
    load_script("finetune/merge_dd_tags_to_metadata.py").main([images, out])
    meta = json.load(open(out))
    assert meta == {"a": {"caption": "a photo of a", "tags": "long_hair, rating:safe, 1girl"}, "b": {"tags": "tag_b"}}
    # the stem keys these scripts write are understood by the fine-tuning dataset
    from library.data.datasets import build_from_args
    from test_data_helpers import dataset_args

    train, _ = build_from_args(dataset_args(["--in_json", out, "--train_data_dir", images, "--resolution", "32"]))
    caps = sorted(e.caption for e in train.entries())
    assert caps == ["a photo of a,long_hair, rating:safe, 1girl", "tag_b"]


def test_merge_full_path_and_recursive(images, tmp_path):
    make_image(f"{images}/sub/c.png", (16, 16))
    write(f"{images}/sub/c.caption", "in sub")
    out = str(tmp_path / "m.json")
    mod = load_script("finetune/merge_captions_to_metadata.py")
    with pytest.raises(UserInputError, match="--recursive needs --full_path"):
        mod.main([images, out, "--recursive"])
    mod.main([images, out, "--recursive", "--full_path"])
    assert set(json.load(open(out))) == {os.path.abspath(f"{images}/a.png"), os.path.abspath(f"{images}/sub/c.png")}


def test_merge_script_bad_input_is_one_line(tmp_path):
    r = run_script("finetune/merge_captions_to_metadata.py", str(tmp_path / "none"), str(tmp_path / "o.json"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: image folder not found")
    assert "Traceback" not in r.stderr


def test_clean_captions_and_tags(tmp_path):
    mod = load_script("finetune/clean_captions_and_tags.py")
    assert mod.clean_tags("long_hair, rating:safe, 1girl, ^_^, long_hair") == "long hair, 1girl, ^_^"
    assert mod.clean_tags("2girls, long_hair, blue_eyes, smile") == "2girls, smile"
    assert mod.clean_tags("multiple boys, short hair, sword") == "multiple boys, sword"
    assert mod.clean_caption("arafed  anime anime girl  with a sword") == "a anime girl with a sword"
    src = write(str(tmp_path / "in.json"), json.dumps({"k": {"tags": "a_b_c, rating_explicit", "caption": "x  y"}}))
    mod.main([src, str(tmp_path / "out.json")])
    assert json.load(open(tmp_path / "out.json")) == {"k": {"tags": "a b c", "caption": "x y"}}
    assert json.load(open(src)) == {"k": {"tags": "a_b_c, rating_explicit", "caption": "x  y"}}  # input untouched


def test_resize_images_to_resolution(images, tmp_path):
    dst = str(tmp_path / "out")
    before = {n: open(os.path.join(images, n), "rb").read() for n in os.listdir(images)}
    load_script("tools/resize_images_to_resolution.py").main(
        [images, dst, "--max_resolution", "32x32,16x16", "--divisible_by", "4", "--copy_associated_files"])
    names = sorted(os.listdir(dst))
    assert "a+32x32.png" in names and "b+16x16.png" in names
    assert "a+32x32.caption" in names and "a+16x16.txt" in names
    w, h = Image.open(os.path.join(dst, "a+32x32.png")).size
    assert w * h <= 32 * 32 and w % 4 == 0 and h % 4 == 0
    assert abs(w / h - 64 / 48) < 0.2
    assert Image.open(os.path.join(dst, "b+16x16.png")).size == (16, 16)
    assert {n: open(os.path.join(images, n), "rb").read() for n in os.listdir(images)} == before
    with pytest.raises(UserInputError, match="not WIDTHxHEIGHT"):
        load_script("tools/resize_images_to_resolution.py").main([images, dst, "--max_resolution", "512"])


def test_resize_never_enlarges(tmp_path):
    mod = load_script("tools/resize_images_to_resolution.py")
    assert mod.target_size(40, 40, 512 * 512, 1) == (40, 40)
    assert mod.target_size(1000, 500, 512 * 512, 64) == (704, 320)


def test_cache_latents_tool_with_tiny_model(tiny_sd, tmp_path):
    model = tiny_sd("sd1").path
    root = str(tmp_path)
    make_tree(root, {"t/2_x": [((64, 64), "a"), ((96, 64), "b")]})
    argv = ["--pretrained_model_name_or_path", model, "--train_data_dir", f"{root}/t", "--resolution", "64",
            "--enable_bucket", "--min_bucket_reso", "32", "--max_bucket_reso", "128", "--bucket_reso_steps", "32",
            "--caption_extension", ".txt", "--vae_batch_size", "2", "--flip_aug", "--seed", "1"]
    load_script("tools/cache_latents.py").main(argv)
    files = sorted(f for f in os.listdir(f"{root}/t/2_x") if f.endswith(".npz"))
    assert files == ["img00_0064x0064_sd.npz", "img01_0096x0064_sd.npz"]
    assert npz_members(f"{root}/t/2_x/img01_0096x0064_sd.npz") >= {"latents", "latents_flipped", "crop_ltrb"}
    # a training run with the same settings finds them valid
    from library.data.datasets import build_from_args
    from library.data.latent_cache import LATENT_FORMATS
    from test_data_helpers import dataset_args

    train, _ = build_from_args(dataset_args(argv[2:]))
    assert train.cache_latents(lambda x: 1 / 0, LATENT_FORMATS["sd"], to_disk=True, progress=False) == 0


def test_cache_latents_tool_refuses_color_aug_before_loading_models(tmp_path):
    make_tree(str(tmp_path), {"t/1_x": [((32, 32), None)]})
    with pytest.raises(UserInputError, match="color_aug"):
        load_script("tools/cache_latents.py").main(
            ["--pretrained_model_name_or_path", "does-not-exist", "--train_data_dir", f"{tmp_path}/t",
             "--resolution", "32", "--color_aug"])


class _FakeSDXLStrategy(TextEncoderCacheStrategy):
    suffix = "_te_outputs.npz"
    npz_keys = ("hidden_state1", "hidden_state2", "pool2")

    def tokenize(self, captions):
        return captions

    def encode(self, tokens, captions):
        n = len(captions)
        return {"hidden_state1": np.zeros((n, 77, 8), np.float32), "hidden_state2": np.ones((n, 77, 12), np.float32),
                "pool2": np.full((n, 12), len(captions[0]), np.float32)}


def test_cache_text_encoder_outputs_tool_with_strategy(tmp_path, monkeypatch):
    fake = types.ModuleType("library.arch.sdxl")

    class FakeSDXLArchitecture:
        @classmethod
        def from_args(cls, args):
            return cls()

        def text_encoder_cache_strategy(self, args):
            return _FakeSDXLStrategy()

    FakeSDXLArchitecture.__module__ = "library.arch.sdxl"
    fake.FakeSDXLArchitecture = FakeSDXLArchitecture
    monkeypatch.setitem(sys.modules, "library.arch.sdxl", fake)
    make_tree(str(tmp_path), {"t/1_x": [((32, 32), "hello"), ((32, 32), None)]})
    mod = load_script("tools/cache_text_encoder_outputs.py")
    mod.main(["--sdxl", "--train_data_dir", f"{tmp_path}/t", "--resolution", "32", "--caption_extension", ".txt"])
    assert npz_members(f"{tmp_path}/t/1_x/img00_te_outputs.npz") == {"hidden_state1", "hidden_state2", "pool2"}
    with np.load(f"{tmp_path}/t/1_x/img00_te_outputs.npz") as z:
        assert z["hidden_state1"].shape == (77, 8) and z["pool2"][0] == len("hello")
    with pytest.raises(UserInputError, match="exactly one of --sdxl or --flux"):
        mod.main(["--train_data_dir", f"{tmp_path}/t", "--resolution", "32"])
    with pytest.raises(UserInputError, match="shuffle_caption"):
        mod.main(["--sdxl", "--train_data_dir", f"{tmp_path}/t", "--resolution", "32", "--shuffle_caption"])


def test_prepare_buckets_latents(tiny_sd, images, tmp_path):
    meta = write(str(tmp_path / "in.json"), json.dumps({"a": {"caption": "x"}, "b": {"caption": "y"}}))
    out = str(tmp_path / "out.json")
    load_script("finetune/prepare_buckets_latents.py").main(
        [images, meta, out, tiny_sd("sd1").path, "--max_resolution", "32,32", "--min_bucket_reso", "16",
         "--max_bucket_reso", "64", "--bucket_reso_steps", "16", "--batch_size", "2"])
    result = json.load(open(out))
    assert result["a"]["image_size"] == [64, 48] and result["b"]["train_resolution"] == [32, 32]
    assert os.path.exists(f"{images}/a_0064x0048_sd.npz") and os.path.exists(f"{images}/b_0040x0040_sd.npz")
