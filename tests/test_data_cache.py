"""Latent and text-encoder caches: names, validity, invalidation, atomic writes, batches."""

import io
import logging
import os
import zipfile

import numpy as np
import pytest
import torch

from library.data.datasets import build_from_args, check_caching_compatibility
from library.data.latent_cache import (
    LATENT_FORMATS,
    is_latent_cache_valid,
    key_suffix,
    latent_cache_path,
    npz_array_shape,
    npz_members,
    required_keys,
    save_npz,
)
from library.data.text_encoder_cache import TextEncoderCacheStrategy, to_numpy_for_cache
from library.errors import UserInputError
from test_data_helpers import dataset_args, make_image, make_tree

SD, SDXL, FLUX = LATENT_FORMATS["sd"], LATENT_FORMATS["sdxl"], LATENT_FORMATS["flux"]


class TinyEncoder:
    """Stand-in VAE: a fixed random 8x8/stride-8 convolution (4 latent channels)."""

    def __init__(self, channels=4):
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, channels, 8, stride=8)
        self.calls = 0

    def __call__(self, x):
        self.calls += 1
        return self.conv(x)


def tree_args(root, *extra):
    return dataset_args(["--train_data_dir", f"{root}/t", "--resolution", "32", "--enable_bucket",
                         "--min_bucket_reso", "16", "--max_bucket_reso", "64", "--bucket_reso_steps", "16",
                         "--caption_extension", ".txt", "--seed", "0", *extra])


@pytest.fixture
def tree(tmp_path):
    root = str(tmp_path)
    make_tree(root, {"t/2_x": [((32, 32), "a"), ((48, 32), "b"), ((32, 48), "c")]})
    return root


# ---- names and validity -----------------------------------------------------------------

def test_cache_names_and_legacy_precedence(tmp_path):
    img = str(tmp_path / "photo.png")
    assert latent_cache_path(img, (640, 48), SD) == str(tmp_path / "photo_0640x0048_sd.npz")
    assert latent_cache_path(img, (1024, 1024), FLUX) == str(tmp_path / "photo_1024x1024_flux.npz")
    (tmp_path / "photo.npz").write_bytes(b"")
    assert latent_cache_path(img, (640, 48), SDXL) == str(tmp_path / "photo.npz")
    assert latent_cache_path(img, (640, 48), SDXL, frozenset()) == str(tmp_path / "photo_0640x0048_sdxl.npz")
    assert latent_cache_path(img, (640, 48), FLUX) == str(tmp_path / "photo_0640x0048_flux.npz")


def test_key_suffix_and_required_keys():
    assert key_suffix((1024, 768), SD) == ""
    assert key_suffix((1024, 768), FLUX) == "_96x128"
    assert required_keys((64, 32), FLUX, True, True) == ["latents_4x8", "latents_flipped_4x8", "alpha_mask_4x8"]


def test_npz_members_and_shape_without_loading(tmp_path):
    p = str(tmp_path / "a.npz")
    np.savez(p, latents=np.zeros((4, 6, 5), np.float32), original_size=np.array([40, 48]))
    assert npz_members(p) == {"latents", "original_size"}
    assert npz_array_shape(p, "latents") == (4, 6, 5)
    assert npz_array_shape(p, "nothing") is None
    c = str(tmp_path / "c.npz")
    np.savez_compressed(c, latents=np.zeros((4, 3, 2), np.float32))
    assert npz_members(c) == {"latents"} and npz_array_shape(c, "latents") == (4, 3, 2)
    assert npz_members(str(tmp_path / "missing.npz")) is None


