"""Pictures of what each method keeps: the input, then one panel per reduction stage.

A panel shows the model's preprocessed input with the patches that do not go on as themselves
greyed (dropped) or tinted (fused, fast path, frozen); kept patches are shown as they are. After a
merging stage (ToMe) each patch is painted in the colour of the token it has been merged into (the
mean colour of its patches, tinted per token), as ToMe's own figure does. A panel's title counts
the tokens after the stage: the patches kept as themselves plus the tokens the method made (EViT's
fused tokens, ToMe's merged ones); the class token is not counted, and blocks are numbered from 0.
A method with many stages (ToMe merges in every block) is shown at a few of them, the last included.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.cbook import get_sample_data
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from PIL import Image, UnidentifiedImageError
from torch import nn

import methods
from harness.measure.data import eval_config, eval_transform
from harness.measure.models import create_model
from methods.errors import TokenBenchError
from methods.timm_compat import model_image_size, patch_size
from methods.tracing import Stage

KEPT = 0
# What happens to the patches a stage does not keep, with its mask code and its tint (RGB in [0, 1]).
CODES = {"dropped": 1, "fused": 2, "fast path": 3, "frozen": 4, "merged": 5}
TINTS = {
    "dropped": (0.55, 0.55, 0.55),
    "fused": (1.0, 0.5, 0.05),
    "fast path": (0.12, 0.47, 0.71),
    "frozen": (0.58, 0.4, 0.74),
    "merged": (0.84, 0.15, 0.55),
}
# What the tokens a method makes are called, by what happens to the patches it does not keep.
MADE = {"fused": "fused", "fast path": "representative", "merged": "merged"}
TINT_WEIGHT = 0.65
GROUP_TINT = 0.35  # share of a merged token's own random colour in its patches' paint
MAX_PANELS = 4
LEGEND = {"merged": "merged (a colour per token)"}
COUNTED = "tokens = patches kept as themselves + tokens the method made; class token not counted"


def default_image() -> Path:
    """The photograph matplotlib ships, so that a picture can be drawn with no input at hand."""
    return Path(get_sample_data("grace_hopper.jpg", asfileobj=False))


def stage_masks(stages: Sequence[Stage], grid: tuple[int, int], sample: int = 0) -> list[np.ndarray]:
    """Per stage, an int array [rows, cols] over the original patch grid (row-major patch order):
    KEPT (0) where the patch goes on as itself, else CODES[stage.others]."""
    masks = []
    for stage in stages:
        mask = np.full(grid[0] * grid[1], CODES[stage.others], dtype=np.int64)  # [rows * cols]
        kept = stage.kept[sample]  # [k]; -1 marks a token the method made, not a patch
        mask[kept[kept >= 0].numpy()] = KEPT
        masks.append(mask.reshape(grid))
    return masks


def stage_tokens(stage: Stage, sample: int = 0) -> tuple[int, int]:
    """(patches kept as themselves, tokens made by the method) after `stage`, class token excluded."""
    kept = stage.kept[sample]
    patches = int((kept >= 0).sum())
    return patches, len(kept) - patches + stage.appended


def stage_title(stage: Stage, sample: int = 0) -> str:
    patches, made = stage_tokens(stage, sample)
    detail = f"{patches} patches + {made} {MADE.get(stage.others, 'made')}" if made else f"{patches} patches"
    return f"block {stage.block}: {patches + made} tokens\n({detail})"


def tint(picture: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Blend each patch that is not kept towards its kind's tint. picture: [H, W, 3], mask: [rows, cols]"""
    rows, cols = mask.shape
    pixels = mask.repeat(picture.shape[0] // rows, axis=0).repeat(picture.shape[1] // cols, axis=1)  # [H, W]
    grey = picture.mean(axis=-1, keepdims=True)  # [H, W, 1]
    out = picture.copy()
    for kind, code in CODES.items():
        where = pixels == code
        out[where] = ((1 - TINT_WEIGHT) * grey + TINT_WEIGHT * np.asarray(TINTS[kind]))[where]
    return out


def paint_groups(picture: np.ndarray, groups: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Paint each patch merged with others in its token's colour: the mean colour of the token's patches,
    tinted by a random colour per token; a patch alone is shown as it is.
    picture: [H, W, 3], groups: [rows * cols], the token each patch is part of"""
    rows, cols = grid
    ph, pw = picture.shape[0] // rows, picture.shape[1] // cols
    patches = picture.reshape(rows, ph, cols, pw, 3).swapaxes(1, 2).reshape(rows * cols, ph * pw, 3).copy()
    sizes = np.bincount(groups)  # [tokens]
    mean = np.zeros((len(sizes), 3))
    np.add.at(mean, groups, patches.mean(axis=1))
    mean /= np.maximum(sizes, 1)[:, None]  # [tokens, 3]
    colour = (1 - GROUP_TINT) * mean + GROUP_TINT * np.random.default_rng(0).random((len(sizes), 3))
    merged = sizes[groups] > 1  # [rows * cols]
    patches[merged] = colour[groups[merged]][:, None, :]
    return patches.reshape(rows, cols, ph, pw, 3).swapaxes(1, 2).reshape(picture.shape)


def shown_stages(stages: Sequence[Stage]) -> list[Stage]:
    """At most MAX_PANELS stages, evenly spaced and ending with the last."""
    count = min(len(stages), MAX_PANELS)
    return [stages[len(stages) * (i + 1) // count - 1] for i in range(count)]


def stage_figure(picture: np.ndarray, stages: Sequence[Stage], patch: tuple[int, int], title: str) -> Figure:
    """The input, then one panel per shown stage (`shown_stages`) with its mask or its merged tokens drawn.

    picture: [H, W, 3] in [0, 1], the image as the model sees it; patch: (height, width) of a patch.
    """
    grid = (picture.shape[0] // patch[0], picture.shape[1] // patch[1])
    stages = shown_stages(stages)
    masks = stage_masks(stages, grid)
    fig = Figure(figsize=(3 * (1 + len(stages)), 3.9), layout="constrained")
    axes = fig.subplots(1, 1 + len(stages), squeeze=False)[0]
    axes[0].imshow(picture)
    axes[0].set_title("input" if stages else "input (no reduction stage)")
    for ax, stage, mask in zip(axes[1:], stages, masks):
        merged = stage.groups is not None
        ax.imshow(paint_groups(picture, stage.groups[0].numpy(), grid) if merged else tint(picture, mask))
        ax.set_title(stage_title(stage))
    for ax in axes:
        ax.set_axis_off()
    kinds = sorted({stage.others for stage in stages}, key=CODES.__getitem__)
    handles = [Patch(facecolor=(1, 1, 1), edgecolor="black", label="kept")]
    handles += [Patch(facecolor=TINTS[kind], label=LEGEND.get(kind, kind)) for kind in kinds]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), title=COUNTED)
    fig.suptitle(title)
    return fig


def check_request(
    images: Sequence[str | Path] | None, method_names: Sequence[str], keep_rate: float, checkpoints: Mapping
) -> list[Path]:
    """Every check before any model is built; returns the image paths to draw."""
    if not method_names:
        raise TokenBenchError(f"give at least one method; known methods: {', '.join(methods.list_methods())}")
    for name in method_names:
        methods.lookup(name).make_config(keep_rate=keep_rate)
    extra = sorted(set(checkpoints) - set(method_names))
    if extra:
        raise TokenBenchError(
            f"checkpoint given for {', '.join(extra)}, which is not among the methods: {', '.join(method_names)}"
        )
    missing = [str(path) for path in checkpoints.values() if not Path(path).is_file()]
    if missing:
        raise TokenBenchError(f"checkpoint file not found: {', '.join(missing)}")
    paths = [Path(image) for image in images] if images else [default_image()]
    for path in paths:
        if path.is_dir():
            raise TokenBenchError(f"{path} is a folder: give image files (a shell glob, {path}/*.jpg, names them)")
        if not path.is_file():
            raise TokenBenchError(f"image file not found: {path}")
    stems = [path.stem for path in paths]
    if len(set(stems)) < len(stems):
        raise TokenBenchError(f"images must have distinct file names (outputs are named after them), got {stems}")
    return paths


def method_model(
    model_name: str, method: str, keep_rate: float, checkpoint: str | Path | None, img_size: int
) -> nn.Module:
    """A fresh model with `method` applied, loaded from `checkpoint`, or random (seeded) if there is none
    (`visualise` warns of those)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = create_model(model_name, img_size=img_size)
    methods.apply(model, method, keep_rate=keep_rate)
    if checkpoint is not None:
        methods.load_checkpoint(model, checkpoint)
    return model.eval()


def preprocess(model: nn.Module, path: Path) -> tuple[torch.Tensor, np.ndarray]:
    """The image as the model takes it ([1, 3, H, W], its eval transform) and as it is drawn ([H, W, 3] in [0, 1])."""
    try:
        image = Image.open(path).convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise TokenBenchError(f"cannot read image {path}: {error}") from None
    size = model_image_size(model)
    config = eval_config(model, size)
    tensor = eval_transform(model, size)(image)  # [3, H, W], normalised
    mean = torch.tensor(config["mean"]).view(3, 1, 1)
    std = torch.tensor(config["std"]).view(3, 1, 1)
    picture = (tensor * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()  # [H, W, 3]
    return tensor.unsqueeze(0), picture


def visualise(
    images: Sequence[str | Path] | None,
    method_names: Sequence[str],
    keep_rate: float,
    *,
    model_name: str = "deit_small_patch16_224",
    checkpoints: Mapping[str, str | Path] | None = None,
    out_dir: str | Path = "results/viz",
    img_size: int = 224,
) -> list[Path]:
    """Draw, for each image and method, the patches kept at each stage; write `<image-stem>_<method>.png`.

    With no images, matplotlib's sample photograph is drawn. A method without a checkpoint runs on
    random weights (with a warning); `checkpoints` maps method names to files for methods.load_checkpoint.
    Returns the written paths, image by image, in the order of `method_names`.
    """
    checkpoints = dict(checkpoints or {})
    paths = check_request(images, method_names, keep_rate, checkpoints)
    models = {name: method_model(model_name, name, keep_rate, checkpoints.get(name), img_size) for name in method_names}
    if untrained := [name for name in method_names if name not in checkpoints]:
        warnings.warn(
            f"no checkpoint for {', '.join(untrained)}, so {model_name} has random weights there and the kept "
            f"patches mean nothing",
            UserWarning,
            stacklevel=2,
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in paths:
        # Every model is model_name at img_size, so they all take the image preprocessed alike.
        tensor, picture = preprocess(next(iter(models.values())), path)
        for name, model in models.items():
            stages = methods.kept_patches(model, tensor)
            title = f"{name} at keep rate {keep_rate:g} on {model_name}: {path.name}"
            target = out / f"{path.stem}_{name}.png"
            stage_figure(picture, stages, patch_size(model), title).savefig(target, dpi=100)
            written.append(target)
    return written
