"""Browser tier: the example workflows in ComfyUI's real frontend, in a real Chromium.

A ComfyUI server runs on loopback as in the ComfyUI tier (COMFYUI_PATH, CPU, a temporary base folder with
this pack linked in); Debian's ``chromium`` (or ``$ICE_CHROMIUM``) is driven by the ``playwright`` package
through ``executable_path`` (install it with ``pip install -e .[browser]``; never ``playwright install``).
Skipped without COMFYUI_PATH, a Chromium or playwright.

Every workflow is loaded with ``app.loadGraphData``: no missing-node dialog, every node type registered, no
two node boxes overlapping (read from the live graph once the frontend has laid the nodes out), the whole
graph inside a 1600 x 900 window, and still no overlap once every node that shows a picture has one. The
template browser lists the four workflows with their titles and thumbnails. ``ice_toyworld_demo`` (its model
ships inside the pack) runs from the Run button and shows its pictures; a second run is cancelled with the
Cancel button during learning and must stop within about one learning step.

Screenshots go to pytest's temporary folder; with ``ICE_WRITE_SCREENSHOTS=1`` they replace the workflow
thumbnails (``workflows/<title>.jpg``, shown by the template browser) and the README's ComfyUI picture.
"""
from __future__ import annotations

import importlib.util
import json
import os
import statistics
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "comfyui"))
from browser_harness import (  # noqa: E402
    CANCEL_LABEL,
    RUN_LABEL,
    SET_WIDGET,
    SETTLE_MS,
    SHOW_OUTPUTS,
    VIEW,
    events,
    find_chromium,
    graph_clip,
    load_workflow,
    close_dialogs,
    missing_models_text,
    missing_nodes_dialog_shown,
    node_boxes,
    now_ms,
    open_frontend,
    outside_window,
    overlaps,
    settle,
    wait_for_pictures,
    write_settings,
)
from comfyui_harness import PACK_DIR_NAME, ROOT, ComfyServer, comfyui_path, make_base  # noqa: E402

from ice_ops.imaging import legible_factor  # noqa: E402
from ice_ops.toyworld.scenes import DEFAULT_SIZE as SCENE_SIDE  # noqa: E402
from devtools import make_workflows  # noqa: E402
from nodes._spec import NODE_BY_ID  # noqa: E402

COMFYUI = comfyui_path()
CHROMIUM = find_chromium()
_MISSING = [m for m in ("playwright", "aiohttp", "yaml", "requests") if importlib.util.find_spec(m) is None]
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(COMFYUI is None, reason="set COMFYUI_PATH to a ComfyUI checkout to run the browser tier"),
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium: apt-get install chromium, or set ICE_CHROMIUM"),
    pytest.mark.skipif(bool(_MISSING), reason=f"not installed: {_MISSING} (pip install -e .[browser])"),
]

WRITE_SCREENSHOTS = os.environ.get("ICE_WRITE_SCREENSHOTS") == "1"
TOYWORLD = "ice_toyworld_demo"
RUN_TIMEOUT_S = 1800  # the Toy World demo takes a minute or two on two free CPU cores, much longer on busy ones
POLL_S = 0.2
PICTURE_TIMEOUT_MS = 60_000
# The cancel check: learning runs as many steps as the node allows (hours) unless Cancel works; the step time
# is measured over several progress messages, and the run must end within one step plus a fixed allowance for
# ComfyUI's own work after the engine stops (the error path, freeing the node's outputs, the queue update).
STEPS_TO_TIME = 6
CANCEL_ALLOWANCE_S = 3.0
# Pictures: the output picture shown on every picture node by the overlap check, the thumbnails (resized
# screenshots of the canvas) and the README picture (a resized screenshot of the window).
FAKE_OUTPUT = "ice_browser_tier_output.png"
FAKE_OUTPUT_SIDE = 512
THUMBNAIL_WIDTH = 768
README_WIDTH = 1200
JPEG_QUALITY = 85
README_PICTURE = os.path.join(ROOT, "docs", "images", "comfyui_toyworld_demo.jpg")
LEARN_NODE = "ICE_LearnObjectTokens"
EXAMPLE_IMAGE = os.path.join("input", "example.png")  # in a ComfyUI checkout


