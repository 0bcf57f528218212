"""Download path of the model zoo, against a local HTTP server (no internet access).

Each test points a ModelSpec at a throwaway server on 127.0.0.1 and a temporary
BIOSAM_CACHE_DIR, then checks what ends up in the cache and what the error says.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
import socket
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import xxhash

if importlib.util.find_spec("biosam") is None:  # running from a checkout without install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from biosam.zoo import (  # noqa: E402
    DownloadError,
    ModelSpec,
    UnknownVersionError,
    UnsupportedModelError,
    cache_dir,
    cache_path,
    fetch,
    get_spec,
    is_cached,
    resolve_checkpoint,
)
from biosam.zoo import registry as registry_module  # noqa: E402
from biosam.zoo.registry import index_specs  # noqa: E402

PAYLOAD = os.urandom(300_000)
XXH128 = "xxh128:" + xxhash.xxh128_hexdigest(PAYLOAD)
SHA256 = "sha256:" + hashlib.sha256(PAYLOAD).hexdigest()


class _LocalServer:
    """Tiny HTTP server with scripted routes and a per-path request counter."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[str, bytes]] = {}
        self.hits: Counter[str] = Counter()
        self.release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                server.hits[self.path] += 1
                kind, body = server.routes.get(self.path, ("missing", b""))
                if kind == "missing":
                    self.send_error(404, "File not found")
                    return
                if kind == "hang":  # accept, then never answer (until teardown)
                    server.release.wait(10)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                # "short": promise more bytes than are sent, then close the connection.
                declared = len(body) + (50_000 if kind == "short" else 0)
                self.send_header("Content-Length", str(declared))
                self.end_headers()
                self.wfile.write(body)
                self.close_connection = True

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"


@pytest.fixture
def server():
    srv = _LocalServer()
    srv.thread.start()
    yield srv
    srv.release.set()
    srv.httpd.shutdown()
    srv.httpd.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("BIOSAM_CACHE_DIR", str(root))
    return root


def _spec(url: str | None, known_hash: str | None, name: str = "test_model", filename: str = "weights.pt",
          **kw) -> ModelSpec:
    return ModelSpec(name=name, family="sam", architecture="vit_b", domain="test", url=url,
                     known_hash=known_hash, filename=filename, size_mb=0.3,
                     preprocessing="sam", defaults={}, **kw)


def _files(root: Path) -> list[str]:
    """Every file under root (relative), to prove nothing partial was left behind."""
    if not root.exists():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _refused_url() -> str:
    # Bind to get a free port, then close it: nothing listens there any more.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/weights.pt"


def _assert_actionable(message: str, url: str, target: Path) -> None:
    assert url in message
    assert str(target) in message
    assert f"save it as {target}" in message
    assert "--model PATH" in message


def test_pooch_supports_xxh128(tmp_path):
    import pooch

    path = tmp_path / "blob"
    path.write_bytes(PAYLOAD)
    assert pooch.file_hash(str(path), alg="xxh128") == XXH128.split(":")[1]


