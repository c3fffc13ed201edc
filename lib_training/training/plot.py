"""A loss plot drawn with Pillow (no plotting library needed in the WebUI's environment)."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw

WIDTH, HEIGHT = 640, 360
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 64, 16, 16, 36
RAW_COLOUR = (170, 190, 230)
SMOOTH_COLOUR = (30, 80, 200)


def smooth(values: Sequence[float], strength: float = 0.9) -> list[float]:
    """Exponential moving average, bias-corrected so the start is not pulled towards 0."""
    out, average, weight = [], 0.0, 0.0
    for value in values:
        average = strength * average + (1 - strength) * value
        weight = strength * weight + (1 - strength)
        out.append(average / weight)
    return out


def plot_loss(steps: Sequence[int], losses: Sequence[float], title: str = "loss") -> Image.Image:
    """Raw loss (light) and its moving average (dark) against the step."""
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = MARGIN_LEFT, MARGIN_TOP, WIDTH - MARGIN_RIGHT, HEIGHT - MARGIN_BOTTOM
    draw.rectangle((left, top, right, bottom), outline=(120, 120, 120))
    draw.text((left + 6, top + 4), title, fill=(40, 40, 40))
    if not losses:
        draw.text((left + 6, top + 20), "no steps yet", fill=(120, 120, 120))
        return image

    x0, x1 = min(steps), max(steps)
    y0, y1 = min(losses), max(losses)
    if x1 == x0:
        x1 = x0 + 1
    if y1 - y0 < 1e-12:
        y0, y1 = y0 - 0.5, y1 + 0.5

    def point(step: float, value: float) -> tuple[float, float]:
        return (
            left + (step - x0) / (x1 - x0) * (right - left),
            bottom - (value - y0) / (y1 - y0) * (bottom - top),
        )

    for fraction in (0.0, 0.5, 1.0):
        value = y0 + fraction * (y1 - y0)
        _, y = point(x0, value)
        draw.line((left - 4, y, left, y), fill=(120, 120, 120))
        draw.text((4, y - 6), f"{value:.4g}", fill=(60, 60, 60))
    for fraction in (0.0, 0.5, 1.0):
        step = x0 + fraction * (x1 - x0)
        x, _ = point(step, y0)
        draw.line((x, bottom, x, bottom + 4), fill=(120, 120, 120))
        draw.text((x - 12, bottom + 8), f"{int(step)}", fill=(60, 60, 60))

    if len(losses) > 1:
        draw.line([point(s, v) for s, v in zip(steps, losses)], fill=RAW_COLOUR, width=1)
        draw.line([point(s, v) for s, v in zip(steps, smooth(losses))], fill=SMOOTH_COLOUR, width=2)
    else:
        x, y = point(steps[0], losses[0])
        draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=SMOOTH_COLOUR)
    return image
