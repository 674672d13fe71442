"""The datasets: DreamBooth folders, fine-tuning metadata, ControlNet/mask pairs.

A dataset (one ``[[datasets]]`` entry) discovers its images once at construction --
paths, captions, original sizes -- assigns every image to a bucket and then serves
*batches*: ``dataset[i]`` is the i-th batch of the current epoch, already collated.
:class:`DatasetGroup` concatenates several datasets (different resolutions or batch
sizes in one run).

Randomness is a pure function of ``(seed, dataset index, epoch, batch index)``: bucket
contents and batch order are shuffled with ``Random(seed + epoch)``, and flips, crops,
colour augmentation and caption randomness of a batch come from a generator seeded with
that tuple. A batch is therefore identical whichever DataLoader worker builds it and
whether or not training was resumed -- the loader passes ``(index, epoch, step)`` keys.

See ``library/data/__init__.py`` for the interface the trainers use.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import random
from bisect import bisect_right
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np

from library.data import discovery
from library.data.buckets import BucketManager, compute_crop_ltrb
from library.data.captions import count_tags, fixed_caption, process_caption, resolve_token_warmup_step
from library.data.config_schema import DatasetParams, SchemaSupport, SubsetParams, blueprint_from_args
from library.errors import UserInputError

logger = logging.getLogger(__name__)

__all__ = [
    "ImageEntry",
    "BaseDataset",
    "DreamBoothDataset",
    "FineTuningDataset",
    "ControlNetDataset",
    "DatasetGroup",
    "build_dataset",
    "build_dataset_groups",
    "build_from_args",
    "check_caching_compatibility",
]


class ImageEntry:
    """One image of a dataset (shared by all its repeats)."""

    __slots__ = (
        "path", "caption", "subset", "is_reg", "num_repeats", "size", "bucket", "resized_size",
        "cond_path", "latents_npz", "latents", "latents_flipped", "alpha_mask",
        "te_npz", "te_outputs", "te_caption",
    )

    def __init__(self, path: str, caption: str, subset: int, is_reg: bool, num_repeats: int, size: tuple[int, int]):
        self.path = path
        self.caption = caption
        self.subset = subset
        self.is_reg = is_reg
        self.num_repeats = num_repeats
        self.size = size  # original (width, height)
        self.bucket: tuple[int, int] = (0, 0)
        self.resized_size: tuple[int, int] = (0, 0)
        self.cond_path: Optional[str] = None
        self.latents_npz: Optional[str] = None
        self.latents = None
        self.latents_flipped = None
        self.alpha_mask = None
        self.te_npz: Optional[str] = None
        self.te_outputs: Optional[dict] = None
        self.te_caption: Optional[str] = None

    def __repr__(self) -> str:
        return f"ImageEntry({self.path!r}, caption={self.caption!r}, repeats={self.num_repeats}, size={self.size})"


def _warn_list(items: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(os.path.basename(p) for p in items[:limit])
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return shown + more


class BaseDataset:
    """Shared machinery; subclasses implement :meth:`_load` (fill ``self.entries``)."""

    kind = "base"

    def __init__(self, params: DatasetParams, seed: int = 0, split: str = "all", dataset_index: int = 0):
        self.params = params
        self.subsets: list[SubsetParams] = list(params.subsets)
        self.seed = int(seed)
        self.split = split  # "all", "train" or "validation"
        self.dataset_index = dataset_index
        self.batch_size = params.batch_size
        self.resolution = params.resolution
        self.where = params.where
        self.entries: list[ImageEntry] = []
        self.current_epoch = 1
        self.current_step = 0
        self.max_train_steps: Optional[int] = None
        self.latent_format = None
        self.latents_cached = False
        self.te_strategy = None
        self.te_cached = False
        self.empty_te_outputs: Optional[dict] = None
        self.tokenize_fn: Optional[Callable[[list[str]], Any]] = None
        self._caption_opts = [s.caption_options() for s in self.subsets]
        self._load()
        if not self.entries:
            sources = ", ".join(s.image_dir or s.metadata_file or "?" for s in self.subsets) or "(no subsets)"
            if split == "validation":
                logger.warning("%s: the validation split is empty", self.where)
            else:
                raise UserInputError(f"{self.where}: no training images found in {sources}")
        self.bucket_manager = self._make_buckets()

    # ---- discovery helpers ------------------------------------------------------------
    def _load(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _split_items(self, subset: SubsetParams, items: list) -> list:
        """Apply the validation split to one subset's image list."""
        split = self.params.validation_split
        if self.split == "all" or split <= 0:
            return items
        if subset.is_reg:
            return items if self.split == "train" else []
        seed = self.params.validation_seed if self.params.validation_seed is not None else self.seed
        order = list(range(len(items)))
        random.Random(seed).shuffle(order)
        n_train = math.ceil(len(items) * (1 - split))
        chosen = set(order[:n_train] if self.split == "train" else order[n_train:])
        return [item for i, item in enumerate(items) if i in chosen]

    def _repeats(self, subset: SubsetParams) -> int:
        return 1 if self.split == "validation" else subset.num_repeats

    def _discover_folder(self, subset: SubsetParams, class_tokens: Optional[str]) -> list[tuple[str, str, tuple[int, int]]]:
        """(path, caption, size) of every image in a subset's ``image_dir``."""
        folder = subset.image_dir
        if subset.cache_info:
            cached = discovery.read_metadata_cache(folder)
            if cached is not None:
                return [(p, str(cached[p].get("caption", "")), tuple(cached[p]["resolution"])) for p in sorted(cached)]
        listing = discovery.scan_folder(folder, f"{subset.where}: image_dir")
        if not listing.images:
            logger.warning("%s: no images in %s (supported: %s)", subset.where, folder,
                           " ".join(sorted(discovery.image_extensions())))
            return []
        cache_sizes = discovery.sizes_from_cache_names(listing.names)
        out = []
        missing: list[str] = []
        for path in listing.images:
            caption_file = discovery.find_caption_file(path, subset.caption_extension, listing.names)
            if caption_file is not None:
                caption = discovery.read_caption_file(caption_file, subset.enable_wildcard)
            else:
                caption = class_tokens or ""
                missing.append(path)
            stem = os.path.splitext(os.path.basename(path))[0]
            size = cache_sizes.get(stem) or discovery.probe_image(path)
            out.append((path, caption, size))
        if missing:
            if not class_tokens:
                logger.warning(
                    "%s: %d image(s) in %s have no caption file (%s) and there are no class_tokens, so they train "
                    "with an empty caption: %s",
                    subset.where, len(missing), folder, subset.caption_extension, _warn_list(missing),
                )
            elif len(missing) < len(out):
                logger.warning(
                    "%s: %d of %d image(s) in %s have no caption file (%s); using the class tokens '%s' for: %s",
                    subset.where, len(missing), len(out), folder, subset.caption_extension, class_tokens,
                    _warn_list(missing),
                )
            else:
                logger.info("%s: no caption files (%s) in %s; using the class tokens '%s'",
                            subset.where, subset.caption_extension, folder, class_tokens)
        if subset.cache_info:
            discovery.write_metadata_cache(
                folder, {p: {"caption": c, "resolution": [s[0], s[1]]} for p, c, s in out}
            )
        return out

    # ---- buckets ---------------------------------------------------------------------
    def _make_buckets(self) -> BucketManager:
        p = self.params
        bm = BucketManager(p.resolution, p.enable_bucket, p.min_bucket_reso, p.max_bucket_reso,
                           p.bucket_reso_steps, p.bucket_no_upscale, where=f"{self.where}: ")
        for subset in self.subsets:
            if subset.face_crop_aug_range and p.enable_bucket:
                logger.warning("%s: face_crop_aug_range is ignored when enable_bucket is on", subset.where)
        errors = 0.0
        for idx, e in enumerate(self.entries):
            try:
                e.bucket, e.resized_size, ar_error = bm.select(e.size[0], e.size[1])
            except ValueError as err:
                raise UserInputError(f"{e.path}: {err}") from None
            errors += ar_error
            bm.add(e.bucket, idx, e.num_repeats)
        bm.mean_ar_error = errors / len(self.entries) if self.entries else 0.0
        if self.entries:
            logger.info("%s", bm.table())
        return bm

    # ---- epoch / step --------------------------------------------------------------
    def set_current_epoch(self, epoch: int) -> None:
        self.current_epoch = epoch

    def set_current_step(self, step: int) -> None:
        self.current_step = step

    def set_max_train_steps(self, max_train_steps: int) -> None:
        self.max_train_steps = max_train_steps

    def set_tokenize_fn(self, fn: Optional[Callable[[list[str]], Any]]) -> None:
        """Tokenise captions inside the batch (in DataLoader workers): ``batch["input_ids"] = fn(captions)``."""
        self.tokenize_fn = fn

    # ---- sizes ----------------------------------------------------------------------
    def __len__(self) -> int:
        return self.bucket_manager.num_batches(self.batch_size)

    @property
    def num_train_images(self) -> int:
        """Training samples per epoch (repeats counted), regularisation excluded."""
        return sum(e.num_repeats for e in self.entries if not e.is_reg)

    @property
    def num_reg_images(self) -> int:
        return sum(e.num_repeats for e in self.entries if e.is_reg)

    def batch_entries(self, index: int, epoch: Optional[int] = None) -> tuple[tuple[int, int], list[ImageEntry]]:
        """(bucket, entries) of batch ``index`` in ``epoch`` -- without loading anything."""
        epoch = self.current_epoch if epoch is None else epoch
        bucket, items = self.bucket_manager.epoch_batches(self.batch_size, self.seed, epoch)[index]
        return bucket, [self.entries[i] for i in items]

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """``{subset folder or metadata name: {tag: count}}`` for ``ss_tag_frequency``."""
        out: dict[str, dict[str, int]] = {}
        for si, subset in enumerate(self.subsets):
            counts = count_tags(e.caption for e in self.entries if e.subset == si)
            name = subset.source_name
            merged = out.setdefault(name, {})
            for k, v in counts.items():
                merged[k] = merged.get(k, 0) + v
        return out

    # ---- batches ---------------------------------------------------------------------
    def __getitem__(self, key) -> dict:
        if isinstance(key, tuple):
            index, epoch, step = key
        else:
            index, epoch, step = int(key), self.current_epoch, self.current_step
        batches = self.bucket_manager.epoch_batches(self.batch_size, self.seed, epoch)
        if not 0 <= index < len(batches):
            raise IndexError(f"batch {index} out of range (dataset has {len(batches)} batches)")
        bucket, items = batches[index]
        rng = random.Random(f"{self.seed}:{self.dataset_index}:{epoch}:{index}")
        samples = [self._make_sample(self.entries[i], bucket, rng, epoch, step) for i in items]
        return self._collate(samples, bucket)

    def _make_sample(self, e: ImageEntry, bucket: tuple[int, int], rng: random.Random, epoch: int, step: int) -> dict:
        from library.data import image_loading as il

        subset = self.subsets[e.subset]
        flipped = subset.flip_aug and rng.random() < 0.5
        sample: dict[str, Any] = {"entry": e, "flipped": flipped, "image": None, "latents": None,
                                  "alpha_mask": None, "cond": None}
        if e.latents is not None or e.latents_npz is not None:
            if e.latents is not None:
                lat = e.latents_flipped if flipped else e.latents
                if lat is None:
                    raise RuntimeError(f"{e.path}: flipped latents were not cached")
                sample["latents"] = lat
                if subset.alpha_mask and e.alpha_mask is not None:
                    sample["alpha_mask"] = e.alpha_mask[:, ::-1].copy() if flipped else e.alpha_mask
            else:
                from library.data.latent_cache import load_latent_cache

                data = load_latent_cache(e.latents_npz, bucket, self.latent_format, flipped, subset.alpha_mask)
                sample["latents"] = data["latents"]
                sample["alpha_mask"] = data.get("alpha_mask")
        else:
            img = il.load_image(e.path, with_alpha=subset.alpha_mask)
            face = None
            if subset.face_crop_aug_range and not self.params.enable_bucket:
                face = il.parse_face_info(e.path)
            if face is not None:
                img = il.face_crop(img, face, subset.face_crop_aug_range, bucket, subset.random_crop, rng,
                                   self._interp(subset))
            elif (subset.random_crop and not self.params.enable_bucket
                  and img.shape[1] >= bucket[0] and img.shape[0] >= bucket[1]):
                img = il.random_window(img, bucket, rng)
            else:
                img, _ = il.resize_and_trim(img, bucket, e.resized_size, subset.random_crop, rng, self._interp(subset))
            if flipped:
                img = il.flip_horizontal(img)
            if subset.alpha_mask:
                if img.shape[-1] == 4:
                    sample["alpha_mask"] = il.alpha_to_mask(img[..., 3])
                else:
                    sample["alpha_mask"] = np.ones(img.shape[:2], np.float32)
                img = img[..., :3]
            if subset.color_aug:
                img = il.color_augment(img, rng)
            sample["image"] = img
        if e.cond_path is not None:
            cond = il.load_image(e.cond_path)
            cond, _ = il.resize_and_trim(cond, bucket, e.resized_size, False, None, self._interp(subset))
            sample["cond"] = il.flip_horizontal(cond) if flipped else cond
        opts = self._caption_opts[e.subset]
        if self.te_cached:
            dropped = (opts.caption_dropout_rate > 0 and rng.random() < opts.caption_dropout_rate) or (
                opts.caption_dropout_every_n_epochs > 0 and epoch % opts.caption_dropout_every_n_epochs == 0
            )
            if dropped and self.empty_te_outputs is not None:
                sample["caption"], sample["te"] = "", self.empty_te_outputs
            else:
                sample["caption"] = e.te_caption if e.te_caption is not None else e.caption
                sample["te"] = e.te_outputs if e.te_outputs is not None else self.te_strategy.load(e.te_npz)
        else:
            warmup = resolve_token_warmup_step(opts.token_warmup_step, self.max_train_steps)
            sample["caption"] = process_caption(e.caption, opts, rng, epoch, step, warmup)
            sample["te"] = None
        return sample

    def _interp(self, subset: SubsetParams) -> Optional[str]:
        return subset.resize_interpolation or self.params.resize_interpolation

    def _collate(self, samples: list[dict], bucket: tuple[int, int]) -> dict:
        import torch

        entries: list[ImageEntry] = [s["entry"] for s in samples]
        bw, bh = bucket
        batch: dict[str, Any] = {
            "captions": [s["caption"] for s in samples],
            "image_keys": [e.path for e in entries],
            "absolute_paths": [os.path.abspath(e.path) for e in entries],
            "is_reg": [e.is_reg for e in entries],
            "flippeds": [s["flipped"] for s in samples],
            "loss_weights": torch.tensor(
                [self.params.prior_loss_weight if e.is_reg else 1.0 for e in entries], dtype=torch.float32
            ),
            "network_multipliers": torch.full((len(samples),), float(self.params.network_multiplier)),
            "original_sizes_hw": torch.tensor([[e.size[1], e.size[0]] for e in entries], dtype=torch.long),
            "target_sizes_hw": torch.tensor([[bh, bw]] * len(samples), dtype=torch.long),
            "custom_attributes": [self.subsets[e.subset].custom_attributes for e in entries],
            "images": None,
            "latents": None,
            "alpha_masks": None,
            "conditioning_images": None,
            "text_encoder_outputs": None,
            "input_ids": None,
        }
        from library.data.image_loading import crop_top_left

        batch["crop_top_lefts"] = torch.tensor(
            [crop_top_left(compute_crop_ltrb(bucket, e.size), bw, s["flipped"]) for e, s in zip(entries, samples)],
            dtype=torch.long,
        )
        has_lat = [s["latents"] is not None for s in samples]
        if all(has_lat):
            batch["latents"] = torch.stack([torch.as_tensor(np.asarray(s["latents"])) for s in samples]).float()
        elif any(has_lat):
            raise RuntimeError("a batch mixes cached latents and images; cache all subsets of a dataset")
        else:
            imgs = np.stack([s["image"] for s in samples])
            batch["images"] = torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        if any(self.subsets[e.subset].alpha_mask for e in entries):
            masks = [s["alpha_mask"] if s["alpha_mask"] is not None else np.ones((bh, bw), np.float32) for s in samples]
            batch["alpha_masks"] = torch.from_numpy(np.stack(masks)).float()
        if any(s["cond"] is not None for s in samples):
            conds = np.stack([s["cond"] for s in samples])
            batch["conditioning_images"] = torch.from_numpy(conds).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        if any(s["te"] is not None for s in samples):
            keys = samples[0]["te"].keys()
            batch["text_encoder_outputs"] = {
                k: torch.stack([torch.as_tensor(np.asarray(s["te"][k])) for s in samples]) for k in keys
            }
        elif self.tokenize_fn is not None:
            batch["input_ids"] = self.tokenize_fn(batch["captions"])
        return batch

    # ---- caching ----------------------------------------------------------------------
    def latent_jobs(self, fmt, to_disk: bool, skip_cache_check: bool = False,
                    process_index: int = 0, num_processes: int = 1) -> list:
        """Caching work for this dataset; valid disk caches are skipped (and used)."""
        from library.data.latent_cache import LatentJob, is_latent_cache_valid, latent_cache_path

        self.latent_format = fmt
        jobs = []
        folder_names: dict[str, frozenset] = {}
        for i, e in enumerate(self.entries):
            subset = self.subsets[e.subset]
            npz = None
            if to_disk:
                folder = os.path.dirname(e.path)
                if fmt.legacy_stem_npz and folder not in folder_names:
                    try:
                        folder_names[folder] = frozenset(os.listdir(folder))
                    except OSError:
                        folder_names[folder] = frozenset()
                npz = latent_cache_path(e.path, e.size, fmt, folder_names.get(folder))
                e.latents_npz = npz
                if is_latent_cache_valid(npz, e.bucket, fmt, subset.flip_aug, subset.alpha_mask, skip_cache_check):
                    continue
                if i % num_processes != process_index:
                    continue
            jobs.append(LatentJob(e.path, e.bucket, e.resized_size, e.size, subset.flip_aug, subset.alpha_mask,
                                  self._interp(subset), npz, tag=e))
        return jobs

    def describe(self) -> dict:
        """A summary for logs and training metadata."""
        p = self.params
        return {
            "kind": self.kind,
            "resolution": list(p.resolution),
            "batch_size": p.batch_size,
            "enable_bucket": p.enable_bucket,
            "min_bucket_reso": p.min_bucket_reso,
            "max_bucket_reso": p.max_bucket_reso,
            "bucket_reso_steps": p.bucket_reso_steps,
            "bucket_no_upscale": p.bucket_no_upscale,
            "num_train_images": self.num_train_images,
            "num_reg_images": self.num_reg_images,
            "buckets": {f"{w}x{h}": len(v) for (w, h), v in self.bucket_manager.sorted_buckets()},
            "subsets": [
                {"image_dir": s.image_dir, "metadata_file": s.metadata_file, "num_repeats": s.num_repeats,
                 "is_reg": s.is_reg, "class_tokens": s.class_tokens, "caption_extension": s.caption_extension,
                 "shuffle_caption": s.shuffle_caption, "keep_tokens": s.keep_tokens, "flip_aug": s.flip_aug,
                 "color_aug": s.color_aug, "random_crop": s.random_crop, "alpha_mask": s.alpha_mask,
                 "img_count": sum(1 for e in self.entries if e.subset == i)}
                for i, s in enumerate(self.subsets)
            ],
        }


