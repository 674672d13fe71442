"""The network trainer of flux_train_network.py: train_network.py's trainer with the FLUX.1
architecture object and FLUX's memory options.

What it adds to NetworkTrainer (everything else, the loop, saving, resume, validation, DOP,
comes from library/training/trainer.py):

* checks before anything loads: the four model files, `--split_mode` (deprecated: means
  `--blocks_to_swap 18` when that is not given), `--fp8_base_unet` (implies `--fp8_base`),
  `--blocks_to_swap` against the model's block counts (read from the file header) and not
  with `--cpu_offload_checkpointing`, `train_t5xxl` not with text-encoder caching, the
  network module's own divisibility rules (oft_flux), options that do not apply to FLUX;
* base models on the device: fp8 weights come from the loader, `--blocks_to_swap` installs
  the BlockSwapper (library/training/block_swap.py) instead of moving the swapped blocks;
* `--cache_text_encoder_outputs`: CLIP-L stays live when its LoRA is trained (T5 comes from
  the cache); preview prompts are encoded first, and a T5 that is no longer needed is
  released;
* `--gradient_checkpointing` with `--cpu_offload_checkpointing`;
* previews with the FLUX Euler sampler.
"""

from __future__ import annotations

import gc
import logging
import os
import random

from library.errors import UserInputError
from library.training.trainer import NetworkTrainer

logger = logging.getLogger(__name__)

SPLIT_MODE_BLOCKS = 18
# options of train_network.py that the FLUX step does not use (training-math.md §3)
_NOT_FOR_FLUX = {
    "min_snr_gamma": "Min-SNR weighting", "scale_v_pred_loss_like_noise_pred": "v-prediction loss scaling",
    "v_pred_like_loss": "v-prediction-like loss", "debiased_estimation_loss": "debiased estimation",
    "v_parameterization": "v-parameterization", "zero_terminal_snr": "zero terminal SNR",
    "noise_offset": "noise offset", "multires_noise_iterations": "multi-resolution noise",
    "clip_skip": "CLIP skip", "max_token_length": "--max_token_length (FLUX uses --t5xxl_max_token_length)",
}


