"""SD text conditioning: CLIP windows for long captions and --clip_skip."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from library.arch.sd import SDArchitecture
from library.models.sd.loading import load_sd_models

BOS, EOS = 49406, 49407
V1_TOK = SimpleNamespace(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS)
V2_TOK = SimpleNamespace(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=0)


def _ids(n_content: int, length: int, pad: int):
    content = list(range(1000, 1000 + n_content))[: length - 2]
    seq = [BOS] + content + [EOS]
    seq += [pad] * (length - len(seq))
    if n_content > length - 2:  # truncated: the tokenizer ends with EOS
        seq[-1] = EOS
    return torch.tensor([seq[:length]])


def test_windows_v1_long_caption():
    ids = _ids(100, 152, EOS)
    w = SDArchitecture.split_into_windows(ids, V1_TOK)
    assert w.shape == (2, 77)
    assert w[0, 0] == BOS and w[1, 0] == BOS
    assert w[0, -1] == EOS and w[1, -1] == EOS
    assert torch.equal(w[0, 1:76], ids[0, 1:76]) and torch.equal(w[1, 1:76], ids[0, 76:151])


def test_windows_v2_padding_rules():
    # 80 content tokens: window 1 ends in content -> EOS; window 2 continues content then PAD.
    ids = _ids(80, 152, 0)
    w = SDArchitecture.split_into_windows(ids, V2_TOK)
    assert w[0, -1] == EOS  # content at the end of window 1
    assert w[1, -1] == 0  # window 2 ends in padding: keeps the sequence's own last token
    # 20 content tokens: window 2 starts with padding -> EOS right after BOS
    ids = _ids(20, 152, 0)
    w = SDArchitecture.split_into_windows(ids, V2_TOK)
    assert w[1, 0] == BOS and w[1, 1] == EOS and (w[1, 2:] == 0).all()


def test_encode_long_caption_and_clip_skip(tiny_sd):
    arch = SDArchitecture()
    te = load_sd_models(tiny_sd("sd1").path).text_encoder
    ids = _ids(100, 152, EOS)
    with torch.no_grad():
        ctx = arch.encode_tokens(te, ids, V1_TOK)
        assert ctx.shape == (1, 152, 32)
        # the first window's states equal encoding that window alone
        first = te(SDArchitecture.split_into_windows(ids, V1_TOK)[:1]).last_hidden_state
        torch.testing.assert_close(ctx[:, :76], first[:, :76])

        short = _ids(10, 77, EOS)
        skip2 = arch.encode_tokens(te, short, V1_TOK, clip_skip=2)
        out = te(short, output_hidden_states=True)
        torch.testing.assert_close(skip2, te.final_layer_norm(out.hidden_states[-2]))
        assert not torch.allclose(skip2, out.last_hidden_state)
        torch.testing.assert_close(arch.encode_tokens(te, short, V1_TOK, clip_skip=1), out.last_hidden_state)


def test_base_model_version_strings():
    assert SDArchitecture(False, False).base_model_version == "sd_v1"
    assert SDArchitecture(True, True).base_model_version == "sd_v2_v"
    assert SDArchitecture(True, True).default_resolution() == (768, 768)