class DreamBoothDataset(BaseDataset):
    """Image folders with caption files; regularisation subsets are interleaved."""

    kind = "dreambooth"

    def _load(self) -> None:
        train: list[ImageEntry] = []
        reg: list[ImageEntry] = []
        for si, subset in enumerate(self.subsets):
            found = self._split_items(subset, self._discover_folder(subset, subset.class_tokens))
            repeats = self._repeats(subset)
            target = reg if subset.is_reg else train
            for path, caption, size in found:
                target.append(ImageEntry(path, caption, si, subset.is_reg, repeats, size))
        self.entries = train + self._interleave_reg(train, reg)

    def _interleave_reg(self, train: list[ImageEntry], reg: list[ImageEntry]) -> list[ImageEntry]:
        """Use regularisation images until their repeat-weighted count matches the training images."""
        if not reg:
            return []
        n_train = sum(e.num_repeats for e in train)
        if n_train == 0:
            return []
        chosen: list[ImageEntry] = []
        n_reg = 0
        i = 0
        first_round = True
        while n_reg < n_train:
            e = reg[i]
            if first_round:
                chosen.append(e)
                n_reg += e.num_repeats
            else:
                e.num_repeats += 1
                n_reg += 1
            i += 1
            if i == len(reg):
                i = 0
                first_round = False
        logger.info("%s: %d training samples per epoch, %d regularisation samples from %d of %d reg images",
                    self.where, n_train, n_reg, len(chosen), len(reg))
        return chosen


