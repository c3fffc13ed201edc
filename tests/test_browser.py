"""A person's first run, in a real browser: `serve --demo`, fill the textual-inversion form, train;
then merge the demo model with itself in the Merge tab.

Headless Chromium (Debian's `chromium` package, never a downloaded browser) driven by Playwright.
The page's own polling script must move the progress bar, show a preview image and the loss plot,
and list the result. Screenshots of the finished pages are kept in test-artifacts/.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
SCREENSHOT = ARTIFACTS / "browser-training.png"
MERGE_SCREENSHOT = ARTIFACTS / "browser-merge.png"
INVALID_SCREENSHOT = ARTIFACTS / "browser-invalid-fields.png"
STEPS = 16

if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium (CI installs it)", allow_module_level=True)
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is missing: pip install -r requirements-dev.txt (CI installs it)"
)

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """(URL, outputs folder) of `python -m lib_training serve --demo` on a free port."""
    root = tmp_path_factory.mktemp("serve")
    port = _free_port()
    env = {**os.environ, "SDWT_CACHE": str(root / "cache"), "GRADIO_ANALYTICS_ENABLED": "False"}
    command = [sys.executable, "-m", "lib_training", "serve", "--demo", "--port", str(port)]
    log = (root / "server.log").open("w")
    process = subprocess.Popen(
        [*command, "--outputs", str(root / "outputs"), "--device", "cpu"],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 90
        while True:
            if process.poll() is not None:
                raise AssertionError(f"serve exited with {process.returncode}:\n{(root / 'server.log').read_text()}")
            try:
                with urllib.request.urlopen(url + "training/v1/methods", timeout=2):
                    break
            except OSError:
                if time.time() > deadline:
                    raise AssertionError("serve did not answer within 90 s") from None
                time.sleep(0.3)
        yield url, root / "outputs"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        yield browser
        browser.close()


def _open(browser, url: str, width: int = 1400, height: int = 1000):
    """A new page on `url`, its console messages collected in `page.console_lines`."""
    page = browser.new_page(viewport={"width": width, "height": height})
    page.set_default_timeout(30_000)
    page.console_lines = []  # type: ignore[attr-defined]
    page.on("console", lambda message: page.console_lines.append(f"{message.type}: {message.text}"))
    page.goto(url, wait_until="domcontentloaded")
    return page


@pytest.fixture(scope="module")
def page(browser, server):
    page = _open(browser, server[0])
    yield page
    page.close()


@pytest.fixture()
def laptop_page(browser, server):
    """A fresh page at a laptop's 1280x900, the Training tab loaded."""
    page = _open(browser, server[0], 1280, 900)
    page.wait_for_selector("#sdwt-embedding-start")
    yield page
    page.close()


def _block(page, elem_id: str):
    """A component by elem_id (Gradio 3 repeats an HTML component's id on an inner element)."""
    return page.locator(f"#{elem_id}").first


def _field(page, elem_id: str):
    return _block(page, elem_id).locator("textarea, input").first


def _training_step(page) -> int | None:
    """The training step the progress bar shows (also while previewing or saving), else None."""
    text = page.locator("#sdwt-embedding-progress .sdwt-progress-text").inner_text()
    match = re.match(rf"(Training|Previewing|Saving) · step (\d+)/{STEPS}", text)
    return int(match.group(2)) if match else None


