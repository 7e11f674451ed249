"""Record the page's demo, docs/demo.gif: upload a slice, see the outline, switch models, open Compare.

    .venv/bin/python docs/screenshots/demo.py [--slice FILE] [--data ../shared/data/lgg]

Real Chromium frames (Debian's, through Playwright) of the page against `brainmets serve` with the shipped
models, each held for a moment and captioned, assembled into an animated GIF with Pillow. The servers, the
browser and the slice are those of take.py, beside this file.
"""

from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from take import DATA, IDLE, UPLOAD, api_and_page, as_tiff, choose_model, chromium_page, largest_lesion_slice

OUT = Path(__file__).resolve().parents[1] / "demo.gif"
VIEWPORT = (1280, 800)  # also the GIF's size, less its caption bar
CAPTION_PX = 34


class Recording:
    """Captioned frames and how long each is shown."""

    def __init__(self, page):
        self.page, self.frames, self.durations = page, [], []
        self.font = ImageFont.load_default(size=20)

    def frame(self, caption: str, seconds: float) -> None:
        self.page.mouse.move(0, 0)  # no hover buttons over the images
        shot = Image.open(io.BytesIO(self.page.screenshot())).convert("RGB")
        framed = Image.new("RGB", (shot.width, shot.height + CAPTION_PX), (14, 17, 23))
        framed.paste(shot, (0, CAPTION_PX))
        ImageDraw.Draw(framed).text((12, 6), caption, fill=(250, 250, 250), font=self.font)
        self.frames.append(framed)
        self.durations.append(round(seconds * 1000))

    def save(self, path: Path) -> None:
        # One palette for every frame keeps the unchanged parts identical, so the GIF stores only what moves.
        palette = self.frames[0].quantize(colors=255, method=Image.Quantize.MEDIANCUT)
        frames = [f.quantize(palette=palette, dither=Image.Dither.NONE) for f in self.frames]
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=self.durations, loop=0,
                       optimize=True)


def scroll_to(page, locator) -> None:
    locator.scroll_into_view_if_needed()
    page.wait_for_timeout(400)  # images finish decoding


def record(page, upload: Path) -> Recording:
    rec = Recording(page)
    rec.frame("brainmets: the page, talking to the API", 1.5)
    page.locator(UPLOAD).set_input_files(str(upload))
    page.wait_for_timeout(300)
    rec.frame(f"1. Upload a slice ({upload.name})", 1.2)
    overlay = page.get_by_test_id("stImage").filter(has_text="lesions outlined").first
    overlay.wait_for()
    page.locator(IDLE).wait_for()
    scroll_to(page, overlay)
    rec.frame("2. The lesion outlined, with the probability heat map", 3.0)
    result = page.get_by_test_id("stDataFrame").first
    scroll_to(page, result)
    rec.frame("2. Lesion count, area and the table of lesions", 2.5)
    page.get_by_test_id("stSelectbox").scroll_into_view_if_needed()
    for label, caption in (("Attention U-Net", "3. Switch models: Attention U-Net"),
                           ("both side by side", "3. Both networks side by side")):
        choose_model(page, label)
        scroll_to(page, page.get_by_test_id("stImage").filter(has_text="lesions outlined").first)
        rec.frame(caption, 2.5)
        page.get_by_test_id("stSelectbox").scroll_into_view_if_needed()
    page.get_by_role("tab", name="Compare").click()
    panel = page.get_by_role("tabpanel", name="Compare")
    panel.get_by_test_id("stDataFrame").first.wait_for()
    page.locator(IDLE).wait_for()
    page.wait_for_timeout(400)
    rec.frame("4. Compare: the shipped models' test metrics", 3.0)
    figure = panel.locator('[data-testid="stImage"] img').first
    if figure.count():
        scroll_to(page, figure)
        rec.frame("4. Compare: training curves and per-patient Dice from docs/results.md", 3.0)
    return rec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slice", type=Path, help="Slice to upload (default: picked from --data).")
    parser.add_argument("--data", type=Path, default=DATA,
                        help="Reference data (default: $BRAINMETS_DATA, else ../shared/data/lgg).")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, api_and_page() as url, chromium_page(url, *VIEWPORT) as page:
        upload = as_tiff(args.slice or largest_lesion_slice(args.data), Path(tmp))
        rec = record(page, upload)
    rec.save(args.out)
    print(f"{args.out}: {len(rec.frames)} frames, {sum(rec.durations) / 1000:.0f} s, "
          f"{args.out.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