class ControlNetDataset(BaseDataset):
    """Image folders paired with same-stem images in ``conditioning_data_dir`` (ControlNet or loss masks)."""

    kind = "controlnet"

    def _load(self) -> None:
        cond_maps: dict[str, dict[str, list[str]]] = {}
        used: dict[str, set[str]] = {}
        for si, subset in enumerate(self.subsets):
            cdir = subset.conditioning_data_dir
            if cdir not in cond_maps:
                listing = discovery.scan_folder(cdir, f"{subset.where}: conditioning_data_dir")
                stems: dict[str, list[str]] = {}
                for p in listing.images:
                    stems.setdefault(os.path.splitext(os.path.basename(p))[0], []).append(p)
                cond_maps[cdir] = stems
                used[cdir] = set()
            stems = cond_maps[cdir]
            found = self._discover_folder(subset, subset.class_tokens)
            missing, ambiguous, mismatched = [], [], []
            pairs = []
            for path, caption, size in found:
                stem = os.path.splitext(os.path.basename(path))[0]
                used[cdir].add(stem)
                cands = stems.get(stem, [])
                if not cands:
                    missing.append(path)
                    continue
                if len(cands) > 1:
                    ambiguous.append(stem)
                    continue
                csize = discovery.probe_image(cands[0])
                if csize != tuple(size):
                    mismatched.append(f"{os.path.basename(cands[0])} {csize[0]}x{csize[1]} vs {size[0]}x{size[1]}")
                pairs.append((path, caption, size, cands[0]))
            if missing:
                raise UserInputError(
                    f"{subset.where}: {len(missing)} image(s) have no conditioning image with the same name in "
                    f"{cdir}: {_warn_list(missing)}"
                )
            if ambiguous:
                raise UserInputError(
                    f"{subset.where}: several conditioning images in {cdir} share a name: {', '.join(ambiguous[:5])}"
                )
            if mismatched:
                raise UserInputError(
                    f"{subset.where}: conditioning images must have the same size as their training image: "
                    f"{'; '.join(mismatched[:5])}"
                )
            repeats = self._repeats(subset)
            for path, caption, size, cpath in self._split_items(subset, pairs):
                e = ImageEntry(path, caption, si, False, repeats, size)
                e.cond_path = cpath
                self.entries.append(e)
        for cdir, stems in cond_maps.items():
            extra = sorted(set(stems) - used[cdir])
            if extra:
                raise UserInputError(
                    f"{self.where}: {len(extra)} conditioning image(s) in {cdir} have no training image with the "
                    f"same name: {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}"
                )


