"""Helpers of the browser tier: find a Chromium, open ComfyUI's frontend in it, read the live graph.

The browser is Debian's ``chromium`` (or the one ``ICE_CHROMIUM`` names) driven by the ``playwright`` package
through ``executable_path``; nothing is downloaded. The server is the ComfyUI tier's (tests/comfyui).
"""
from __future__ import annotations

import json
import os
import shutil

CHROMIUM_ENV = "ICE_CHROMIUM"
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser")
# The window the layout is made for (devtools/make_workflows.py VIEW_WIDTH and VIEW_HEIGHT add the frontend's
# side bar and menus to the canvas): 1600 x 900, and the canvas part of it.
WINDOW = {"width": 1600, "height": 900}
SIDE_BAR_WIDTH = 64
MENU_HEIGHT = 80
FRONTEND_TIMEOUT_MS = 120_000
SETTLE_MS = 400  # after a graph change, for the frontend to lay the nodes out and draw them
# Frontend settings for a quiet first start and clean screenshots: no template browser on the first visit, and
# no minimap, canvas statistics or zoom toolbar over the graph.
SETTINGS = {
    "Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasInfo": False,
    "Comfy.Graph.CanvasMenu": False,
}
BADGE_HEIGHT = 20  # the pack badge above an ICE node's title bar (devtools/make_workflows.py BADGE_HEIGHT)
CLIP_PADDING = 16  # px around the graph in a thumbnail
MISSING_NODES_TITLE = "Some Nodes Are Missing"  # the frontend's missing-node dialog (locale en)
MISSING_MODELS_MESSAGE = "the following models were not found"  # its missing-models dialog (locale en)
DIALOG = ".p-dialog"
MAX_DIALOGS = 4  # dialogs the frontend may stack on one load (missing nodes, missing models, ...)
RUN_LABEL = "Run"
CANCEL_LABEL = "Cancel current run"  # aria-label of the Cancel (interrupt) button next to Run


def find_chromium() -> str | None:
    """The Chromium to drive: ``$ICE_CHROMIUM``, else Debian's /usr/bin/chromium or one on PATH; None if none."""
    named = os.environ.get(CHROMIUM_ENV)
    if named:
        return named if os.path.isfile(named) and os.access(named, os.X_OK) else None
    for candidate in CHROMIUM_CANDIDATES:
        found = candidate if os.path.isabs(candidate) and os.access(candidate, os.X_OK) else shutil.which(candidate)
        if found:
            return found
    return None


def write_settings(base: str) -> None:
    """The default user's frontend settings in a ComfyUI base folder (before the page first loads)."""
    folder = os.path.join(base, "user", "default")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "comfy.settings.json"), "w", encoding="utf-8") as handle:
        json.dump(SETTINGS, handle)


def open_frontend(browser, url: str):
    """A page with ComfyUI's frontend loaded and every node type registered; collects console errors."""
    page = browser.new_page(viewport=WINDOW)
    page.goto(url)
    page.wait_for_function(
        "() => window.app && window.app.graph && window.app.canvas && window.comfyAPI && window.comfyAPI.api"
        " && window.LiteGraph && window.LiteGraph.registered_node_types['ICE_Generate']",
        timeout=FRONTEND_TIMEOUT_MS,
    )
    page.evaluate(RECORD_EVENTS)
    return page


# Records the server's messages as the frontend receives them (performance.now() in ms).
RECORD_EVENTS = """() => {
  const api = window.comfyAPI.api.api;
  window.iceEvents = [];
  for (const kind of ['progress', 'executing', 'executed', 'execution_start', 'execution_interrupted', 'execution_error',
                      'execution_success', 'status']) {
    api.addEventListener(kind, (event) => window.iceEvents.push({kind, t: performance.now(), detail: event.detail}));
  }
}"""

LOAD = """async ([workflow, name]) => {
  await window.app.loadGraphData(workflow, true, true, name);
}"""

SETTLE = """async () => {
  const frame = () => new Promise((resolve) => requestAnimationFrame(() => resolve()));
  window.app.canvas.setDirty(true, true);
  await frame(); await frame();
  window.app.canvas.draw(true, true);
}"""

# Every node's box as drawn (title bar included): [x, y, width, height] in canvas units.
NODE_BOXES = """() => window.app.graph._nodes.map((node) => ({
  id: node.id, type: node.type, title: node.title, box: Array.from(node.boundingRect),
  registered: !!window.LiteGraph.registered_node_types[node.type],
  pictures: (node.imgs || []).map((img) => [img.naturalWidth, img.naturalHeight]),
}))"""

VIEW = "() => ({scale: window.app.canvas.ds.scale, offset: Array.from(window.app.canvas.ds.offset)})"

