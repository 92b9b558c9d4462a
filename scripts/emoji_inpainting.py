"""The emoji model's inpainting demo on held-out emoji (never seen in training): a new mouth for one face,
new eyes for another, a new colour for a strawberry's red. Writes the README picture (each row: the
emoji, its mask in red, four fills) and the same cases as the model's web-app examples.

    python scripts/emoji_inpainting.py [--model emoji] [--out docs/emoji/inpainting.png]
        [--examples-dir src/sundae/assets/emoji/examples]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sundae.data.images import pil_to_tensor, save_image_grid
from sundae.pipeline import SundaePipeline

ROOT = Path(__file__).resolve().parent.parent
FILLS = 4


@dataclass(frozen=True)
class Example:
    name: str
    slug: str
    image: str  # under data/emoji/validation
    category: str
    box: tuple[int, int, int, int] | None = None  # x0, y0, x1, y1 (end-exclusive) to redo
    red: bool = False  # redo the red pixels instead

    def mask(self, pixels: np.ndarray) -> np.ndarray:
        mask = np.zeros(pixels.shape[:2], dtype=bool)
        if self.box is not None:
            x0, y0, x1, y1 = self.box
            mask[y0:y1, x0:x1] = True
        if self.red:
            r, g, b = (pixels[..., i].astype(int) for i in range(3))
            mask |= (r > 150) & (g < 110) & (b < 110)
        return mask


EXAMPLES = (
    Example("beaming face: a new mouth", "beaming-face-mouth", "0_smileys-emotion/2027.png", "Smileys & Emotion",
            box=(12, 34, 52, 56)),
    Example("neutral face: new eyes", "neutral-face-eyes", "0_smileys-emotion/2042.png", "Smileys & Emotion",
            box=(12, 14, 52, 34)),
    Example("strawberry: a new colour for its red", "strawberry-red", "3_food-drink/0388.png", "Food & Drink",
            red=True),
)


def overlay(image: torch.Tensor, mask: np.ndarray) -> torch.Tensor:
    """The image with its mask shown half-transparent red."""
    shown = image.clone()
    red = torch.tensor([1.0, -1.0, -1.0])[:, None]
    where = torch.from_numpy(mask)
    shown[:, where] = 0.5 * shown[:, where] + 0.5 * red
    return shown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="emoji")
    parser.add_argument("--held-out", default=str(ROOT / "data/emoji/validation"))
    parser.add_argument("--out", default=str(ROOT / "docs/emoji/inpainting.png"))
    parser.add_argument("--examples-dir", default=str(ROOT / "src/sundae/assets/emoji/examples"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    pipe = SundaePipeline.from_pretrained(args.model, device="cpu")
    examples_dir = Path(args.examples_dir)
    examples_dir.mkdir(parents=True, exist_ok=True)
    rows, listed = [], []
    for index, example in enumerate(EXAMPLES):
        image = Image.open(Path(args.held_out) / example.image).convert("RGB")
        mask = example.mask(np.asarray(image))
        mask_image = Image.fromarray(mask.astype(np.uint8) * 255)
        fills = pipe.inpaint(image, mask_image, num_images=FILLS, class_labels=example.category,
                             seed=args.seed + 100 * index, output_type="pt").images
        original = pil_to_tensor(image)
        rows.append(torch.cat((original[None], overlay(original, mask)[None], fills.float().cpu())))
        image.save(examples_dir / f"{example.slug}.png")
        mask_image.save(examples_dir / f"{example.slug}.mask.png")
        listed.append({"name": example.name, "image": f"{example.slug}.png", "mask": f"{example.slug}.mask.png",
                       "class_label": example.category})
        print(f"{example.name}: {int(mask.sum())} of {mask.size} pixels redone")
    (examples_dir / "examples.json").write_text(json.dumps(listed, indent=2) + "\n")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_image_grid(torch.cat(rows), args.out, nrow=2 + FILLS)
    print(f"wrote {args.out} and {examples_dir}/examples.json")


if __name__ == "__main__":
    main()