def test_demo_training_runs_end_to_end_in_the_browser(page, server) -> None:
    expect = sync_api.expect
    page.wait_for_selector("#sdwt-embedding-start")

    # The demo pre-filled the form; choose our own name and a short run.
    _field(page, "sdwt-embedding-method-name").fill("browser-test")
    steps = _field(page, "sdwt-embedding-loop-steps")
    steps.fill("0")
    expect(_block(page, "sdwt-embedding-loop-steps")).to_contain_text("must be at least 1")  # checked inline
    steps.fill(str(STEPS))
    _field(page, "sdwt-embedding-loop-preview-every").fill("4")
    expect(_block(page, "sdwt-embedding-loop-steps")).not_to_contain_text("must be at least 1")

    page.click("#sdwt-embedding-check")
    expect(page.locator("#sdwt-embedding-summary textarea")).to_have_value(re.compile(r"images: \d+"))
    expect(page.locator("#sdwt-embedding-samples img").first).to_be_visible()

    page.click("#sdwt-embedding-start")
    expect(_block(page, "sdwt-embedding-status")).to_contain_text("Started Textual inversion: browser-test")
    expect(_block(page, "sdwt-embedding-interrupt")).to_be_enabled()
    seen = set()
    deadline = time.time() + 60
    while time.time() < deadline:
        seen.add(_training_step(page))
        state = page.locator("#sdwt-embedding-progress .sdwt-progress").get_attribute("data-sdwt-state")
        if state != "running":
            break
        time.sleep(0.2)
    assert state == "finished", _block(page, "sdwt-embedding-result").inner_text()
    assert {s for s in seen if s is not None and 0 < s < STEPS}, f"no training step was shown on the way: {seen}"

    expect(_block(page, "sdwt-embedding-progress")).to_contain_text(f"step {STEPS}/{STEPS}")
    expect(page.locator("#sdwt-embedding-preview img")).to_be_visible()
    expect(_block(page, "sdwt-embedding-preview")).to_contain_text(f"Preview at step {STEPS}")
    expect(page.locator("#sdwt-embedding-loss img")).to_be_visible()
    result = server[1] / "embedding" / "browser-test" / "browser-test.safetensors"
    expect(page.locator("#sdwt-embedding-result [data-sdwt-result]")).to_contain_text(str(result))
    assert result.is_file()
    expect(_block(page, "sdwt-embedding-start")).to_be_enabled()

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)


def _files(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _wait_until_ended(page, timeout: float = 60) -> str:
    deadline = time.time() + timeout
    state = "running"
    while time.time() < deadline:
        state = page.locator("#sdwt-embedding-progress .sdwt-progress").get_attribute("data-sdwt-state")
        if state not in ("running", "idle"):
            break
        time.sleep(0.2)
    return state


def test_three_bad_fields_are_all_marked_and_nothing_starts(page, server) -> None:
    expect = sync_api.expect
    page.get_by_role("tab", name="Training").first.click()
    steps, lr, path = (_field(page, f"sdwt-embedding-{name}") for name in ("loop-steps", "loop-lr", "data-path"))
    kept = {"steps": steps.input_value(), "lr": lr.input_value(), "path": path.input_value()}
    steps.fill("0")
    lr.fill("abc")
    path.fill("/nonexistent/folder")
    page.click("#sdwt-embedding-start")
    status = _block(page, "sdwt-embedding-status")
    expect(status).to_contain_text("Steps: must be at least 1")
    expect(status).to_contain_text("Learning rate: 'abc' in the learning rate is not a number")
    expect(status).to_contain_text("Path: The dataset folder /nonexistent/folder does not exist")
    for name in ("loop-steps", "loop-lr", "data-path"):
        expect(_block(page, f"sdwt-embedding-{name}")).to_have_class(re.compile(r"\bsdwt-invalid\b"))
    expect(_block(page, "sdwt-embedding-loop-batch-size")).not_to_have_class(re.compile(r"\bsdwt-invalid\b"))
    expect(_block(page, "sdwt-embedding-interrupt")).to_be_disabled()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(INVALID_SCREENSHOT), full_page=True)
    steps.fill(kept["steps"])
    lr.fill(kept["lr"])
    path.fill(kept["path"])
    expect(_block(page, "sdwt-embedding-data-path")).not_to_have_class(re.compile(r"\bsdwt-invalid\b"))