class FineTuningDataset(BaseDataset):
    """Images listed in a metadata JSON/JSONL with captions and tags."""

    kind = "finetuning"

    def _load(self) -> None:
        self._size_cache: dict[str, dict[str, tuple[int, int]]] = {}
        listings: dict[str, Optional[discovery.FolderListing]] = {}

        def listing(folder: str) -> Optional[discovery.FolderListing]:
            if folder not in listings:
                try:
                    listings[folder] = discovery.scan_folder(folder)
                except UserInputError:
                    listings[folder] = None
            return listings[folder]

        for si, subset in enumerate(self.subsets):
            meta = discovery.read_metadata_file(subset.metadata_file)
            image_dir = subset.image_dir
            stem_map: Optional[dict[str, str]] = None
            found: list[tuple[str, str, tuple[int, int]]] = []
            missing: list[str] = []
            empty: list[str] = []
            for key, info in meta.items():
                path = key if (os.path.isabs(key) or not image_dir) else os.path.join(image_dir, key)
                folder, name = os.path.split(path)
                lst = listing(folder or ".")
                if lst is None or name not in lst.names:
                    # keys written as bare stems by merge_*_to_metadata without --full_path
                    if image_dir and stem_map is None:
                        lst_dir = listing(image_dir)
                        stem_map = {}
                        if lst_dir is not None:
                            for p in lst_dir.images:
                                stem_map.setdefault(os.path.splitext(os.path.basename(p))[0], p)
                    resolved = stem_map.get(key) if stem_map else None
                    if resolved is None:
                        missing.append(key)
                        continue
                    path = resolved
                    folder = os.path.dirname(path)
                    lst = listing(folder)
                caption = self._assemble_caption(info, subset)
                if not caption:
                    empty.append(path)
                size = info.get("image_size")
                if (isinstance(size, (list, tuple)) and len(size) == 2
                        and all(isinstance(v, int) and v > 0 for v in size)):
                    size = (size[0], size[1])
                else:
                    stem = os.path.splitext(os.path.basename(path))[0]
                    cache_sizes = self._cache_sizes(folder, lst)
                    size = cache_sizes.get(stem) or discovery.probe_image(path)
                found.append((path, caption, size))
            if missing:
                where = f" (relative to {image_dir})" if image_dir else ""
                raise UserInputError(
                    f"metadata file {subset.metadata_file}: {len(missing)} listed image(s) not found{where}: "
                    f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
                )
            if empty:
                logger.warning("%s: %d image(s) in %s have neither caption nor tags: %s",
                               subset.where, len(empty), subset.metadata_file, _warn_list(empty))
            repeats = self._repeats(subset)
            for path, caption, size in self._split_items(subset, found):
                self.entries.append(ImageEntry(path, caption, si, False, repeats, size))

    def _cache_sizes(self, folder: str, lst) -> dict[str, tuple[int, int]]:
        """Sizes recovered from latent-cache names in ``folder`` (computed once per folder)."""
        if folder not in self._size_cache:
            self._size_cache[folder] = discovery.sizes_from_cache_names(lst.names) if lst is not None else {}
        return self._size_cache[folder]

    @staticmethod
    def _assemble_caption(info: dict, subset: SubsetParams) -> str:
        caption = info.get("caption") or ""
        tags = info.get("tags") or ""
        if not isinstance(caption, str) or not isinstance(tags, str):
            raise UserInputError(f"{subset.metadata_file}: 'caption' and 'tags' must be strings")
        sep = subset.caption_separator
        if subset.enable_wildcard:
            tags = tags.replace("\n", sep)
            if not caption:
                return tags
            lines = [line.strip() for line in caption.split("\n") if line.strip()]
            if tags:
                lines = [line + sep + tags for line in lines]
            return "\n".join(lines)
        caption = caption.strip()
        if caption and tags:
            return caption + sep + tags
        return caption or tags


