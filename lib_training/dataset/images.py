"""Find, check and load training images.

Images are opened with Pillow and turned upright by their EXIF orientation; sizes are always given
after that rotation, as (height, width). An image that has an alpha channel is split into RGB and
alpha before resizing. The RGB values are kept as stored: transparent pixels are *not* composited
onto a background, so what the file holds under them (often black) is what the VAE sees. The alpha
channel can become a per-pixel loss weight at latent resolution (`alpha_to_weight`), which is how
transparent areas are kept out of training. A mask file beside the image, `NAME.mask.png` for
`NAME.png` / `NAME.jpg` / ..., takes the alpha channel's place (white trains, black does not); mask
files are not training images themselves.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image, ImageOps
from torch import Tensor

from lib_training.dataset.errors import DatasetError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
MASK_SUFFIX = ".mask.png"  # NAME.mask.png beside NAME.png (or .jpg, ...): the image's loss weight
LATENT_FACTOR = 8  # pixels per latent cell along each side

_EXIF_ORIENTATION = 0x0112
_ORIENTATIONS_SWAPPING_SIDES = (5, 6, 7, 8)


@dataclass(frozen=True)
class FolderScan:
    """The files of a dataset folder, sorted by their path relative to `root` (hidden ones skipped)."""

    root: Path
    images: list[Path]  # files with an image extension
    other_files: list[Path]  # everything else (caption files included)


def relative_name(path: Path, root: Path) -> str:
    """`path` relative to `root` with forward slashes, as messages and summaries show it."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def scan_folder(root: Path, readable: bool = False) -> FolderScan:
    """List the images under `root`, recursively and in a deterministic order.

    Files and folders whose names start with "." are skipped. Raises `DatasetError` when `root` is
    missing, is not a folder, cannot be listed, or holds no image; with `readable`, also when an
    image file cannot be opened for reading (its contents are not checked).
    """
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"The dataset folder {root} does not exist. Check the path.")
    if not root.is_dir():
        raise DatasetError(f"The dataset path {root} is a file, not a folder. Give the folder that holds the images.")
    if not os.access(root, os.R_OK | os.X_OK):
        raise DatasetError(f"The dataset folder {root} cannot be read. Fix its permissions or choose another folder.")
    images: list[Path] = []
    others: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for filename in filenames:
            if filename.startswith("."):
                continue
            path = Path(dirpath) / filename
            is_image = path.suffix.lower() in IMAGE_EXTENSIONS and not filename.lower().endswith(MASK_SUFFIX)
            (images if is_image else others).append(path)
    images.sort(key=lambda p: relative_name(p, root))
    others.sort(key=lambda p: relative_name(p, root))
    if not images:
        found = f" (it holds {len(others)} other files)" if others else " (it is empty)"
        raise DatasetError(
            f"The dataset folder {root} contains no images{found}. "
            f"Accepted image extensions: {', '.join(IMAGE_EXTENSIONS)}."
        )
    if readable:
        unreadable = [relative_name(path, root) for path in images if not os.access(path, os.R_OK)]
        if unreadable:
            listed = ", ".join(unreadable[:5]) + (f" and {len(unreadable) - 5} more" if len(unreadable) > 5 else "")
            raise DatasetError(
                f"{len(unreadable)} image(s) in {root} cannot be read: {listed}. Fix their permissions or remove them."
            )
    return FolderScan(root, images, others)


@dataclass(frozen=True)
class ImageInfo:
    """What validation learnt about one image file."""

    path: Path
    format: str  # lower-case Pillow format name: "png", "jpeg", "webp"
    size: tuple[int, int]  # (height, width) once EXIF orientation is applied
    has_alpha: bool  # an alpha channel, or a mask file (either gives the loss weight)


def _has_alpha(img: Image.Image) -> bool:
    return "A" in img.getbands() or "transparency" in img.info


def inspect_images(paths: list[Path], root: Path) -> tuple[list[ImageInfo], list[str]]:
    """Open and fully decode every image; return the infos of the good ones and one line per bad one.

    Each problem line names the file (relative to `root`) and what went wrong, so the caller can
    report every bad file in one message.
    """
    infos: list[ImageInfo] = []
    problems: list[str] = []
    for path in paths:
        try:
            with Image.open(path) as img:
                img.load()
                width, height = img.size
                if img.getexif().get(_EXIF_ORIENTATION, 1) in _ORIENTATIONS_SWAPPING_SIDES:
                    width, height = height, width
                fmt = (img.format or path.suffix.lstrip(".")).lower()
                infos.append(ImageInfo(path, fmt, (height, width), _has_alpha(img) or mask_path(path).is_file()))
        except Exception as error:  # any decoder failure means the file is unusable
            problems.append(f"{relative_name(path, root)}: {type(error).__name__}: {error}")
    return infos, problems


