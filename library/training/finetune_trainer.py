"""Full-model fine-tuning (sdxl_train.py): the network trainer's machinery with whole models trained.

`FineTuneTrainer` extends `NetworkTrainer` (library/training/trainer.py) and keeps its
pieces: argument checks, datasets and caches, accelerate setup, the training loop
(noise -> denoiser -> loss -> step), step/epoch saves, state save and exact resume,
previews and the summary. What differs is what is trained and saved:

* the architecture object (`library/arch/sdxl_finetune.py`) says which models are
  trained at which learning rate (`--learning_rate`, `--block_lr`,
  `--train_text_encoder` with `--learning_rate_te1/te2`; 0 or below freezes), builds the
  optimizer parameter groups and saves the whole model (single file or diffusers);
* trained models keep float32 master weights under mixed precision (`--full_bf16` /
  `--full_fp16`: the compute dtype); frozen ones are stored in the compute dtype;
* the optimizer can step during the backward pass (library/training/fused_optimizers.py):
  `--fused_backward_pass` (Adafactor, per tensor, stochastic rounding for bf16 weights)
  or `--fused_optimizer_groups N` (N optimizers, each stepped once its gradients are
  complete). The training loop sees a stand-in optimizer whose `step()` only finishes
  what the hooks left.

Order of work: every option is checked (and the optimizer resolved) before any model
loads; then datasets, accelerator, models, caches, optimizer(s), the loop, the final save.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time

from library.errors import UserInputError
from library.training import checkpoints
from library.training.trainer import NetworkTrainer, RunState, TrainContext

logger = logging.getLogger(__name__)

# Options of network training that the shared loop and resume code read. The fine-tuning
# scripts do not have them; these values mean "not used".
ABSENT_NETWORK_OPTIONS = {
    "initial_step": None,
    "initial_epoch": None,
    "skip_until_initial_step": False,
    "scale_weight_norms": None,
    "validate_every_n_steps": None,
    "validate_every_n_epochs": None,
    "network_train_unet_only": False,
    "network_train_text_encoder_only": False,
    "network_weights": None,
    "base_weights": None,
    "fp8_base_unet": False,
    "no_metadata": False,
}


def check_fused_options(args, optimizer_class) -> None:
    """--fused_backward_pass / --fused_optimizer_groups rules (no model needed)."""
    from library.training.optimizers import is_adaptive_lr

    groups = getattr(args, "fused_optimizer_groups", None)
    fused_backward = bool(getattr(args, "fused_backward_pass", False))
    if groups is not None and groups < 0:
        raise UserInputError(f"--fused_optimizer_groups {groups}: give a positive number of optimizers")
    if not groups and not fused_backward:
        return
    option = "--fused_backward_pass" if fused_backward else f"--fused_optimizer_groups {groups}"
    if fused_backward and groups:
        raise UserInputError(
            "--fused_backward_pass and --fused_optimizer_groups exclude each other (both step the optimizer during "
            "the backward pass); use one"
        )
    accumulation = getattr(args, "gradient_accumulation_steps", 1) or 1
    if accumulation != 1:
        raise UserInputError(
            f"{option} cannot be used with gradient accumulation (--gradient_accumulation_steps {accumulation}): "
            "the weights change before all micro-batches are seen; set it to 1"
        )
    if groups and is_adaptive_lr(optimizer_class):
        raise UserInputError(
            f"{option} cannot be used with {optimizer_class.__name__}: it estimates one step size from all "
            "parameters, which split optimizers cannot share; use an optimizer without automatic learning rate "
            "(AdamW, AdamW8bit, Lion, Adafactor with relative_step=False, ...)"
        )
    if getattr(args, "deepspeed", False):
        raise UserInputError(f"{option} cannot be used with --deepspeed (DeepSpeed owns the optimizer step)")
    if (getattr(args, "mixed_precision", "no") or "no") == "fp16":
        raise UserInputError(
            f"{option} cannot be used with --mixed_precision fp16: its loss scaling would need the whole backward "
            "pass before any step; use --mixed_precision bf16 (or no)"
        )


def allow_fp16_gradients(accelerator) -> None:
    """--full_fp16: let the gradient scaler unscale fp16 gradients (torch refuses by default)."""
    scaler = getattr(accelerator, "scaler", None)
    if scaler is None or getattr(scaler, "_fp16_grads_allowed", False):
        return
    original = scaler._unscale_grads_

    def unscale(optimizer, inv_scale, found_inf, allow_fp16):
        return original(optimizer, inv_scale, found_inf, True)

    scaler._unscale_grads_ = unscale
    scaler._fp16_grads_allowed = True


class FineTuneTrainer(NetworkTrainer):
    """Fine-tunes whole models; the architecture class supplies the model-specific parts."""

    from library.arch.sdxl_finetune import SDXLFineTuneArchitecture as architecture_class  # noqa: N811

    tracker_name = "finetuning"

    # ------------------------------------------------------------------ checks
    def check_args(self, args) -> None:
        from library.training import optimizers

        for key, value in ABSENT_NETWORK_OPTIONS.items():
            if not hasattr(args, key):
                setattr(args, key, value)
        super().check_args(args)
        self.arch = self.make_architecture(args)
        self.block_lrs = self.arch.check_finetune_args(args)
        self.parts = self.arch.trainable_parts(args, self.block_lrs)
        if not any(p.trained for p in self.parts):
            raise UserInputError(
                "nothing to train: the U-Net's learning rate (--learning_rate / --block_lr) is 0 or below and the "
                "text encoders are not trained (--train_text_encoder with a positive --learning_rate_te1/te2)"
            )
        optimizer_class = optimizers.resolve_optimizer_class(args)  # also checks --fused_backward_pass
        check_fused_options(args, optimizer_class)
        if hasattr(self.arch, "check_model_path"):
            self.arch.check_model_path(args.pretrained_model_name_or_path)
        if getattr(args, "cache_text_encoder_outputs", False) and not getattr(self.arch, "supports_text_encoder_caching", True):
            raise UserInputError("--cache_text_encoder_outputs is not available for this model type")
        if getattr(args, "deepspeed", False):
            raise UserInputError("--deepspeed is not supported by the fine-tuning scripts of this project yet; "
                                 "train without it (fused backward pass or fused optimizer groups save memory too)")
        if getattr(args, "diffusers_xformers", False):
            import importlib

            try:
                importlib.import_module("xformers.ops")
            except Exception as e:  # noqa: BLE001 - any import failure means "not usable"
                raise UserInputError(f"--diffusers_xformers: xformers cannot be imported here ({type(e).__name__}); "
                                     "use --sdpa instead") from None
        for opt in ("huggingface_repo_id", "resume_from_huggingface"):
            if getattr(args, opt, None):
                logger.warning("--%s: uploads to / downloads from Hugging Face are not implemented; "
                               "everything stays in --output_dir", opt)

    def check_fused_runtime(self, args, accelerator) -> None:
        if (args.fused_backward_pass or args.fused_optimizer_groups) and accelerator.num_processes > 1:
            raise UserInputError(
                "--fused_backward_pass / --fused_optimizer_groups need a single process: with several, gradients "
                "are averaged across processes only after the hooks that step the optimizer have run"
            )

    # ------------------------------------------------------------------ main
    def _train(self, args) -> dict:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from library.log import setup_logging
        from library.training import model_options, optimizers

        setup_logging(args)
        t_start = time.time()
        self.check_args(args)
        arch, parts = self.arch, self.parts
        from library.training.memory import release_freed_tensors_at_once

        release_freed_tensors_at_once()  # gradients and activations freed are returned, not kept resident
        if args.seed is None:
            args.seed = random.SystemRandom().randint(0, 2**31 - 1)
            logger.info("no --seed given; using %d", args.seed)

        train_group, val_group = self.build_datasets(args, arch)
        if getattr(args, "debug_dataset", False):
            from library.data.debug import debug_dataset

            debug_dataset(train_group)
            return {"steps": 0, "files": []}
        if val_group is not None:
            logger.warning("validation_split: full fine-tuning computes no validation loss; the %d held-out images "
                           "are left out of training", val_group.num_train_images)
            val_group = None

        import torch
        from accelerate.utils import set_seed

        accelerator = self.make_accelerator(args)
        self.check_fused_runtime(args, accelerator)
        set_seed(args.seed)
        is_main = accelerator.is_main_process
        device = accelerator.device
        weight_dtype = self.weight_dtype(args)  # frozen models and the U-Net's inputs
        master_dtype = weight_dtype if (args.full_fp16 or args.full_bf16) else torch.float32
        vae_dtype = torch.float32 if args.no_half_vae else weight_dtype
        if args.lowram or args.highvram:
            logger.info("--lowram/--highvram: models are loaded one tensor at a time and stay on the device")

        # models: trained ones in the master dtype, frozen ones in the compute dtype
        t0 = time.time()
        models = arch.load_models(args, dtype=master_dtype, vae_dtype=vae_dtype)
        logger.info("models loaded in %.1f s", time.time() - t0)
        tokenizers = arch.load_tokenizers(args)
        text_encoders = arch.text_encoders(models) if hasattr(arch, "text_encoders") else list(models.text_encoders)
        unet, vae = models.unet, models.vae
        for part in parts:
            module = getattr(models, part.key)
            module.requires_grad_(part.trained)
            module.to(device, dtype=master_dtype if part.trained else weight_dtype)
            module.train(part.trained)
            logger.info("%s: %s", part.label, f"trained, learning rate {part.lr:g}" if part.trained else "frozen")
        vae.requires_grad_(False)
        vae.eval()
        logger.info("U-Net attention: %s", model_options.set_attention(unet, args))
        if args.diffusers_xformers or args.xformers:
            vae.enable_xformers_memory_efficient_attention()
            if args.diffusers_xformers:
                unet.enable_xformers_memory_efficient_attention()
        if args.fp8_base:
            frozen_tes = [te for te, p in zip(text_encoders, parts[1:]) if not p.trained]
            if parts[0].trained:
                logger.warning("--fp8_base: the U-Net is trained in full precision; only frozen text encoders are "
                               "stored in fp8")
            for te in frozen_tes:
                model_options.store_weights_in_fp8(te, weight_dtype)

        # data: latents, text-encoder outputs or token ids
        self.cache_latents_if_requested(args, arch, accelerator, vae, train_group, None)
        te_cached = self.cache_text_encoder_outputs_if_requested(args, arch, accelerator, text_encoders, tokenizers,
                                                                 train_group, None)
        if not args.weighted_captions and not te_cached:
            train_group.set_tokenize_fn(lambda caps: arch.tokenize_captions(tokenizers, caps, args.max_token_length))
        if vae is not None and not args.cache_latents:
            vae.to(device, dtype=vae_dtype)
        # frozen models whose outputs are cached sit idle: their memory-mapped pages go back
        # to the kernel (read back from the file for previews and saves)
        self.idle_models = ([te for te, p in zip(text_encoders, parts[1:]) if not p.trained] if te_cached else [])
        self.idle_models += [vae] if args.cache_latents and vae is not None else []
        self.page_out_idle_models()

        if args.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            unet.train()  # the blocks checkpoint in training mode only
            for te, part in zip(text_encoders, parts[1:]):
                if part.trained:  # transformers 5 renamed it; the old name warns
                    (getattr(te, "activation_checkpointing_enable", None) or te.gradient_checkpointing_enable)()
        arch.freeze_unused(models, parts)

        # optimizer(s) and schedule(s)
        groups = arch.param_groups(models, parts, self.block_lrs)
        if not groups:
            raise UserInputError("nothing to train: every parameter group is frozen (check --block_lr)")
        n_params = sum(p.numel() for g in groups for p in g["params"])
        logger.info("trainable parameters: %.1fM in %d group(s)", n_params / 1e6, len(groups))
        if args.fused_optimizer_groups:
            from library.training.fused_optimizers import split_param_groups

            chunks = split_param_groups(groups, args.fused_optimizer_groups)
            built = [optimizers.get_optimizer(args, [c]) for c in chunks]
            optimizer_name, optimizer_args_str = built[0][0], built[0][1]
            optimizer_list = [b[2] for b in built]
            logger.info("--fused_optimizer_groups %d: %d optimizers", args.fused_optimizer_groups, len(optimizer_list))
        else:
            optimizer_name, optimizer_args_str, optimizer = optimizers.get_optimizer(args, groups)
            optimizer_list = [optimizer]

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
        scheduler_list = [optimizers.get_scheduler(args, o, num_processes) for o in optimizer_list]

        trained = [(p, getattr(models, p.key)) for p in parts if p.trained]
        prepared = accelerator.prepare(*[m for _, m in trained], *optimizer_list, *scheduler_list)
        prepared = list(prepared) if isinstance(prepared, (list, tuple)) else [prepared]
        n_models, n_opt = len(trained), len(optimizer_list)
        prepared_models = dict(zip([p.key for p, _ in trained], prepared[:n_models]))
        optimizer_list = prepared[n_models:n_models + n_opt]
        scheduler_list = prepared[n_models + n_opt:]
        if args.full_fp16:
            allow_fp16_gradients(accelerator)

        from library.training import fused_optimizers

        if args.fused_backward_pass:
            optimizer = fused_optimizers.FusedBackwardPass(optimizer_list[0], args.max_grad_norm,
                                                           stochastic_rounding=True)
            logger.info("--fused_backward_pass: %d tensors stepped during backward%s", optimizer.num_hooked,
                        " (bf16 weights rounded stochastically)" if master_dtype == torch.bfloat16 else "")
        elif args.fused_optimizer_groups:
            optimizer = fused_optimizers.FusedOptimizerGroups(optimizer_list, args.max_grad_norm)
        else:
            optimizer = optimizer_list[0]
        scheduler = scheduler_list[0] if len(scheduler_list) == 1 else fused_optimizers.SchedulerList(scheduler_list)

        unet_run = prepared_models.get("unet", unet)
        tes_run = [prepared_models.get(p.key, te) for te, p in zip(text_encoders, parts[1:])]
        network = next(iter(prepared_models.values()))  # what accumulate / train-mode switching look at
        denoiser = model_options.compile_model(unet_run, args) if args.torch_compile else unet_run

        state = RunState()
        if args.resume:
            state = self.resume(args, accelerator, state, batches_per_epoch)
        if state.loader:
            loader.load_state_dict(state.loader)
        else:
            loader.set_position(state.epoch, 0)

        ctx = TrainContext(args, arch, accelerator, network, optimizer, scheduler, loader, train_group, None,
                           tes_run, tokenizers, vae, unet_run, weight_dtype, {}, state, num_epochs,
                           any(p.trained for p in parts[1:]), time.time(), te_for_network=None, denoiser=denoiser)
        ctx.models = models
        ctx.master_dtype = master_dtype
        ctx.save_format = arch.save_format(args, args.pretrained_model_name_or_path)
        ctx.optimizer_name = optimizers.optimizer_metadata_string(optimizer_name, optimizer_args_str)
        self.log_start(ctx, batches_per_epoch, steps_per_epoch)
        logger.info("optimizer %s; saving as %s", ctx.optimizer_name, ctx.save_format)
        self.init_trackers(ctx)
        self.noise_setup(ctx)

        if args.sample_at_first and state.global_step == 0:
            self.sample_images(ctx, epoch=0, step=0)

        self.loop(ctx)

        accelerator.wait_for_everyone()
        files = list(ctx.files_written)
        if is_main:
            final_epoch = state.epoch - 1 if state.epoch > num_epochs else state.epoch
            files.append(self.save_network(ctx, checkpoints.last_name(args.output_name), final_epoch))
        if args.save_state or args.save_state_on_train_end:
            folder = os.path.join(args.output_dir, f"{checkpoints.last_name(args.output_name)}-state")
            self.save_state(ctx, folder)
            files.append(folder)
        accelerator.end_training()
        if hasattr(optimizer, "remove_hooks"):
            optimizer.remove_hooks()
        return self.summary(ctx, t_start, files)

    # ------------------------------------------------------------------ pieces
    def page_out_idle_models(self) -> None:
        from library.training.memory import page_out_frozen, trim_heap

        released = page_out_frozen(getattr(self, "idle_models", []))
        trimmed = trim_heap()
        if released or trimmed:
            logger.info("released %.0f MiB of idle frozen weights (memory-mapped; read back when needed) and %.0f MiB "
                        "of freed heap", released / 2**20, trimmed / 2**20)

    def dop_rows(self, batch) -> list[int]:
        """Differential output preservation needs a network to switch off; a full fine-tune has none."""
        rows = super().dop_rows(batch)
        if rows and not getattr(self, "_warned_dop", False):
            logger.warning("custom_attributes.diff_output_preservation: only for network training; ignored here")
            self._warned_dop = True
        return []

    def init_trackers(self, ctx) -> None:
        if not ctx.args.log_tracker_name:
            ctx.args.log_tracker_name = self.tracker_name
        super().init_trackers(ctx)

    def sample_images(self, ctx, epoch, step) -> None:
        if not ctx.args.sample_prompts:
            return
        if getattr(ctx.arch, "image_sampler_class", None) is None:
            if not getattr(self, "_warned_previews", False):
                logger.warning("--sample_prompts: sample images of this model type are not available yet; skipped")
                self._warned_previews = True
            return
        super().sample_images(ctx, epoch, step)
        self.page_out_idle_models()

    # ------------------------------------------------------------------ saving
    def network_path(self, ctx, name: str) -> str:
        return os.path.join(ctx.args.output_dir, name + ctx.arch.model_file_suffix(ctx.save_format))

    def save_network(self, ctx, name: str, epoch: int) -> str:
        """The whole model (single file or diffusers folder), written atomically."""
        from library.io.modelspec import build_metadata_from_args
        from library.models.dtypes import dtype_from_precision
        from library.training.optimizers import optimizer_eval_context

        a = ctx.args
        path = self.network_path(ctx, name)
        save_dtype = dtype_from_precision(a.save_precision) or ctx.master_dtype
        metadata = None
        if ctx.save_format == "safetensors":
            metadata = build_metadata_from_args(a, timestamp=time.time(), **ctx.arch.modelspec_kwargs())
        with optimizer_eval_context(ctx.optimizer):
            ctx.arch.save_full_model(ctx.models, path, ctx.save_format, save_dtype, metadata, ctx.tokenizers,
                                     epoch=epoch, global_step=ctx.state.global_step)
        logger.info("saved %s", path)
        self.page_out_idle_models()
        return path


__all__ = ["ABSENT_NETWORK_OPTIONS", "FineTuneTrainer", "allow_fp16_gradients", "check_fused_options"]