class FluxNetworkTrainer(NetworkTrainer):
    from library.arch.flux import FluxArchitecture as architecture_class  # noqa: N811

    swapper = None

    def make_architecture(self, args):
        self.arch = self.architecture_class.from_args(args)
        self.arch.train_clip_l = not getattr(args, "network_train_unet_only", False)
        self.arch.train_t5xxl = self._network_arg(args, "train_t5xxl") == "True" and self.arch.train_clip_l
        return self.arch

    @staticmethod
    def _network_arg(args, key):
        from library.training.network_setup import parse_network_args

        return parse_network_args(getattr(args, "network_args", None)).get(key)

    # ------------------------------------------------------------------ checks
    def assert_extra_args(self, args) -> None:
        from library.arch.flux import FluxArchitecture

        if getattr(args, "split_mode", False):
            if args.blocks_to_swap is None:
                logger.warning("--split_mode is deprecated; it now means --blocks_to_swap %d (use that instead)",
                               SPLIT_MODE_BLOCKS)
                args.blocks_to_swap = SPLIT_MODE_BLOCKS
            else:
                logger.warning("--split_mode is deprecated and ignored: --blocks_to_swap %d is given",
                               args.blocks_to_swap)
        if getattr(args, "fp8_base_unet", False) and not args.fp8_base:
            args.fp8_base = True
            if (args.mixed_precision or "no") == "no":
                raise UserInputError("--fp8_base_unet needs --mixed_precision fp16 or bf16 (got --mixed_precision no)")
        if args.blocks_to_swap is not None and args.blocks_to_swap < 0:
            raise UserInputError(f"--blocks_to_swap must be 0 or more, got {args.blocks_to_swap}")
        if args.blocks_to_swap and args.cpu_offload_checkpointing:
            raise UserInputError("--blocks_to_swap cannot be combined with --cpu_offload_checkpointing; use one of them")
        if args.cpu_offload_checkpointing and not args.gradient_checkpointing:
            logger.warning("--cpu_offload_checkpointing has no effect without --gradient_checkpointing")
        FluxArchitecture.check_model_files(args)
        if getattr(args, "cache_text_encoder_outputs", False) and self._network_arg(args, "train_t5xxl") == "True":
            raise UserInputError("network arg train_t5xxl=True cannot be combined with --cache_text_encoder_outputs: "
                                 "the T5-XXL LoRA needs T5 to run on every step")
        for name, what in _NOT_FOR_FLUX.items():
            value = getattr(args, name, None)
            if value not in (None, False, 0, 0.0):
                logger.warning("--%s: %s does not apply to FLUX.1 training and is ignored", name, what)
        if getattr(args, "xformers", False) or getattr(args, "mem_eff_attn", False):
            logger.warning("--xformers / --mem_eff_attn: the FLUX transformer always uses PyTorch's "
                           "scaled_dot_product_attention")

    def check_architecture_args(self, args, arch) -> None:
        """Header-only checks: the transformer's config, block swapping, the network module's rules.
        Cached text-encoder outputs work with a trained CLIP-L LoRA (CLIP-L runs live)."""
        arch.check_model_path(args.pretrained_model_name_or_path)
        cfg = arch.config
        logger.info("%s", cfg.describe())
        if args.blocks_to_swap:
            from library.training.block_swap import flux_swap_counts

            flux_swap_counts(args.blocks_to_swap, cfg.depth, cfg.depth_single_blocks)
        from library.training.network_setup import import_network_module, network_kwargs

        module = import_network_module(args.network_module)
        check = getattr(module, "check_before_loading", None)
        if check is not None:
            kwargs = {k: v for k, v in network_kwargs(args).items() if k != "dropout"}
            check(cfg, args.network_dim, args.network_alpha, **kwargs)

    # ------------------------------------------------------------------ models
    def prepare_base_models(self, args, accelerator, unet, text_encoders, vae, weight_dtype):
        """Frozen models on the device; fp8 storage comes from the loader (--fp8_base), and
        --blocks_to_swap keeps the swapped blocks' weights in CPU memory."""
        from library.training.block_swap import BlockSwapper

        for m in [unet, *text_encoders] + ([vae] if vae is not None else []):
            if m is not None:
                m.requires_grad_(False)
                m.eval()
        device = accelerator.device
        self.swapper = None
        if args.blocks_to_swap:
            self.swapper = BlockSwapper.create(unet, args.blocks_to_swap, device)
            if self.swapper is None:
                logger.warning("--blocks_to_swap %d has no effect on %s: the weights already live in CPU memory",
                               args.blocks_to_swap, device)
        if self.swapper is None:
            unet.to(device)
        for te in text_encoders:
            if te is not None:
                te.to(device)
        if args.torch_compile:
            from library.training.model_options import compile_model

            return compile_model(unet, args)
        return unet

    def enable_gradient_checkpointing(self, args, unet, text_encoders, network) -> None:
        unet.enable_gradient_checkpointing(cpu_offload=bool(args.cpu_offload_checkpointing))
        for te in text_encoders:
            if te is not None:
                te.gradient_checkpointing_enable()
        if hasattr(network, "enable_gradient_checkpointing"):
            network.enable_gradient_checkpointing()

    def create_network(self, args, module, kwargs, vae, text_encoders, unet):
        network = super().create_network(args, module, kwargs, vae, text_encoders, unet)
        te_mods = getattr(network, "text_encoder_loras", None)
        if te_mods is not None and hasattr(self, "arch"):
            train_te = not args.network_train_unet_only
            self.arch.train_clip_l = train_te and any((m.te_index or 0) == 0 for m in te_mods)
            self.arch.train_t5xxl = train_te and any(m.te_index == 1 for m in te_mods)
        return network

    # ------------------------------------------------------------------ text-encoder caching
    def cache_text_encoder_outputs_if_requested(self, args, arch, accelerator, text_encoders, tokenizers,
                                                train_group, val_group) -> bool:
        if not getattr(args, "cache_text_encoder_outputs", False):
            return False
        if args.sample_prompts:
            from library.inference.prompt_file import read_prompt_file

            arch.precompute_sample_conditions(read_prompt_file(args.sample_prompts, "sample"), text_encoders,
                                              tokenizers, accelerator.device)
        done = super().cache_text_encoder_outputs_if_requested(args, arch, accelerator, text_encoders, tokenizers,
                                                               train_group, val_group)
        if arch.train_clip_l and text_encoders[0] is not None:
            text_encoders[0].to(accelerator.device)  # its LoRA trains on live CLIP-L outputs
        # the datasets keep the strategy (to read the cache files): it needs no models any more
        for g in (train_group, val_group):
            for d in getattr(g, "datasets", None) or []:
                strategy = getattr(d, "te_strategy", None)
                if strategy is not None:
                    strategy.clip_l = strategy.t5 = None
        if not arch.train_t5xxl and self._releasable(args):
            self.release_text_encoder(arch, text_encoders, 1)
        if not arch.train_clip_l and self._releasable(args):
            self.release_text_encoder(arch, text_encoders, 0)
        return done

    @staticmethod
    def _releasable(args) -> bool:
        """Our network modules accept a missing encoder; third-party ones get every model."""
        from library.training.network_setup import import_network_module

        return getattr(import_network_module(args.network_module), "ACCEPTED_ARGS", None) is not None

    @staticmethod
    def release_text_encoder(arch, text_encoders, index: int) -> None:
        """Drop a text encoder that cached outputs make unnecessary (its memory is freed)."""
        if text_encoders[index] is None:
            return
        text_encoders[index] = None
        models = getattr(arch, "loaded_models", None)
        if models is not None:
            setattr(models, ("clip_l", "t5")[index], None)
        gc.collect()
        logger.info("%s is not needed after caching its outputs; released", ("CLIP-L", "T5-XXL")[index])

    # ------------------------------------------------------------------ previews
    def sample_images(self, ctx, epoch, step) -> list:
        """FLUX previews from --sample_prompts (defaults: 512x512, 20 steps, guidance 3.5, CFG 1)."""
        a, acc = ctx.args, ctx.accelerator
        if not a.sample_prompts:
            return []
        if not acc.is_main_process:
            acc.wait_for_everyone()
            return []
        import torch
        from PIL.PngImagePlugin import PngInfo

        from library.inference.prompt_file import read_prompt_file, resolve_sample_spec
        from library.training.optimizers import optimizer_eval_context
        from library.training.previews import preview_name

        specs = read_prompt_file(a.sample_prompts, "sample")
        out_dir = os.path.join(a.output_dir, "sample")
        os.makedirs(out_dir, exist_ok=True)
        net = acc.unwrap_model(ctx.network)
        was_training, unet_training = net.training, ctx.unet.training
        net.eval()
        ctx.unet.eval()
        ae = ctx.vae
        ae_device = next(ae.parameters()).device
        ae.to(acc.device)
        written = []
        py_state = random.getstate()
        try:
            with torch.random.fork_rng(devices=[]), optimizer_eval_context(ctx.optimizer), torch.no_grad(), \
                    acc.autocast():
                for i, spec in enumerate(specs):
                    spec = resolve_sample_spec(spec, sampler="euler", width=512, height=512, steps=20, scale=1.0,
                                               size_multiple=16)
                    seed = spec.seed if spec.seed is not None else random.randint(0, 2**31 - 1)
                    image = ctx.arch.generate_preview(ctx.unet, ae, ctx.text_encoders, ctx.tokenizers, spec,
                                                      acc.device, ctx.weight_dtype, seed)
                    info = PngInfo()
                    info.add_text("parameters", f"{spec.prompt}\nNegative prompt: {spec.negative_prompt or ''}\n"
                                                f"Steps: {spec.sample_steps}, Sampler: Euler (flow), CFG scale: "
                                                f"{spec.scale}, Guidance: {spec.guidance_scale or 3.5}, Seed: {seed}, "
                                                f"Size: {spec.width}x{spec.height}")
                    path = os.path.join(out_dir, preview_name(a.output_name, epoch, step, i, spec.seed))
                    image.save(path, pnginfo=info)
                    written.append(path)
        finally:
            random.setstate(py_state)
            ae.to(ae_device)
            net.train(was_training)
            ctx.unet.train(unet_training)
        logger.info("wrote %d sample image(s) to %s", len(written), out_dir)
        acc.wait_for_everyone()
        return written
