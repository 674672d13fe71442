"""The network trainer shared by train_network.py and the *_train_network.py scripts.

Order of work (everything the user can get wrong is checked before any model loads):
  1. arguments: checks, seed, output folder, network module, optimizer name, resume folder;
  2. datasets (discovery, captions, buckets);
  3. models, through the architecture object (the trainer never branches on architecture);
  4. latent caching, network creation, optimizer and scheduler, accelerate;
  5. the loop: noise -> denoiser -> loss -> step, with saving, previews and validation;
  6. final save and a summary.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field

from library.errors import UserInputError
from library.training import checkpoints

logger = logging.getLogger(__name__)


@dataclass
class RunState:
    """Counters that must survive a resume."""

    epoch: int = 1  # epoch in progress (1-based)
    global_step: int = 0  # optimizer steps completed
    loader: dict = field(default_factory=dict)  # ResumableLoader position
    loss_history: list = field(default_factory=list)


class NetworkTrainer:
    """Subclasses (SDXL, FLUX, SD3) replace `architecture_class` and a few hooks.

    Everything that differs between architectures comes from the architecture object:
    `load_models` / `text_encoders(models)` / `load_tokenizers`, `tokenize_captions` (the
    dataset's token ids), `encode_batch` (text conditioning of a batch: token ids, weighted
    captions or cached text-encoder outputs), `text_encoder_cache_strategy`,
    `call_denoiser` (extra conditioning such as SDXL's sizes taken from the batch),
    `image_sampler_class` (previews), `modelspec_kwargs`, `check_model_path`,
    `bucket_reso_multiple`. The network module picks its targets and key prefixes from
    the U-Net it is given and the number of text encoders.
    """

    from library.arch.sd import SDArchitecture as architecture_class  # noqa: N811

    # ------------------------------------------------------------------ hooks
    def make_architecture(self, args):
        return self.architecture_class.from_args(args)

    def assert_extra_args(self, args) -> None:
        """Architecture-specific argument checks (before anything loads)."""

    # ------------------------------------------------------------------ checks
    def check_args(self, args) -> None:
        from library.args.checks import verify_training_args

        verify_training_args(args)
        if getattr(args, "network_train_unet_only", False) and getattr(args, "network_train_text_encoder_only", False):
            raise UserInputError("--network_train_unet_only and --network_train_text_encoder_only exclude each other")
        if not getattr(args, "output_dir", None):
            raise UserInputError("--output_dir is required")
        os.makedirs(args.output_dir, exist_ok=True)
        if not os.access(args.output_dir, os.W_OK):
            raise UserInputError(f"--output_dir {args.output_dir}: not writable")
        if not getattr(args, "pretrained_model_name_or_path", None):
            raise UserInputError("--pretrained_model_name_or_path is required")
        path = args.pretrained_model_name_or_path
        if not os.path.exists(path):
            raise UserInputError(f"--pretrained_model_name_or_path {path}: file or folder not found")
        if os.path.isfile(path):
            from library.io import safetensors_io

            if safetensors_io.is_safetensors_path(path):
                safetensors_io.read_header(path)  # truncated / foreign files fail here, not after minutes
        if getattr(args, "vae", None) and not os.path.exists(args.vae):
            raise UserInputError(f"--vae {args.vae}: file or folder not found")
        for w in getattr(args, "network_weights", None) and [args.network_weights] or []:
            if not os.path.exists(w):
                raise UserInputError(f"--network_weights {w}: file not found")
        for w in getattr(args, "base_weights", None) or []:
            if not os.path.exists(w):
                raise UserInputError(f"--base_weights {w}: file not found")
        if getattr(args, "resume", None):
            checkpoints.read_train_state(args.resume)
        if getattr(args, "sample_prompts", None) and not os.path.exists(args.sample_prompts):
            raise UserInputError(f"--sample_prompts {args.sample_prompts}: file not found")
        if getattr(args, "deepspeed", False):
            import importlib.util

            if importlib.util.find_spec("deepspeed") is None:
                raise UserInputError("--deepspeed: the deepspeed package is not installed (pip install deepspeed)")
        from library.training.model_options import check_attention_options

        check_attention_options(args)
        self.assert_extra_args(args)

    # ------------------------------------------------------------------ main
    def train(self, args) -> dict:
        """Run training; returns a summary dict (also printed)."""
        try:
            return self._train(args)
        finally:
            _release_accelerate_state()

    def _train(self, args) -> dict:
        # Captions are tokenized inside forked DataLoader workers: keep the tokenizers
        # library's own thread pool out of them (it warns, and competes for the cores).
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from library.log import setup_logging
        from library.training import network_setup, optimizers

        setup_logging(args)
        t_start = time.time()
        self.check_args(args)
        if args.seed is None:
            args.seed = random.SystemRandom().randint(0, 2**31 - 1)
            logger.info("no --seed given; using %d", args.seed)
        network_module = network_setup.import_network_module(args.network_module)
        net_kwargs = network_setup.network_kwargs(args)
        network_setup.check_network_kwargs(network_module, args.network_module, net_kwargs)
        optimizers.resolve_optimizer_class(args)  # unknown names fail before models load

        arch = self.make_architecture(args)
        self.check_architecture_args(args, arch)
        train_group, val_group = self.build_datasets(args, arch)

        import torch
        from accelerate.utils import set_seed

        accelerator = self.make_accelerator(args)
        set_seed(args.seed)
        is_main = accelerator.is_main_process
        weight_dtype = self.weight_dtype(args)

        # models
        t0 = time.time()
        # converted while reading, one tensor at a time: no second full-precision copy
        models = arch.load_models(args, dtype=weight_dtype, vae_dtype=torch.float32 if args.no_half_vae else weight_dtype)
        text_encoders = arch.text_encoders(models)
        vae, unet = models.vae, models.unet
        logger.info("models loaded in %.1f s", time.time() - t0)
        tokenizers = arch.load_tokenizers(args)
        denoiser = self.prepare_base_models(args, accelerator, unet, text_encoders, vae, weight_dtype)

        # data: latents and tokens
        self.cache_latents_if_requested(args, arch, accelerator, vae, train_group, val_group)
        te_cached = self.cache_text_encoder_outputs_if_requested(args, arch, accelerator, text_encoders, tokenizers,
                                                                 train_group, val_group)
        # weighted captions are tokenized with their weights at encode time; cached outputs need no tokens
        if not args.weighted_captions and not te_cached:
            tokenize = lambda caps: arch.tokenize_captions(tokenizers, caps, args.max_token_length)  # noqa: E731
            for g in (train_group, val_group):
                if g is not None:
                    g.set_tokenize_fn(tokenize)

        # network; third-party modules see the text encoders under their canonical
        # (`text_model.`) module names, so their files match every other tool's
        train_unet = not args.network_train_text_encoder_only
        train_te = not args.network_train_unet_only
        te_for_network = text_encoders
        if getattr(network_module, "ACCEPTED_ARGS", None) is None:
            from library.networks.discovery import plugin_view

            te_for_network = plugin_view(text_encoders)
        te_arg = te_for_network[0] if len(te_for_network) == 1 else te_for_network
        self.merge_base_weights(args, network_module, vae, te_arg, unet)
        network = self.create_network(args, network_module, net_kwargs, vae, te_for_network, unet)
        if args.scale_weight_norms and not hasattr(network, "apply_max_norm_regularization"):
            raise UserInputError(f"--scale_weight_norms: {args.network_module} does not support max-norm regularisation")
        network.apply_to(te_arg, unet, train_te, train_unet)
        if args.network_weights and not args.dim_from_weights:
            info = network.load_weights(args.network_weights)
            logger.info("loaded network weights from %s: %s", args.network_weights, info)
        if args.gradient_checkpointing:
            self.enable_gradient_checkpointing(args, unet, text_encoders, network)

        if vae is not None and not args.cache_latents:
            vae.to(accelerator.device, dtype=torch.float32 if args.no_half_vae else weight_dtype)
        if args.gradient_checkpointing:
            unet.train()  # diffusers only checkpoints in training mode
        if args.full_fp16 or args.full_bf16:
            network.to(weight_dtype)  # trained weights and their gradients in half precision too

        # optimizer and schedule
        te_lr = self.text_encoder_lr(args, network)
        if isinstance(te_lr, list):  # one learning rate per text encoder
            prepared = network.prepare_optimizer_params_with_multiple_te_lrs(te_lr, args.unet_lr, args.learning_rate)
        else:
            prepared = network.prepare_optimizer_params(te_lr, args.unet_lr, args.learning_rate)
        param_groups = prepared[0] if isinstance(prepared, tuple) else prepared
        if not param_groups:
            raise UserInputError("nothing to train: every parameter group has learning rate 0 (check --unet_lr/--text_encoder_lr)")
        optimizer_name, optimizer_args_str, optimizer = optimizers.get_optimizer(args, param_groups)

        from library.data.loader import ResumableLoader, worker_count

        loader = ResumableLoader(
            train_group, seed=args.seed, num_workers=worker_count(args.max_data_loader_n_workers),
            persistent_workers=args.persistent_data_loader_workers,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
        )
        num_processes = accelerator.num_processes
        batches_per_epoch = len(loader)
        if args.max_train_epochs:
            args.max_train_steps = optimizers.compute_max_train_steps(args, batches_per_epoch, num_processes)
        steps_per_epoch = math.ceil(batches_per_epoch / num_processes / args.gradient_accumulation_steps)
        num_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
        if args.save_n_epoch_ratio:
            args.save_every_n_epochs = max(1, num_epochs // args.save_n_epoch_ratio)
        train_group.set_max_train_steps(args.max_train_steps)
        scheduler = optimizers.get_scheduler(args, optimizer, num_processes)

        network, optimizer, scheduler = accelerator.prepare(network, optimizer, scheduler)
        net = accelerator.unwrap_model(network)
        if hasattr(net, "prepare_grad_etc"):
            net.prepare_grad_etc(te_arg, unet)
        network.train()

        # resume
        state = RunState()
        if args.resume:
            state = self.resume(args, accelerator, state, batches_per_epoch)
        elif args.initial_step is not None or args.initial_epoch is not None:
            from library.data.loader import resume_position

            epoch, batch, step = resume_position(args.initial_step, args.initial_epoch, batches_per_epoch,
                                                 args.gradient_accumulation_steps, args.skip_until_initial_step)
            state.epoch, state.global_step, state.loader = epoch, step, {"epoch": epoch, "batch": batch}
        if state.loader:
            loader.load_state_dict(state.loader)
        else:
            loader.set_position(state.epoch, 0)

        # metadata
        from library.training.metadata import build_training_metadata

        base_metadata = build_training_metadata(
            args, arch=arch, group=train_group, val_group=val_group, num_batches_per_epoch=batches_per_epoch,
            num_epochs=num_epochs, optimizer_name=optimizers.optimizer_metadata_string(optimizer_name, optimizer_args_str),
            text_encoder_lr=te_lr, network_args=net_kwargs if args.network_args else None, num_processes=num_processes,
        )
        if hasattr(arch, "training_metadata"):  # architecture keys, e.g. FLUX's ss_timestep_sampling
            base_metadata.update({k: v if isinstance(v, str) else str(v) for k, v in arch.training_metadata(args).items()})
        ctx = TrainContext(args, arch, accelerator, network, optimizer, scheduler, loader, train_group, val_group,
                           text_encoders, tokenizers, vae, unet, weight_dtype, base_metadata, state, num_epochs,
                           train_te, time.time(), te_for_network=te_arg, denoiser=denoiser)
        self.log_start(ctx, batches_per_epoch, steps_per_epoch)
        self.init_trackers(ctx)
        self.noise_setup(ctx)

        if args.sample_at_first and state.global_step == 0:
            self.sample_images(ctx, epoch=0, step=0)

        self.loop(ctx)

        # the end
        accelerator.wait_for_everyone()
        files = list(ctx.files_written)
        if is_main:
            files.append(self.save_network(ctx, checkpoints.last_name(args.output_name), state.epoch - 1 if state.epoch > num_epochs else state.epoch))
        if args.save_state or args.save_state_on_train_end:
            folder = os.path.join(args.output_dir, f"{checkpoints.last_name(args.output_name)}-state")
            self.save_state(ctx, folder)
            files.append(folder)
        accelerator.end_training()
        summary = self.summary(ctx, t_start, files)
        return summary

    # ------------------------------------------------------------------ pieces
    def prepare_base_models(self, args, accelerator, unet, text_encoders, vae, weight_dtype):
        """Frozen, on the device, in the compute dtype, with the chosen attention and storage.

        Runs before the network is created: the network hooks into these layers as they are.
        Returns the module to call as the denoiser (the U-Net, or its torch.compile wrapper).
        """
        from library.training import model_options

        for m in [unet, *text_encoders] + ([vae] if vae is not None else []):
            m.requires_grad_(False)
            m.eval()
        unet.to(accelerator.device, dtype=weight_dtype)
        for te in text_encoders:
            te.to(accelerator.device, dtype=weight_dtype)
        logger.info("U-Net attention: %s", model_options.set_attention(unet, args))
        if args.fp8_base or args.fp8_base_unet:
            model_options.store_weights_in_fp8(unet, weight_dtype)
            if args.fp8_base and not args.fp8_base_unet:
                for te in text_encoders:
                    model_options.store_weights_in_fp8(te, weight_dtype)
        if args.highvram:
            logger.info("--highvram: models stay on the device between phases")
        return model_options.compile_model(unet, args) if args.torch_compile else unet

    def enable_gradient_checkpointing(self, args, unet, text_encoders, network) -> None:
        """--gradient_checkpointing on the denoiser, the text encoders and the network."""
        unet.enable_gradient_checkpointing()
        for te in text_encoders:
            if te is not None:
                te.gradient_checkpointing_enable()
        if hasattr(network, "enable_gradient_checkpointing"):
            network.enable_gradient_checkpointing()

    def make_accelerator(self, args):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, ProjectConfiguration

        kwargs_handlers = []
        if args.ddp_timeout:
            import datetime

            kwargs_handlers.append(InitProcessGroupKwargs(timeout=datetime.timedelta(minutes=args.ddp_timeout)))
        if args.ddp_gradient_as_bucket_view or args.ddp_static_graph:
            kwargs_handlers.append(DistributedDataParallelKwargs(
                gradient_as_bucket_view=args.ddp_gradient_as_bucket_view, static_graph=args.ddp_static_graph))
        log_with = None
        logging_dir = None
        if args.logging_dir or args.log_with:
            log_with = {"tensorboard": "tensorboard", "wandb": "wandb", "all": "all", None: "tensorboard"}[args.log_with]
            logging_dir = args.logging_dir
            if log_with in ("tensorboard", "all") and not logging_dir:
                raise UserInputError("--log_with tensorboard needs --logging_dir")
        deepspeed_plugin = None
        if getattr(args, "deepspeed", False):
            from accelerate import DeepSpeedPlugin

            deepspeed_plugin = DeepSpeedPlugin(
                zero_stage=args.zero_stage, gradient_accumulation_steps=args.gradient_accumulation_steps,
                gradient_clipping=args.max_grad_norm, offload_optimizer_device=args.offload_optimizer_device,
                offload_optimizer_nvme_path=args.offload_optimizer_nvme_path, offload_param_device=args.offload_param_device,
                offload_param_nvme_path=args.offload_param_nvme_path, zero3_init_flag=args.zero3_init_flag,
                zero3_save_16bit_model=args.zero3_save_16bit_model,
            )
        return Accelerator(
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            mixed_precision=args.mixed_precision,
            log_with=log_with,
            project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=logging_dir),
            kwargs_handlers=kwargs_handlers or None,
            deepspeed_plugin=deepspeed_plugin,
        )

    @staticmethod
    def weight_dtype(args):
        import torch

        if args.full_fp16 or args.mixed_precision == "fp16":
            return torch.float16
        if args.full_bf16 or args.mixed_precision == "bf16":
            return torch.bfloat16
        return torch.float32

    def dataset_support(self, args):
        """Which dataset kinds this script accepts (train_db/fine_tune override)."""
        from library.data.config_schema import SchemaSupport

        return SchemaSupport(dreambooth=True, finetuning=True, controlnet=bool(getattr(args, "masked_loss", False)), dropout=True)

    def build_datasets(self, args, arch):
        from library.data.datasets import build_from_args, check_caching_compatibility

        train_group, val_group = build_from_args(args, self.dataset_support(args), seed=args.seed)
        if len(train_group) == 0:
            raise UserInputError("the dataset has no images (check --train_data_dir / --dataset_config)")
        multiple = getattr(arch, "bucket_reso_multiple", None)
        for g in (train_group, val_group):
            for d in getattr(g, "datasets", None) or []:
                p = d.params
                if multiple and p.enable_bucket and p.bucket_reso_steps % multiple:
                    raise UserInputError(f"{d.where}: bucket_reso_steps {p.bucket_reso_steps} must be a multiple of "
                                         f"{multiple} for this model (--bucket_reso_steps)")
            if g is not None and getattr(args, "cache_text_encoder_outputs", False):
                check_caching_compatibility(g, cache_text_encoder_outputs=True)
        return train_group, val_group

    def check_architecture_args(self, args, arch) -> None:
        """Checks that need the architecture object (still before anything loads)."""
        arch.check_model_path(args.pretrained_model_name_or_path)
        if getattr(args, "cache_text_encoder_outputs", False):
            if not getattr(arch, "supports_text_encoder_caching", False):
                raise UserInputError("--cache_text_encoder_outputs is not available for this model type")
            if not args.network_train_unet_only:
                raise UserInputError("--cache_text_encoder_outputs needs --network_train_unet_only: text-encoder "
                                     "LoRA modules cannot be trained on cached text-encoder outputs")

    def cache_text_encoder_outputs_if_requested(self, args, arch, accelerator, text_encoders, tokenizers,
                                                train_group, val_group) -> bool:
        """--cache_text_encoder_outputs(_to_disk): every caption encoded once, before training.
        The text encoders then go to the CPU (previews still use them there)."""
        if not getattr(args, "cache_text_encoder_outputs", False):
            return False
        import torch

        strategy = arch.text_encoder_cache_strategy(args, text_encoders, tokenizers, accelerator.device)
        batch_size = getattr(args, "text_encoder_batch_size", None) or args.train_batch_size or 1
        with torch.no_grad(), accelerator.autocast():
            for g in (train_group, val_group):
                if g is not None:
                    g.cache_text_encoder_outputs(strategy, to_disk=bool(args.cache_text_encoder_outputs_to_disk),
                                                 batch_size=batch_size, skip_cache_check=args.skip_cache_check,
                                                 process_index=accelerator.process_index,
                                                 num_processes=accelerator.num_processes)
        accelerator.wait_for_everyone()
        for te in text_encoders:
            te.to("cpu")
        return True

    def cache_latents_if_requested(self, args, arch, accelerator, vae, train_group, val_group) -> None:
        if not args.cache_latents:
            return
        import torch

        from library.data.latent_cache import LATENT_FORMATS

        dtype = torch.float32 if args.no_half_vae else self.weight_dtype(args)
        vae.to(accelerator.device, dtype=dtype)
        gen = torch.Generator(device="cpu").manual_seed(args.seed)

        custom = getattr(arch, "encode_latents_for_cache", None)  # e.g. FLUX caches scaled latents

        @torch.no_grad()
        def encode(images):
            images = images.to(accelerator.device, dtype=dtype)
            if custom is not None:
                return custom(vae, images, generator=gen).float().cpu()
            return vae.encode(images).latent_dist.sample(generator=gen).float().cpu()

        fmt = getattr(arch, "latent_cache_format", None) or LATENT_FORMATS[arch.name]
        for g in (train_group, val_group):
            if g is not None:
                g.cache_latents(encode, fmt, to_disk=args.cache_latents_to_disk,
                                batch_size=args.vae_batch_size, skip_cache_check=args.skip_cache_check,
                                process_index=accelerator.process_index, num_processes=accelerator.num_processes)
        accelerator.wait_for_everyone()
        vae.to("cpu")

    def merge_base_weights(self, args, module, vae, text_encoder, unet) -> None:
        """--base_weights folded into the model; `text_encoder` is one model or the list (SDXL)."""
        if not args.base_weights:
            return
        multipliers = args.base_weights_multiplier or []
        for i, path in enumerate(args.base_weights):
            m = multipliers[i] if i < len(multipliers) else 1.0
            net, weights_sd = module.create_network_from_weights(m, path, vae, text_encoder, unet, for_inference=True)
            net.merge_to(text_encoder, unet, weights_sd, None, "cpu")
            logger.info("merged base weights %s (multiplier %s)", path, m)

    def create_network(self, args, module, kwargs, vae, text_encoders, unet):
        te = text_encoders[0] if len(text_encoders) == 1 else text_encoders
        if args.dim_from_weights:
            network, _ = module.create_network_from_weights(1.0, args.network_weights, vae, te, unet, **kwargs)
        else:
            network = module.create_network(1.0, args.network_dim, args.network_alpha, vae, te, unet,
                                            neuron_dropout=args.network_dropout, **kwargs)
        if network is None:
            raise UserInputError(f"--network_module {args.network_module}: create_network returned nothing")
        for name in ("apply_to", "prepare_optimizer_params"):
            if not hasattr(network, name):
                raise UserInputError(f"--network_module {args.network_module}: the network has no {name}()")
        return network

    @staticmethod
    def text_encoder_lr(args, network):
        """--text_encoder_lr: a list (one per text encoder) for networks that take several
        (`prepare_optimizer_params_with_multiple_te_lrs`) when more than one value is given;
        otherwise the first value."""
        lrs = args.text_encoder_lr
        if lrs is None:
            return None
        if not isinstance(lrs, (list, tuple)):
            return lrs
        if len(lrs) > 1 and hasattr(network, "prepare_optimizer_params_with_multiple_te_lrs"):
            return list(lrs)
        return lrs[0] if lrs else None

    def resume(self, args, accelerator, state: RunState, batches_per_epoch: int) -> RunState:
        saved = checkpoints.read_train_state(args.resume)
        accelerator.load_state(args.resume)
        state.global_step = int(saved.get("current_step", 0))
        state.epoch = int(saved.get("current_epoch", 1)) or 1
        state.loader = saved.get("loader") or {}
        state.loss_history = saved.get("loss_history", [])
        if args.initial_step is not None or args.initial_epoch is not None:
            from library.data.loader import resume_position

            epoch, batch, step = resume_position(args.initial_step, args.initial_epoch, batches_per_epoch,
                                                 args.gradient_accumulation_steps, args.skip_until_initial_step)
            state.epoch, state.global_step, state.loader = epoch, step, {"epoch": epoch, "batch": batch}
        logger.info("resumed from %s at epoch %d, step %d", args.resume, state.epoch, state.global_step)
        return state

    def noise_setup(self, ctx) -> None:
        ctx.arch.prepare_training(ctx.args, ctx.accelerator.device)

    def log_start(self, ctx, batches_per_epoch, steps_per_epoch) -> None:
        a = ctx.args
        logger.info(
            "training: %d images (+%d reg), %d batches/epoch, %d epochs, %d steps, batch %s x %d processes x %d accumulation",
            ctx.train_group.num_train_images, ctx.train_group.num_reg_images, batches_per_epoch, ctx.num_epochs,
            a.max_train_steps, [d.params.batch_size for d in ctx.train_group.datasets], ctx.accelerator.num_processes,
            a.gradient_accumulation_steps,
        )

    def init_trackers(self, ctx) -> None:
        a = ctx.args
        if not (a.logging_dir or a.log_with):
            return
        config = {}
        if a.log_config:
            hidden = {"wandb_api_key", "huggingface_token", "config_file"}
            config = {k: v for k, v in vars(a).items()
                      if k not in hidden and not k.endswith(("_dir", "_path", "_file")) and isinstance(v, (int, float, str, bool))}
        init_kwargs = {}
        if a.log_tracker_config:
            import toml

            init_kwargs = toml.load(a.log_tracker_config)
        if a.wandb_run_name:
            init_kwargs.setdefault("wandb", {})["name"] = a.wandb_run_name
        name = a.log_tracker_name or "network_train"
        if a.log_prefix:
            name = a.log_prefix + name
        ctx.accelerator.init_trackers(name, config=config, init_kwargs=init_kwargs)
        ctx.trackers = True

    # ------------------------------------------------------------------ the loop
    def loop(self, ctx) -> None:
        from tqdm.auto import tqdm

        from library.training.optimizers import current_learning_rates, report_loss

        a, acc, st = ctx.args, ctx.accelerator, ctx.state
        progress = tqdm(total=a.max_train_steps, initial=st.global_step, disable=not acc.is_local_main_process,
                        desc="steps", dynamic_ncols=True)
        recent: list[float] = []
        params = [p for g in ctx.optimizer.param_groups for p in g["params"]]
        done = st.global_step >= a.max_train_steps
        epoch = ctx.loader.epoch
        while not done and epoch <= ctx.num_epochs:
            st.epoch = epoch
            net = acc.unwrap_model(ctx.network)
            if hasattr(net, "on_epoch_start"):
                net.on_epoch_start(ctx.te_for_network, ctx.unet)
            for batch_index, batch in enumerate(self.shard(ctx.loader.iter_epoch(epoch), acc)):
                if hasattr(net, "on_step_start"):
                    net.on_step_start()
                with acc.accumulate(ctx.network):
                    loss = self.training_loss(ctx, batch)
                    acc.backward(loss)
                    if acc.sync_gradients and a.max_grad_norm:
                        acc.clip_grad_norm_(params, a.max_grad_norm)
                    if acc.sync_gradients and hasattr(net, "update_grad_norms"):  # LoRA-GGPO (lora_flux)
                        net.update_grad_norms()
                        net.update_norms()
                    ctx.optimizer.step()
                    report_loss(ctx.scheduler, loss.detach())
                    ctx.scheduler.step()
                    ctx.optimizer.zero_grad(set_to_none=True)
                if not acc.sync_gradients:
                    continue
                if a.scale_weight_norms:
                    keys_scaled, mean_norm, max_norm = net.apply_max_norm_regularization(a.scale_weight_norms, acc.device)
                st.global_step += 1
                st.loader = ctx.loader.state_dict()
                value = float(loss.detach())
                recent.append(value)
                recent = recent[-100:]
                st.loss_history.append([st.global_step, value])
                lrs = current_learning_rates(ctx.scheduler, ctx.optimizer)
                progress.update(1)
                progress.set_postfix(loss=f"{value:.4f}", avg=f"{sum(recent) / len(recent):.4f}", lr=f"{lrs[0]:.2e}")
                if ctx.trackers:
                    logs = {"loss/current": value, "loss/average": sum(recent) / len(recent)}
                    logs.update({f"lr/group{i}": lr for i, lr in enumerate(lrs)})
                    acc.log(logs, step=st.global_step)
                self.after_step(ctx, epoch)
                if st.global_step >= a.max_train_steps:
                    done = True
                    break
            else:
                st.loader = ctx.loader.state_dict()
                self.after_epoch(ctx, epoch)
                epoch += 1
                continue
            break
        # a finished epoch bumps the counter so the final file carries the epoch reached
        st.epoch = epoch if not done else st.epoch
        progress.close()

    def shard(self, batches, accelerator):
        """Each process takes every N-th batch (the order is the same on every process)."""
        n, rank = accelerator.num_processes, accelerator.process_index
        if n == 1:
            yield from batches
            return
        for i, b in enumerate(batches):
            if i % n == rank:
                yield b

    def training_loss(self, ctx, batch):
        """Mean loss of one batch through the architecture's noise/denoiser/loss steps."""
        import torch

        a, arch, acc = ctx.args, ctx.arch, ctx.accelerator
        with torch.no_grad():
            if batch["latents"] is not None:
                latents = batch["latents"].to(acc.device)
            else:
                vae_dtype = torch.float32 if a.no_half_vae else ctx.weight_dtype
                images = batch["images"].to(acc.device, dtype=vae_dtype)
                custom = getattr(arch, "encode_latents_for_cache", None)  # what the cache would hold
                latents = custom(ctx.vae, images) if custom is not None else ctx.vae.encode(images).latent_dist.sample()
                latents = latents.float()
            latents = torch.nan_to_num(latents, 0.0) * arch.latent_scale
        with torch.set_grad_enabled(ctx.train_te), acc.autocast():
            # token ids, (word:1.2) weighted captions or cached outputs: the architecture knows
            context = arch.encode_batch(ctx.text_encoders, ctx.tokenizers, batch, a, acc.device)
        with acc.autocast():
            noisy, target, timesteps, extras = arch.noise_and_target(latents)
            cond = context.to(ctx.weight_dtype)
            pred = arch.call_denoiser(ctx.denoiser or ctx.unet, noisy.to(ctx.weight_dtype), timesteps, cond, batch)
            rows = self.dop_rows(batch)
            if rows:
                target = self.base_model_target(ctx, batch, rows, noisy.to(ctx.weight_dtype), timesteps, cond, target)
        mask = self.loss_mask(ctx, batch, latents)
        per_sample = arch.loss(pred.float(), target.float(), timesteps, batch["loss_weights"].to(acc.device), mask, extras)
        return per_sample.mean()

    @staticmethod
    def dop_rows(batch) -> list[int]:
        """Batch rows of subsets with custom_attributes.diff_output_preservation = true."""
        attrs = batch.get("custom_attributes") or []
        return [i for i, a in enumerate(attrs) if isinstance(a, dict) and a.get("diff_output_preservation") is True]

    def base_model_target(self, ctx, batch, rows, noisy, timesteps, cond, target):
        """Differential Output Preservation (training-math.md §8): for `rows`, the target becomes
        the base model's own prediction (network multiplier 0, no gradient) on the same noisy
        input, timestep and conditioning, post-processed like the main prediction. The rest of
        the loss (weighting, masks, prior_loss_weight) is unchanged."""
        import torch

        net = ctx.accelerator.unwrap_model(ctx.network)
        index = torch.tensor(rows, device=noisy.device)
        old = getattr(net, "multiplier", 1.0)
        with torch.no_grad():
            net.set_multiplier(0.0)
            try:
                prior = ctx.arch.call_denoiser(ctx.denoiser or ctx.unet, noisy[index], timesteps[index],
                                               _select_rows(cond, index, rows), _select_batch(batch, rows))
            finally:
                net.set_multiplier(old)
        target = target.clone()
        target[index] = prior.to(target.dtype)
        return target

    @staticmethod
    def loss_mask(ctx, batch, latents):
        """Alpha / conditioning mask (B,1,H,W) or None; the loss resizes it to latent size."""
        from library.training.losses import loss_mask_from_batch

        mask = loss_mask_from_batch(batch, masked_loss=bool(ctx.args.masked_loss))
        return None if mask is None else mask.to(latents.device)

    # ------------------------------------------------------------------ after step / epoch
    def after_step(self, ctx, epoch: int) -> None:
        a, st = ctx.args, ctx.state
        if a.sample_every_n_epochs is None and a.sample_every_n_steps and st.global_step % a.sample_every_n_steps == 0:
            self.sample_images(ctx, epoch=None, step=st.global_step)
        if checkpoints.should_save_step(st.global_step, a.save_every_n_steps):
            name = checkpoints.step_name(a.output_name, st.global_step)
            if ctx.accelerator.is_main_process:
                ctx.files_written.append(self.save_network(ctx, name, epoch))
                old = checkpoints.stale_step(st.global_step, a.save_every_n_steps, a.save_last_n_steps)
                if old is not None:
                    checkpoints.remove_quietly(self.network_path(ctx, checkpoints.step_name(a.output_name, old)))
            if a.save_state:
                self.save_state(ctx, os.path.join(a.output_dir, name + "-state"))
                old = checkpoints.stale_step(st.global_step, a.save_every_n_steps,
                                             a.save_last_n_steps_state or a.save_last_n_steps, for_state=True)
                if old is not None and ctx.accelerator.is_main_process:
                    checkpoints.remove_quietly(os.path.join(a.output_dir, checkpoints.step_name(a.output_name, old) + "-state"))
        if ctx.val_group is not None and a.validate_every_n_steps and st.global_step % a.validate_every_n_steps == 0:
            self.validate(ctx, tag="step")

    def after_epoch(self, ctx, epoch: int) -> None:
        a = ctx.args
        if checkpoints.should_save_epoch(epoch, a.save_every_n_epochs, ctx.num_epochs):
            name = checkpoints.epoch_name(a.output_name, epoch)
            if ctx.accelerator.is_main_process:
                ctx.files_written.append(self.save_network(ctx, name, epoch))
                old = checkpoints.stale_epoch(epoch, a.save_every_n_epochs, a.save_last_n_epochs)
                if old is not None:
                    checkpoints.remove_quietly(self.network_path(ctx, checkpoints.epoch_name(a.output_name, old)))
            if a.save_state:
                ctx.state.epoch = epoch + 1
                self.save_state(ctx, os.path.join(a.output_dir, name + "-state"))
                old = checkpoints.stale_epoch(epoch, a.save_every_n_epochs, a.save_last_n_epochs_state or a.save_last_n_epochs)
                if old is not None and ctx.accelerator.is_main_process:
                    checkpoints.remove_quietly(os.path.join(a.output_dir, checkpoints.epoch_name(a.output_name, old) + "-state"))
        if a.sample_every_n_epochs and epoch % a.sample_every_n_epochs == 0:
            self.sample_images(ctx, epoch=epoch, step=ctx.state.global_step)
        if ctx.val_group is not None and (a.validate_every_n_epochs is None or epoch % a.validate_every_n_epochs == 0):
            self.validate(ctx, tag="epoch")

    # ------------------------------------------------------------------ saving
    def network_path(self, ctx, name: str) -> str:
        ext = {"safetensors": ".safetensors", "ckpt": ".ckpt", "pt": ".pt", None: ".safetensors"}[ctx.args.save_model_as]
        return os.path.join(ctx.args.output_dir, name + ext)

    def save_network(self, ctx, name: str, epoch: int) -> str:
        import time as _time

        from library.io.modelspec import build_metadata_from_args
        from library.models.dtypes import dtype_from_precision
        from library.training import metadata as md
        from library.training.optimizers import optimizer_eval_mode, optimizer_train_mode

        a = ctx.args
        path = self.network_path(ctx, name)
        spec = build_metadata_from_args(a, timestamp=_time.time(), lora=True, **ctx.arch.modelspec_kwargs())
        meta = md.for_save(ctx.base_metadata, step=ctx.state.global_step, epoch=epoch, modelspec=spec, no_metadata=a.no_metadata)
        optimizer_eval_mode(ctx.optimizer)
        try:
            ctx.accelerator.unwrap_model(ctx.network).save_weights(path, dtype_from_precision(a.save_precision), meta)
        finally:
            optimizer_train_mode(ctx.optimizer)
        logger.info("saved %s", path)
        return path

    def save_state(self, ctx, folder: str) -> None:
        from library.training.optimizers import optimizer_eval_mode, optimizer_train_mode

        st = ctx.state
        train_state = {"current_epoch": st.epoch, "current_step": st.global_step, "loader": st.loader,
                       "loss_history": st.loss_history}
        optimizer_eval_mode(ctx.optimizer)
        try:
            if ctx.accelerator.is_main_process:
                checkpoints.save_state_folder(ctx.accelerator, folder, train_state)
        finally:
            optimizer_train_mode(ctx.optimizer)
        ctx.accelerator.wait_for_everyone()

    # ------------------------------------------------------------------ previews / validation
    def sample_images(self, ctx, epoch, step) -> None:
        """Preview images from --sample_prompts (see library/training/previews.py)."""
        if not ctx.args.sample_prompts:
            return
        from library.training.previews import sample_images

        sample_images(self, ctx, epoch, step)

    def validate(self, ctx, tag: str) -> None:
        from library.training.validation import validation_loss

        validation_loss(self, ctx, tag)

    # ------------------------------------------------------------------ summary
    def summary(self, ctx, t_start: float, files: list[str]) -> dict:
        import psutil

        elapsed = time.time() - t_start
        steps_done = ctx.state.global_step
        loop_time = time.time() - ctx.loop_started
        peak_rss = psutil.Process().memory_info().rss / 2**20
        try:
            import resource

            peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        except ImportError:
            pass
        out = {
            "steps": steps_done, "epochs": ctx.state.epoch, "seconds": round(elapsed, 1),
            "seconds_per_step": round(loop_time / max(1, steps_done), 3), "peak_rss_mib": round(peak_rss),
            "files": files, "final_loss": ctx.state.loss_history[-1][1] if ctx.state.loss_history else None,
        }
        if ctx.accelerator.is_main_process:
            logger.info("finished: %d steps in %.1f s (%.3f s/step), peak RSS %.0f MiB", steps_done, elapsed,
                        out["seconds_per_step"], peak_rss)
            for f in files:
                logger.info("  wrote %s", f)
            with open(os.path.join(ctx.args.output_dir, "training_summary.json"), "w") as fh:
                json.dump(out, fh, indent=2)
        out["loss_history"] = list(ctx.state.loss_history)
        return out


def _select_rows(obj, index, rows):
    """`obj` restricted to the batch rows: tensors, conditioning objects (`select` or
    dataclasses of tensors), dicts, lists."""
    import dataclasses

    import torch

    if obj is None:
        return None
    if isinstance(obj, torch.Tensor):
        return obj[index.to(obj.device)]
    if hasattr(obj, "select") and callable(obj.select):
        return obj.select(index)
    if dataclasses.is_dataclass(obj):
        return dataclasses.replace(obj, **{f.name: _select_rows(getattr(obj, f.name), index, rows)
                                           for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, dict):
        return {k: _select_rows(v, index, rows) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [obj[i] for i in rows]
    return obj


def _select_batch(batch: dict, rows, n: int | None = None) -> dict:
    """A batch dict with only `rows` (per-sample tensors and lists; other values as they are)."""
    import torch

    if n is None:
        n = len(batch.get("captions") or batch.get("custom_attributes") or [])
    index = torch.tensor(rows)
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n:
            out[k] = v[index.to(v.device)]
        elif isinstance(v, list) and len(v) == n:
            out[k] = [v[i] for i in rows]
        elif isinstance(v, dict):
            out[k] = _select_batch(v, rows, n)
        else:
            out[k] = v
    return out


def _release_accelerate_state() -> None:
    """Forget accelerate's process-wide settings after a single-process run, so another
    run in the same Python process (tests, the demo, notebooks) may use other precision."""
    try:
        from accelerate.state import AcceleratorState, PartialState
    except ImportError:
        return
    if PartialState._shared_state and PartialState().num_processes > 1:
        return
    AcceleratorState._reset_state(reset_partial_state=True)


@dataclass
class TrainContext:
    args: object
    arch: object
    accelerator: object
    network: object
    optimizer: object
    scheduler: object
    loader: object
    train_group: object
    val_group: object
    text_encoders: list
    tokenizers: list
    vae: object
    unet: object
    weight_dtype: object
    base_metadata: dict
    state: RunState
    num_epochs: int
    train_te: bool
    loop_started: float
    files_written: list = field(default_factory=list)
    trackers: bool = False
    te_for_network: object = None
    denoiser: object = None  # the U-Net or its compiled wrapper
