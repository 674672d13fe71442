"""tools/convert_diffusers20_original_sd.py in both directions (in-process)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from library.errors import UserInputError
from library.io import safetensors_io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool():
    spec = importlib.util.spec_from_file_location("convert_tool", os.path.join(ROOT, "tools", "convert_diffusers20_original_sd.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_file_to_folder_to_fp16_file_with_metadata(tiny_sd, tmp_path):
    tool = _tool()
    src = tiny_sd("sd1").path
    folder = str(tmp_path / "as_diffusers")
    tool.main([src, folder, "--use_safetensors"])
    assert os.path.exists(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))
    out = str(tmp_path / "back.safetensors")
    tool.main([folder, out, "--save_precision_as", "fp16", "--metadata", "{'title': 'tiny'}"])
    assert safetensors_io.read_metadata(out) == {"title": "tiny"}
    original, back = safetensors_io.load_state_dict(src), safetensors_io.load_state_dict(out)
    assert set(original) == set(back)
    for k, v in original.items():
        assert back[k].dtype == torch.float16
        assert torch.equal(back[k], v.to(torch.float16)), k


def test_refuses_to_overwrite_input_and_bad_metadata(tiny_sd, tmp_path):
    tool = _tool()
    src = tiny_sd("sd1").path
    with pytest.raises(UserInputError, match="same as the input"):
        tool.main([src, src])
    with pytest.raises(UserInputError, match="--metadata"):
        tool.main([src, str(tmp_path / "o.safetensors"), "--metadata", "not a dict"])
    with pytest.raises(UserInputError, match=r"\.ckpt or \.safetensors"):
        tool.main([src, str(tmp_path / "o.bin")])