def test_cache_dir_env_and_default(tmp_path, monkeypatch):
    import pooch

    monkeypatch.setenv("BIOSAM_CACHE_DIR", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    assert not (tmp_path / "c").exists()  # computing the location creates nothing
    monkeypatch.delenv("BIOSAM_CACHE_DIR")
    assert cache_dir() == Path(pooch.os_cache("biosam"))


@pytest.mark.parametrize("known_hash", [XXH128, SHA256, None], ids=["xxh128", "sha256", "nohash"])
def test_download_then_cache_hit(server, cache, known_hash):
    server.routes["/w.pt"] = ("ok", PAYLOAD)
    spec = _spec(server.url("/w.pt"), known_hash)
    assert not is_cached(spec)

    path = fetch(spec, progress=True)
    assert path == cache_path(spec) == cache / "test_model" / "weights.pt"
    assert path.read_bytes() == PAYLOAD
    assert is_cached(spec)
    assert _files(cache) == ["test_model/weights.pt"]

    assert fetch(spec, progress=False) == path
    assert server.hits["/w.pt"] == 1  # the second fetch is served from the cache


def test_resolve_zoo_name_downloads(server, cache, monkeypatch):
    server.routes["/w.pt"] = ("ok", PAYLOAD)
    spec = _spec(server.url("/w.pt"), XXH128)
    monkeypatch.setattr(registry_module, "REGISTRY", index_specs([spec]))
    path, got = resolve_checkpoint("test_model", progress=False)
    assert got is spec and path.read_bytes() == PAYLOAD


def test_versions_download_side_by_side(server, cache, monkeypatch):
    """Each version of a model downloads from its own address, is checked against its own
    hash and keeps its own cache file; the plain name is the newest version."""
    old_payload = os.urandom(200_000)
    server.routes["/v2.pt"] = ("ok", PAYLOAD)
    server.routes["/v1.pt"] = ("ok", old_payload)
    newest = _spec(server.url("/v2.pt"), XXH128, filename="test_model_v2.pt", version="v2")
    older = _spec(server.url("/v1.pt"), "xxh128:" + xxhash.xxh128_hexdigest(old_payload),
                  name="test_model:v1", filename="test_model_v1.pt", version="v1")
    monkeypatch.setattr(registry_module, "REGISTRY", index_specs([newest, older]))

    path, got = resolve_checkpoint("test_model", progress=False)
    assert got is newest and path.read_bytes() == PAYLOAD
    assert resolve_checkpoint("test_model:v2", progress=False) == (path, newest)
    old_path, got = resolve_checkpoint("test_model:v1", progress=False)
    assert got is older and old_path.read_bytes() == old_payload
    assert _files(cache) == ["test_model/test_model_v1.pt", "test_model/test_model_v2.pt"]
    assert server.hits["/v2.pt"] == 1 and server.hits["/v1.pt"] == 1  # v2 twice: the second from the cache

    with pytest.raises(UnknownVersionError, match=r"versions are v2 \(newest, the default\), v1\.") as info:
        resolve_checkpoint("test_model:v3", progress=False)
    assert "'test_model'" in str(info.value)
    assert sum(server.hits.values()) == 2 and len(_files(cache)) == 2


def test_old_version_with_wrong_bytes_is_refused(server, cache, monkeypatch):
    # A server answering an older version's address with other bytes: that version fails its own
    # hash check and leaves nothing, while the newest version's cached file stays untouched.
    server.routes["/v2.pt"] = ("ok", PAYLOAD)
    server.routes["/v1.pt"] = ("ok", PAYLOAD[:1000])
    newest = _spec(server.url("/v2.pt"), XXH128, filename="test_model_v2.pt", version="v2")
    older = _spec(server.url("/v1.pt"), XXH128, name="test_model:v1", filename="test_model_v1.pt", version="v1")
    monkeypatch.setattr(registry_module, "REGISTRY", index_specs([newest, older]))
    path, _ = resolve_checkpoint("test_model", progress=False)
    with pytest.raises(DownloadError, match="checksum mismatch") as info:
        resolve_checkpoint("test_model:v1", progress=False)
    assert "'test_model:v1'" in str(info.value) and str(cache_path(older)) in str(info.value)
    assert _files(cache) == ["test_model/test_model_v2.pt"] and path.read_bytes() == PAYLOAD


def test_hash_mismatch_leaves_nothing(server, cache):
    server.routes["/w.pt"] = ("ok", PAYLOAD)
    wrong = "xxh128:" + "0" * 32
    spec = _spec(server.url("/w.pt"), wrong)
    with pytest.raises(DownloadError) as info:
        fetch(spec, progress=False)
    message = str(info.value)
    assert wrong in message and XXH128.split(":")[1] in message  # expected and got
    _assert_actionable(message, spec.url, cache_path(spec))
    assert _files(cache) == []
    assert not is_cached(spec)


@pytest.mark.parametrize("known_hash", [XXH128, None], ids=["xxh128", "nohash"])
def test_truncated_transfer_leaves_nothing(server, cache, known_hash):
    # Without a hash only the Content-Length check can catch the truncation.
    server.routes["/w.pt"] = ("short", PAYLOAD)
    spec = _spec(server.url("/w.pt"), known_hash)
    with pytest.raises(DownloadError) as info:
        fetch(spec, progress=False)
    _assert_actionable(str(info.value), spec.url, cache_path(spec))
    assert _files(cache) == []


def test_connection_refused(cache):
    spec = _spec(_refused_url(), XXH128)
    with pytest.raises(DownloadError) as info:
        fetch(spec, progress=False)
    message = str(info.value)
    _assert_actionable(message, spec.url, cache_path(spec))
    assert "connection failed" in message
    assert _files(cache) == []


def test_http_404(server, cache):
    spec = _spec(server.url("/nothing-here.pt"), XXH128)
    with pytest.raises(DownloadError) as info:
        fetch(spec, progress=False)
    message = str(info.value)
    _assert_actionable(message, spec.url, cache_path(spec))
    assert "HTTP 404" in message
    assert _files(cache) == []


def test_timeout(server, cache):
    server.routes["/w.pt"] = ("hang", b"")
    spec = _spec(server.url("/w.pt"), XXH128)
    start = time.monotonic()
    with pytest.raises(DownloadError) as info:
        fetch(spec, progress=False, timeout=0.5)
    assert time.monotonic() - start < 5
    _assert_actionable(str(info.value), spec.url, cache_path(spec))
    assert _files(cache) == []


def test_corrupt_cached_file_is_replaced(server, cache):
    server.routes["/w.pt"] = ("ok", PAYLOAD)
    spec = _spec(server.url("/w.pt"), XXH128)
    target = cache_path(spec)
    target.parent.mkdir(parents=True)
    target.write_bytes(b"truncated")
    assert fetch(spec, progress=False).read_bytes() == PAYLOAD
    assert server.hits["/w.pt"] == 1


def test_mismatching_cached_file_survives_a_failed_download(cache):
    spec = _spec(_refused_url(), XXH128)
    target = cache_path(spec)
    target.parent.mkdir(parents=True)
    target.write_bytes(b"some other version")
    with pytest.raises(DownloadError, match="does not match"):
        fetch(spec, progress=False)
    assert target.read_bytes() == b"some other version"
    assert _files(cache) == ["test_model/weights.pt"]


def test_hand_placed_file_is_used_without_network(cache):
    spec = _spec(_refused_url(), XXH128)
    target = cache_path(spec)
    target.parent.mkdir(parents=True)
    target.write_bytes(PAYLOAD)
    assert fetch(spec, progress=False) == target


def test_stale_partials_are_removed(server, cache):
    server.routes["/w.pt"] = ("ok", PAYLOAD)
    spec = _spec(server.url("/w.pt"), XXH128)
    folder = cache_path(spec).parent
    folder.mkdir(parents=True)
    stale, fresh = folder / "tmpstale01", folder / "tmpfresh01"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"y")  # could be another process's live download: kept
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    fetch(spec, progress=False)
    assert _files(cache) == ["test_model/tmpfresh01", "test_model/weights.pt"]


