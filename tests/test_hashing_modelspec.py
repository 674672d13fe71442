"""sshs_* / legacy / full hashes (formats.md b.1) and modelspec.* metadata (b.3)."""

from __future__ import annotations

import argparse
import base64
import datetime
import hashlib
import os
import re
import struct
import subprocess

import pytest

from library.io import hashing as H
from library.io import modelspec as M

EMPTY8 = hashlib.sha256(b"").hexdigest()[:8]


@pytest.fixture(scope="module")
def tensors():
    import torch

    g = torch.Generator().manual_seed(0)
    return {
        "lora_unet_x.lora_down.weight": torch.randn(600, 600, generator=g),  # 1.44 MB: past the 1 MiB window
        "lora_unet_x.lora_up.weight": torch.randn(8, 600, generator=g).half(),
        "lora_unet_x.alpha": torch.tensor(4.0),
    }


def _hand_hashes(buf: bytes) -> tuple[str, str]:
    (n,) = struct.unpack("<Q", buf[:8])
    return hashlib.sha256(buf[8 + n :]).hexdigest(), hashlib.sha256(buf[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]


def test_sshs_hashes_match_hand_computation(tensors):
    from safetensors.torch import save

    md = {"ss_network_dim": "8", "ss_output_name": "x", "modelspec.title": "ignored"}
    model_hash, legacy_hash = H.sshs_hashes(tensors, md)
    buf = save(tensors, {"ss_network_dim": "8", "ss_output_name": "x"})
    assert (model_hash, legacy_hash) == _hand_hashes(buf)
    assert re.fullmatch(r"[0-9a-f]{64}", model_hash) and re.fullmatch(r"[0-9a-f]{8}", legacy_hash)
    assert legacy_hash != EMPTY8


def test_model_hash_is_independent_of_metadata(tensors, tmp_path):
    from safetensors.torch import save_file

    model_hash, legacy_hash = H.sshs_hashes(tensors, {"ss_a": "1"})
    path = tmp_path / "final.safetensors"
    save_file(tensors, str(path), metadata={"ss_a": "1", "ss_b": "x" * 5000, "modelspec.title": "t"})
    assert H.model_hash_of_file(path) == model_hash
    # the legacy hash covers the header, so ss_* metadata changes it; other keys do not
    assert H.sshs_hashes(tensors, {"ss_a": "1", "ss_b": "x" * 5000})[1] != legacy_hash
    assert H.sshs_hashes(tensors, {"ss_a": "1", "modelspec.x": "y" * 5000}) == (model_hash, legacy_hash)


def test_legacy_hash_of_short_buffer_is_empty_hash():
    from safetensors.torch import save
    import torch

    buf = save({"a": torch.zeros(10)}, {})
    assert len(buf) < 0x100000
    assert H.legacy_hash_of_bytes(buf) == EMPTY8 == "e3b0c442"
    assert H.sshs_hashes({"a": torch.zeros(10)}, None)[1] == EMPTY8
    assert H.model_hash_of_bytes(buf) == _hand_hashes(buf)[0]


def test_file_hashes(tmp_path):
    data = os.urandom(0x100000 + 0x10000 + 12345)
    p = tmp_path / "model.ckpt"
    p.write_bytes(data)
    assert H.legacy_hash_of_file(p) == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert H.full_sha256_of_file(p) == hashlib.sha256(data).hexdigest()
    small = tmp_path / "small.bin"
    small.write_bytes(b"abc")
    assert H.legacy_hash_of_file(small) == EMPTY8
    assert H.legacy_hash_of_file(tmp_path / "missing.safetensors") == "NOFILE"
    assert H.legacy_hash_of_file(tmp_path) == "IsADirectory"


def test_add_sshs_hashes(tensors):
    md = {"ss_v2": "False"}
    H.add_sshs_hashes(tensors, md)
    assert set(md) == {"ss_v2", "sshs_model_hash", "sshs_legacy_hash"}


# ------------------------------------------------------------------------------------------
# modelspec
# ------------------------------------------------------------------------------------------

SAI = "https://github.com/Stability-AI/generative-models"
BFL = "https://github.com/black-forest-labs/flux"
CHROMA = "https://huggingface.co/lodestones/Chroma"
TS = 1700000000.25


@pytest.mark.parametrize(
    "kwargs, arch, impl",
    [
        (dict(lora=True), "stable-diffusion-v1/lora", "diffusers"),
        (dict(textual_inversion=True), "stable-diffusion-v1/textual-inversion", SAI),
        (dict(), "stable-diffusion-v1", SAI),
        (dict(v_parameterization=True, lora=True), "stable-diffusion-v1/lora", "diffusers"),
        (dict(v2=True, lora=True), "stable-diffusion-v2-512/lora", "diffusers"),
        (dict(v2=True, v_parameterization=True, lora=True), "stable-diffusion-v2-768-v/lora", "diffusers"),
        (dict(v2=True, v_parameterization=True), "stable-diffusion-v2-768-v", SAI),
        (dict(v2=True, textual_inversion=True), "stable-diffusion-v2-512/textual-inversion", SAI),
        (dict(sdxl=True, lora=True), "stable-diffusion-xl-v1-base/lora", SAI),
        (dict(sdxl=True, textual_inversion=True), "stable-diffusion-xl-v1-base/textual-inversion", SAI),
        (dict(sdxl=True), "stable-diffusion-xl-v1-base", SAI),
        (dict(sd3="medium", lora=True), "stable-diffusion-3-medium/lora", "diffusers"),
        (dict(sd3="5-medium", lora=True), "stable-diffusion-3-5-medium/lora", "diffusers"),
        (dict(sd3="5-large"), "stable-diffusion-3-5-large", SAI),
        (dict(flux="dev", lora=True), "flux-1-dev/lora", BFL),
        (dict(flux="schnell", lora=True), "flux-1-schnell/lora", BFL),
        (dict(flux="dev"), "flux-1-dev", BFL),
        (dict(flux="something-else", lora=True), "flux-1/lora", BFL),
        (dict(flux=True, lora=True), "flux-1/lora", BFL),
        (dict(flux="chroma", lora=True), "chroma/lora", CHROMA),
        (dict(model_config={"flux": "chroma"}), "chroma", CHROMA),
        (dict(model_config={"sd3": "5-large"}, lora=True), "stable-diffusion-3-5-large/lora", "diffusers"),
    ],
)
def test_architecture_and_implementation(kwargs, arch, impl):
    md = M.build_metadata(timestamp=TS, **kwargs)
    assert md["modelspec.architecture"] == arch
    assert md["modelspec.implementation"] == impl
    assert md["modelspec.sai_model_spec"] == "1.0.1"
    assert all(isinstance(v, str) for v in md.values())
    assert all(k.startswith("modelspec.") for k in md)
    assert "modelspec.hash_sha256" not in md


def test_lora_and_ti_together_is_an_error():
    with pytest.raises(ValueError):
        M.build_metadata(timestamp=TS, lora=True, textual_inversion=True)


def test_title_fallback():
    assert M.build_metadata(timestamp=TS, title="my lora", lora=True)["modelspec.title"] == "my lora"
    assert M.build_metadata(timestamp=TS, lora=True)["modelspec.title"] == f"LoRA@{TS}"
    assert M.build_metadata(timestamp=TS, textual_inversion=True)["modelspec.title"] == f"TextualInversion@{TS}"
    assert M.build_metadata(timestamp=TS, sdxl=True)["modelspec.title"] == f"Checkpoint@{TS}"


@pytest.mark.parametrize(
    "kwargs, reso",
    [
        (dict(), "512x512"),
        (dict(v2=True), "512x512"),
        (dict(v_parameterization=True), "512x512"),
        (dict(v2=True, v_parameterization=True), "768x768"),
        (dict(sdxl=True), "1024x1024"),
        (dict(sd3="medium"), "1024x1024"),
        (dict(flux="dev"), "1024x1024"),
        (dict(reso=640), "640x640"),
        (dict(reso=(768, 512), sdxl=True), "768x512"),
        (dict(reso="512,768"), "512x768"),
        (dict(reso="896"), "896x896"),
        (dict(reso=[832, 1216]), "832x1216"),
    ],
)
def test_resolution(kwargs, reso):
    assert M.build_metadata(timestamp=TS, **kwargs)["modelspec.resolution"] == reso


def test_date_is_local_iso_seconds():
    date = M.build_metadata(timestamp=TS)["modelspec.date"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", date)
    assert date == datetime.datetime.fromtimestamp(int(TS)).strftime("%Y-%m-%dT%H:%M:%S")


def test_prediction_type():
    assert M.build_metadata(timestamp=TS)["modelspec.prediction_type"] == "epsilon"
    assert M.build_metadata(timestamp=TS, v2=True, v_parameterization=True)["modelspec.prediction_type"] == "v"
    assert M.build_metadata(timestamp=TS, sdxl=True)["modelspec.prediction_type"] == "epsilon"
    assert "modelspec.prediction_type" not in M.build_metadata(timestamp=TS, flux="dev", lora=True)
    assert "modelspec.prediction_type" not in M.build_metadata(timestamp=TS, model_config={"flux": "chroma"})


def test_timestep_range_and_encoder_layer():
    base = M.build_metadata(timestamp=TS)
    assert "modelspec.timestep_range" not in base and "modelspec.encoder_layer" not in base
    assert "modelspec.timestep_range" not in M.build_metadata(timestamp=TS, timesteps=(None, None))
    assert M.build_metadata(timestamp=TS, timesteps=(100, None))["modelspec.timestep_range"] == "100,1000"
    assert M.build_metadata(timestamp=TS, timesteps=(None, 500))["modelspec.timestep_range"] == "0,500"
    assert M.build_metadata(timestamp=TS, timesteps=(200, 800))["modelspec.timestep_range"] == "200,800"
    assert M.build_metadata(timestamp=TS, clip_skip=2)["modelspec.encoder_layer"] == "2"


def test_implementation_version():
    v = M.build_metadata(timestamp=TS)["modelspec.implementation_version"]
    assert v.startswith("sd-trainer/")
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=os.path.dirname(M.__file__), capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        head = "unknown"
    assert v == f"sd-trainer/{head}"


def test_optional_fields():
    base = M.build_metadata(timestamp=TS, lora=True)
    for key in ("description", "author", "license", "tags", "merged_from", "usage_hint", "thumbnail",
                "trigger_phrase", "preprocessor", "is_negative_embedding"):
        assert f"modelspec.{key}" not in base
    md = M.build_metadata(
        timestamp=TS,
        lora=True,
        author="me",
        description="d",
        license="MIT",
        tags="a,b",
        merged_from="x,y",
        usage_hint="use it",
        trigger_phrase="sks dog",
        preprocessor="canny",
        is_negative_embedding="True",
        thumbnail="data:image/png;base64,AAAA",
    )
    assert md["modelspec.author"] == "me" and md["modelspec.description"] == "d"
    assert md["modelspec.license"] == "MIT" and md["modelspec.tags"] == "a,b"
    assert md["modelspec.merged_from"] == "x,y" and md["modelspec.usage_hint"] == "use it"
    assert md["modelspec.trigger_phrase"] == "sks dog" and md["modelspec.preprocessor"] == "canny"
    assert md["modelspec.is_negative_embedding"] == "True"
    assert md["modelspec.thumbnail"] == "data:image/png;base64,AAAA"


def test_thumbnail_file_becomes_data_url(tmp_path):
    png = b"\x89PNG\r\n\x1a\n" + os.urandom(100)
    p = tmp_path / "thumb.png"
    p.write_bytes(png)
    url = M.build_metadata(timestamp=TS, thumbnail=str(p))["modelspec.thumbnail"]
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix) and base64.b64decode(url[len(prefix):]) == png
    jpg = tmp_path / "thumb.jpg"
    jpg.write_bytes(b"\xff\xd8\xff")
    assert M.build_metadata(timestamp=TS, thumbnail=str(jpg))["modelspec.thumbnail"].startswith("data:image/jpeg;base64,")
    assert "modelspec.thumbnail" not in M.build_metadata(timestamp=TS, thumbnail=str(tmp_path / "missing.png"))


def _spec_args(**overrides):
    ns = dict(
        v2=False,
        v_parameterization=False,
        resolution=None,
        output_name=None,
        min_timestep=None,
        max_timestep=None,
        clip_skip=None,
        metadata_title=None,
        metadata_author=None,
        metadata_description=None,
        metadata_license=None,
        metadata_tags=None,
        metadata_usage_hint=None,
        metadata_thumbnail=None,
        metadata_merged_from=None,
        metadata_trigger_phrase=None,
        metadata_preprocessor=None,
        metadata_is_negative_embedding=None,
    )
    ns.update(overrides)
    return argparse.Namespace(**ns)


def test_build_from_args():
    md = M.build_metadata_from_args(_spec_args(), timestamp=TS, lora=True)
    assert md["modelspec.title"] == f"LoRA@{TS}" and md["modelspec.resolution"] == "512x512"
    md = M.build_metadata_from_args(_spec_args(output_name="out"), timestamp=TS, lora=True)
    assert md["modelspec.title"] == "out"
    md = M.build_metadata_from_args(
        _spec_args(
            output_name="out",
            metadata_title="Title",
            metadata_author="A",
            metadata_tags="t1,t2",
            v2=True,
            v_parameterization=True,
            resolution="640,448",
            min_timestep=10,
            clip_skip=2,
        ),
        timestamp=TS,
        lora=True,
    )
    assert md["modelspec.title"] == "Title" and md["modelspec.author"] == "A" and md["modelspec.tags"] == "t1,t2"
    assert md["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert md["modelspec.resolution"] == "640x448" and md["modelspec.prediction_type"] == "v"
    assert md["modelspec.timestep_range"] == "10,1000" and md["modelspec.encoder_layer"] == "2"
    # a bare namespace (tools without the options) works too
    md = M.build_metadata_from_args(argparse.Namespace(), timestamp=TS, sdxl=True)
    assert md["modelspec.title"] == f"Checkpoint@{TS}" and md["modelspec.resolution"] == "1024x1024"