_DATASET_CLASSES = {"dreambooth": DreamBoothDataset, "finetuning": FineTuningDataset, "controlnet": ControlNetDataset}


def build_dataset(params: DatasetParams, seed: int = 0, split: str = "all", dataset_index: int = 0) -> BaseDataset:
    return _DATASET_CLASSES[params.kind](params, seed, split, dataset_index)


class DatasetGroup:
    """Several datasets served as one sequence of batches (index = concatenation)."""

    def __init__(self, datasets: Sequence[BaseDataset]):
        self.datasets = list(datasets)
        self._offsets: list[int] = []
        self._refresh()

    def _refresh(self) -> None:
        total = 0
        self._offsets = []
        for d in self.datasets:
            self._offsets.append(total)
            total += len(d)
        self._len = total

    def __len__(self) -> int:
        return self._len

    def locate(self, index: int) -> tuple[BaseDataset, int]:
        if not 0 <= index < self._len:
            raise IndexError(f"batch {index} out of range (group has {self._len} batches)")
        di = bisect_right(self._offsets, index) - 1
        while len(self.datasets[di]) == 0:  # skip empty datasets sharing an offset
            di += 1
        return self.datasets[di], index - self._offsets[di]

    def __getitem__(self, key) -> dict:
        if isinstance(key, tuple):
            index, epoch, step = key
            dataset, local = self.locate(index)
            return dataset[(local, epoch, step)]
        dataset, local = self.locate(int(key))
        return dataset[local]

    # broadcast setters
    def set_current_epoch(self, epoch: int) -> None:
        for d in self.datasets:
            d.set_current_epoch(epoch)

    def set_current_step(self, step: int) -> None:
        for d in self.datasets:
            d.set_current_step(step)

    def set_max_train_steps(self, n: int) -> None:
        for d in self.datasets:
            d.set_max_train_steps(n)

    def set_tokenize_fn(self, fn) -> None:
        for d in self.datasets:
            d.set_tokenize_fn(fn)

    @property
    def num_train_images(self) -> int:
        return sum(d.num_train_images for d in self.datasets)

    @property
    def num_reg_images(self) -> int:
        return sum(d.num_reg_images for d in self.datasets)

    def entries(self) -> Iterable[ImageEntry]:
        for d in self.datasets:
            yield from d.entries

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for d in self.datasets:
            for name, counts in d.tag_frequency().items():
                merged = out.setdefault(name, {})
                for k, v in counts.items():
                    merged[k] = merged.get(k, 0) + v
        return out

    def describe(self) -> list[dict]:
        return [d.describe() for d in self.datasets]

    # ---- caching ----------------------------------------------------------------------
    def cache_latents(
        self,
        encode: Callable[[Any], Any],
        fmt,
        to_disk: bool = False,
        batch_size: int = 1,
        skip_cache_check: bool = False,
        num_workers: Optional[int] = None,
        process_index: int = 0,
        num_processes: int = 1,
        progress: bool = True,
    ) -> int:
        """Encode every image with ``encode(images in [-1, 1], (B, 3, H, W)) -> latents``.

        ``fmt`` is a :class:`~library.data.latent_cache.LatentCacheFormat`. With ``to_disk``
        latents go to ``.npz`` files (valid ones are reused; with several processes each
        caches every N-th image -- wait for all before training); otherwise they are kept
        in memory. Returns the number of images encoded by this process.
        """
        from library.data.latent_cache import run_latent_caching

        check_caching_compatibility(self, cache_latents=True)
        jobs = []
        for d in self.datasets:
            jobs += d.latent_jobs(fmt, to_disk, skip_cache_check, process_index, num_processes)
        n_entries = sum(len(d.entries) for d in self.datasets)
        logger.info("latent cache: %d of %d images need encoding", len(jobs), n_entries)

        def store(job, arrays):
            if to_disk:
                return
            import torch

            e: ImageEntry = job.tag
            e.latents = torch.from_numpy(arrays["latents"])
            if "latents_flipped" in arrays:
                e.latents_flipped = torch.from_numpy(arrays["latents_flipped"])
            if "alpha_mask" in arrays:
                e.alpha_mask = arrays["alpha_mask"]

        if num_workers is None:
            # one core stays with the encoder (torch's CPU threads spin when starved)
            num_workers = min(4, max(1, (os.cpu_count() or 2) - 1))
        done = run_latent_caching(jobs, encode, fmt, batch_size, num_workers, store, progress)
        for d in self.datasets:
            d.latents_cached = True
            d.latent_format = fmt
        return done

    def cache_text_encoder_outputs(
        self,
        strategy,
        to_disk: bool = False,
        batch_size: int = 1,
        skip_cache_check: bool = False,
        process_index: int = 0,
        num_processes: int = 1,
        progress: bool = True,
    ) -> int:
        """Encode every caption once with a :class:`TextEncoderCacheStrategy`.

        Captions are fixed for the run (prefix/suffix, secondary separator; a wildcard
        is expanded once per image). Caption dropout still works: the empty caption is
        encoded too and swapped in at batch time.
        """
        from library.data.text_encoder_cache import TextCacheJob, cache_text_encoder_outputs

        check_caching_compatibility(self, cache_text_encoder_outputs=True)
        jobs = []
        index = 0
        for d in self.datasets:
            for e in d.entries:
                opts = d._caption_opts[e.subset]
                e.te_caption = fixed_caption(e.caption, opts, random.Random(f"{d.seed}:{e.path}"))
                npz = strategy.cache_path(e.path) if to_disk else None
                e.te_npz = npz
                mine = (not to_disk) or index % num_processes == process_index
                index += 1
                if mine:
                    jobs.append(TextCacheJob(e.te_caption, npz, tag=e))

        def store(job, arrays):
            if not to_disk:
                job.tag.te_outputs = arrays

        done = cache_text_encoder_outputs(jobs, strategy, batch_size, skip_cache_check, store, progress)
        needs_empty = any(
            o.caption_dropout_rate > 0 or o.caption_dropout_every_n_epochs > 0
            for d in self.datasets for o in d._caption_opts
        )
        empty = None
        if needs_empty:
            holder: dict = {}
            cache_text_encoder_outputs([TextCacheJob("", None, tag=holder)], strategy, 1, False,
                                       lambda job, arrays: holder.update(arrays), False)
            empty = holder
        for d in self.datasets:
            d.te_strategy = strategy
            d.te_cached = True
            d.empty_te_outputs = empty
        return done