def test_unwritable_cache_is_a_download_error(server, tmp_path, monkeypatch):
    server.routes["/w.pt"] = ("ok", PAYLOAD)
    blocker = tmp_path / "a_file"
    blocker.write_bytes(b"")
    monkeypatch.setenv("BIOSAM_CACHE_DIR", str(blocker / "cache"))
    spec = _spec(server.url("/w.pt"), XXH128)
    with pytest.raises(DownloadError, match="BIOSAM_CACHE_DIR"):
        fetch(spec, progress=False)


def test_unsupported_and_urlless_specs_do_not_touch_network(server, cache):
    server.routes["/w.pt"] = ("ok", PAYLOAD)
    with pytest.raises(UnsupportedModelError, match="not supported yet"):
        fetch(_spec(server.url("/w.pt"), XXH128, supported=False), progress=False)
    with pytest.raises(UnsupportedModelError, match="instance-segmentation decoder"):
        fetch(dataclasses.replace(get_spec("vit_b_lm_decoder"), url=server.url("/w.pt")))
    urlless = _spec(None, XXH128)
    with pytest.raises(DownloadError) as info:
        fetch(urlless, progress=False)
    assert f"save it as {cache_path(urlless)}" in str(info.value)
    assert sum(server.hits.values()) == 0
    assert _files(cache) == []
