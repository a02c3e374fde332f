"""Take docs/ui.png: the routing explorer (GET /ui) of a real `loralag serve`, driven in headless Chromium.

    python docs/ui_screenshot.py --model default --library LIB [--prompt ...] [--out docs/ui.png]

Serves the model with the library in this process (create_app, as `loralag serve` does), opens /ui in Debian's
chromium through Playwright (`--chromium`, default: `chromium` on PATH), asks the prompt with two routers side by
side, hovers one heatmap cell and saves the page.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import threading
import time

import torch
import uvicorn

from loralag import open_library
from loralag.models import load_model
from loralag.serve.app import create_app, server_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--library", required=True)
    ap.add_argument("--prompt", default="Question: Who founded Velmora Glassworks?\nAnswer:")
    ap.add_argument("--router", default="lag")
    ap.add_argument("--compare", default="lag-prefix")
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--out", default="docs/ui.png")
    ap.add_argument("--chromium", default=shutil.which("chromium"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    from playwright.sync_api import sync_playwright

    model, tok = load_model(args.model)
    app = create_app(model, tok, {"knowledge": open_library(args.library)}, router=args.router, k=args.k)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(server_config(app, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1300, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/ui")
            page.wait_for_selector("#run:not([disabled])")
            page.fill("#prompt", args.prompt)
            page.select_option("#router", args.router)
            page.select_option("#router-b", args.compare)
            page.fill("#k", str(args.k))
            page.fill("#max-tokens", str(args.max_tokens))
            page.click("#run")
            page.wait_for_function(
                "['done', 'failed'].some(s => document.getElementById('run-status').textContent.startsWith(s))",
                timeout=600_000,
            )
            cells = page.query_selector_all(".panel:nth-child(1) .heatmap .cell")
            cells[len(cells) // 3].hover()
            page.screenshot(path=args.out, full_page=True)
            print(page.inner_text("#results")[:2000])
            browser.close()
    finally:
        server.should_exit = True
        thread.join(30)


if __name__ == "__main__":
    main()
