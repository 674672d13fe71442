"""Everything between the user's image folders and a training batch.

Modules (one idea each):

* ``discovery``      -- images, ``<N>_<name>`` folders, caption files, image sizes,
                        ``metadata_cache.json``, fine-tuning metadata JSON/JSONL
* ``captions``       -- caption options in their documented order; weighted-caption parser
* ``buckets``        -- bucket lists, assignment, crop geometry, per-epoch batches
* ``config_schema``  -- dataset TOML/JSON validation (voluptuous) and the fallback chain
* ``datasets``       -- DreamBooth / fine-tuning / ControlNet datasets and ``DatasetGroup``
* ``image_loading``  -- decode, resize, trim, flip, colour augmentation, face crops, masks
* ``latent_cache``   -- ``.npz`` names, fast validity checks, atomic writes, caching pipeline
* ``text_encoder_cache`` -- the per-architecture text-encoder caching strategy
* ``loader``         -- deterministic, resumable DataLoader wrapper
* ``cache_tools`` / ``metadata_tools`` -- glue for tools/ and finetune/ scripts

Importing any of them does not import torch.

Interface for trainers
----------------------

Build::

    from library.data.config_schema import SchemaSupport
    from library.data.datasets import build_from_args
    train, val = build_from_args(args, SchemaSupport(dreambooth=True, finetuning=True,
                                                     controlnet=args.masked_loss, dropout=True))

``train`` is a :class:`~library.data.datasets.DatasetGroup` (``val`` one too, or None when
no dataset has ``validation_split``). All user-input errors (TOML, folders, captions,
images, metadata) are raised here as ``UserInputError`` -- before any model loads.

Caching (optional, before training)::

    from library.data.latent_cache import LATENT_FORMATS   # or the architecture's format
    train.cache_latents(encode, LATENT_FORMATS["sdxl"], to_disk=args.cache_latents_to_disk,
                        batch_size=args.vae_batch_size, skip_cache_check=args.skip_cache_check,
                        process_index=rank, num_processes=world)      # then a barrier
    train.cache_text_encoder_outputs(strategy, to_disk=..., batch_size=...)

``encode(images)`` gets float32 (B, 3, H, W) in [-1, 1] on the CPU and returns the latents
the cache stores (moving to the device and dtype is up to it). ``strategy`` is a
:class:`~library.data.text_encoder_cache.TextEncoderCacheStrategy` from the architecture.

Each step::

    from library.data.loader import ResumableLoader, resume_position, worker_count
    train.set_max_train_steps(max_train_steps)          # token warm-up given as a fraction
    train.set_tokenize_fn(lambda caps: arch.tokenize(tok, caps))   # optional, runs in workers
    loader = ResumableLoader(train, seed, worker_count(args.max_data_loader_n_workers),
                             args.persistent_data_loader_workers,
                             gradient_accumulation_steps=args.gradient_accumulation_steps)
    loader.set_position(*resume_position(args.initial_step, args.initial_epoch, len(loader),
                                         args.gradient_accumulation_steps,
                                         args.skip_until_initial_step)[:2])
    for epoch in range(loader.epoch, num_epochs + 1):
        for batch in loader.iter_epoch(epoch): ...

A batch is a dict:

=====================  ===============================================================
``images``             float (B, 3, H, W) in [-1, 1], or None when latents are cached
``latents``            float (B, C, H/8, W/8) as cached, or None
``captions``           list[str] (processed; raw fixed caption with cached TE outputs)
``input_ids``          ``tokenize_fn(captions)`` or None
``text_encoder_outputs`` dict key -> (B, ...) tensors when TE outputs are cached, else None
``loss_weights``       float (B,): ``prior_loss_weight`` for regularisation images, else 1
``is_reg``             list[bool]
``original_sizes_hw``  long (B, 2) original (height, width)
``crop_top_lefts``     long (B, 2) (top, left) for SDXL conditioning (flip-aware)
``target_sizes_hw``    long (B, 2) bucket (height, width)
``flippeds``           list[bool]
``alpha_masks``        float (B, H, W) in [0, 1] when a subset uses ``alpha_mask``, else None
``conditioning_images`` float (B, 3, H, W) in [-1, 1] for ControlNet / ``--masked_loss``
                       datasets (mask = red channel mapped to [0, 1]), else None
``network_multipliers`` float (B,) from the dataset's ``network_multiplier``
``custom_attributes``  list[dict] from the subset's ``custom_attributes``
``image_keys`` / ``absolute_paths``  list[str]
=====================  ===============================================================

Group helpers: ``len(group)`` (batches per epoch), ``num_train_images``,
``num_reg_images``, ``tag_frequency()`` (for ``ss_tag_frequency``), ``describe()``
(for ``ss_datasets``), ``set_current_epoch/step`` (used when indexing with an int; the
loader passes the exact (index, epoch, step) key instead).
"""