def test_validity_rules(tmp_path, caplog):
    p = str(tmp_path / "x_0032x0016_sd.npz")
    bucket = (32, 16)
    assert not is_latent_cache_valid(p, bucket, SD, False, False)
    np.savez(p, latents=np.zeros((4, 2, 4), np.float32))
    assert is_latent_cache_valid(p, bucket, SD, False, False)
    assert not is_latent_cache_valid(p, bucket, SD, True, False)  # flip needs latents_flipped
    assert not is_latent_cache_valid(p, bucket, SD, False, True)  # alpha needs alpha_mask
    assert not is_latent_cache_valid(p, (64, 16), SD, False, False)  # other bucket: shape mismatch
    assert is_latent_cache_valid(p, (64, 16), SD, True, True, skip_cache_check=True)
    np.savez(p, latents=np.zeros((4, 2, 4)), latents_flipped=np.zeros((4, 2, 4)), alpha_mask=np.ones((16, 32)))
    assert is_latent_cache_valid(p, bucket, SD, True, True)
    # corrupt file: reported by name, treated as invalid
    open(p, "wb").write(b"PK\x03\x04 broken")
    with caplog.at_level(logging.WARNING):
        assert not is_latent_cache_valid(p, bucket, SD, False, False)
    assert "x_0032x0016_sd.npz is corrupt" in caplog.text


def test_multi_resolution_keys_and_merge(tmp_path):
    p = str(tmp_path / "m_0064x0064_flux.npz")
    save_npz(p, {"latents_8x8": np.zeros((16, 8, 8), np.float32)}, merge=True)
    save_npz(p, {"latents_4x4": np.ones((16, 4, 4), np.float32)}, merge=True)
    assert npz_members(p) == {"latents_8x8", "latents_4x4"}
    assert is_latent_cache_valid(p, (64, 64), FLUX, False, False)
    assert is_latent_cache_valid(p, (32, 32), FLUX, False, False)
    assert not is_latent_cache_valid(p, (32, 64), FLUX, False, False)
    assert not [n for n in os.listdir(tmp_path) if n != os.path.basename(p)]  # no temp files left


# ---- caching through the dataset ------------------------------------------------------------

