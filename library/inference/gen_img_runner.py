"""gen_img.py: image generation from prompts, prompt files or standard input.

    run(args)  # args from library.args.gen_img_args.parse_gen_img_args

Order of work (everything the user can get wrong is checked before a model loads):

1. `check_inputs`: the output folder is created and test-written, the model path, VAE,
   network modules and files, init images and masks, prompt file and embeddings are
   checked, options that this version does not implement are reported.
2. `GenerationPipeline.load`: the architecture object (SD1.x/2.x or SDXL, picked by
   `select_architecture`) loads the models; networks are applied or merged;
   textual-inversion tokens are added; `library.inference.sd_sampling.create_sampler`
   builds the denoising loop shared with the trainer's previews.
3. `Generator.run`: for every iteration (--n_iter) and prompt, dynamic prompts are
   expanded, per-prompt options read (`parse_prompt_line(..., "gen")`), one `Job` per
   image made (seed, size, steps, scale, strength, multipliers, init image, mask) and jobs
   with equal settings are batched (--batch_size). Each batch goes through one denoising
   loop, or two with highres fix, and its images are saved (library.inference.gen_img_output).

Seeds (one per image):
* a prompt's `--d 1,2,3` gives the seeds of its images in order; when the list runs out
  the last one repeats; `-1` means random seeds from there on;
* otherwise with --iter_same_seed every image of an iteration shares one seed;
* otherwise seeds are drawn from `random.Random(--seed)` (or unseeded). With a single
  prompt and --images_per_prompt 1, the first image uses --seed itself.
Image i's starting noise comes from a CPU generator seeded with its seed (the same in any
batch and on any device). Highres fix's second pass uses seed + 1; files record the seed.
"""

from __future__ import annotations

import glob
import logging
import os
import random
import sys
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Iterator, Optional

from library.errors import UserInputError
from library.inference import gen_img_output as out
from library.inference.prompt_file import GEN, PromptSpec, expand_dynamic_prompts, parse_prompt_line, read_prompt_file

logger = logging.getLogger(__name__)

IMAGE_FILE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
DEFAULT_STRENGTH = 0.8
MAX_SEED = 2**32 - 1
PYRAMID_ITERATIONS = 6
MIN_STEPS = {"pndm": 4}  # diffusers' PNDM (with its Runge-Kutta warm-up) cannot run fewer

# Options accepted for compatibility that this version does not act on: (dest, what).
NOT_IMPLEMENTED = (
    ("control_net_models", "ControlNet"),
    ("control_net_lllite_models", "ControlNet-LLLite"),
    ("control_net_preps", "ControlNet preprocessors"),
    ("control_net_multipliers", "ControlNet multipliers"),
    ("control_net_ratios", "ControlNet ratios"),
    ("guide_image_path", "ControlNet guide images"),
    ("highres_fix_disable_control_net", "ControlNet in highres fix"),
    ("ds_depth_1", "Deep Shrink"),
    ("ds_depth_2", "Deep Shrink"),
    ("gradual_latent_timesteps", "Gradual Latent"),
    ("gradual_latent_unsharp_params", "Gradual Latent"),
    ("network_regional_mask_max_color_codes", "regional network masks"),
    ("clip_vision_strength", "CLIP-Vision conditioning (SDXL)"),
)
PROMPT_FIELDS_NOT_IMPLEMENTED = (
    (("ds_depth_1", "ds_timesteps_1", "ds_depth_2", "ds_timesteps_2", "ds_ratio"), "Deep Shrink (--dsd1/--dst1/--dsd2/--dst2/--dsr)"),
    (("gradual_latent_timesteps", "gradual_latent_ratio", "gradual_latent_every_n_steps", "gradual_latent_ratio_step",
      "gradual_latent_s_noise", "gradual_latent_unsharp_params"), "Gradual Latent (--glt/--glr/--gle/--gls/--glsn/--glus)"),
)
SIZE_CONDITIONING = ("original_width", "original_height", "original_width_negative", "original_height_negative",
                     "crop_top", "crop_left")


# ============================================================================ input checks
def _resolve_ckpt(path: Optional[str]) -> str:
    if not path:
        raise UserInputError("--ckpt is required: a .safetensors/.ckpt model file or a diffusers folder")
    if not os.path.exists(path):
        matches = glob.glob(path)
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise UserInputError(f"--ckpt {path}: the pattern matches {len(matches)} files; give one")
        raise UserInputError(f"--ckpt {path}: file or folder not found")
    return path


def list_images(path: str, what: str) -> list[str]:
    """A file, or every png/jpg/jpeg/webp in a folder (sorted by name)."""
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        files = sorted(
            os.path.join(path, f) for f in os.listdir(path) if os.path.splitext(f)[1].lower() in IMAGE_FILE_EXTENSIONS
        )
        if not files:
            raise UserInputError(f"{what} {path}: the folder holds no png/jpg/jpeg/webp image")
        return files
    raise UserInputError(f"{what} {path}: file or folder not found")


