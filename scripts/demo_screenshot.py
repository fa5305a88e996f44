"""Check ``clevrgen demo`` in a real browser and take the README's screenshot (docs/demo.png).

Starts ``clevrgen demo`` on a free port, opens it in headless Chromium (Debian's ``chromium``,
driven by Playwright, which needs no browser download with ``executable_path``), draws a scene
with the shipped model, shows the judge's reading, screenshots the page, then types a bad phrase
and checks that the page shows the CLI's message and still draws after it. Every request the
page makes must go to 127.0.0.1.

    apt-get install -y chromium && pip install playwright   # Playwright outside clevrgen's venv is fine
    python scripts/demo_screenshot.py --python .venv/bin/python --out docs/demo.png
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request
from urllib.parse import urlparse

SCENE = "red sphere, cyan cylinder, cyan cube"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, server: subprocess.Popen, seconds: float = 600) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if server.poll() is not None:
            sys.exit(f"clevrgen demo exited with {server.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    sys.exit(f"{url} did not answer in {seconds:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=sys.executable, help="The Python that has clevrgen and Gradio.")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--out", default="docs/demo.png")
    parser.add_argument("--images", type=int, default=8)
    args = parser.parse_args()
    from playwright.sync_api import expect, sync_playwright

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    server = subprocess.Popen([args.python, "-m", "clevrgen", "demo", "--port", str(port)],
                              env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    outside: list[str] = []
    try:
        wait_for(url, server)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("request", lambda r: outside.append(r.url) if urlparse(r.url).hostname not in ("127.0.0.1", None) else None)
            page.goto(url)
            page.get_by_role("button", name="Clear").click()
            expect(page.locator("#objects textarea")).to_have_value("")
            page.get_by_role("button", name="Add this object").click()  # the pickers' red sphere
            expect(page.locator("#objects textarea")).to_have_value("red sphere")
            page.locator("#objects textarea").fill(SCENE)
            page.locator("#num input").fill(str(args.images))
            page.locator("#judge input").check()
            started = time.time()
            page.locator("#draw").click()
            expect(page.locator("#status")).to_contain_text("images of", timeout=1_800_000)
            expect(page.locator("#readings")).to_contain_text("The shipped judge's reading")
            print(f"drew {args.images} images in {time.time() - started:.1f} s (page to page)")
            page.wait_for_timeout(1000)  # the gallery's images load
            page.screenshot(path=args.out, full_page=True)
            print(f"wrote {args.out}")

            page.locator("#objects textarea").fill("pink cube")
            page.locator("#draw").click()
            # the whole message, "<color> <shape>" included (the toast reads it as HTML)
            expect(page.get_by_text('Did you mean "purple cube"? A phrase is "<color> <shape>"').first).to_be_visible(
                timeout=60_000)
            page.screenshot(path=os.path.splitext(args.out)[0] + "-error.png")
            page.locator("#objects textarea").fill("gray cube")
            page.locator("#num input").fill("2")
            page.locator("#draw").click()
            expect(page.locator("#status")).to_contain_text("2 images of gray cube", timeout=1_800_000)
            print("a bad phrase shows the CLI's message; the page draws again after it")
            browser.close()
    finally:
        server.terminate()
        server.wait(30)
    if outside:
        sys.exit("requests that left the machine:\n" + "\n".join(outside))
    print("no request left 127.0.0.1")


if __name__ == "__main__":
    main()
