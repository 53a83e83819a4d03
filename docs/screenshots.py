"""Make the README's pictures: the chat page of ``phikit serve`` and a fine-tuning run's dashboard, in
Debian's headless Chromium. Model hubs may be out of reach, so the chat page talks to a tiny Phi model
trained here to give one answer (the picture shows the page, not a model's quality); the dashboard is that of
a run folder you give (the README's: a DPO run on ../shared/data/hh-rlhf-2k, benchmarks/bench_preference.py
--real).

    .venv/bin/python docs/screenshots.py --run benchmarks/_work/dpo-hh
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

QUESTION = "How do I reverse a list in Python?"
ANSWER = (
    "Use **slicing** to get a reversed copy, or `list.reverse()` to reverse in place:\n"
    "```python\nnumbers = [1, 2, 3]\nprint(numbers[::-1])  # [3, 2, 1]\nnumbers.reverse()\n```\n"
    "- `reversed(numbers)` gives an iterator instead of a list."
)


def browser(width: int, height: int):
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", f"--window-size={width},{height}"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))


def chat_page(out: Path) -> None:
    from conftest import _vocab_rows, fill_tokenizer_dir, make_checkpoint
    from serving import Server
    from test_chat_page import train_to_say

    import phikit
    from phikit.serve import create_app
    from phikit.templates import get_template

    with tempfile.TemporaryDirectory() as tmp:
        tok, folder = Path(tmp, "tokenizer"), Path(tmp, "model")
        tok.mkdir()
        fill_tokenizer_dir(tok)
        vocab = _vocab_rows(tok)
        hf = make_checkpoint(folder, tok, vocab, max_position_embeddings=512)
        phi = phikit.load(folder, dtype="fp32", device="cpu")
        prompt = get_template("guanaco", phi.tokenizer).render_messages([{"role": "user", "content": QUESTION}])
        t = phi.tokenizer
        train_to_say(hf, [t.encode(prompt) + t.encode(ANSWER) + [t.eos_id]], steps=600)
        hf.save_pretrained(folder)
        phi = phikit.load(folder, dtype="fp32", device="cpu")
        app = create_app(phi.model, phi.tokenizer, "phi-2-tiny", "guanaco")
        driver = browser(1200, 760)
        try:
            with Server(app) as server:
                driver.get(server.url + "/")
                driver.execute_script("localStorage.clear(); sessionStorage.clear();")
                driver.get(server.url + "/")
                time.sleep(1)
                box = driver.find_element("id", "input")
                box.send_keys(QUESTION)
                driver.find_element("id", "send").click()
                deadline = time.time() + 60
                while time.time() < deadline:
                    replies = driver.find_elements("css selector", ".message.assistant[data-state=done]")
                    if replies:
                        break
                    time.sleep(0.1)
                driver.find_element("id", "settings-toggle").click()  # the settings folded away
                time.sleep(0.3)
                driver.save_screenshot(str(out))
        finally:
            driver.quit()


def dashboard(run: Path, out: Path) -> None:
    from phikit.plots import write_dashboard

    page = write_dashboard(run)
    driver = browser(1200, 900)
    try:
        driver.get(page.resolve().as_uri())
        time.sleep(1)
        driver.save_screenshot(str(out))
    finally:
        driver.quit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a fine-tuning output_dir (with metrics.jsonl)")
    parser.add_argument("--out", type=Path, default=HERE / "images", help="folder for chat.png, dashboard.png")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    chat_page(args.out / "chat.png")
    dashboard(args.run, args.out / "dashboard.png")
    print(f"wrote {args.out / 'chat.png'} and {args.out / 'dashboard.png'}")


if __name__ == "__main__":
    main()
