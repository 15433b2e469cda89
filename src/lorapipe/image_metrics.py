"""Image quality numbers that need no model: sharpness, exposure clipping, brightness, colour.

They are for comparing images of one grid against each other (the same prompt at another LoRA
scale, CFG or negative preset), not absolute grades:

- ``sharpness``: variance of the Laplacian of the luma (0-255 scale, the 4-neighbour kernel
  OpenCV's ``Laplacian(ksize=1)`` uses, interior pixels only). Blur lowers it; noise and grain
  raise it.
- ``highlight_clipping``: fraction of pixels with any channel at or above 250 (blown whites and
  channels pushed to the limit, e.g. glaring neon at a high LoRA scale).
- ``shadow_clipping``: fraction of pixels with every channel at or below 5 (crushed black).
- ``mean_luminance``: mean Rec. 709 luma, 0 (black) to 1 (white).
- ``colorfulness``: Hasler & Süsstrunk (2003), ``sigma_rgyb + 0.3 * mu_rgyb`` over the opponent
  channels rg = R - G and yb = (R + G) / 2 - B, computed in signed floats (uint8 arithmetic
  would wrap around). About 0 for grey, 15-35 for muted photos, above 100 for garish ones.

``ClipScorer`` adds a CLIP score (100 x cosine similarity of image and prompt, floored at 0,
as torchmetrics defines it) from a CLIP model directory given by the user; nothing downloads.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from lorapipe.errors import ModelError

if TYPE_CHECKING:
    import torch

HIGHLIGHT_LEVEL = 250
SHADOW_LEVEL = 5
REC709 = np.array([0.2126, 0.7152, 0.0722])
# the image normalization OpenAI's CLIP was trained with (used when the model dir has none)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
METRIC_NAMES = (
    "sharpness",
    "highlight_clipping",
    "shadow_clipping",
    "mean_luminance",
    "colorfulness",
)


def to_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """(H, W, 3) float64 in 0-255 from a PIL image or a uint8 / 0-255 array."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image, dtype=np.float64)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {array.shape}")
    return array


def luma(rgb: np.ndarray) -> np.ndarray:
    """Rec. 709 luma of an RGB array, same scale as the input."""
    return rgb @ REC709


def sharpness(image: Image.Image | np.ndarray) -> float:
    """Variance of the Laplacian of the luma (0-255 scale)."""
    y = luma(to_rgb_array(image))
    if min(y.shape) < 3:
        return 0.0
    laplacian = y[:-2, 1:-1] + y[2:, 1:-1] + y[1:-1, :-2] + y[1:-1, 2:] - 4.0 * y[1:-1, 1:-1]
    return float(laplacian.var())


def highlight_clipping(image: Image.Image | np.ndarray, level: int = HIGHLIGHT_LEVEL) -> float:
    """Fraction of pixels with at least one channel >= ``level``."""
    return float((to_rgb_array(image).max(axis=2) >= level).mean())


def shadow_clipping(image: Image.Image | np.ndarray, level: int = SHADOW_LEVEL) -> float:
    """Fraction of pixels with every channel <= ``level``."""
    return float((to_rgb_array(image).max(axis=2) <= level).mean())


def mean_luminance(image: Image.Image | np.ndarray) -> float:
    """Mean Rec. 709 luma, 0 to 1."""
    return float(luma(to_rgb_array(image)).mean() / 255.0)


def colorfulness(image: Image.Image | np.ndarray) -> float:
    """Hasler & Süsstrunk's colourfulness M, in signed floats."""
    rgb = to_rgb_array(image)
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    rg = red - green
    yb = 0.5 * (red + green) - blue
    spread = np.hypot(rg.std(), yb.std())
    offset = np.hypot(rg.mean(), yb.mean())
    return float(spread + 0.3 * offset)


def compute_metrics(image: Image.Image | np.ndarray) -> dict[str, float]:
    """Every model-free metric of one image, by name (``METRIC_NAMES``)."""
    rgb = to_rgb_array(image)
    return {
        "sharpness": sharpness(rgb),
        "highlight_clipping": highlight_clipping(rgb),
        "shadow_clipping": shadow_clipping(rgb),
        "mean_luminance": mean_luminance(rgb),
        "colorfulness": colorfulness(rgb),
    }


class ClipScorer:
    """CLIP score of images against their prompts, from a local transformers CLIP model
    directory (``config.json``, weights, tokenizer; ``preprocessor_config.json`` optional)."""

    def __init__(self, model_path: str | Path, *, device: str = "cpu") -> None:
        from transformers import CLIPModel, CLIPTokenizer

        path = Path(model_path)
        try:
            self.model = CLIPModel.from_pretrained(path, local_files_only=True).to(device).eval()
            self.tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as error:
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ModelError(
                f"CLIP model '{model_path}' could not be loaded ({first_line}); give a local "
                "transformers CLIP directory (CLIPModel.save_pretrained plus its tokenizer)"
            ) from error
        self.device = device
        self.image_size = int(self.model.config.vision_config.image_size)
        self.mean, self.std = _normalization(path)

    def score(self, images: Sequence[Image.Image], texts: Sequence[str]) -> list[float]:
        """``max(100 * cos(image, text), 0)`` for each image and its text."""
        import torch

        pixels = torch.stack([self._pixels(image) for image in images]).to(self.device)
        tokens = self.tokenizer(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=self.tokenizer.model_max_length,
            return_tensors="pt",
        ).to(self.device)
        with torch.no_grad():
            image_embeds = self.model.get_image_features(pixel_values=pixels)
            text_embeds = self.model.get_text_features(**tokens)
        image_embeds = _as_tensor(image_embeds)
        text_embeds = _as_tensor(text_embeds)
        cosine = torch.nn.functional.cosine_similarity(image_embeds, text_embeds, dim=-1)
        return [float(value) for value in (100 * cosine).clamp(min=0).cpu()]

    def _pixels(self, image: Image.Image) -> torch.Tensor:
        """CLIP preprocessing: shortest side to the model size (bicubic), centre crop,
        scale to 0-1, normalize."""
        import torch

        size = self.image_size
        image = image.convert("RGB")
        scale = size / min(image.size)
        resized = image.resize(
            (max(size, round(image.width * scale)), max(size, round(image.height * scale))),
            Image.Resampling.BICUBIC,
        )
        left = (resized.width - size) // 2
        top = (resized.height - size) // 2
        cropped = np.asarray(resized.crop((left, top, left + size, top + size)), np.float32)
        normalized = (cropped / 255.0 - self.mean) / self.std
        return torch.from_numpy(normalized.transpose(2, 0, 1).copy())


def _as_tensor(features: object) -> torch.Tensor:
    """transformers 5 may return a model output instead of a tensor from get_*_features."""
    return getattr(features, "pooler_output", features)  # type: ignore[return-value]


def _normalization(path: Path) -> tuple[np.ndarray, np.ndarray]:
    config_path = path / "preprocessor_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    mean = np.asarray(config.get("image_mean", CLIP_MEAN), np.float32)
    std = np.asarray(config.get("image_std", CLIP_STD), np.float32)
    return mean, std