def workflow_file(key: str) -> str:
    return os.path.join(make_workflows.UI_FOLDER, make_workflows.ui_file_name(key) + ".json")


def load_json(key: str) -> dict:
    with open(workflow_file(key), encoding="utf-8") as handle:
        return json.load(handle)


def node_id_of(workflow: dict, node_type: str) -> int:
    (found,) = [node["id"] for node in workflow["nodes"] if node["type"] == node_type]
    return found


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from PIL import Image

    base = make_base(str(tmp_path_factory.mktemp("comfyui_browser_base")))
    write_settings(base)
    example = os.path.join(COMFYUI, EXAMPLE_IMAGE)
    if os.path.isfile(example):  # Load Image's picture in the SD workflows
        Image.open(example).save(os.path.join(base, "input", make_workflows.IMAGE))
    Image.new("RGB", (FAKE_OUTPUT_SIDE, FAKE_OUTPUT_SIDE), (90, 120, 160)).save(os.path.join(base, "output", FAKE_OUTPUT))
    running = ComfyServer(COMFYUI, base).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def page(browser, server):
    opened = open_frontend(browser, server.url)
    yield opened
    opened.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("browser_screenshots"))


def save_picture(page, path: str, width: int, clip: dict | None = None) -> None:
    """A screenshot of the page (or of ``clip``), resized to ``width`` and saved as JPEG."""
    import io

    from PIL import Image

    picture = Image.open(io.BytesIO(page.screenshot(clip=clip) if clip else page.screenshot())).convert("RGB")
    height = round(picture.height * width / picture.width)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    picture.resize((width, height), Image.LANCZOS).save(path, format="JPEG", quality=JPEG_QUALITY, optimize=True)


def save_thumbnail(page, key: str, shots: str) -> None:
    """The graph as drawn, for the template browser's card."""
    name = make_workflows.ui_file_name(key) + ".jpg"
    for folder in (shots, make_workflows.UI_FOLDER) if WRITE_SCREENSHOTS else (shots,):
        save_picture(page, os.path.join(folder, name), THUMBNAIL_WIDTH, graph_clip(page))


def assert_laid_out(page, what: str) -> list[dict]:
    nodes = node_boxes(page)
    assert not overlaps(nodes), f"{what}: node boxes overlap: {overlaps(nodes)}"
    return nodes


def queue_idle(server: ComfyServer) -> bool:
    import requests

    queue = requests.get(server.url + "/queue", timeout=30).json()
    return not queue["queue_running"] and not queue["queue_pending"]


def wait_idle(server: ComfyServer, timeout_s: float) -> float:
    """Poll until nothing runs or waits; returns the monotonic time it was first seen idle."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if queue_idle(server):
            return time.monotonic()
        time.sleep(POLL_S)
    raise TimeoutError(f"ComfyUI still busy after {timeout_s} s:\n{server.log_tail()}")


def wait_started(page, server: ComfyServer) -> None:
    """Wait for the run queued by the Run button to start; fail with the server's log when it was refused."""
    try:
        page.wait_for_function("() => window.iceEvents.some((e) => e.kind === 'execution_start')",
                               timeout=PICTURE_TIMEOUT_MS)
    except Exception as error:
        raise AssertionError(f"the run did not start:\n{server.log_tail()}") from error


def last_entry(server: ComfyServer) -> dict:
    import requests

    history = requests.get(server.url + "/history", timeout=30).json()
    return list(history.values())[-1]


def report(capsys, line: str) -> None:
    """One line on the terminal (the tier's timings), also under ``-q``."""
    with capsys.disabled():
        sys.stdout.write(f"\n[browser tier] {line}\n")