# Shows an output picture on each of the given nodes as if the graph had run ("executed" messages).
SHOW_OUTPUTS = """([nodeIds, filename]) => {
  const api = window.comfyAPI.api.api;
  for (const id of nodeIds) {
    api.dispatchCustomEvent('executed', {
      node: String(id), display_node: String(id), prompt_id: 'browser-tier',
      output: {images: [{filename, subfolder: '', type: 'output'}]},
    });
  }
}"""

SET_WIDGET = """([nodeId, name, value]) => {
  const node = window.app.graph.getNodeById(nodeId);
  node.widgets.find((widget) => widget.name === name).value = value;
}"""


# True once every given node shows a loaded picture; draws the canvas first (pictures load when drawn).
PICTURES_SHOWN = """(ids) => {
  window.app.canvas.draw(true, true);
  return ids.every((id) => (window.app.graph.getNodeById(id).imgs || []).some((img) => img.naturalWidth > 0));
}"""


def wait_for_pictures(page, node_ids: list[int], timeout_ms: float) -> None:
    page.wait_for_function(PICTURES_SHOWN, arg=node_ids, timeout=timeout_ms)


def load_workflow(page, workflow: dict, name: str) -> None:
    page.evaluate(LOAD, [workflow, name])
    settle(page)


def missing_models_text(page) -> str | None:
    """The text of the frontend's missing-models dialog (which lists each file with its folder), or None."""
    dialog = page.locator(DIALOG).filter(has_text=MISSING_MODELS_MESSAGE)
    return dialog.first.inner_text() if dialog.count() else None


def close_dialogs(page) -> None:
    """Close what the frontend opened on top of the canvas (each Escape closes the topmost dialog)."""
    for _ in range(MAX_DIALOGS):
        if not page.locator(DIALOG).count():
            return
        page.keyboard.press("Escape")
        page.wait_for_timeout(SETTLE_MS)


def settle(page) -> None:
    page.evaluate(SETTLE)
    page.wait_for_timeout(SETTLE_MS)
    page.evaluate(SETTLE)


def node_boxes(page) -> list[dict]:
    return page.evaluate(NODE_BOXES)


def overlaps(nodes: list[dict]) -> list[str]:
    """Pairs of nodes whose boxes share any area, described for an assertion message."""
    found = []
    for index, first in enumerate(nodes):
        for second in nodes[index + 1:]:
            (x1, y1, w1, h1), (x2, y2, w2, h2) = first["box"], second["box"]
            width = min(x1 + w1, x2 + w2) - max(x1, x2)
            height = min(y1 + h1, y2 + h2) - max(y1, y2)
            if width > 0 and height > 0:
                found.append(f"{first['title']} #{first['id']} and {second['title']} #{second['id']} "
                             f"({width:.0f} x {height:.0f})")
    return found


def outside_window(nodes: list[dict], view: dict) -> list[str]:
    """Nodes that are not wholly inside the canvas part of the window at the view the workflow opened with."""
    scale, (dx, dy) = view["scale"], view["offset"]
    found = []
    for node in nodes:
        x, y, width, height = node["box"]
        left, top = (x + dx) * scale, (y + dy) * scale
        right, bottom = (x + width + dx) * scale, (y + height + dy) * scale
        if left < 0 or top < 0 or right > WINDOW["width"] - SIDE_BAR_WIDTH or bottom > WINDOW["height"] - MENU_HEIGHT:
            found.append(f"{node['title']} #{node['id']} at {left:.0f},{top:.0f}..{right:.0f},{bottom:.0f} px")
    return found


def missing_nodes_dialog_shown(page) -> bool:
    return page.get_by_text(MISSING_NODES_TITLE).count() > 0


def events(page, kind: str | None = None) -> list[dict]:
    found = page.evaluate("() => window.iceEvents")
    return [event for event in found if kind is None or event["kind"] == kind]


def now_ms(page) -> float:
    return page.evaluate("() => performance.now()")


def graph_clip(page) -> dict:
    """The part of the window the graph is drawn in (badges included, a little padding), for thumbnails."""
    view = page.evaluate(VIEW)
    scale, (dx, dy) = view["scale"], view["offset"]
    boxes = [node["box"] for node in node_boxes(page)]
    left = SIDE_BAR_WIDTH + (min(x for x, _, _, _ in boxes) + dx) * scale - CLIP_PADDING
    top = MENU_HEIGHT + (min(y for _, y, _, _ in boxes) - BADGE_HEIGHT + dy) * scale - CLIP_PADDING
    right = SIDE_BAR_WIDTH + (max(x + w for x, _, w, _ in boxes) + dx) * scale + CLIP_PADDING
    bottom = MENU_HEIGHT + (max(y + h for _, y, _, h in boxes) + dy) * scale + CLIP_PADDING
    left, top = max(SIDE_BAR_WIDTH, left), max(MENU_HEIGHT, top)
    right, bottom = min(WINDOW["width"], right), min(WINDOW["height"], bottom)
    return {"x": left, "y": top, "width": right - left, "height": bottom - top}