def test_a_second_run_of_the_same_name_deletes_nothing_of_the_first(page, server) -> None:
    expect = sync_api.expect
    folder = server[1] / "embedding" / "browser-test"
    before = _files(folder)
    assert "browser-test.safetensors" in before and "loss.csv" in before, before

    _field(page, "sdwt-embedding-method-name").fill("browser-test")
    _field(page, "sdwt-embedding-loop-steps").fill("3")
    overwrite = page.locator("#sdwt-embedding-method-overwrite input").first
    expect(overwrite).not_to_be_checked()  # off by default, also in the demo's form
    page.click("#sdwt-embedding-start")
    expect(_block(page, "sdwt-embedding-status")).to_contain_text("already exists")
    assert _files(folder) == before

    overwrite.check()
    page.click("#sdwt-embedding-start")
    expect(_block(page, "sdwt-embedding-status")).to_contain_text("Started Textual inversion: browser-test")
    assert _wait_until_ended(page) == "finished"
    expect(_block(page, "sdwt-embedding-progress")).to_contain_text("step 3/3")
    assert _files(folder.with_name("browser-test.1")) == before  # the earlier run, every file as it was
    assert "browser-test.safetensors" in _files(folder)


def test_a_merge_of_the_demo_model_runs_from_the_merge_tab(page, server) -> None:
    expect = sync_api.expect
    page.get_by_role("tab", name="Merge").first.click()
    page.wait_for_selector("#sdwt-merge-start")
    page.click("#sdwt-merge-start")  # nothing chosen yet: the problems are listed, nothing runs
    expect(_block(page, "sdwt-merge-status")).to_contain_text("A: required")
    _expect_problem_under_input(page, "sdwt-merge-a", "required")  # at the field too, as in every form

    for field in ("a", "b"):  # both from the list of the model folder's checkpoints
        page.locator(f"#sdwt-merge-{field} input").first.click()
        page.get_by_role("option", name="tiny-world-sd1.safetensors").first.click()
    _field(page, "sdwt-merge-out").fill("browser-merge")
    page.click("#sdwt-merge-start")

    result = server[1] / "merge" / "browser-merge.safetensors"
    expect(page.locator("#sdwt-merge-result [data-sdwt-result]")).to_contain_text(str(result), timeout=60_000)
    expect(_block(page, "sdwt-merge-progress")).to_contain_text("Finished")
    data = result.read_bytes()
    digest = hashlib.sha256(data[8 + int.from_bytes(data[:8], "little") :]).hexdigest()
    expect(page.locator("#sdwt-merge-result [data-sdwt-sha256]")).to_have_text(digest)
    expect(_block(page, "sdwt-merge-start")).to_be_enabled()

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(MERGE_SCREENSHOT), full_page=True)


# Gradio 4.40's client warns about events and tab groups that are right (`app/ui/page_client.py`).
GRADIO_FALSE_ALARMS = ("Too many arguments provided for the endpoint", "non-interactive or hidden tab")


def test_the_console_has_no_gradio_false_alarms_through_load_and_use(laptop_page) -> None:
    expect = sync_api.expect
    page = laptop_page
    sent: list[str] = []  # the events' requests: the page did talk to the server
    page.on("request", lambda request: sent.append(request.url) if request.method == "POST" else None)
    steps = _field(page, "sdwt-embedding-loop-steps")
    steps.fill("0")  # checked as typed: an event with an input
    expect(_block(page, "sdwt-embedding-loop-steps")).to_have_class(re.compile(r"\bsdwt-invalid\b"))
    steps.fill("8")
    page.click("#sdwt-embedding-check")
    expect(page.locator("#sdwt-embedding-summary textarea")).to_have_value(re.compile(r"images: \d+"))
    for tab in ("Generate", "Merge", "Training"):
        page.get_by_role("tab", name=tab).first.click()
    page.wait_for_timeout(4_500)  # an idle poll of the run panel (every 4 s)
    assert len(sent) >= 4, sent
    alarms = [line for line in page.console_lines if any(alarm in line for alarm in GRADIO_FALSE_ALARMS)]
    assert alarms == []


# The Training form (the loader and the three groups, advanced settings folded) at 1280x900 on commit
# ab2f093, before the form's fields shared rows by width and showed their help on hover: 2,059 px.
FORM_HEIGHT_BEFORE = 2059