def load_images(paths: list[str], what: str) -> list:
    from PIL import Image

    images = []
    for p in paths:
        try:
            im = Image.open(p)
            im.load()
        except (OSError, ValueError) as e:
            raise UserInputError(f"{what} {p}: cannot read the image ({e})") from None
        text = dict(getattr(im, "text", {}) or {})
        if im.mode != "RGB":
            im = im.convert("RGB")
        im.info["source_path"] = p
        im.info["png_text"] = text
        images.append(im)
    return images


def check_inputs(args) -> SimpleNamespace:
    """Everything that can be checked without models. Returns what it read (images,
    prompt entries, network requests)."""
    from library.inference.network_loading import check_network_requests
    from library.inference.samplers import canonical_sampler_name

    out.check_output_dir(args.outdir)
    ckpt = _resolve_ckpt(args.ckpt)
    if args.vae and not os.path.exists(args.vae):
        raise UserInputError(f"--vae {args.vae}: file or folder not found")
    canonical_sampler_name(args.sampler)
    for name, value in (("--images_per_prompt", args.images_per_prompt), ("--batch_size", args.batch_size),
                        ("--n_iter", args.n_iter), ("--steps", args.steps)):
        if value is None or value < 1:
            raise UserInputError(f"{name} must be at least 1, not {value}")
    if args.max_embeddings_multiples is not None and args.max_embeddings_multiples < 1:
        raise UserInputError(f"--max_embeddings_multiples must be at least 1, not {args.max_embeddings_multiples}")
    if args.strength is not None and not 0.0 <= args.strength <= 1.0:
        raise UserInputError(f"--strength must be between 0 and 1, not {args.strength}")
    if args.highres_fix_scale is not None and args.highres_fix_scale <= 0:
        raise UserInputError(f"--highres_fix_scale must be positive, not {args.highres_fix_scale}")
    if args.vae_batch_size is not None and args.vae_batch_size <= 0:
        raise UserInputError(f"--vae_batch_size must be positive, not {args.vae_batch_size}")
    if args.fp16 and args.bf16:
        logger.warning("--fp16 and --bf16 both given; using fp16")
    for name, prob in (("--pyramid_noise_prob", args.pyramid_noise_prob), ("--noise_offset_prob", args.noise_offset_prob)):
        if prob is not None and not 0.0 <= prob <= 1.0:
            raise UserInputError(f"{name} must be between 0 and 1, not {prob}")
    for path in args.textual_inversion_embeddings or []:
        if not os.path.isfile(path):
            raise UserInputError(f"--textual_inversion_embeddings {path}: file not found")

    for dest, what in NOT_IMPLEMENTED:
        if getattr(args, dest, None):
            logger.warning("--%s: %s is not implemented in this version; the option is ignored", dest, what)
    if args.highres_fix_upscaler:
        import importlib

        try:
            importlib.import_module(args.highres_fix_upscaler)
        except ImportError as e:
            raise UserInputError(f"--highres_fix_upscaler {args.highres_fix_upscaler}: cannot be imported ({e})") from None

    init_images = load_images(list_images(args.image_path, "--image_path"), "--image_path") if args.image_path else None
    masks = load_images(list_images(args.mask_path, "--mask_path"), "--mask_path") if args.mask_path else None
    if masks is not None and init_images is None:
        raise UserInputError("--mask_path needs --image_path (the image to inpaint)")

    entries = None
    if args.from_file:
        entries = read_prompt_entries(args.from_file)
    elif args.from_module:
        if not os.path.isfile(args.from_module):
            raise UserInputError(f"--from_module {args.from_module}: file not found")
    elif args.prompt is not None:
        entries = [PromptEntry(args.prompt, None, "--prompt")]
    elif init_images is not None and not args.interactive:
        entries = prompts_from_image_metadata(init_images)
        logger.info("no prompt given: using the prompts stored in %d init image(s)", len(entries))
        # every prompt's images use its own source image
        init_images = [im for im in init_images for _ in range(args.images_per_prompt)]
        if masks is not None:
            masks = [m for m in masks for _ in range(args.images_per_prompt)]
    elif not args.interactive:
        raise UserInputError("no prompt: give --prompt, --from_file, --from_module or --interactive")
    if args.interactive and (args.prompt is not None or args.from_file or args.from_module):
        logger.warning("--interactive is ignored: prompts come from %s",
                       "--from_file" if args.from_file else "--from_module" if args.from_module else "--prompt")
    return SimpleNamespace(ckpt=ckpt, init_images=init_images, masks=masks, entries=entries,
                           networks=check_network_requests(args))


# ============================================================================ prompts
@dataclass
class PromptEntry:
    """One prompt source item: a raw line (options inline) or a table spec (.toml/.json)."""

    raw: Optional[str]
    spec: Optional[PromptSpec]
    where: str


