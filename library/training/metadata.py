"""`ss_*` metadata written into trained network files (formats.md b.2).

Values are strings: Python's str() of the value (None -> "None", booleans "True"/"False",
tuples "(512, 512)"), JSON where the spec says so.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
from typing import Any

# kept by --no_metadata (plus modelspec.* and sshs_*)
MINIMUM_KEYS = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args")


def _git_head() -> str:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "(unknown)"
    except (OSError, subprocess.SubprocessError):
        return "(unknown)"


def model_file_keys(path: str | None, name_key: str, hash_key: str, new_hash_key: str) -> dict[str, str]:
    """Name and hashes of the base model or VAE; hashes only for an existing local file."""
    from library.io.hashing import full_sha256_of_file, legacy_hash_of_file

    if not path:
        return {}
    if os.path.exists(path):
        md = {name_key: os.path.basename(os.path.normpath(path)), hash_key: legacy_hash_of_file(path)}
        md[new_hash_key] = full_sha256_of_file(path) if os.path.isfile(path) else "IsADirectory"
        return md
    return {name_key: path}


def _subset_image_counts(d) -> list[int]:
    counts = [0] * len(d.subsets)
    for e in d.entries:
        counts[e.subset] += 1
    return counts


def _dir_counts(group, reg: bool) -> dict:
    """{subset folder (or metadata file) basename: {"n_repeats", "img_count"}}, duplicates numbered."""
    out: dict[str, dict] = {}
    for d in group.datasets:
        for s, count in zip(d.subsets, _subset_image_counts(d)):
            if bool(s.is_reg) != reg:
                continue
            name = os.path.basename(os.path.normpath(str(s.image_dir or s.metadata_file or "(none)")))
            base, k = name, 2
            while name in out:
                name = f"{base} ({k})"
                k += 1
            out[name] = {"n_repeats": int(s.num_repeats), "img_count": count}
    return out


def _bucket_info(d) -> dict | None:
    if not d.params.enable_bucket:
        return None
    buckets = {str(i): {"resolution": [w, h], "count": len(items)} for i, ((w, h), items) in enumerate(d.bucket_manager.sorted_buckets())}
    return {"buckets": buckets, "mean_img_ar_error": float(getattr(d.bucket_manager, "mean_ar_error", 0.0) or 0.0)}


def _ss_dataset(d) -> dict:
    """One entry of ss_datasets."""
    p = d.params
    subsets = []
    for s, count in zip(d.subsets, _subset_image_counts(d)):
        entry = {
            "img_count": count, "num_repeats": s.num_repeats, "color_aug": s.color_aug, "flip_aug": s.flip_aug,
            "random_crop": s.random_crop, "shuffle_caption": s.shuffle_caption, "keep_tokens": s.keep_tokens,
            "keep_tokens_separator": s.keep_tokens_separator, "secondary_separator": s.secondary_separator,
            "enable_wildcard": s.enable_wildcard, "caption_prefix": s.caption_prefix, "caption_suffix": s.caption_suffix,
            "resize_interpolation": s.resize_interpolation,
        }
        if s.image_dir:
            entry["image_dir"] = os.path.basename(os.path.normpath(s.image_dir))
        if p.kind == "finetuning" or s.metadata_file:
            entry["metadata_file"] = os.path.basename(s.metadata_file) if s.metadata_file else None
        else:
            entry["class_tokens"] = s.class_tokens
            entry["is_reg"] = s.is_reg
        subsets.append(entry)
    return {
        "is_dreambooth": p.kind != "finetuning", "batch_size_per_device": p.batch_size,
        "num_train_images": d.num_train_images, "num_reg_images": d.num_reg_images,
        "resolution": list(p.resolution), "enable_bucket": p.enable_bucket,
        "min_bucket_reso": p.min_bucket_reso, "max_bucket_reso": p.max_bucket_reso,
        "tag_frequency": d.tag_frequency(), "bucket_info": _bucket_info(d),
        "resize_interpolation": p.resize_interpolation, "subsets": subsets,
    }


def build_training_metadata(args, *, arch, group, val_group, num_batches_per_epoch: int, num_epochs: int,
                            optimizer_name: str, text_encoder_lr, network_args: dict | None, num_processes: int = 1,
                            session_id: int | None = None, started_at: float | None = None) -> dict[str, str]:
    """The ss_* keys known when training starts (updated at each save by `for_save`)."""
    g = lambda name, default=None: getattr(args, name, default)  # noqa: E731
    md: dict[str, Any] = {
        "ss_session_id": session_id if session_id is not None else random.randint(0, 2**32),
        "ss_training_started_at": started_at if started_at is not None else time.time(),
        "ss_output_name": g("output_name"),
        "ss_learning_rate": g("learning_rate"),
        "ss_text_encoder_lr": text_encoder_lr,
        "ss_unet_lr": g("unet_lr"),
        "ss_num_train_images": group.num_train_images,
        "ss_num_reg_images": group.num_reg_images,
        "ss_num_validation_images": val_group.num_train_images if val_group is not None else 0,
        "ss_num_batches_per_epoch": num_batches_per_epoch,
        "ss_num_epochs": num_epochs,
        "ss_gradient_checkpointing": g("gradient_checkpointing"),
        "ss_gradient_accumulation_steps": g("gradient_accumulation_steps"),
        "ss_max_train_steps": g("max_train_steps"),
        "ss_lr_warmup_steps": g("lr_warmup_steps"),
        "ss_lr_scheduler": g("lr_scheduler"),
        "ss_network_module": g("network_module"),
        "ss_network_dim": g("network_dim"),
        "ss_network_alpha": g("network_alpha"),
        "ss_network_dropout": g("network_dropout"),
        "ss_mixed_precision": g("mixed_precision"),
        "ss_full_fp16": bool(g("full_fp16", False)),
        "ss_v2": bool(g("v2", False)),
        "ss_base_model_version": arch.base_model_version,
        "ss_clip_skip": g("clip_skip"),
        "ss_max_token_length": g("max_token_length"),
        "ss_cache_latents": g("cache_latents"),
        "ss_seed": g("seed"),
        "ss_lowram": g("lowram"),
        "ss_noise_offset": g("noise_offset"),
        "ss_multires_noise_iterations": g("multires_noise_iterations"),
        "ss_multires_noise_discount": g("multires_noise_discount"),
        "ss_adaptive_noise_scale": g("adaptive_noise_scale"),
        "ss_zero_terminal_snr": g("zero_terminal_snr"),
        "ss_training_comment": g("training_comment"),
        "ss_sd_scripts_commit_hash": _git_head(),
        "ss_optimizer": optimizer_name,
        "ss_max_grad_norm": g("max_grad_norm"),
        "ss_caption_dropout_rate": g("caption_dropout_rate"),
        "ss_caption_dropout_every_n_epochs": g("caption_dropout_every_n_epochs"),
        "ss_caption_tag_dropout_rate": g("caption_tag_dropout_rate"),
        "ss_face_crop_aug_range": g("face_crop_aug_range"),
        "ss_prior_loss_weight": g("prior_loss_weight"),
        "ss_min_snr_gamma": g("min_snr_gamma"),
        "ss_scale_weight_norms": g("scale_weight_norms"),
        "ss_ip_noise_gamma": g("ip_noise_gamma"),
        "ss_debiased_estimation": bool(g("debiased_estimation_loss", False)),
        "ss_noise_offset_random_strength": g("noise_offset_random_strength"),
        "ss_ip_noise_gamma_random_strength": g("ip_noise_gamma_random_strength"),
        "ss_loss_type": g("loss_type"),
        "ss_huber_schedule": g("huber_schedule"),
        "ss_huber_scale": g("huber_scale"),
        "ss_huber_c": g("huber_c"),
        "ss_fp8_base": bool(g("fp8_base", False)),
        "ss_fp8_base_unet": bool(g("fp8_base_unet", False)),
        "ss_validation_seed": g("validation_seed"),
        "ss_validation_split": g("validation_split"),
        "ss_max_validation_steps": g("max_validation_steps"),
        "ss_validate_every_n_epochs": g("validate_every_n_epochs"),
        "ss_validate_every_n_steps": g("validate_every_n_steps"),
        "ss_resize_interpolation": g("resize_interpolation"),
    }
    tag_frequency = group.tag_frequency()
    if g("dataset_config"):
        md["ss_datasets"] = json.dumps([_ss_dataset(d) for d in group.datasets])
        md["ss_tag_frequency"] = json.dumps(tag_frequency)
        md["ss_dataset_dirs"] = json.dumps(_dir_counts(group, reg=False))
    else:
        d = group.datasets[0]
        p = d.params
        s = d.subsets[0] if d.subsets else None
        md.update({
            "ss_batch_size_per_device": p.batch_size,
            "ss_total_batch_size": p.batch_size * num_processes * int(g("gradient_accumulation_steps", 1) or 1),
            "ss_resolution": tuple(p.resolution) if p.resolution else None,
            "ss_color_aug": getattr(s, "color_aug", g("color_aug")),
            "ss_flip_aug": getattr(s, "flip_aug", g("flip_aug")),
            "ss_random_crop": getattr(s, "random_crop", g("random_crop")),
            "ss_shuffle_caption": getattr(s, "shuffle_caption", g("shuffle_caption")),
            "ss_keep_tokens": getattr(s, "keep_tokens", g("keep_tokens")),
            "ss_enable_bucket": p.enable_bucket,
            "ss_bucket_no_upscale": p.bucket_no_upscale,
            "ss_min_bucket_reso": p.min_bucket_reso,
            "ss_max_bucket_reso": p.max_bucket_reso,
            "ss_dataset_dirs": json.dumps(_dir_counts(group, reg=False)),
            "ss_reg_dataset_dirs": json.dumps(_dir_counts(group, reg=True)),
            "ss_tag_frequency": json.dumps(tag_frequency),
            "ss_bucket_info": json.dumps(_bucket_info(d)),
        })
    if network_args:
        md["ss_network_args"] = json.dumps(network_args)
    md.update(model_file_keys(g("pretrained_model_name_or_path"), "ss_sd_model_name", "ss_sd_model_hash", "ss_new_sd_model_hash"))
    md.update(model_file_keys(g("vae"), "ss_vae_name", "ss_vae_hash", "ss_new_vae_hash"))
    return {k: (v if isinstance(v, str) else str(v)) for k, v in md.items()}


def for_save(base: dict[str, str], *, step: int, epoch: int, modelspec: dict[str, str], no_metadata: bool) -> dict[str, str]:
    """The metadata of one saved file: base + save-time keys + modelspec (minimum set with --no_metadata)."""
    md = dict(base)
    md.update({"ss_training_finished_at": str(time.time()), "ss_steps": str(step), "ss_epoch": str(epoch)})
    if no_metadata:
        md = {k: v for k, v in md.items() if k in MINIMUM_KEYS}
    md.update(modelspec)
    return md
