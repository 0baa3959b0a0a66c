"""Screenshots of the documentation site as a reader sees it, offline, at 1,280 px.

    python tools/site_shots.py [--out site-shots] [--site DIR] [--width 1280] [--only api,...]

Builds the site with ``mkdocs build --strict`` (unless ``--site`` names a
built one), serves it on 127.0.0.1, and has headless Chromium take a
whole-page PNG of each page in ``PAGES`` (home, choosing, quickstart,
concepts, API, benchmarks, performance), cut below the page's end, plus the
same page in screen-high tiles (``api-01.png``, ``api-02.png``, ...) that
are easier to look through. Chromium resolves no host name but 127.0.0.1,
so whatever the pages would fetch from the network (a CDN, web fonts) is
missing in the shots, as it is for a reader offline: a diagram shown as its
source, a table whose columns scroll out of sight, a plot too small to read
show up here.

Chromium comes from the system (Debian: ``apt-get install chromium``), or
from ``$CHROMIUM``; the cutting uses Pillow and NumPy (matplotlib's
dependencies, in the ``bench`` extra). The PNGs go to ``--out`` (ignored by
git); look at them.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# file name -> the page's path in the site
PAGES: dict[str, str] = {
    "home": "",
    "choosing": "choosing/",
    "quickstart": "quickstart/",
    "concepts": "concepts/",
    "api": "api/",
    "benchmarks": "benchmarks/",
    "performance": "performance/",
}
TALLEST = 32_000  # px: the window is this tall, then the shot is cut below the page's end
TILE = 1_600  # px: height of one tile
SHOT_TIMEOUT = 120  # seconds for one shot (about 15 s for the API page on 2 idle cores)


def find_chromium() -> str:
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return str(shutil.which(name))
    sys.exit("no Chromium found: apt-get install chromium, or set CHROMIUM=/path/to/chrome")


def build_site(target: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-d", str(target)],
        cwd=ROOT,
        check=True,
        timeout=300,
    )


def serve(site: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, name="site", daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def shoot(chromium: str, url: str, out: Path, width: int, height: int = TALLEST) -> None:
    """One whole-window shot; tried twice, since a loaded machine can stall Chromium once."""
    for attempt in (1, 2):
        try:
            _shoot_once(chromium, url, out, width, height)
            return
        except subprocess.TimeoutExpired:
            if attempt == 2:
                sys.exit(f"Chromium took more than {SHOT_TIMEOUT} s for {url}, twice")


def _shoot_once(chromium: str, url: str, out: Path, width: int, height: int) -> None:
    with tempfile.TemporaryDirectory(prefix="site-shots-profile-") as profile:
        subprocess.run(
            [
                chromium,
                "--headless=new",
                "--no-sandbox",  # root in a container has no user namespace to sandbox with
                "--disable-gpu",
                "--hide-scrollbars",
                "--no-first-run",
                f"--user-data-dir={profile}",
                # Offline, as a reader without network: only the local server resolves.
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                "--virtual-time-budget=4000",  # let the page's scripts run before the shot
                f"--window-size={width},{height}",
                f"--screenshot={out}",
                url,
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=SHOT_TIMEOUT,
        )


def cut(shot: Path, tile: int = TILE) -> list[Path]:
    """Cut the whole-window shot below the page's end; write it in tiles too; return the tiles.

    The window is taller than the page, so the shot has a long blank stretch
    between the last line of text and the footer, which the theme pins to
    the window's bottom. The page ends where that stretch begins, found in
    the column where the text is.
    """
    import numpy as np
    from PIL import Image

    image = Image.open(shot).convert("RGB")
    width, height = image.size
    text_column = np.asarray(image.convert("L").crop((width // 4, 0, 3 * width // 4, height)))
    inked = np.nonzero((text_column < 245).any(axis=1))[0]
    end = height
    if len(inked) > 1:
        gaps = np.diff(inked)
        last_gap = int(np.argmax(gaps[::-1] > 400)) if (gaps > 400).any() else None
        if last_gap is not None:
            end = int(inked[len(gaps) - last_gap - 1]) + 40
    if end >= height - 1:
        print(f"{shot.name}: the page may be taller than {height} px; the shot ends there")
    image = image.crop((0, 0, width, min(end, height)))
    image.save(shot)
    tiles = []
    for number, top in enumerate(range(0, image.height, tile), start=1):
        path = shot.with_name(f"{shot.stem}-{number:02d}.png")
        image.crop((0, top, width, min(top + tile, image.height))).save(path)
        tiles.append(path)
    return tiles


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/site_shots.py", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "site-shots")
    parser.add_argument("--site", type=Path, help="a site already built (default: build one)")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--only", help=f"comma-separated pages (default: {','.join(PAGES)})")
    args = parser.parse_args(argv)
    chromium = find_chromium()
    wanted = set(args.only.split(",")) if args.only else None
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="site-") as built:
        site = args.site
        if site is None:
            site = Path(built)
            build_site(site)
        server, base = serve(site)
        try:
            for name, page in PAGES.items():
                if wanted is not None and name not in wanted:
                    continue
                path = args.out / f"{name}.png"
                for stale in args.out.glob(f"{name}-[0-9][0-9].png"):
                    stale.unlink()
                shoot(chromium, base + page, path, args.width)
                tiles = cut(path)
                print(f"{path} ({len(tiles)} tiles)")
        finally:
            server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
