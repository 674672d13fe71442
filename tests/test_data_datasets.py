"""Datasets built from generated folder trees: batches, repeats, reg images, determinism."""

import hashlib
import json
import os
from collections import Counter

import numpy as np
import pytest
import torch

from library.data.config_schema import SchemaSupport, blueprint_from_args
from library.data.datasets import DatasetGroup, build_dataset_groups, build_from_args
from library.errors import UserInputError
from test_data_helpers import dataset_args, make_image, make_tree, write

SIZES = [(32, 32), (48, 32), (32, 48), (40, 24), (24, 40)]


@pytest.fixture
def tree(tmp_path):
    root = str(tmp_path)
    make_tree(root, {
        "train/5_sks dog": [(SIZES[i % 5], "dog, red, ball" if i != 1 else None) for i in range(3)],
        "train/2_cat": [(SIZES[(i + 2) % 5], "cat, sofa") for i in range(2)],
        "reg/1_dog": [(SIZES[i % 5], None) for i in range(4)],
    })
    return root


def args_for(root, *extra):
    return dataset_args(["--train_data_dir", f"{root}/train", "--reg_data_dir", f"{root}/reg",
                         "--resolution", "32", "--enable_bucket", "--min_bucket_reso", "16", "--max_bucket_reso", "64",
                         "--bucket_reso_steps", "16", "--caption_extension", ".txt", "--seed", "3", *extra])


def all_batches(group, epoch=1):
    return [group[(i, epoch, 0)] for i in range(len(group))]