def check_caching_compatibility(group, cache_latents: bool = False, cache_text_encoder_outputs: bool = False) -> None:
    """Raise a UserInputError naming the subset when an option rules out the requested cache."""
    datasets = group.datasets if isinstance(group, DatasetGroup) else [group]
    for d in datasets:
        for s in d.subsets:
            if cache_latents:
                for opt in ("color_aug", "random_crop"):
                    if getattr(s, opt):
                        raise UserInputError(
                            f"{s.where}: {opt} changes the image every epoch, so latents cannot be cached; "
                            f"turn off {opt} or --cache_latents/--cache_latents_to_disk"
                        )
            if cache_text_encoder_outputs:
                reasons = []
                if s.shuffle_caption:
                    reasons.append("shuffle_caption")
                if s.token_warmup_step > 0:
                    reasons.append("token_warmup_step")
                if s.caption_tag_dropout_rate > 0:
                    reasons.append("caption_tag_dropout_rate")
                if reasons:
                    raise UserInputError(
                        f"{s.where}: {', '.join(reasons)} change the caption every step, so text-encoder outputs "
                        "cannot be cached; turn them off or drop --cache_text_encoder_outputs"
                    )


def build_dataset_groups(
    blueprint: Sequence[DatasetParams], seed: int = 0
) -> tuple[DatasetGroup, Optional[DatasetGroup]]:
    """Build the training group and, when any dataset has ``validation_split``, the validation group."""
    train, val = [], []
    for i, params in enumerate(blueprint):
        if params.validation_split > 0:
            train.append(build_dataset(params, seed, "train", i))
            vd = build_dataset(params, seed, "validation", i)
            if vd.entries:
                val.append(vd)
        else:
            train.append(build_dataset(params, seed, "all", i))
    return DatasetGroup(train), (DatasetGroup(val) if val else None)


