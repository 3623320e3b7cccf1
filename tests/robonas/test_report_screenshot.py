"""The report as a person sees it: rendered by headless Chromium, the screenshot is not blank.

Reuses test_report's small study (four trials, deployments, reports, models). Pillow measures
the screenshot: a blank or unstyled page has a handful of colours, a page with the report's
figures has thousands, and the figures' bands (where the plots sit) are not all white.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from test_report import EVIL, full_study, store  # noqa: F401  (fixtures used by name below)

from robonas.report import write_report
from robonas.store import Store

Image = pytest.importorskip("PIL.Image")

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
WIDTH, HEIGHT = 1280, 6000  # tall enough for the whole fixture report


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on this host to render the report")
def test_report_screenshot_is_not_blank(full_study: Store, tmp_path: Path):  # noqa: F811  (pytest fixture)
    page = write_report(full_study, "full " + EVIL, tmp_path / "report.html")
    shot = tmp_path / "report.png"
    proc = subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            f"--window-size={WIDTH},{HEIGHT}",
            page.resolve().as_uri(),
        ],
        check=False,
        capture_output=True,
        timeout=90,
    )
    assert shot.exists(), proc.stderr.decode(errors="replace")[-2000:]
    assert shot.stat().st_size > 100_000  # a page of text and inline figures, not an empty canvas
    with Image.open(shot) as img:
        rgb = img.convert("RGB")
        assert rgb.size == (WIDTH, HEIGHT)
        colours = rgb.getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 1000  # anti-aliased text plus coloured plots
        # split the page into horizontal bands: many carry ink (text, tables, figures), and some
        # carry saturated colour, which only the figures' lines and markers put there
        bands = [rgb.crop((0, y, WIDTH, y + 200)) for y in range(0, HEIGHT, 200)]
        inked = [b for b in bands if b.convert("L").getextrema()[0] < 128]
        coloured = [b for b in bands if b.convert("HSV").getextrema()[1][1] > 150]
        assert len(inked) >= 10 and len(coloured) >= 3, (len(inked), len(coloured))
    # keep a copy for a human to look at when asked (pytest's tmp_path is kept for a few runs)
    print(f"screenshot: {shot}")