def snapshot(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            out[p] = (os.path.getmtime(p), hashlib.md5(open(p, "rb").read()).hexdigest())
    return out


def test_repeats_and_reg_interleaving(tree):
    train, val = build_from_args(args_for(tree, "--prior_loss_weight", "0.25"))
    assert val is None
    (ds,) = train.datasets
    assert train.num_train_images == 5 * 3 + 2 * 2
    # reg: 4 images registered once (4), then +1 round-robin until 19 -> repeats 5,5,5,4
    reg = [e for e in ds.entries if e.is_reg]
    assert sorted(e.num_repeats for e in reg) == [4, 5, 5, 5]
    assert train.num_reg_images == 19
    counts = Counter()
    n_samples = 0
    for batch in all_batches(train):
        n_samples += len(batch["captions"])
        for path, reg_flag, w in zip(batch["image_keys"], batch["is_reg"], batch["loss_weights"].tolist()):
            counts[path] += 1
            assert w == (0.25 if reg_flag else 1.0)
    assert n_samples == 38
    for e in ds.entries:
        assert counts[e.path] == e.num_repeats


def test_reg_images_beyond_training_count_are_unused(tmp_path):
    root = str(tmp_path)
    make_tree(root, {"train/1_a": [((32, 32), "x")], "reg/1_b": [((32, 32), None)] * 3})
    train, _ = build_from_args(dataset_args(["--train_data_dir", f"{root}/train", "--reg_data_dir", f"{root}/reg",
                                             "--resolution", "32", "--seed", "1"]))
    reg = [e for e in train.datasets[0].entries if e.is_reg]
    assert len(reg) == 1 and reg[0].num_repeats == 1


def test_batch_shapes_and_contents(tree):
    train, _ = build_from_args(args_for(tree, "--train_batch_size", "3", "--flip_aug"))
    batches = all_batches(train)
    assert len(batches) == len(train)
    for b in batches:
        n = len(b["captions"])
        assert 1 <= n <= 3
        imgs = b["images"]
        assert imgs.dtype == torch.float32 and imgs.shape[:2] == (n, 3)
        h, w = imgs.shape[2:]
        assert h % 16 == 0 and w % 16 == 0
        assert imgs.min() >= -1 and imgs.max() <= 1
        assert b["target_sizes_hw"].tolist() == [[h, w]] * n
        assert b["original_sizes_hw"].shape == (n, 2) and b["crop_top_lefts"].shape == (n, 2)
        assert b["latents"] is None and b["alpha_masks"] is None and b["conditioning_images"] is None
        assert b["network_multipliers"].tolist() == [1.0] * n
        assert len(b["flippeds"]) == n and b["custom_attributes"] == [{}] * n
    captions = {c for b in batches for c in b["captions"]}
    assert captions == {"dog, red, ball", "sks dog", "cat, sofa", "dog"}


def test_deterministic_order_for_a_seed(tree):
    def run(seed):
        train, _ = build_from_args(args_for(tree, "--shuffle_caption", "--flip_aug", "--seed", str(seed)))
        return [(b["image_keys"], b["captions"], b["flippeds"], b["images"].sum().item())
                for b in all_batches(train, epoch=2)]

    a, b = run(5), run(5)
    assert a == b
    assert run(6) != a


def test_epochs_reshuffle(tree):
    train, _ = build_from_args(args_for(tree, "--train_batch_size", "2"))
    e1 = [b["image_keys"] for b in all_batches(train, 1)]
    e2 = [b["image_keys"] for b in all_batches(train, 2)]
    assert e1 != e2
    assert sorted(k for b in e1 for k in b) == sorted(k for b in e2 for k in b)


def test_int_index_uses_current_epoch_and_step(tree):
    train, _ = build_from_args(args_for(tree, "--caption_dropout_every_n_epochs", "2"))
    train.set_current_epoch(2)
    assert set(train[0]["captions"]) == {""}
    train.set_current_epoch(3)
    assert "" not in train[0]["captions"]


def test_toml_and_command_line_build_the_same_dataset(tree, tmp_path):
    toml = write(str(tmp_path / "ds.toml"), f"""
[general]
caption_extension = ".txt"
enable_bucket = true
min_bucket_reso = 16
max_bucket_reso = 64
bucket_reso_steps = 16

[[datasets]]
resolution = 32
  [[datasets.subsets]]
  image_dir = "{tree}/train/2_cat"
  num_repeats = 2
  class_tokens = "cat"
  [[datasets.subsets]]
  image_dir = "{tree}/train/5_sks dog"
  num_repeats = 5
  class_tokens = "sks dog"
  [[datasets.subsets]]
  image_dir = "{tree}/reg/1_dog"
  class_tokens = "dog"
  is_reg = true
""")
    a, _ = build_from_args(args_for(tree))
    b, _ = build_from_args(dataset_args(["--dataset_config", toml, "--seed", "3"]))
    ka = [(x["image_keys"], x["captions"]) for x in all_batches(a)]
    kb = [(x["image_keys"], x["captions"]) for x in all_batches(b)]
    assert ka == kb


def test_multiple_datasets_at_different_resolutions(tree, tmp_path):
    toml = write(str(tmp_path / "ds.toml"), f"""
[general]
caption_extension = ".txt"
[[datasets]]
resolution = 32
batch_size = 2
  [[datasets.subsets]]
  image_dir = "{tree}/train/2_cat"
  custom_attributes = {{ tag = "small" }}
[[datasets]]
resolution = [48, 16]
network_multiplier = 0.5
  [[datasets.subsets]]
  image_dir = "{tree}/train/5_sks dog"
""")
    train, _ = build_from_args(dataset_args(["--dataset_config", toml, "--seed", "1"]))
    assert len(train.datasets) == 2
    shapes = set()
    for b in all_batches(train):
        shapes.add(tuple(b["images"].shape[2:]))
        if b["images"].shape[2:] == (32, 32):
            assert b["custom_attributes"] == [{"tag": "small"}] * len(b["captions"])
        else:
            assert b["network_multipliers"].tolist() == [0.5]
    assert shapes == {(32, 32), (16, 48)}
    assert len(train) == 1 + 3


def test_validation_split(tmp_path):
    root = str(tmp_path)
    make_tree(root, {"t/3_x": [((16, 16), f"c{i}") for i in range(10)], "r/1_y": [((16, 16), "r")] * 2})
    toml = write(str(tmp_path / "ds.toml"), f"""
[[datasets]]
resolution = 16
validation_split = 0.2
validation_seed = 9
caption_extension = ".txt"
  [[datasets.subsets]]
  image_dir = "{root}/t/3_x"
  num_repeats = 3
  [[datasets.subsets]]
  image_dir = "{root}/r/1_y"
  is_reg = true
""")
    train, val = build_from_args(dataset_args(["--dataset_config", toml, "--seed", "1"]))
    t_imgs = {e.path for e in train.datasets[0].entries if not e.is_reg}
    v_entries = val.datasets[0].entries
    assert len(t_imgs) == 8 and len(v_entries) == 2
    assert not t_imgs & {e.path for e in v_entries}
    assert all(e.num_repeats == 1 and not e.is_reg for e in v_entries)
    assert any(e.is_reg for e in train.datasets[0].entries)
    train2, val2 = build_from_args(dataset_args(["--dataset_config", toml, "--seed", "2"]))
    assert {e.path for e in val2.datasets[0].entries} == {e.path for e in v_entries}  # validation_seed decides


def test_finetuning_dataset_from_metadata(tmp_path):
    root = str(tmp_path)
    for name, size in [("a", (32, 32)), ("b", (48, 32)), ("c", (32, 32))]:
        make_image(f"{root}/imgs/{name}.png", size)
    meta = {
        "a.png": {"caption": "a photo", "tags": "t1, t2"},
        f"{root}/imgs/b.png": {"tags": "only tags", "image_size": [48, 32]},
        "c": {"caption": "stem key"},  # key written without --full_path
    }
    write(f"{root}/meta.json", json.dumps(meta))
    train, _ = build_from_args(dataset_args(["--in_json", f"{root}/meta.json", "--train_data_dir", f"{root}/imgs",
                                             "--resolution", "32", "--dataset_repeats", "2", "--seed", "0"]))
    ds = train.datasets[0]
    assert ds.kind == "finetuning"
    got = {os.path.basename(e.path): (e.caption, e.num_repeats) for e in ds.entries}
    assert got == {"a.png": ("a photo,t1, t2", 2), "b.png": ("only tags", 2), "c.png": ("stem key", 2)}
    assert train.tag_frequency() == {"meta.json": {"a photo": 1, "t1": 1, "t2": 1, "only tags": 1, "stem key": 1}}
    assert all_batches(train)[0]["images"].shape[1:] == (3, 32, 32)


def test_finetuning_wildcard_caption_assembly(tmp_path):
    root = str(tmp_path)
    make_image(f"{root}/a.png", (16, 16))
    write(f"{root}/m.json", json.dumps({f"{root}/a.png": {"caption": "l1\nl2", "tags": "x\ny"}}))
    train, _ = build_from_args(dataset_args(["--in_json", f"{root}/m.json", "--resolution", "16", "--enable_wildcard"]))
    assert train.datasets[0].entries[0].caption == "l1,x,y\nl2,x,y"


def test_metadata_pointing_at_missing_files(tmp_path):
    root = str(tmp_path)
    make_image(f"{root}/imgs/a.png", (16, 16))
    write(f"{root}/m.json", json.dumps({"a.png": {"caption": "x"}, "gone.png": {"caption": "y"}}))
    with pytest.raises(UserInputError, match=r"metadata file .*m\.json: 1 listed image\(s\) not found .*gone\.png"):
        build_from_args(dataset_args(["--in_json", f"{root}/m.json", "--train_data_dir", f"{root}/imgs",
                                      "--resolution", "16"]))


def test_controlnet_dataset_pairs_and_flips_together(tmp_path):
    root = str(tmp_path)
    for i in range(2):
        make_image(f"{root}/img/1_x/p{i}.png", (32, 32), seed=i)
        make_image(f"{root}/cond/p{i}.png", (32, 32), color=(255, 0, 0))
    args = dataset_args(["--train_data_dir", f"{root}/img", "--conditioning_data_dir", f"{root}/cond", "--masked_loss",
                         "--resolution", "32", "--flip_aug", "--train_batch_size", "2", "--seed", "0"])
    train, _ = build_from_args(args, SchemaSupport(controlnet=True))
    b = train[(0, 1, 0)]
    cond = b["conditioning_images"]
    assert cond.shape == (2, 3, 32, 32)
    assert torch.allclose(cond[:, 0], torch.ones(2, 32, 32))  # red channel -> 1.0
    make_image(f"{root}/cond/extra.png", (32, 32))
    with pytest.raises(UserInputError, match="no training image with the same name: extra"):
        build_from_args(args, SchemaSupport(controlnet=True))
    os.remove(f"{root}/cond/extra.png")
    os.remove(f"{root}/cond/p1.png")
    with pytest.raises(UserInputError, match="no conditioning image with the same name .*p1.png"):
        build_from_args(args, SchemaSupport(controlnet=True))


def test_controlnet_conditioning_follows_flip(tmp_path):
    root = str(tmp_path)
    arr = np.zeros((16, 16, 3), np.uint8)
    arr[:, :8] = 255  # left half white
    from PIL import Image

    os.makedirs(f"{root}/img/1_x")
    os.makedirs(f"{root}/cond")
    Image.fromarray(arr).save(f"{root}/img/1_x/a.png")
    Image.fromarray(arr).save(f"{root}/cond/a.png")
    args = dataset_args(["--train_data_dir", f"{root}/img", "--conditioning_data_dir", f"{root}/cond", "--masked_loss",
                         "--resolution", "16", "--flip_aug", "--seed", "0"])
    train, _ = build_from_args(args, SchemaSupport(controlnet=True))
    for epoch in range(1, 6):
        b = train[(0, epoch, 0)]
        assert torch.equal(b["images"], b["conditioning_images"])


def test_alpha_mask_batches(tmp_path):
    root = str(tmp_path)
    make_image(f"{root}/t/1_x/a.png", (16, 16), color=(10, 20, 30, 128), mode="RGBA")
    make_image(f"{root}/t/1_x/b.png", (16, 16))  # no alpha channel -> mask of ones
    train, _ = build_from_args(dataset_args(["--train_data_dir", f"{root}/t", "--resolution", "16", "--alpha_mask",
                                             "--train_batch_size", "2"]))
    b = train[0]
    masks = dict(zip(b["image_keys"], b["alpha_masks"]))
    assert masks[f"{root}/t/1_x/a.png"].allclose(torch.full((16, 16), 128 / 255))
    assert masks[f"{root}/t/1_x/b.png"].allclose(torch.ones(16, 16))
    assert b["images"].shape == (2, 3, 16, 16)


def test_cache_info_file_written_and_used(tmp_path):
    root = str(tmp_path)
    make_tree(root, {"t/1_x": [((16, 16), "orig")]})
    args = dataset_args(["--train_data_dir", f"{root}/t", "--resolution", "16", "--caption_extension", ".txt",
                         "--cache_info"])
    build_from_args(args)
    cache = json.load(open(f"{root}/t/1_x/metadata_cache.json"))
    assert cache == {f"{root}/t/1_x/img00.png": {"caption": "orig", "resolution": [16, 16]}}
    write(f"{root}/t/1_x/img00.txt", "changed")
    train, _ = build_from_args(args)
    assert train.datasets[0].entries[0].caption == "orig"  # taken from the cache, folder not re-read


def test_empty_folder_warns_and_all_empty_errors(tmp_path, caplog):
    root = str(tmp_path)
    make_tree(root, {"t/1_x": [((16, 16), None)]})
    os.makedirs(f"{root}/t/2_empty")
    train, _ = build_from_args(dataset_args(["--train_data_dir", f"{root}/t", "--resolution", "16"]))
    assert "no images in" in caplog.text and "2_empty" in caplog.text
    os.makedirs(f"{root}/u/3_empty")
    with pytest.raises(UserInputError, match="no training images found in .*3_empty"):
        build_from_args(dataset_args(["--train_data_dir", f"{root}/u", "--resolution", "16"]))


def test_missing_captions_warning_lists_images(tmp_path, caplog):
    root = str(tmp_path)
    make_tree(root, {"t/1": [((16, 16), None), ((16, 16), "has one")]})
    build_from_args(dataset_args(["--train_data_dir", f"{root}/t", "--resolution", "16", "--caption_extension", ".txt"]))
    assert "no caption file (.txt) and there are no class_tokens" in caplog.text and "img00.png" in caplog.text


def test_bad_inputs_name_the_file(tmp_path):
    root = str(tmp_path)
    make_tree(root, {"t/1_x": [((16, 16), "ok")]})
    (tmp_path / "t/1_x/img00.txt").write_bytes(b"\xff\xfe bad")
    args = dataset_args(["--train_data_dir", f"{root}/t", "--resolution", "16", "--caption_extension", ".txt"])
    with pytest.raises(UserInputError, match=r"img00\.txt is not UTF-8"):
        build_from_args(args)
    write(f"{root}/t/1_x/img00.txt", "fine")
    png = f"{root}/t/1_x/img00.png"
    data = open(png, "rb").read()
    open(png, "wb").write(data[:60])
    with pytest.raises(UserInputError, match=r"img00\.png is corrupt or truncated"):
        build_from_args(args)


def test_corrupt_image_at_load_time_is_named(tmp_path):
    root = str(tmp_path)
    make_tree(root, {"t/1_x": [((16, 16), None)]})
    train, _ = build_from_args(dataset_args(["--train_data_dir", f"{root}/t", "--resolution", "16"]))
    open(f"{root}/t/1_x/img00.png", "wb").write(b"garbage")
    with pytest.raises(UserInputError, match=r"img00\.png is corrupt"):
        train[0]


def test_nothing_user_made_is_modified(tree):
    before = snapshot(tree)
    train, _ = build_from_args(args_for(tree, "--flip_aug", "--color_aug", "--shuffle_caption"))
    all_batches(train)
    assert snapshot(tree) == before


def test_no_bucket_random_crop_and_face_crop(tmp_path):
    root = str(tmp_path)
    make_image(f"{root}/t/1_x/big.png", (64, 48))
    make_image(f"{root}/t/1_x/face_30_20_10_10.png", (64, 64))
    train, _ = build_from_args(dataset_args(["--train_data_dir", f"{root}/t", "--resolution", "32", "--random_crop",
                                             "--face_crop_aug_range", "2.0,4.0", "--train_batch_size", "2"]))
    b = train[0]
    assert b["images"].shape == (2, 3, 32, 32)


def test_tokenize_fn_and_group_api(tree):
    train, _ = build_from_args(args_for(tree))
    train.set_tokenize_fn(lambda caps: [len(c) for c in caps])
    b = train[0]
    assert b["input_ids"] == [len(c) for c in b["captions"]]
    assert 0 < train.datasets[0].bucket_manager.mean_ar_error < 1
    desc = train.describe()[0]
    assert desc["num_train_images"] == 19 and desc["kind"] == "dreambooth"
    assert sum(desc["buckets"].values()) == 38
    freq = train.tag_frequency()
    assert freq["5_sks dog"]["dog"] == 2 and freq["1_dog"] == {"dog": 4}
    assert isinstance(train, DatasetGroup)
    with pytest.raises(IndexError):
        train[len(train)]


def test_build_dataset_groups_from_blueprint(tree):
    bp = blueprint_from_args(args_for(tree))
    g1, _ = build_dataset_groups(bp, seed=1)
    g2, _ = build_dataset_groups(bp, seed=1)
    assert [b["image_keys"] for b in all_batches(g1)] == [b["image_keys"] for b in all_batches(g2)]


def test_debug_dataset_prints_batches(tree):
    from library.data.debug import debug_dataset

    train, _ = build_from_args(args_for(tree, "--train_batch_size", "4"))
    lines = []
    debug_dataset(train, max_batches=2, out=lines.append)
    assert lines[0].startswith(f"{len(train)} batches per epoch, 19 training samples")
    assert sum(line.startswith("epoch 1 batch") for line in lines) == 2
    assert any("caption:" in line for line in lines)


def test_caption_file_with_leading_blank_line(tmp_path):
    root = str(tmp_path)
    make_tree(root, {"t/1_x": [((16, 16), "\n  \nreal caption\nmore")]})
    train, _ = build_from_args(dataset_args(["--train_data_dir", f"{root}/t", "--resolution", "16",
                                             "--caption_extension", ".txt"]))
    assert train.datasets[0].entries[0].caption == "real caption"