def test_the_training_form_is_compact_at_a_laptops_size(laptop_page) -> None:
    page = laptop_page
    form = page.evaluate(
        """() => {
            const box = id => document.getElementById(id).getBoundingClientRect();
            const fields = ["steps", "batch-size", "lr"].map(name => box("sdwt-embedding-loop-" + name));
            return {height: box("sdwt-embedding-loop").bottom - box("sdwt-embedding-loader").top,
                    rowTops: fields.map(field => Math.round(field.top))};
        }"""
    )
    assert form["height"] <= FORM_HEIGHT_BEFORE / 2, form
    assert len(set(form["rowTops"])) == 1, form  # side by side, not one under another
    for name in ("check", "start", "interrupt"):  # buttons of a normal size: no taller than a text field
        button = _block(page, f"sdwt-embedding-{name}").bounding_box()
        field = _field(page, "sdwt-embedding-method-name").bounding_box()
        assert button["height"] <= field["height"], (name, button, field)


def test_no_placeholder_is_cut_off(laptop_page) -> None:
    page = laptop_page
    for accordion in ("Load settings from a previous run", "Advanced"):  # every field of the form shown
        for header in page.get_by_text(accordion, exact=True).all():
            if header.is_visible():
                header.click()
    page.wait_for_timeout(500)
    cut = page.evaluate(
        """() => {
            const canvas = document.createElement("canvas").getContext("2d");
            const cut = [];
            const tab = document.getElementById("sdwt-train-embedding");
            for (const input of tab.querySelectorAll("input, textarea")) {
                if (!input.placeholder || input.offsetParent === null) continue;
                const style = getComputedStyle(input);
                canvas.font = style.font;
                const room = input.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
                const value = input.value;
                input.value = "";  // as an empty field shows it (no input event: the form is not told)
                const scrolls = input.scrollWidth > input.clientWidth;
                input.value = value;
                if (canvas.measureText(input.placeholder).width > room || scrolls)
                    cut.push([input.closest("[id]").id, input.placeholder, Math.round(room)]);
            }
            return cut;
        }"""
    )
    assert cut == []


def test_a_fields_help_shows_while_it_is_hovered(laptop_page) -> None:
    expect = sync_api.expect
    page = laptop_page
    for name, help in (("loop-steps", "Optimizer steps to train for"), ("data-template", "Prompt template")):
        text = _block(page, f"sdwt-embedding-{name}").locator("[data-testid='block-info'] + div").first
        expect(text).to_be_hidden()
        _field(page, f"sdwt-embedding-{name}").hover()
        expect(text).to_be_visible()
        expect(text).to_contain_text(help)
        page.mouse.move(0, 0)
        expect(text).to_be_hidden()


def test_the_run_panel_stays_in_view_beside_the_long_form(laptop_page) -> None:
    page = laptop_page
    advanced = [_block(page, f"sdwt-embedding-{group}-advanced") for group in ("method", "data", "loop")]
    for accordion in advanced:  # every setting shown: a form longer than the page
        accordion.get_by_text("Advanced", exact=True).first.click()
    page.wait_for_timeout(300)
    form, run = (_block(page, f"sdwt-embedding-{part}").bounding_box() for part in ("form", "run"))
    assert form["height"] > run["height"] + 450, (form, run)
    page.evaluate("window.scrollTo(0, 450)")  # down the settings form, past the run panel's own top
    page.wait_for_timeout(300)
    start = _block(page, "sdwt-embedding-start").bounding_box()
    assert start is not None and 0 <= start["y"] < page.viewport_size["height"], start


def _expect_problem_under_input(page, elem_id: str, problem: str) -> None:
    """The field is marked invalid and its problem shows in view, below its input."""
    expect = sync_api.expect
    block = _block(page, elem_id)
    expect(block).to_have_class(re.compile(r"\bsdwt-invalid\b"))
    text = block.locator("[data-testid='block-info'] + div").first
    expect(text).to_be_visible()
    expect(text).to_contain_text(problem)
    top = text.bounding_box()["y"]
    field = _field(page, elem_id).bounding_box()
    assert top >= field["y"] + field["height"], (top, field)


def test_a_fields_problem_shows_under_its_input(laptop_page) -> None:
    _field(laptop_page, "sdwt-embedding-loop-steps").fill("0")
    _expect_problem_under_input(laptop_page, "sdwt-embedding-loop-steps", "must be at least 1")