def read_prompt_entries(path: str) -> list[PromptEntry]:
    """Prompt file -> entries. .txt lines stay raw (dynamic prompts are expanded before
    their options are read); .toml/.json tables become specs."""
    ext = os.path.splitext(path)[1].lower()
    name = os.path.basename(path)
    if ext in (".toml", ".json"):
        return [PromptEntry(None, spec, f"{name} entry {i + 1}") for i, spec in enumerate(read_prompt_file(path, GEN))]
    if not os.path.isfile(path):
        raise UserInputError(f"--from_file {path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserInputError(f"--from_file {path}: cannot read it ({e})") from None
    entries = [PromptEntry(line, None, f"{name} line {i + 1}") for i, line in enumerate(lines)
               if line.strip() and not line.startswith("#")]
    if not entries:
        logger.warning("--from_file %s holds no prompts", path)
    return entries


def prompts_from_image_metadata(images) -> list[PromptEntry]:
    entries = []
    for im in images:
        text = im.info.get("png_text", {})
        source = os.path.basename(im.info.get("source_path", "image"))
        if "prompt" not in text:
            raise UserInputError(f"--image_path {source}: no prompt given and the image has no 'prompt' text chunk")
        line = text["prompt"]
        if text.get("negative-prompt"):
            line += " --n " + text["negative-prompt"]
        entries.append(PromptEntry(line, None, f"{source} metadata"))
    return entries


class ListPrompter:
    """Prompt entries in order, once per iteration (shuffled with --shuffle_prompts)."""

    def __init__(self, entries: list[PromptEntry], rng: random.Random):
        self.entries = list(entries)
        self.rng = rng

    def __len__(self) -> int:
        return len(self.entries)

    def iteration(self, shuffle: bool) -> Iterator[PromptEntry]:
        if shuffle:
            self.rng.shuffle(self.entries)
        yield from self.entries


class InteractivePrompter:
    """Lines from standard input until end of input; lines without prompt text are skipped."""

    def __init__(self, stream=None):
        self.stream = stream

    def iteration(self, shuffle: bool) -> Iterator[PromptEntry]:
        stream = self.stream or sys.stdin
        n = 0
        while True:
            if stream.isatty():
                print("prompt> ", end="", file=sys.stderr, flush=True)
            line = stream.readline()
            if not line:
                return
            line = line.rstrip("\r\n")
            if not line.split(" --")[0].strip():
                continue
            n += 1
            yield PromptEntry(line, None, f"input line {n}")


class ModulePrompter:
    """--from_module: a Python file whose `get_prompter(args, pipe, networks)` returns a
    callable `prompter(args, pipe, seed_random, iter_seed, prompt_index, global_step)` giving
    prompt lines and None at the end of an iteration."""

    def __init__(self, path: str, args, pipe, networks, seed_random: random.Random):
        import importlib.util

        spec = importlib.util.spec_from_file_location("gen_img_prompt_module", path)
        if spec is None or spec.loader is None:
            raise UserInputError(f"--from_module {path}: cannot be loaded as a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules["gen_img_prompt_module"] = module
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            raise UserInputError(f"--from_module {path}: failed to import ({type(e).__name__}: {e})") from None
        if not hasattr(module, "get_prompter"):
            raise UserInputError(f"--from_module {path}: has no get_prompter(args, pipe, networks)")
        self.prompter = module.get_prompter(args, pipe, networks)
        self.args, self.pipe, self.seed_random = args, pipe, seed_random
        self.iter_seed = None
        self.global_step = 0

    def iteration(self, shuffle: bool) -> Iterator[PromptEntry]:
        if shuffle and hasattr(self.prompter, "shuffle"):
            self.prompter.shuffle()
        index = 0
        while True:
            line = self.prompter(self.args, self.pipe, self.seed_random, self.iter_seed, index, self.global_step)
            if line is None:
                return
            index += 1
            yield PromptEntry(str(line), None, f"--from_module prompt {index}")


# ============================================================================ models
def _looks_like_sdxl(path: str) -> bool:
    if os.path.isdir(path):
        return os.path.isdir(os.path.join(path, "text_encoder_2"))
    from library.io.safetensors_io import is_safetensors_path, read_header

    if is_safetensors_path(path):
        return any(k.startswith("conditioner.embedders.1.") for k in read_header(path).shapes())
    return os.path.getsize(path) > 5.5 * 1024**3


def select_architecture(args, ckpt: str):
    """The architecture object for the model: SDXL with --sdxl or when the file/folder is
    SDXL (and neither --v1 nor --v2 is given), SD1.x/2.x otherwise."""
    if args.sdxl or (not args.v1 and not args.v2 and _looks_like_sdxl(ckpt)):
        from library.arch.sdxl import SDXLArchitecture

        if not args.sdxl:
            logger.info("%s: an SDXL model (two text encoders); generating with SDXL conditioning", ckpt)
        return SDXLArchitecture.from_args(args)
    from library.arch.sd import SDArchitecture

    return SDArchitecture(v2=bool(args.v2), v_parameterization=bool(args.v_parameterization))


def pick_device():
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _textual_inversion(path: str):
    """(token string, [(n, dim) float tensor per text encoder]) from an embedding file
    (formats.md §h): one tensor for SD1.x/2.x files, `clip_l` and `clip_g` for SDXL ones."""
    import torch

    from library.io.safetensors_io import is_safetensors_path, load_state_dict

    try:
        if is_safetensors_path(path):
            data = load_state_dict(path)
        else:
            data = torch.load(path, map_location="cpu", weights_only=False)
    except UserInputError:
        raise
    except Exception as e:
        raise UserInputError(f"--textual_inversion_embeddings {path}: cannot read it ({type(e).__name__}: {e})") from None
    if isinstance(data, dict) and "string_to_param" in data:
        data = data["string_to_param"]
        data = getattr(data, "_parameters", data)
    if isinstance(data, dict) and isinstance(data.get("clip_l"), torch.Tensor) and isinstance(data.get("clip_g"), torch.Tensor):
        parts = [data["clip_l"], data["clip_g"]]
    else:
        if isinstance(data, dict):
            data = data.get("emb_params", next(iter(data.values()), None)) if data else None
        if not isinstance(data, torch.Tensor):
            raise UserInputError(f"--textual_inversion_embeddings {path}: no embedding tensor found")
        parts = [data]
    embeds = [p.detach().float() for p in parts]
    embeds = [e.unsqueeze(0) if e.dim() == 1 else e for e in embeds]
    if len({e.shape[0] for e in embeds}) != 1:
        raise UserInputError(f"--textual_inversion_embeddings {path}: clip_l and clip_g hold different vector counts")
    return os.path.splitext(os.path.basename(path))[0], embeds


class GenerationPipeline:
    """Models, networks and the sampler, ready to generate."""

    def __init__(self, args, arch, models, text_encoders, vae, unet, tokenizers, sampler, networks, device, dtype):
        self.args, self.arch, self.models = args, arch, models
        self.text_encoders, self.vae, self.unet, self.tokenizers = text_encoders, vae, unet, tokenizers
        self.sampler, self.networks, self.device, self.dtype = sampler, networks, device, dtype
        self.token_expansions: dict[str, str] = {}  # textual inversion: token -> "tok tok1 tok2"

    @classmethod
    def load(cls, args, checked) -> "GenerationPipeline":
        import torch

        from library.inference.network_loading import load_networks
        from library.inference.sd_sampling import create_sampler

        dtype = torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else torch.float32
        device = pick_device()
        arch = select_architecture(args, checked.ckpt)
        t0 = time.time()
        model_args = SimpleNamespace(
            pretrained_model_name_or_path=checked.ckpt, v2=args.v2, v_parameterization=args.v_parameterization,
            vae=args.vae, tokenizer_cache_dir=args.tokenizer_cache_dir, disable_mmap_load_safetensors=False, sdxl=args.sdxl,
        )
        models = arch.load_models(model_args, dtype=dtype)
        text_encoders = list(getattr(models, "text_encoders", None) or [models.text_encoder])
        vae, unet = models.vae, models.unet
        tokenizers = cls._tokenizers(arch, model_args, checked.ckpt, len(text_encoders))
        logger.info("model loaded in %.1f s (%s)", time.time() - t0, getattr(arch, "base_model_version", arch.name))

        vae.to(device, torch.float32 if args.no_half_vae else dtype).eval()
        for te in text_encoders:
            te.to(device, dtype).eval()
        unet.to(device, dtype).eval()
        cls._attention(args, unet, vae)
        if args.opt_channels_last:
            unet.to(memory_format=torch.channels_last)
            vae.to(memory_format=torch.channels_last)
        if args.vae_slices:
            vae.enable_tiling()
            logger.info("--vae_slices: tiled VAE decoding enabled")

        networks = load_networks(
            checked.networks, vae=vae, text_encoders=text_encoders, unet=unet, dtype=dtype, device=device,
            pre_calc=args.network_pre_calc, show_meta=args.network_show_meta, channels_last=args.opt_channels_last,
        )
        clip_skip = args.clip_skip if args.clip_skip is not None else getattr(arch, "default_clip_skip", None)
        multiples = args.max_embeddings_multiples or 1
        sampler = create_sampler(
            arch, text_encoders, vae, unet, tokenizers, clip_skip=clip_skip, max_token_length=75 * multiples,
            emb_normalize_mode=args.emb_normalize_mode, device=device,
        )
        pipe = cls(args, arch, models, text_encoders, vae, unet, tokenizers, sampler, networks, device, dtype)
        for path in args.textual_inversion_embeddings or []:
            pipe.add_textual_inversion(path)
        return pipe

    @staticmethod
    def _tokenizers(arch, model_args, ckpt: str, count: int = 1) -> list:
        """A diffusers folder's own tokenizer(s) (tokenizer, tokenizer_2), else the architecture's."""
        subfolders = ["tokenizer"] + [f"tokenizer_{i + 1}" for i in range(1, count)]
        if all(os.path.isdir(os.path.join(ckpt, sub)) for sub in subfolders):
            from transformers import CLIPTokenizer

            try:
                return [CLIPTokenizer.from_pretrained(ckpt, subfolder=sub) for sub in subfolders]
            except Exception as e:  # an incomplete folder: fall back to the cached tokenizer
                logger.warning("%s/tokenizer: cannot load it (%s); using the standard tokenizer", ckpt, e)
        return arch.load_tokenizers(model_args)

    @staticmethod
    def _attention(args, unet, vae) -> None:
        if args.xformers or args.diffusers_xformers:
            try:
                import xformers.ops  # noqa: F401

                unet.enable_xformers_memory_efficient_attention()
                vae.enable_xformers_memory_efficient_attention()
                logger.info("attention: xformers")
                return
            except Exception as e:
                logger.warning("xformers is not available (%s); using PyTorch SDPA attention", e)
        logger.info("attention: PyTorch scaled-dot-product attention")

    def add_textual_inversion(self, path: str) -> None:
        import torch

        token, parts = _textual_inversion(path)
        if len(parts) != len(self.text_encoders):
            kinds = {1: "SD1.x/2.x (one tensor)", 2: "SDXL (clip_l and clip_g)"}
            raise UserInputError(f"--textual_inversion_embeddings {path}: an {kinds.get(len(parts), str(len(parts)))} "
                                 f"embedding; this model has {len(self.text_encoders)} text encoder(s)")
        n = parts[0].shape[0]
        strings = [token] + [f"{token}{i}" for i in range(1, n)]
        for tokenizer, te, embeds in zip(self.tokenizers, self.text_encoders, parts):
            width = te.get_input_embeddings().weight.shape[1]
            if embeds.shape[1] != width:
                raise UserInputError(
                    f"--textual_inversion_embeddings {path}: vectors of width {embeds.shape[1]}, the text encoder needs {width}"
                )
            added = tokenizer.add_tokens(strings)
            if added != n:
                raise UserInputError(f"--textual_inversion_embeddings {path}: the token '{token}' (or {token}1...) already exists")
            ids = tokenizer.convert_tokens_to_ids(strings)
            te.resize_token_embeddings(len(tokenizer))
            weight = te.get_input_embeddings().weight
            with torch.no_grad():
                for i, v in zip(ids, embeds):
                    weight[i] = v.to(weight.device, weight.dtype)
        if n > 1:
            self.token_expansions[token] = " ".join(strings)
        logger.info("textual inversion: '%s' (%d vector%s) from %s", token, n, "s" if n > 1 else "", path)

    def expand_tokens(self, prompt: str) -> str:
        """A multi-vector embedding's token stands for all its vectors."""
        import re

        for token, expansion in self.token_expansions.items():
            prompt = re.sub(rf"(?<![\w]){re.escape(token)}(?![\w])", expansion, prompt)
        return prompt


# ============================================================================ jobs
@dataclass
class Job:
    """One image to generate."""

    index: int  # image number in request order (from 0)
    prompt: str
    negative_prompt: str
    seed: int
    raw_prompt: str
    width: int
    height: int
    steps: int
    scale: float
    negative_scale: Optional[float]
    strength: float
    multipliers: tuple
    clip_prompt: Optional[str] = None
    file_name: Optional[str] = None
    init_image: Any = None
    mask: Any = None
    extra: dict = field(default_factory=dict)

    def batch_key(self) -> tuple:
        return (self.width, self.height, self.steps, self.scale, self.negative_scale, self.strength, self.multipliers,
                self.init_image is not None, self.mask is not None, tuple(sorted(self.extra.items())))


class Generator:
    """Turns prompt entries into jobs, batches and saved images."""

    def __init__(self, args, pipe: GenerationPipeline, init_images=None, masks=None):
        self.args = args
        self.pipe = pipe
        self.init_images = init_images
        self.masks = masks
        self.seed_random = random.Random(args.seed) if args.seed is not None else random.Random()
        self.dynamic_rng = random.Random(None if args.seed is None else args.seed + 1)
        self.highres = args.highres_fix_scale is not None
        self.global_step = 0
        self.saved: list[str] = []
        self.warned: set[str] = set()
        self.fixed_first_seed = False
        self.upscaler = self._make_upscaler() if args.highres_fix_upscaler else None
        self.progress = None
        size_arch = getattr(pipe.arch, "default_generation_size", (512, 512))
        self.default_width = args.W if args.W is not None else size_arch[0]
        self.default_height = args.H if args.H is not None else size_arch[1]
        self.uses_size_conditioning = bool(getattr(pipe.arch, "size_conditioning", False))
        if init_images is not None and args.W is not None and args.H is not None:
            w, h = args.W, args.H
            if self.highres:
                w, h = int(w * args.highres_fix_scale + 0.5), int(h * args.highres_fix_scale + 0.5)
            logger.info("resizing the init images%s to %dx%d", " and masks" if masks else "", w, h)
            self.init_images = [self._resized(im, w, h) for im in init_images]
            if masks is not None:
                self.masks = [self._resized(m, w, h) for m in masks]

    @staticmethod
    def _resized(image, w: int, h: int):
        from PIL import Image

        r = image.resize((w, h), Image.LANCZOS)
        r.info.update(image.info)
        return r

    def _warn_once(self, key: str, message: str, *fmt) -> None:
        if key not in self.warned:
            self.warned.add(key)
            logger.warning(message, *fmt)

    def _make_upscaler(self):
        import importlib

        module = importlib.import_module(self.args.highres_fix_upscaler)
        if not hasattr(module, "create_upscaler"):
            raise UserInputError(f"--highres_fix_upscaler {self.args.highres_fix_upscaler}: has no create_upscaler()")
        from library.inference.network_loading import parse_network_args_string

        kwargs = parse_network_args_string(self.args.highres_fix_upscaler_args, "--highres_fix_upscaler_args")
        upscaler = module.create_upscaler(**kwargs)
        if hasattr(upscaler, "to"):
            upscaler.to(self.pipe.device, self.pipe.dtype)
        return upscaler

    # ------------------------------------------------------------------ seeds
    def _draw_seed(self) -> int:
        if self.fixed_first_seed:
            self.fixed_first_seed = False
            return int(self.args.seed)
        return self.seed_random.randint(0, MAX_SEED)

    # ------------------------------------------------------------------ entries -> jobs
    def _variant_spec(self, entry: PromptEntry, text: str, cache: dict) -> PromptSpec:
        if text not in cache:
            if entry.spec is not None:
                cache[text] = entry.spec.replace(prompt=text)
            else:
                cache[text] = parse_prompt_line(text, GEN, entry.where)
        return cache[text]

    def jobs_for_entry(self, entry: PromptEntry, iter_seed: Optional[int]) -> list[Job]:
        a = self.args
        source = entry.spec.prompt if entry.spec is not None else entry.raw
        variants = expand_dynamic_prompts(source, a.images_per_prompt, self.dynamic_rng)
        count = a.images_per_prompt if len(variants) == 1 else len(variants)
        cache: dict = {}
        first = self._variant_spec(entry, variants[0], cache)
        prompt_seeds = list(first.seeds) if first.seeds else None
        last_seed = None
        jobs = []
        for k in range(count):
            text = variants[k] if len(variants) > 1 else variants[0]
            spec = self._variant_spec(entry, text, cache)
            seed = None
            if prompt_seeds is not None:
                if prompt_seeds:
                    s = prompt_seeds.pop(0)
                    if s < 0:
                        prompt_seeds = None
                    else:
                        seed = last_seed = s
                elif last_seed is not None:
                    seed = last_seed
            if seed is None:
                seed = iter_seed if iter_seed is not None else self._draw_seed()
            jobs.append(self._job(spec, text if entry.spec is None else (entry.raw or spec.prompt), seed, k, count))
        return jobs

    def _job(self, spec: PromptSpec, raw: str, seed: int, k: int, count: int) -> Job:
        a = self.args
        for fields, what in PROMPT_FIELDS_NOT_IMPLEMENTED:
            if any(getattr(spec, f) is not None for f in fields):
                self._warn_once(what, "prompt option for %s is not implemented in this version; ignored", what)
        extra = {f: getattr(spec, f) if getattr(spec, f) is not None else getattr(a, f) for f in SIZE_CONDITIONING}
        extra = {k_: v for k_, v in extra.items() if v is not None}
        if extra and not self.uses_size_conditioning:
            self._warn_once("sdxl-size", "SDXL size/crop conditioning (%s) has no effect on this model", ", ".join(sorted(extra)))
            extra = {}
        width = spec.width if spec.width is not None else self.default_width
        height = spec.height if spec.height is not None else self.default_height
        steps = spec.sample_steps if spec.sample_steps is not None else a.steps
        scale = spec.scale if spec.scale is not None else a.scale
        if spec.negative_scale == "none":
            negative_scale = None
        elif spec.negative_scale is not None:
            negative_scale = float(spec.negative_scale)
        else:
            negative_scale = a.negative_scale
        strength = spec.strength if spec.strength is not None else (a.strength if a.strength is not None else DEFAULT_STRENGTH)
        if not 0.0 <= strength <= 1.0:
            self._warn_once(f"strength{strength}", "strength %g is outside 0..1; clamped", strength)
            strength = min(1.0, max(0.0, strength))
        file_name = spec.file_name
        if file_name and count > 1:
            file_name = out.numbered_file_name(out.with_image_extension(file_name), k)
        init_image = mask = None
        if self.init_images is not None:
            init_image = self.init_images[self.global_step % len(self.init_images)]
            if not self.highres:
                w, h = init_image.size
                width, height = w - w % 32, h - h % 32
                if (width, height) != (w, h):
                    self._warn_once(f"size{w}x{h}", "init image size %dx%d is not a multiple of 32; it is resized to %dx%d",
                                    w, h, width, height)
        if self.masks is not None:
            mask = self.masks[self.global_step % len(self.masks)]
        job = Job(
            index=self.global_step, prompt=spec.prompt, negative_prompt=spec.negative_prompt or "", seed=int(seed),
            raw_prompt=raw, width=width, height=height, steps=steps, scale=scale, negative_scale=negative_scale,
            strength=strength, multipliers=self.pipe.networks.resolve_multipliers(spec.network_multipliers),
            clip_prompt=spec.clip_prompt, file_name=file_name, init_image=init_image, mask=mask, extra=extra,
        )
        self.global_step += 1
        return job

    # ------------------------------------------------------------------ running
    def prompter(self, checked):
        a = self.args
        if checked.entries is not None:
            entries = checked.entries
            single = len(entries) == 1 and a.images_per_prompt == 1
            self.fixed_first_seed = a.seed is not None and single and not a.iter_same_seed
            return ListPrompter(entries, random.Random(a.seed))
        if a.from_module:
            return ModulePrompter(a.from_module, a, self.pipe, self.pipe.networks, self.seed_random)
        return InteractivePrompter()

    def run(self, checked) -> list[str]:
        a = self.args
        prompter = self.prompter(checked)
        interactive = isinstance(prompter, InteractivePrompter)
        n_iter = 1 if interactive else a.n_iter
        t0 = time.time()
        for it in range(n_iter):
            if n_iter > 1:
                logger.info("iteration %d/%d", it + 1, n_iter)
            iter_seed = self.seed_random.randint(0, MAX_SEED) if a.iter_same_seed else None
            if isinstance(prompter, ModulePrompter):
                prompter.iter_seed = iter_seed
            entries = prompter.iteration(a.shuffle_prompts)
            if isinstance(prompter, ListPrompter):
                jobs = [j for e in entries for j in self.jobs_for_entry(e, iter_seed)]
                self._run_jobs(jobs, total=len(jobs))
            else:
                for e in entries:
                    jobs = self.jobs_for_entry(e, iter_seed)
                    if isinstance(prompter, ModulePrompter):
                        prompter.global_step = self.global_step
                    self._run_jobs(jobs, total=None, preview=interactive)
        elapsed = time.time() - t0
        n = len(self.saved)
        if n:
            logger.info("done: %d image%s in %.1f s (%.2f s/image), saved to %s", n, "s" if n != 1 else "",
                        elapsed, elapsed / n, os.path.abspath(a.outdir))
        else:
            logger.info("done: no images generated")
        return self.saved

    def _run_jobs(self, jobs: list[Job], total: Optional[int], preview: bool = False) -> None:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="image", desc="images", disable=total is None or total <= 1, leave=True)
        batch: list[Job] = []
        try:
            for job in jobs:
                if batch and batch[-1].batch_key() != job.batch_key():
                    self._flush(batch, bar, preview)
                batch.append(job)
                if len(batch) >= self.args.batch_size:
                    self._flush(batch, bar, preview)
            if batch:
                self._flush(batch, bar, preview)
        finally:
            bar.close()

    def _flush(self, batch: list[Job], bar, preview: bool) -> None:
        jobs = list(batch)
        batch.clear()
        paths = self.process_batch(jobs)
        bar.update(len(jobs))
        if preview and not self.args.no_preview:
            self._preview(paths)

    def _preview(self, paths: list[str]) -> None:
        try:
            import cv2

            for p in paths:
                cv2.imshow(os.path.basename(p), cv2.imread(p))
                cv2.waitKey()
                cv2.destroyAllWindows()
        except Exception as e:  # no OpenCV, or no display
            self._warn_once("preview", "cannot show previews (%s); images are only saved (use --no_preview)", e)

    # ------------------------------------------------------------------ one batch
    def _vae_batch(self, n: int) -> int:
        v = self.args.vae_batch_size
        if v is None:
            return n
        return max(1, int(n * v)) if v < 1 else int(v)

    def _initial_noise(self, jobs: list[Job], width: int, height: int):
        """Seeded starting noise with --pyramid_noise_prob / --noise_offset_prob applied,
        or None when neither is set (the sampler then draws the same noise itself)."""
        a = self.args
        if not a.pyramid_noise_prob and not a.noise_offset_prob:
            return None
        import torch

        from library.training.noise import offset_noise, pyramid_noise

        s = self.pipe.sampler
        shape = (1, s.latent_channels, height // s.vae_scale_factor, width // s.vae_scale_factor)
        noises = []
        for job in jobs:
            g = torch.Generator("cpu").manual_seed(job.seed)
            noise = torch.randn(shape, generator=g, dtype=torch.float32)
            rng = random.Random(job.seed)
            if a.pyramid_noise_prob and rng.random() < a.pyramid_noise_prob:
                lo, hi = a.pyramid_noise_discount_range or (0.4, 0.4)
                discount = lo + (hi - lo) * rng.random()
                noise = pyramid_noise(noise, PYRAMID_ITERATIONS, discount, generator=g)
                logger.info("seed %d: pyramid noise, discount %.3f", job.seed, discount)
            if a.noise_offset_prob and rng.random() < a.noise_offset_prob:
                lo, hi = a.noise_offset_range or (0.1, 0.1)
                offset = lo + (hi - lo) * rng.random()
                noise = offset_noise(noise, noise, offset, generator=g)
                logger.info("seed %d: noise offset %.3f", job.seed, offset)
            noises.append(noise)
        return torch.cat(noises)

    def _generate(self, jobs: list[Job], *, width: int, height: int, steps: int, strength: float, seeds: list[int],
                  init_images=None, init_latents=None, masks=None, noise=None, output_type: str = "pil"):
        from library.inference.samplers import get_scheduler

        a = self.args
        first = jobs[0]
        s = self.pipe.sampler
        s.vae_batch_size = self._vae_batch(len(jobs))
        minimum = MIN_STEPS.get(a.sampler, 1)
        if steps < minimum:
            self._warn_once(f"min-steps{steps}", "the %s sampler needs at least %d steps; using %d instead of %d",
                            a.sampler, minimum, minimum, steps)
            steps = minimum
        scheduler = get_scheduler(a.sampler, a.v_parameterization, a.zero_terminal_snr, a.force_scheduler_zero_steps_offset)
        expand = self.pipe.expand_tokens
        return s.generate(
            [expand(j.prompt) for j in jobs], [expand(j.negative_prompt) for j in jobs], width=width, height=height,
            steps=steps, guidance_scale=first.scale, negative_scale=first.negative_scale, scheduler=scheduler,
            seed=seeds, latents=noise, init_image=init_images, init_latents=init_latents, strength=strength,
            mask=masks, eta=a.ddim_eta, extra=dict(first.extra), output_type=output_type, progress=True,
        )

    def process_batch(self, jobs: list[Job]) -> list[str]:
        import torch

        with torch.no_grad():
            return self._process_batch(jobs)

    def _process_batch(self, jobs: list[Job]) -> list[str]:
        a = self.args
        first = jobs[0]
        self.pipe.networks.activate(first.multipliers)
        init_images = [j.init_image for j in jobs] if first.init_image is not None else None
        masks = [j.mask for j in jobs] if first.mask is not None else None
        seeds = [j.seed for j in jobs]
        logger.info("generating %d image%s %dx%d, %d steps%s", len(jobs), "s" if len(jobs) > 1 else "", first.width,
                    first.height, first.steps, ", img2img strength %g" % first.strength if init_images else "")
        if not self.highres:
            noise = None if init_images else self._initial_noise(jobs, first.width, first.height)
            images = self._generate(jobs, width=first.width, height=first.height, steps=first.steps,
                                    strength=first.strength, seeds=seeds, init_images=init_images, masks=masks, noise=noise)
            return self._save(jobs, images, "")

        # highres fix: a small first pass, upscaled, then refined at full size (img2img)
        def scaled(x: int) -> int:
            v = int(x * a.highres_fix_scale + 0.5)
            return max(32, v - v % 32)

        w1, h1 = scaled(first.width), scaled(first.height)
        latent_mode = self.upscaler.support_latents() if self.upscaler is not None else a.highres_fix_latents_upscaling
        strength1 = a.highres_fix_strength if a.highres_fix_strength is not None else first.strength
        logger.info("highres fix: first pass %dx%d, %d steps", w1, h1, a.highres_fix_steps)
        noise = None if init_images else self._initial_noise(jobs, w1, h1)
        first_out = self._generate(jobs, width=w1, height=h1, steps=a.highres_fix_steps, strength=strength1, seeds=seeds,
                                   init_images=init_images, masks=masks, noise=noise,
                                   output_type="latent" if latent_mode else "pil")
        saved = []
        if a.highres_fix_save_1st:
            pil = first_out
            if latent_mode:
                from library.inference.sd_sampling import tensor_to_pil

                pil = tensor_to_pil(self.pipe.sampler.decode_latents(first_out))
            saved += self._save(jobs, pil, "0", size=(w1, h1), steps=a.highres_fix_steps)
        w2, h2 = self.pipe.sampler.round_size(first.width, first.height)
        up_images = up_latents = None
        if self.upscaler is not None:
            result = self.upscaler.upscale(
                self.pipe.vae, None if latent_mode else first_out, first_out if latent_mode else None, self.pipe.dtype,
                w2, h2, len(jobs), self._vae_batch(len(jobs)),
            )
            if hasattr(result, "dim"):
                up_latents = result
            else:
                up_images = list(result)
        elif latent_mode:
            import torch

            s = self.pipe.sampler
            up_latents = torch.nn.functional.interpolate(
                first_out.float(), size=(h2 // s.vae_scale_factor, w2 // s.vae_scale_factor), mode="bilinear"
            )
        else:
            from PIL import Image

            up_images = [im.resize((w2, h2), Image.LANCZOS) for im in first_out]
        logger.info("highres fix: second pass %dx%d, %d steps, strength %g", w2, h2, first.steps, first.strength)
        images = self._generate(jobs, width=w2, height=h2, steps=first.steps, strength=first.strength,
                                seeds=[j.seed + 1 for j in jobs], init_images=up_images, init_latents=up_latents)
        return saved + self._save(jobs, images, "1")

    def _save(self, jobs: list[Job], images: list, highres_prefix: str, size=None, steps=None) -> list[str]:
        a = self.args
        ts = out.timestamp()
        paths = []
        for i, (job, image) in enumerate(zip(jobs, images)):
            record = out.ImageRecord(
                prompt=job.prompt, negative_prompt=job.negative_prompt, seed=job.seed,
                steps=steps if steps is not None else job.steps, scale=job.scale,
                width=size[0] if size else image.size[0], height=size[1] if size else image.size[1],
                negative_scale=job.negative_scale, clip_prompt=job.clip_prompt, raw_prompt=job.raw_prompt,
                file_name=job.file_name,
                init_image_name=job.init_image.info.get("source_path") if job.init_image is not None else None,
                index=job.index, strength=job.strength if job.init_image is not None or self.highres else None,
                extra=job.extra if self.uses_size_conditioning else None,
            )
            name = out.output_file_name(record, index_in_batch=i, ts=ts, sequential=a.sequential_file_name,
                                        use_original_file_name=a.use_original_file_name, highres_prefix=highres_prefix)
            path = out.save_image(image, a.outdir, name, out.png_text(record, a.sampler))
            logger.debug("saved %s", path)
            paths.append(path)
        self.saved.extend(paths)
        return paths


# ============================================================================ entry point
def run(args) -> list[str]:
    """gen_img.py's main: check, load, generate. Returns the paths of the saved images."""
    checked = check_inputs(args)
    pipe = GenerationPipeline.load(args, checked)
    return Generator(args, pipe, checked.init_images, checked.masks).run(checked)
