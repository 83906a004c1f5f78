"""Render an einpart HTML report (or the pareto SVG) in headless Chromium and
save a PNG screenshot, to look at what a browser really shows.

    python tools/report_screenshot.py [--spec llama] [--mesh 2x4] [--out out/report-check]
    python tools/report_screenshot.py --page some.html_or.svg --out out/check

Without --page it first writes a report with `einpart report`. Chromium
(Debian: apt-get install chromium) runs with no network, sandbox or profile
of its own. The script also asks Chromium for the rendered DOM and checks
that the report's sections are there. CI has no Chromium; the tests check
the HTML's structure instead (tests/test_html_report.py).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ('id="pipeline"', 'id="plan"', 'id="layouts"')


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    sys.exit("no Chromium found: apt-get install -y chromium")


def browser(page: Path, *extra: str, timeout: float = 120) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="einpart-chromium-") as profile:
        cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", *extra, page.resolve().as_uri()]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--page", type=Path, help="an existing page (default: write a report first)")
    ap.add_argument("--spec", default="llama")
    ap.add_argument("--mesh", default="2x4")
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "report-check")
    ap.add_argument("--size", default="1400,2000", help="window WIDTH,HEIGHT")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    page = args.page
    if page is None:
        page = args.out / "report.html"
        subprocess.run([sys.executable, "-m", "einpart.cli", "report", args.spec, "--mesh", args.mesh,
                        "--out", str(page)], check=True)
    shot = args.out / (page.stem + ".png")
    r = browser(page, f"--screenshot={shot}", f"--window-size={args.size}", "--hide-scrollbars")
    if not shot.exists() or shot.read_bytes()[:8] != b"\x89PNG\r\n\x1a\n":
        print(r.stderr[-2000:], file=sys.stderr)
        sys.exit(f"Chromium wrote no screenshot of {page}")
    if page.suffix == ".html":
        dom = browser(page, "--dump-dom").stdout
        missing = [s for s in SECTIONS if s not in dom]
        if missing:
            sys.exit(f"the rendered page lacks {', '.join(missing)}")
        print(f"rendered DOM: {len(dom)} characters, sections {', '.join(SECTIONS)} present")
    print(f"screenshot: {shot} ({shot.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