# ---------------------------------------------------------------------- every workflow
@pytest.mark.parametrize("key", list(make_workflows.TEMPLATE_TITLES))
def test_workflow_loads_without_missing_nodes_or_overlaps_and_fits_the_window(page, server, shots, key):
    workflow = load_json(key)
    load_workflow(page, workflow, make_workflows.ui_file_name(key))
    assert not missing_nodes_dialog_shown(page), f"{key}: the frontend reports missing nodes"
    assert_missing_models_named_with_their_folders(page, workflow, key)
    close_dialogs(page)
    nodes = assert_laid_out(page, f"{key} as loaded")
    assert len(nodes) == len(workflow["nodes"])
    assert all(node["registered"] for node in nodes), [node["type"] for node in nodes if not node["registered"]]
    assert not outside_window(nodes, page.evaluate(VIEW)), f"{key}: {outside_window(nodes, page.evaluate(VIEW))}"
    if key != TOYWORLD:  # its thumbnail is taken after the real run below
        save_thumbnail(page, key, shots)
    pictures = [node["id"] for node in workflow["nodes"] if node["type"] in make_workflows.PICTURE_NODES]
    page.evaluate(SHOW_OUTPUTS, [pictures, FAKE_OUTPUT])
    wait_for_pictures(page, pictures, PICTURE_TIMEOUT_MS)
    settle(page)
    assert_laid_out(page, f"{key} with a {FAKE_OUTPUT_SIDE} px picture on every picture node")
    page.screenshot(path=os.path.join(shots, f"{key}_with_pictures.png"))


def assert_missing_models_named_with_their_folders(page, workflow: dict, key: str) -> None:
    """The test server has none of the files a user must fetch (its checkpoint and retriever have test names):
    the dialog lists each one the workflow names, with its folder, as soon as the workflow opens."""
    expected = [model for node in workflow["nodes"] for model in node["properties"].get("models", [])]
    text = missing_models_text(page)
    if not expected:
        assert text is None, f"{key}: the frontend reports missing models: {text}"
        return
    assert text is not None, f"{key}: no missing-models dialog for {[m['name'] for m in expected]}"
    for model in expected:
        assert model["name"] in text and model["directory"] in text, f"{key}: {model['name']} not named: {text}"


def test_missing_node_check_sees_the_missing_node_dialog(page):
    broken = load_json("ice_compose")
    broken["nodes"][0]["type"] = "ICE_NoSuchNode"
    load_workflow(page, broken, "broken")
    assert missing_nodes_dialog_shown(page), "the check for the missing-node dialog would miss it"
    close_dialogs(page)
    assert not missing_nodes_dialog_shown(page)


# ---------------------------------------------------------------------- running the Toy World demo
@pytest.fixture
def fresh_page(browser, server):
    """A page of its own (one workflow tab: a clean README picture)."""
    opened = open_frontend(browser, server.url)
    yield opened
    opened.close()


def test_toyworld_demo_runs_from_the_run_button_and_shows_its_pictures(fresh_page, server, shots, capsys):
    page = fresh_page
    workflow = load_json(TOYWORLD)
    load_workflow(page, workflow, make_workflows.ui_file_name(TOYWORLD))
    page.evaluate("() => { window.iceEvents.length = 0; }")
    clicked = time.monotonic()
    page.get_by_role("button", name=RUN_LABEL, exact=True).first.click()
    wait_started(page, server)
    report(capsys, f"ice_toyworld_demo ran in {wait_idle(server, RUN_TIMEOUT_S) - clicked:.1f} s")
    entry = last_entry(server)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:4000]
    wait_for_pictures(page, [node_id_of(workflow, kind) for kind in ("SaveImage", "ICE_PreviewConcepts")],
                      PICTURE_TIMEOUT_MS)
    settle(page)
    nodes = {node["type"]: node for node in assert_laid_out(page, "ice_toyworld_demo after its run")}
    generated = make_workflows.TOYWORLD_VIEW_SCALE * SCENE_SIDE
    labelled = legible_factor(SCENE_SIDE, SCENE_SIDE) * SCENE_SIDE
    assert nodes["SaveImage"]["pictures"] == [[generated, generated]], "the generated image, enlarged to be seen"
    assert nodes["ICE_PreviewConcepts"]["pictures"] == [[labelled, labelled]], "the labelled masks, enlarged"
    page.screenshot(path=os.path.join(shots, "ice_toyworld_demo_after_run.png"))
    save_thumbnail(page, TOYWORLD, shots)
    if WRITE_SCREENSHOTS:
        save_picture(page, README_PICTURE, README_WIDTH)