def build_from_args(
    args: Any,
    support: SchemaSupport = SchemaSupport(),
    seed: Optional[int] = None,
    runtime: Optional[dict] = None,
    tokenizer: Any = None,
):
    """Datasets for a training run from parsed arguments (``--dataset_config`` or plain options).

    Returns ``(train_group, validation_group_or_None)``. ``--dataset_class`` builds the
    user's class as ``Class(tokenizer, max_token_length, resolution, debug_dataset)``
    and returns it as the training dataset.
    """
    if seed is None:
        seed = getattr(args, "seed", None)
    if seed is None:
        seed = random.SystemRandom().randint(0, 2**31 - 1)
        logger.info("no --seed given; using %d for dataset shuffling", seed)
    dataset_class = getattr(args, "dataset_class", None)
    if dataset_class:
        module_name, _, class_name = dataset_class.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError, ValueError) as e:
            raise UserInputError(f"--dataset_class {dataset_class}: cannot import it ({e})") from None
        from library.args.types import parse_resolution

        resolution = parse_resolution(args.resolution) if getattr(args, "resolution", None) else None
        return cls(tokenizer, getattr(args, "max_token_length", None), resolution,
                   getattr(args, "debug_dataset", False)), None
    blueprint = blueprint_from_args(args, support, runtime)
    return build_dataset_groups(blueprint, seed)