def test_cache_latents_in_memory_feeds_batches(tree):
    train, _ = build_from_args(tree_args(tree, "--flip_aug"))
    enc = TinyEncoder()
    n = train.cache_latents(enc, SD, to_disk=False, batch_size=2, num_workers=2, progress=False)
    assert n == 3
    for e in train.entries():
        assert e.latents.shape == (4, e.bucket[1] // 8, e.bucket[0] // 8)
        assert e.latents_flipped is not None
    for i in range(len(train)):
        b = train[(i, 1, 0)]
        assert b["images"] is None
        n_b = len(b["captions"])
        h, w = b["target_sizes_hw"][0].tolist()
        assert b["latents"].shape == (n_b, 4, h // 8, w // 8)
    assert not [f for f in os.listdir(f"{tree}/t/2_x") if f.endswith(".npz")]


def test_cache_latents_to_disk_then_reuse_and_invalidate(tree):
    args = tree_args(tree, "--flip_aug", "--alpha_mask")
    train, _ = build_from_args(args)
    enc = TinyEncoder()
    assert train.cache_latents(enc, SD, to_disk=True, batch_size=4, progress=False) == 3
    files = sorted(f for f in os.listdir(f"{tree}/t/2_x") if f.endswith(".npz"))
    assert files == ["img00_0032x0032_sd.npz", "img01_0048x0032_sd.npz", "img02_0032x0048_sd.npz"]
    with np.load(f"{tree}/t/2_x/img01_0048x0032_sd.npz") as z:
        assert set(z.files) == {"latents", "latents_flipped", "alpha_mask", "original_size", "crop_ltrb"}
        assert z["original_size"].tolist() == [48, 32]
        bucket_h, bucket_w = z["alpha_mask"].shape
        assert z["latents"].shape == (4, bucket_h // 8, bucket_w // 8)
    # batches read the files
    b = train[(0, 1, 0)]
    assert b["latents"] is not None and b["alpha_masks"] is not None
    # second run: everything valid, nothing encoded
    train2, _ = build_from_args(args)
    assert train2.cache_latents(enc, SD, to_disk=True, progress=False) == 0
    # a corrupt file and a file missing a key are rebuilt
    open(f"{tree}/t/2_x/img00_0032x0032_sd.npz", "wb").write(b"junk")
    np.savez(f"{tree}/t/2_x/img02_0032x0048_sd.npz", latents=np.zeros((4, 6, 4), np.float32))
    train3, _ = build_from_args(args)
    assert train3.cache_latents(enc, SD, to_disk=True, progress=False) == 2
    # without flip_aug the existing files (with extra keys) stay valid
    train4, _ = build_from_args(tree_args(tree, "--alpha_mask"))
    assert train4.cache_latents(enc, SD, to_disk=True, progress=False) == 0


def test_sizes_recovered_from_cache_names(tree):
    train, _ = build_from_args(tree_args(tree))
    train.cache_latents(TinyEncoder(), SD, to_disk=True, progress=False)
    # the image itself is no longer opened for its size once a cache name carries it
    img = f"{tree}/t/2_x/img01.png"
    open(img, "wb").write(b"not an image any more")
    train2, _ = build_from_args(tree_args(tree))
    sizes = {os.path.basename(e.path): e.size for e in train2.entries()}
    assert sizes["img01.png"] == (48, 32)


def test_multiprocess_split_of_disk_caching(tree):
    enc = TinyEncoder()
    a, _ = build_from_args(tree_args(tree))
    b, _ = build_from_args(tree_args(tree))
    na = a.cache_latents(enc, SD, to_disk=True, process_index=0, num_processes=2, progress=False)
    nb = b.cache_latents(enc, SD, to_disk=True, process_index=1, num_processes=2, progress=False)
    assert (na, nb) == (2, 1)


def test_nan_latents_are_reported(tree):
    train, _ = build_from_args(tree_args(tree))
    with pytest.raises(UserInputError, match="NaN/inf latents for .*img0"):
        train.cache_latents(lambda x: torch.full((x.shape[0], 4, x.shape[2] // 8, x.shape[3] // 8), float("nan")),
                            SD, progress=False)


def test_diffusers_vae_plugs_in(tree):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4)
    vae.eval()
    train, _ = build_from_args(tree_args(tree))
    train.cache_latents(lambda x: vae.encode(x).latent_dist.mode() * 0.18215, SD, progress=False)
    e = next(iter(train.entries()))
    assert e.latents.shape == (4, e.bucket[1] // 8, e.bucket[0] // 8)


def test_caching_incompatible_options(tree):
    train, _ = build_from_args(tree_args(tree, "--color_aug"))
    with pytest.raises(UserInputError, match="color_aug changes the image every epoch"):
        train.cache_latents(TinyEncoder(), SD, progress=False)
    train, _ = build_from_args(tree_args(tree, "--shuffle_caption", "--caption_tag_dropout_rate", "0.1"))
    with pytest.raises(UserInputError, match="shuffle_caption, caption_tag_dropout_rate change the caption"):
        check_caching_compatibility(train, cache_text_encoder_outputs=True)


# ---- text-encoder outputs ---------------------------------------------------------------------

class FakeStrategy(TextEncoderCacheStrategy):
    suffix = "_fake_te.npz"
    npz_keys = ("hidden", "pooled")

    def __init__(self, mask=False):
        self.mask = mask
        self.encoded: list[str] = []

    def tokenize(self, captions):
        return [[ord(c) for c in cap] for cap in captions]

    def encode(self, tokens, captions):
        self.encoded += list(captions)
        hidden = torch.tensor([[len(t), sum(t)] for t in tokens], dtype=torch.bfloat16)
        pooled = np.array([[float(len(t))] for t in tokens], np.float16)
        return {"hidden": hidden, "pooled": pooled}

    def flags(self):
        return {"apply_mask": self.mask}


def test_te_cache_in_memory_dedupes_and_feeds_batches(tmp_path):
    root = str(tmp_path)
    make_tree(root, {"t/1_x": [((16, 16), "same"), ((16, 16), "same"), ((16, 16), "other")]})
    train, _ = build_from_args(dataset_args(["--train_data_dir", f"{root}/t", "--resolution", "16", "--caption_extension",
                                             ".txt", "--caption_prefix", "pre", "--train_batch_size", "3"]))
    s = FakeStrategy()
    assert train.cache_text_encoder_outputs(s, progress=False) == 2
    assert sorted(s.encoded) == ["pre other", "pre same"]
    b = train[0]
    out = b["text_encoder_outputs"]
    assert out["hidden"].shape == (3, 2) and out["hidden"].dtype == torch.float32  # bf16 stored as fp32
    assert out["pooled"].dtype == torch.float16  # fp16 stays fp16
    assert sorted(b["captions"]) == ["pre other", "pre same", "pre same"]
    assert b["input_ids"] is None


def test_te_cache_to_disk_validity_and_flags(tmp_path):
    root = str(tmp_path)
    make_tree(root, {"t/1_x": [((16, 16), "a"), ((16, 16), "b")]})
    args = dataset_args(["--train_data_dir", f"{root}/t", "--resolution", "16", "--caption_extension", ".txt"])
    train, _ = build_from_args(args)
    assert train.cache_text_encoder_outputs(FakeStrategy(), to_disk=True, progress=False) == 2
    path = f"{root}/t/1_x/img00_fake_te.npz"
    assert npz_members(path) == {"hidden", "pooled", "apply_mask"}
    train, _ = build_from_args(args)
    assert train.cache_text_encoder_outputs(FakeStrategy(), to_disk=True, progress=False) == 0
    b = train[0]
    assert b["text_encoder_outputs"]["hidden"].shape == (1, 2)
    # a changed flag invalidates every file
    train, _ = build_from_args(args)
    assert train.cache_text_encoder_outputs(FakeStrategy(mask=True), to_disk=True, progress=False) == 2
    # --skip_cache_check trusts whatever exists
    train, _ = build_from_args(args)
    assert train.cache_text_encoder_outputs(FakeStrategy(), to_disk=True, skip_cache_check=True, progress=False) == 0


def test_te_cache_with_caption_dropout_uses_empty_caption_outputs(tmp_path):
    root = str(tmp_path)
    make_tree(root, {"t/1_x": [((16, 16), "a")]})
    train, _ = build_from_args(dataset_args(["--train_data_dir", f"{root}/t", "--resolution", "16", "--caption_extension",
                                             ".txt", "--caption_dropout_every_n_epochs", "2"]))
    train.cache_text_encoder_outputs(FakeStrategy(), progress=False)
    assert train[(0, 1, 0)]["text_encoder_outputs"]["hidden"].tolist() == [[1.0, 97.0]]
    dropped = train[(0, 2, 0)]
    assert dropped["captions"] == [""] and dropped["text_encoder_outputs"]["hidden"].tolist() == [[0.0, 0.0]]


def test_to_numpy_for_cache():
    assert to_numpy_for_cache(torch.ones(2, dtype=torch.bfloat16)).dtype == np.float32
    assert to_numpy_for_cache(torch.ones(2, dtype=torch.float16)).dtype == np.float16
    assert to_numpy_for_cache([1, 2]).tolist() == [1, 2]


def test_zip64_npz_members_fallback(tmp_path):
    p = str(tmp_path / "z.npz")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        with z.open("latents.npy", "w", force_zip64=True) as f:
            np.save(f, np.zeros((4, 2, 2), np.float32))
    open(p, "wb").write(buf.getvalue())
    assert npz_members(p) == {"latents"} and npz_array_shape(p, "latents") == (4, 2, 2)


def test_cached_latents_loader_matches_image_geometry(tmp_path):
    root = str(tmp_path)
    make_image(f"{root}/t/1_x/a.png", (48, 32))
    train, _ = build_from_args(tree_args(root))
    b_img = train[(0, 1, 0)]
    train.cache_latents(TinyEncoder(), SD, to_disk=True, progress=False)
    b_lat = train[(0, 1, 0)]
    assert b_lat["crop_top_lefts"].tolist() == b_img["crop_top_lefts"].tolist()
    assert b_lat["original_sizes_hw"].tolist() == [[32, 48]]
    # the cached latent equals encoding the uncached batch image
    enc = TinyEncoder()
    assert torch.allclose(enc(b_img["images"]), b_lat["latents"], atol=1e-5)
