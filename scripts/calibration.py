#!/usr/bin/env python3
"""Calibration and accuracy samples that look like what the models see: text lines rendered
with Pillow and the system's DejaVu fonts (Debian's fonts-dejavu-core), one ``.npz`` per sample,
keyed by the model's input name — the directory ``tvm-hybrid quantize --calibration`` reads.

    python scripts/calibration.py cls calib/cls --samples 40      # 1x3x48x192 line crops, half upside down
    python scripts/calibration.py det calib/det --samples 20      # 1x3x320x320 pages of lines
    python scripts/calibration.py sentences calib/minilm --samples 30 --inputs input_ids,attention_mask

cls samples are PP-OCR's classifier input (a line resized to height 48, padded to 192, scaled
to [-1, 1]); every other one is rotated 180 degrees, the case the classifier exists for. det
samples are 320x320 pages with 3 to 6 lines at random places, sizes and greys, ImageNet-normalized
as PP-OCR's detector expects. sentences samples are English sentences encoded by BERT's uncased
WordPiece tokenizer (scripts/tokenizer.py) for the MiniLM models: 1x128 int64 ids and mask (and
token_type_ids; --inputs picks the ones the model takes). The same --seed gives the same files.
"""

from __future__ import annotations

import argparse
import glob
import random
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/tokenizer.py

WORDS = ("invoice total amount paid receipt date number customer address street city phone email order "
         "item quantity price tax discount balance due account bank transfer payment reference code "
         "shipping delivery warehouse station platform departure arrival gate seat ticket passenger "
         "hotel room guest check breakfast menu coffee tea water bread cheese apple orange chicken").split()
FONT_GLOBS = ("/usr/share/fonts/truetype/dejavu/*.ttf", "/usr/share/fonts/TTF/DejaVu*.ttf",
              "/usr/share/fonts/dejavu/*.ttf")  # fmt: skip


def fonts() -> list[str]:
    found = sorted({f for g in FONT_GLOBS for f in glob.glob(g)})
    if not found:
        raise SystemExit("no DejaVu fonts found (apt-get install fonts-dejavu-core)")
    return found


def text(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(1, 4))]
    if rng.random() < 0.6:
        words.insert(rng.randint(0, len(words)), rng.choice(("", "#", "$", "No. ")) + str(rng.randint(1, 99999)))
    s = " ".join(words)
    return s.upper() if rng.random() < 0.2 else s.capitalize() if rng.random() < 0.5 else s


def line_image(rng: random.Random, height: int):
    """One rendered line, cropped to its text with a small margin (an RGB PIL image)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(rng.choice(fonts()), height)
    s = text(rng)
    x0, y0, x1, y1 = font.getbbox(s)
    bg = rng.randint(170, 255)
    fg = rng.randint(0, 90)
    pad = max(2, height // 6)
    img = Image.new("RGB", (x1 - x0 + 2 * pad, y1 - y0 + 2 * pad), (bg, bg, bg))
    ImageDraw.Draw(img).text((pad - x0, pad - y0), s, font=font, fill=(fg, fg, fg))
    return img


def cls_sample(rng: random.Random, index: int) -> dict[str, np.ndarray]:
    from PIL import Image

    img = line_image(rng, rng.randint(20, 40))
    if index % 2:
        img = img.rotate(180)
    h, w = 48, 192
    new_w = min(w, max(1, round(img.width * h / img.height)))
    img = img.resize((new_w, h), Image.BILINEAR)
    x = np.zeros((3, h, w), np.float32)
    x[:, :, :new_w] = (np.asarray(img, np.float32).transpose(2, 0, 1) / 255 - 0.5) / 0.5
    return {"x": x[None]}


def det_sample(rng: random.Random, index: int, size: int = 320) -> dict[str, np.ndarray]:
    from PIL import Image

    bg = rng.randint(200, 255)
    page = Image.new("RGB", (size, size), (bg, bg, rng.randint(190, 255)))
    for _ in range(rng.randint(3, 6)):
        line = line_image(rng, rng.randint(12, 28))
        if line.width > size - 8:
            line = line.resize((size - 8, max(1, line.height * (size - 8) // line.width)))
        page.paste(line, (rng.randint(0, size - line.width), rng.randint(0, size - line.height)))
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    x = (np.asarray(page, np.float32) / 255 - mean) / std
    return {"x": x.transpose(2, 0, 1)[None].astype(np.float32)}


SENTENCES = (
    "The train to the airport leaves every twenty minutes from platform four.",
    "A man is playing a guitar on the corner of the street.",
    "Please send the signed contract back before Friday afternoon.",
    "The weather will be sunny in the morning with showers in the evening.",
    "She bought fresh bread, cheese and a bottle of olive oil at the market.",
    "How do I reset my password if I no longer have access to my email?",
    "The company reported higher profits for the third quarter in a row.",
    "Two dogs are running through a field of tall grass.",
    "Our flight was delayed by three hours because of the storm.",
    "The museum is closed on Mondays and public holidays.",
    "He fixed the leaking tap in the kitchen with a new washer.",
    "Children are building a sandcastle on the beach.",
    "What time does the pharmacy on Main Street open on Sundays?",
    "The new phone has a larger battery and a better camera.",
    "Researchers found that regular exercise improves sleep quality.",
    "A woman is slicing onions on a wooden board.",
    "The invoice lists twelve items, and the total includes sales tax.",
    "I would like to book a table for four people at seven o'clock.",
    "The river flooded the lower part of the town last spring.",
    "Turn left at the second traffic light and the hotel is on your right.",
    "The orchestra played Beethoven's fifth symphony to a full house.",
    "Can you recommend a good book about the history of mathematics?",
    "The software update fixes a bug that drained the battery overnight.",
    "A cyclist is riding up a steep mountain road.",
    "Prices for fruit and vegetables rose sharply after the drought.",
    "The teacher asked the students to hand in their essays by Monday.",
    "A cat is sleeping on a sunny windowsill.",
    "The bridge will be closed for repairs until the end of the month.",
    "My parcel was delivered to the wrong address yesterday.",
    "The chef added a pinch of salt and some fresh basil to the sauce.",
)


def sentence_sample(rng: random.Random, index: int, inputs=("input_ids", "attention_mask", "token_type_ids")):
    import tokenizer

    if not hasattr(sentence_sample, "tok"):
        sentence_sample.tok = tokenizer.load()
    enc = sentence_sample.tok.encode([SENTENCES[index % len(SENTENCES)]], 128)
    return {k: enc[k] for k in inputs}


KINDS = {"cls": cls_sample, "det": det_sample, "sentences": sentence_sample}


def write(kind: str, out: Path, samples: int, seed: int = 0, inputs: tuple[str, ...] | None = None) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{kind}-{seed}")
    paths = []
    for i in range(samples):
        p = out / f"{kind}-{i:04d}.npz"
        sample = KINDS[kind](rng, i) if inputs is None else KINDS[kind](rng, i, inputs)
        np.savez(p, **sample)
        paths.append(p)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kind", choices=sorted(KINDS))
    ap.add_argument("out", type=Path)
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--inputs", help="sentences: the comma-separated inputs the model takes")
    args = ap.parse_args()
    inputs = tuple(args.inputs.split(",")) if args.inputs else None
    paths = write(args.kind, args.out, args.samples, args.seed, inputs)
    print(f"{len(paths)} {args.kind} samples in {args.out}")


if __name__ == "__main__":
    main()
