"""A loss plot drawn with Pillow (no plotting library needed in the WebUI's environment)."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

WIDTH, HEIGHT = 640, 360
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 92, 16, 34, 58
TICK_SIZE, TITLE_SIZE = 15, 17  # pixels: readable when the plot is shown at half its width
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


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's built-in font at `size` pixels (its scalable version since Pillow 10.1; older ones
    have only the small bitmap font)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def plot_loss(steps: Sequence[int], losses: Sequence[float], title: str = "loss") -> Image.Image:
    """Raw loss (light) and its moving average (dark) against the step, with axis titles and a legend."""
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    ticks, titles = _font(TICK_SIZE), _font(TITLE_SIZE)
    left, top, right, bottom = MARGIN_LEFT, MARGIN_TOP, WIDTH - MARGIN_RIGHT, HEIGHT - MARGIN_BOTTOM
    draw.rectangle((left, top, right, bottom), outline=(120, 120, 120))
    draw.text((left, 8), title, fill=(40, 40, 40), font=titles)
    draw.text(((left + right) / 2, HEIGHT - 6), "step", fill=(40, 40, 40), font=titles, anchor="md")
    axis = Image.new("RGBA", (bottom - top, TITLE_SIZE + 6), (255, 255, 255, 0))
    ImageDraw.Draw(axis).text(((bottom - top) / 2, 0), "loss", fill=(40, 40, 40), font=titles, anchor="ma")
    rotated = axis.rotate(90, expand=True)
    image.paste(rotated, (4, top), rotated)
    if not losses:
        draw.text((left + 8, top + 8), "no steps yet", fill=(120, 120, 120), font=ticks)
        return image
    draw.line((right - 190, 18, right - 170, 18), fill=RAW_COLOUR, width=2)
    draw.text((right - 166, 18), "loss", fill=(60, 60, 60), font=ticks, anchor="lm")
    draw.line((right - 120, 18, right - 100, 18), fill=SMOOTH_COLOUR, width=3)
    draw.text((right - 96, 18), "average", fill=(60, 60, 60), font=ticks, anchor="lm")

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
        draw.text((left - 8, y), f"{value:.4g}", fill=(60, 60, 60), font=ticks, anchor="rm")
    for fraction in (0.0, 0.5, 1.0):
        step = x0 + fraction * (x1 - x0)
        x, _ = point(step, y0)
        draw.line((x, bottom, x, bottom + 4), fill=(120, 120, 120))
        draw.text((x, bottom + 8), f"{int(step):,}", fill=(60, 60, 60), font=ticks, anchor="ma")

    if len(losses) > 1:
        draw.line([point(s, v) for s, v in zip(steps, losses)], fill=RAW_COLOUR, width=1)
        draw.line([point(s, v) for s, v in zip(steps, smooth(losses))], fill=SMOOTH_COLOUR, width=2)
    else:
        x, y = point(steps[0], losses[0])
        draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=SMOOTH_COLOUR)
    return image