def test_cancel_stops_learning_within_one_step(page, server, record_property, capsys):
    workflow = load_json(TOYWORLD)
    load_workflow(page, workflow, make_workflows.ui_file_name(TOYWORLD))
    learn = node_id_of(workflow, LEARN_NODE)
    page.evaluate(SET_WIDGET, [learn, "steps", NODE_BY_ID[LEARN_NODE].input("steps").max])
    page.evaluate("() => { window.iceEvents.length = 0; }")
    page.get_by_role("button", name=RUN_LABEL, exact=True).first.click()
    wait_started(page, server)
    page.wait_for_function(
        "([id, count]) => window.iceEvents.filter((e) => e.kind === 'progress' && String(e.detail.node) === id)"
        ".length >= count",
        arg=[str(learn), STEPS_TO_TIME + 1], timeout=RUN_TIMEOUT_S * 1000,
    )
    clicked_ms = now_ms(page)
    clicked = time.monotonic()
    page.get_by_role("button", name=CANCEL_LABEL).first.click()
    idle = wait_idle(server, RUN_TIMEOUT_S)
    progress = [e for e in events(page, "progress") if str(e["detail"]["node"]) == str(learn)]
    times = [e["t"] for e in progress if e["t"] <= clicked_ms]
    step_s = statistics.median(b - a for a, b in zip(times, times[1:])) / 1000
    latency_s = idle - clicked
    steps_after = sum(1 for e in progress if e["t"] > clicked_ms)
    interrupted = [e["t"] for e in events(page, "execution_interrupted")]
    interrupted_s = (interrupted[0] - clicked_ms) / 1000 if interrupted else float("nan")
    record_property("learning_step_s", round(step_s, 3))
    record_property("cancel_to_interrupted_s", round(interrupted_s, 3))
    record_property("cancel_to_idle_s", round(latency_s, 3))
    record_property("steps_reported_after_cancel", steps_after)
    report(capsys, f"Cancel: 'execution_interrupted' {interrupted_s:.2f} s and queue idle {latency_s:.2f} s after "
                   f"the click; learning step {step_s:.2f} s (median of {len(times) - 1}); {steps_after} step(s) "
                   "reported after the click")
    entry = last_entry(server)
    assert entry["status"]["status_str"] == "error", json.dumps(entry["status"])[:2000]
    assert any(kind == "execution_interrupted" for kind, _ in entry["status"]["messages"])
    assert interrupted_s <= step_s + CANCEL_ALLOWANCE_S, (
        f"the engine stopped {interrupted_s:.2f} s after Cancel; its learning steps take {step_s:.2f} s")
    assert latency_s <= step_s + CANCEL_ALLOWANCE_S, (
        f"Cancel took {latency_s:.2f} s to stop a run whose learning steps take {step_s:.2f} s")
    assert steps_after <= 1, f"{steps_after} learning steps reported after Cancel"


# ---------------------------------------------------------------------- template browser
def test_template_browser_shows_the_titles_and_thumbnails_and_opens_a_workflow(page, shots):
    for title in make_workflows.TEMPLATE_TITLES.values():
        thumbnail = os.path.join(make_workflows.UI_FOLDER, title + ".jpg")
        assert os.path.isfile(thumbnail), f"{thumbnail} missing: run this tier with ICE_WRITE_SCREENSHOTS=1"
    page.evaluate("() => window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    page.get_by_text(PACK_DIR_NAME, exact=True).first.click()
    for title in [*make_workflows.TEMPLATE_TITLES.values(), make_workflows.ui_file_name(TOYWORLD)]:
        card = page.locator(f'[data-testid="template-workflow-{title}"]')
        card.scroll_into_view_if_needed(timeout=PICTURE_TIMEOUT_MS)
        assert card.get_by_role("heading").inner_text().strip() == title
        thumbnail = card.locator("img").first
        thumbnail.wait_for(state="visible", timeout=PICTURE_TIMEOUT_MS)  # shown once loaded, without error
        assert thumbnail.evaluate("(img) => img.naturalWidth") > 0, f"{title}: no thumbnail"
    page.wait_for_timeout(SETTLE_MS)
    page.screenshot(path=os.path.join(shots, "template_browser.png"))
    page.locator(f'[data-testid="template-workflow-{make_workflows.ui_file_name(TOYWORLD)}"]').click()
    expected = len(load_json(TOYWORLD)["nodes"])
    page.wait_for_function(f"() => window.app.graph._nodes.length === {expected}", timeout=PICTURE_TIMEOUT_MS)
    assert not missing_nodes_dialog_shown(page)
