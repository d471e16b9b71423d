"""A real ComfyUI server for the ComfyUI test tier: CPU, loopback, a temporary base folder with this pack
linked into its custom_nodes; workflows are queued through /prompt and followed through /history.

Only the standard library and ``requests`` are used here: ComfyUI itself runs in its own process.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import requests

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACK_DIR_NAME = "ComfyUI-ICE"
LOOPBACK = "127.0.0.1"
STARTUP_TIMEOUT_S = 180
REQUEST_TIMEOUT_S = 30
POLL_INTERVAL_S = 0.5
IMPORT_FAILED_MARKER = "IMPORT FAILED"


def comfyui_path() -> str | None:
    """The ComfyUI checkout named by COMFYUI_PATH, or None when the tier must be skipped."""
    path = os.environ.get("COMFYUI_PATH")
    if path and os.path.isfile(os.path.join(path, "main.py")):
        return os.path.abspath(path)
    return None


def ensure_models(folder: str, comfyui: str, family: str = "sd1", with_retriever: bool = True) -> str:
    """Build the test models into ``folder`` (once: a stamp of the generator's inputs marks them done)."""
    import hashlib

    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "make_fixtures.py")
    config = os.path.join(ROOT, "devtools", "configs", "tiny_open_clip.json")
    digest = hashlib.sha256()
    for path in (script, config) if with_retriever else (script,):
        with open(path, "rb") as handle:
            digest.update(handle.read())
    digest.update(f"{family}:{with_retriever}".encode())
    stamp = os.path.join(folder, f"stamp_{family}_{int(with_retriever)}.txt")
    if os.path.exists(stamp) and open(stamp, encoding="utf-8").read() == digest.hexdigest():
        return folder
    command = [sys.executable, script, "--comfyui", comfyui, "--out", folder, "--family", family]
    if with_retriever:
        command += ["--open-clip-config", config]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"building the test models failed:\n{result.stderr[-4000:]}")
    with open(stamp, "w", encoding="utf-8") as handle:
        handle.write(digest.hexdigest())
    return folder


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


def make_base(base: str, models_source: str | None = None) -> str:
    """A ComfyUI base folder: models/, input/, output/, custom_nodes/<pack> -> this repository."""
    for sub in ("models", "input", "output", "temp", "user", "custom_nodes"):
        os.makedirs(os.path.join(base, sub), exist_ok=True)
    link = os.path.join(base, "custom_nodes", PACK_DIR_NAME)
    if not os.path.lexists(link):
        os.symlink(ROOT, link, target_is_directory=True)
    if models_source:
        for kind in os.listdir(models_source):
            if not os.path.isdir(os.path.join(models_source, kind)):
                continue
            target = os.path.join(base, "models", kind)
            os.makedirs(target, exist_ok=True)
            for name in os.listdir(os.path.join(models_source, kind)):
                dest = os.path.join(target, name)
                if not os.path.lexists(dest):
                    os.symlink(os.path.join(models_source, kind, name), dest)
    return base


@dataclass
class ComfyServer:
    comfyui: str
    base: str
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    log_path: str = ""

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> "ComfyServer":
        self.log_path = os.path.join(self.base, "comfyui.log")
        command = [
            sys.executable, os.path.join(self.comfyui, "main.py"),
            "--cpu", "--listen", LOOPBACK, "--port", str(self.port),
            "--base-directory", self.base, "--disable-auto-launch",
            "--database-url", "sqlite:///:memory:",
        ]
        log = open(self.log_path, "wb")
        self.process = subprocess.Popen(command, cwd=self.comfyui, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(self.url + "/system_stats", timeout=REQUEST_TIMEOUT_S).ok:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(POLL_INTERVAL_S)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {STARTUP_TIMEOUT_S} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as handle:
            return handle.read()

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    # ------------------------------------------------------------------ API
    def object_info(self) -> dict:
        response = requests.get(self.url + "/object_info", timeout=REQUEST_TIMEOUT_S)
        response.raise_for_status()
        return response.json()

    def queue(self, prompt: dict) -> str:
        response = requests.post(self.url + "/prompt", json={"prompt": prompt}, timeout=REQUEST_TIMEOUT_S)
        if response.status_code != 200:
            raise PromptRejected(response.status_code, response.json())
        return response.json()["prompt_id"]

    def wait(self, prompt_id: str, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            history = requests.get(f"{self.url}/history/{prompt_id}", timeout=REQUEST_TIMEOUT_S).json()
            entry = history.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            time.sleep(POLL_INTERVAL_S)
        raise TimeoutError(f"Prompt {prompt_id} did not finish within {timeout_s} s:\n{self.log_tail()}")

    def run(self, prompt: dict, timeout_s: float) -> dict:
        """Queue ``prompt`` and return its history entry; raise with ComfyUI's error when it fails."""
        entry = self.wait(self.queue(prompt), timeout_s)
        if entry["status"]["status_str"] != "success":
            raise PromptFailed(execution_error(entry), self.log_tail())
        return entry

    def interrupt(self) -> None:
        requests.post(self.url + "/interrupt", timeout=REQUEST_TIMEOUT_S)


class PromptRejected(Exception):
    def __init__(self, status: int, body: dict):
        super().__init__(f"/prompt answered {status}: {json.dumps(body, indent=1)[:4000]}")
        self.body = body


class PromptFailed(Exception):
    def __init__(self, error: dict, log_tail: str):
        super().__init__(f"{error.get('node_type')}: {error.get('exception_type')}: {error.get('exception_message')}\n{log_tail}")
        self.error = error


def execution_error(entry: dict) -> dict:
    """The execution_error (or execution_interrupted) message of a history entry, {} if none."""
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind in ("execution_error", "execution_interrupted"):
            return {"kind": kind, **data}
    return {}


def output_files(entry: dict, node_id: str, kind: str = "images") -> list[dict]:
    return entry.get("outputs", {}).get(node_id, {}).get(kind, [])


def queue_and_wait_for_progress(server: ComfyServer, prompt: dict, node_id: str, timeout_s: float) -> str:
    """Queue ``prompt`` and return its id once node ``node_id`` has reported progress over the websocket."""
    import asyncio
    import uuid

    import aiohttp

    async def follow() -> str:
        client_id = uuid.uuid4().hex
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"ws://{LOOPBACK}:{server.port}/ws?clientId={client_id}") as socket_:
                async with session.post(server.url + "/prompt", json={"prompt": prompt, "client_id": client_id}) as reply:
                    body = await reply.json()
                    if reply.status != 200:
                        raise PromptRejected(reply.status, body)
                prompt_id = body["prompt_id"]
                loop = asyncio.get_running_loop()
                deadline = loop.time() + timeout_s
                while loop.time() < deadline:
                    message = await asyncio.wait_for(socket_.receive(), deadline - loop.time())
                    if message.type != aiohttp.WSMsgType.TEXT:
                        continue
                    event = json.loads(message.data)
                    data = event.get("data", {})
                    if event.get("type") == "progress" and str(data.get("node")) == node_id:
                        return prompt_id
                    if event.get("type") in ("execution_error", "execution_success") and data.get("prompt_id") == prompt_id:
                        raise RuntimeError(f"prompt ended before node {node_id} reported progress: {event}")
                raise TimeoutError(f"node {node_id} reported no progress within {timeout_s} s")

    return asyncio.run(follow())