@dataclass(frozen=True)
class ImageView:
    """One image as training sees it: the file, how it is resized and cropped, and whether it is mirrored.

    The crop is taken from the resized, unmirrored image; mirroring is applied after cropping.
    """

    path: Path
    resized_size: tuple[int, int]  # (h, w) after scaling, before cropping
    crop: tuple[int, int]  # (top, left) of the crop in the resized image, before mirroring
    target_size: tuple[int, int]  # (h, w) of the crop: the training resolution
    flip: bool = False

    @property
    def output_crop(self) -> tuple[int, int]:
        """(top, left) of the crop within the resized image as shown (mirrored when flipped): SDXL's crop."""
        top, left = self.crop
        if self.flip:
            left = self.resized_size[1] - left - self.target_size[1]
        return top, left

    def mirrored(self, flip: bool) -> ImageView:
        return ImageView(self.path, self.resized_size, self.crop, self.target_size, flip)


def open_upright(path: Path) -> Image.Image:
    """The decoded image, rotated/mirrored as its EXIF orientation says."""
    with Image.open(path) as img:
        img.load()
        return ImageOps.exif_transpose(img)


def split_alpha(img: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    """(RGB image with the stored colours, alpha as an "L" image or None when the image has no alpha)."""
    if _has_alpha(img):
        rgba = img.convert("RGBA")
        return rgba.convert("RGB"), rgba.getchannel("A")
    return img.convert("RGB"), None


def _apply_view(img: Image.Image, view: ImageView) -> Image.Image:
    height, width = view.resized_size
    if img.size != (width, height):
        img = img.resize((width, height), Image.Resampling.LANCZOS)
    top, left = view.crop
    target_h, target_w = view.target_size
    img = img.crop((left, top, left + target_w, top + target_h))
    if view.flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img


def rgb_to_tensor(img: Image.Image) -> Tensor:
    """RGB image -> float32 [3, H, W] in [-1, 1]."""
    pixels = torch.from_numpy(np.array(img, dtype=np.uint8))  # [H, W, 3]
    return rearrange(pixels, "h w c -> c h w").float() / 127.5 - 1.0


def alpha_to_weight(alpha: Image.Image) -> Tensor:
    """Alpha ("L" image, sides multiples of 8) -> loss weight [1, H/8, W/8] in [0, 1]: alpha's area mean."""
    values = torch.from_numpy(np.array(alpha, dtype=np.float32) / 255.0)  # [H, W]
    height, width = values.shape
    if height % LATENT_FACTOR or width % LATENT_FACTOR:
        raise ValueError(f"alpha of {width}x{height} px is not a whole number of latent cells")
    return F.avg_pool2d(values[None, None], LATENT_FACTOR)[0]  # [1, H/8, W/8]


def mask_path(image: Path) -> Path:
    """Where the mask of `image` would be: NAME.mask.png beside it."""
    return image.with_name(image.stem + MASK_SUFFIX)


def _weight_source(path: Path, rgb: Image.Image, alpha: Image.Image | None) -> Image.Image | None:
    """The image's mask file as an "L" image of the image's size, else its alpha channel (or None)."""
    mask = mask_path(path)
    if not mask.is_file():
        return alpha
    found = open_upright(mask).convert("L")
    return found if found.size == rgb.size else found.resize(rgb.size, Image.Resampling.BILINEAR)


def load_weight(view: ImageView) -> Tensor | None:
    """Only the loss weight [1, H/8, W/8] of `view` from its mask file or alpha channel; None without."""
    rgb, alpha = split_alpha(open_upright(view.path))
    weight = _weight_source(view.path, rgb, alpha)
    return None if weight is None else alpha_to_weight(_apply_view(weight, view))


def load_view(view: ImageView, with_alpha: bool = False) -> tuple[Tensor, Tensor | None]:
    """Load, resize, crop and mirror one image as `view` says.

    Returns (image [3, H, W] in [-1, 1], weight [1, H/8, W/8] or None). The weight is given only when
    `with_alpha` is set and the image has an alpha channel.
    """
    rgb, alpha = split_alpha(open_upright(view.path))
    image = rgb_to_tensor(_apply_view(rgb, view))
    source = _weight_source(view.path, rgb, alpha) if with_alpha else None
    weight = alpha_to_weight(_apply_view(source, view)) if source is not None else None
    return image, weight
