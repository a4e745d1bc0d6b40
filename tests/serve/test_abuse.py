"""Abuse of the HTTP API: hostile file names, uploads at the limits, slow clients, deleting a corpus mid-answer.

None of these may crash the server, write outside its upload folder (or ``$TESSERA_HOME``'s index
cache), or leave a half-built corpus behind; the server keeps answering ``/healthz`` throughout.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from pathlib import Path

import pytest

from serve_helpers import uvicorn_thread
from test_api import assert_error, wait_job

SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def _tree(root: Path) -> set[Path]:
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            out.add(Path(dirpath, n))
    return out


def _multipart(parts: list[tuple[str, bytes | None, bytes]], boundary: str = "abuse-boundary") -> tuple[bytes, dict]:
    """A raw multipart body: ``(field, filename bytes or None, content)`` parts, file names sent exactly as given."""
    b = boundary.encode()
    body = b""
    for field, filename, content in parts:
        disp = b'form-data; name="' + field.encode() + b'"'
        if filename is not None:
            disp += b'; filename="' + filename + b'"'
        body += b"--" + b + b"\r\nContent-Disposition: " + disp + b"\r\n"
        if filename is not None:
            body += b"Content-Type: text/plain\r\n"
        body += b"\r\n" + content + b"\r\n"
    body += b"--" + b + b"--\r\n"
    return body, {"content-type": f"multipart/form-data; boundary={boundary}"}


def _healthy(c) -> None:
    h = c.get("/healthz")
    assert h.status_code == 200 and h.json()["status"] == "ok", h.text


def _no_stray_folders(upload_dir: Path) -> None:
    """No half-written upload (``atomic_dir``'s ``.ID.tmp-*`` / ``.ID.old-*``) is left in the upload folder."""
    if upload_dir.exists():
        stray = [p.name for p in upload_dir.iterdir() if p.name.startswith(".")]
        assert not stray, stray


# -- 1. hostile file names --------------------------------------------------------------------------------------

# (file name as sent, the stored name or None when it must be refused with a 400)
HOSTILE_NAMES = [
    (b"../../escape.txt", "escape.txt"),
    (b"../../../../../../../../tmp/tessera-abuse-escape.txt", "tessera-abuse-escape.txt"),
    (b"..\\..\\..\\evil.md", "evil.md"),
    (b"/etc/passwd", None),
    (b"/etc/passwd.txt", "passwd.txt"),
    (b"C:\\x", None),
    (b"C:\\Windows\\System32\\x.txt", "x.txt"),
    (b"a\x00b.txt", "a-b.txt"),
    (b"evil.png\x00.txt", "evil.png.txt"),
    (b"evil.txt\x00.png", None),
    (b"..", None),
    (b".hidden.txt", "hidden.txt"),
    (b"./.././/.txt", "corpus.txt"),
]


@pytest.mark.parametrize("filename,stored", HOSTILE_NAMES, ids=[repr(n)[2:-1] for n, _ in HOSTILE_NAMES])
def test_hostile_file_names_are_refused_or_reduced_to_safe_names(make_client, tmp_path, tmp_path_factory, tessera_home,
                                                                  filename, stored):
    c = make_client()
    uploads = tmp_path / "uploads"
    base = tmp_path_factory.getbasetemp()
    before, cwd_before = _tree(base), set(os.listdir("."))
    body, headers = _multipart([("files", filename, b"A line of text about a harbour and its ships.\n")])
    r = c.post("/v1/corpora", content=body, headers=headers)
    if stored is None:
        err = assert_error(r, 400, "files")
        assert "\n" not in err["message"] and str(uploads) not in err["message"]
        assert not uploads.exists() or not any(uploads.iterdir())
    else:
        assert r.status_code == 202, r.text
        cid = r.json()["corpus"]["id"]
        assert SAFE_NAME.match(cid) and wait_job(c, r.json()["job"]["id"])["status"] == "done"
        folder = uploads / cid
        assert [p.name for p in folder.iterdir()] == [stored]
        assert SAFE_NAME.match(stored)
    new = _tree(base) - before
    outside = [p for p in new if p != uploads and uploads not in p.parents and Path(tessera_home) not in p.parents]
    assert not outside, outside
    assert set(os.listdir(".")) == cwd_before
    assert not Path("/tmp/tessera-abuse-escape.txt").exists()
    _no_stray_folders(uploads)
    _healthy(c)


def test_hostile_corpus_names_and_ids(make_client, tmp_path):
    c = make_client()
    uploads = tmp_path / "uploads"
    body, headers = _multipart([("name", None, b"../../../etc/\x00passwd"),
                                ("files", b"notes.txt", b"The lighthouse keeper trims the wick every night.\n")])
    r = c.post("/v1/corpora", content=body, headers=headers)
    assert r.status_code == 202, r.text
    cid = r.json()["corpus"]["id"]
    assert SAFE_NAME.match(cid) and cid.startswith("etc-passwd-")
    assert wait_job(c, r.json()["job"]["id"])["status"] == "done"
    assert [p.name for p in uploads.iterdir()] == [cid]
    # ids that try to leave the upload folder name no corpus
    for bad in ("..", "...", "%2e%2e", "..%2F..%2Fetc", "%00"):
        r = c.delete(f"/v1/corpora/{bad}")
        assert r.status_code in (404, 405), r.text
        assert r.json()["error"]["status"] == r.status_code
    assert (uploads / cid / "notes.txt").is_file() and uploads.parent.is_dir()
    _healthy(c)


# -- 2. a repetitive file at the size limit -------------------------------------------------------------------

LIMIT = 200_000


def _upload_at_limit(c, content: bytes) -> tuple[str, dict]:
    assert len(content) == LIMIT
    assert_error(c.post("/v1/corpora", files=[("files", ("over.txt", content + b"a"))]), 413, "files")
    r = c.post("/v1/corpora", files=[("files", ("same.txt", content))])
    assert r.status_code == 202, r.text
    return r.json()["corpus"]["id"], wait_job(c, r.json()["job"]["id"], timeout=30)


@pytest.mark.parametrize("content", [b"a" * LIMIT, b"tea\n\n" * (LIMIT // 5), b"aaaa " * (LIMIT // 5)],
                         ids=["one-word", "one-word-paragraphs", "repeated-word"])
def test_repetitive_file_at_the_size_limit_indexes_and_answers(make_client, tmp_path, content):
    c = make_client(max_upload_bytes=LIMIT)
    cid, job = _upload_at_limit(c, content)
    assert job["status"] == "done", job
    listed = {x["id"]: x for x in c.get("/v1/corpora").json()["corpora"]}
    assert listed[cid]["status"] == "ready" and listed[cid]["passages"] >= 1
    out = c.post("/v1/ask", json={"question": "tea aaaa", "corpus": cid, "k": 2, "max_new_tokens": 2})
    assert out.status_code == 200, out.text
    assert out.json()["corpus"] == cid
    assert (tmp_path / "uploads" / cid / "same.txt").stat().st_size == LIMIT
    _no_stray_folders(tmp_path / "uploads")
    _healthy(c)


def test_stopwords_only_file_at_the_size_limit_fails_cleanly(make_client, tmp_path):
    """200 KB of "a ": nothing to search (``a`` is a stopword); the job fails with a message, asking is a 409."""
    c = make_client(max_upload_bytes=LIMIT)
    cid, job = _upload_at_limit(c, b"a " * (LIMIT // 2))
    assert job["status"] == "failed" and "no searchable words" in job["error"], job
    assert str(tmp_path) not in job["error"]
    listed = {x["id"]: x for x in c.get("/v1/corpora").json()["corpora"]}
    assert listed[cid]["status"] == "failed" and "no searchable words" in listed[cid]["error"]
    assert_error(c.post("/v1/ask", json={"question": "a", "corpus": cid}), 409, "corpus", "corpus_failed")
    assert c.post("/v1/ask", json={"question": "green tea", "max_new_tokens": 2}).status_code == 200
    _healthy(c)
    assert c.delete(f"/v1/corpora/{cid}").status_code == 204  # a failed upload can be removed
    assert not (tmp_path / "uploads" / cid).exists()
    _no_stray_folders(tmp_path / "uploads")


# -- 3. a thousand tiny files -----------------------------------------------------------------------------------

def _tiny_files(n: int) -> list:
    return [("files", (f"f{i}.txt", f"Note {i} names the marker word{i} once.\n".encode(), "text/plain")) for i in range(n)]


def test_a_thousand_tiny_files(make_client, tmp_path):
    files = _tiny_files(1000)
    c = make_client()  # max_upload_files at its default (20)
    err = assert_error(c.post("/v1/corpora", files=files), 400, "files", "too_many_files")
    assert "1000 files" in err["message"] and "\n" not in err["message"]
    assert not (tmp_path / "uploads").exists() or not any((tmp_path / "uploads").iterdir())
    _healthy(c)

    c = make_client(max_upload_files=1000)
    r = c.post("/v1/corpora", files=files, data={"name": "many"})
    assert r.status_code == 202, r.text
    corpus = r.json()["corpus"]
    assert corpus["documents"] == 1000
    assert wait_job(c, r.json()["job"]["id"], timeout=40)["status"] == "done"
    assert len(list((tmp_path / "uploads" / corpus["id"]).iterdir())) == 1000
    out = c.post("/v1/ask", json={"question": "which note names word537", "corpus": corpus["id"], "k": 1,
                                  "max_new_tokens": 2})
    assert out.status_code == 200, out.text
    assert out.json()["sources"][0]["doc_id"] == "f537.txt"
    # past the multipart parser's own limit (1000 files): a clean 400 too, nothing stored
    assert_error(c.post("/v1/corpora", files=_tiny_files(1001)), 400, "files")
    assert [p.name for p in (tmp_path / "uploads").iterdir()] == [corpus["id"]]
    _healthy(c)


# -- 4. slow clients that never finish their bodies ----------------------------------------------------------

@pytest.fixture()
def live_server(tiny_lm, small_corpus_dir, tmp_path, caplog):
    """The app on uvicorn in a thread (127.0.0.1, a free port); logs reach ``caplog`` (``log_config=None``)."""
    from tessera.serve import ServeConfig, create_app

    app = create_app(ServeConfig(corpora=[str(small_corpus_dir)], encoder=None, upload_dir=str(tmp_path / "uploads"),
                                 max_new_tokens=8), lm=tiny_lm)
    caplog.set_level(logging.WARNING)
    with uvicorn_thread(app, log_config=None, limit_concurrency=256, timeout_keep_alive=5) as (url, port, server, thread):
        yield url, port, app, server, thread  # the limits serve() runs uvicorn with


def _wait_for(cond, timeout: float = 10.0) -> None:
    t = time.monotonic()
    while not cond():
        assert time.monotonic() - t < timeout, "timed out"
        time.sleep(0.02)


def _slow_request(port: int, path: str, content_type: str, first_bytes: bytes, length: int) -> socket.socket:
    """A POST whose headers promise ``length`` bytes of body, of which only ``first_bytes`` ever come."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {content_type}\r\n"
              f"Content-Length: {length}\r\n\r\n".encode() + first_bytes)
    return s


def test_slow_clients_do_not_block_the_server(live_server, tmp_path, caplog):
    import httpx

    url, port, app, server, thread = live_server
    upload_body, headers = _multipart([("files", b"slow.txt", b"The slow client never sends the rest" * 10)])
    slow = [_slow_request(port, "/v1/corpora", headers["content-type"], upload_body[:120], 100_000)
            for _ in range(8)]
    slow += [_slow_request(port, "/v1/ask", "application/json", b'{"question": "tea', 10_000)
             for _ in range(4)]  # (under /v1/ask's 64 KiB body limit, else it is a 413 at once)
    try:
        _wait_for(lambda: len(server.server_state.tasks) >= 12)  # the app runs each of them, waiting for the body
        with httpx.Client(base_url=url, timeout=10) as client:
            t = time.monotonic()
            h = client.get("/healthz")
            assert h.status_code == 200 and h.json()["status"] == "ok"
            assert time.monotonic() - t < 2.0
            out = client.post("/v1/ask", json={"question": "green tea", "k": 1, "max_new_tokens": 2})
            assert out.status_code == 200, out.text
            assert out.json()["sources"][0]["doc_id"] == "tea.md"
            # the slow uploads have created nothing yet
            corpora = client.get("/v1/corpora").json()["corpora"]
            assert [x["kind"] for x in corpora] == ["config"]
    finally:
        for s in slow:
            s.close()
    _wait_for(lambda: not server.server_state.tasks)  # each slow request ended when its client left
    time.sleep(0.2)  # (uvicorn logs a failed request just after its response)
    with httpx.Client(base_url=url, timeout=10) as client:
        assert client.get("/healthz").status_code == 200
        assert [x["kind"] for x in client.get("/v1/corpora").json()["corpora"]] == ["config"]
        assert app.state.tessera.jobs.jobs == {}
    uploads = tmp_path / "uploads"
    assert not uploads.exists() or not any(uploads.iterdir())
    # a body announced past the path's limit is refused at once, without waiting for it
    with _slow_request(port, "/v1/ask", "application/json", b"{", 100_000) as s:
        assert s.recv(4096).startswith(b"HTTP/1.1 413 ")
    assert thread.is_alive()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


# -- 5. a corpus deleted while it is being queried -------------------------------------------------------------

@pytest.mark.parametrize("when", ["before_retrieval", "mid_generation"])
def test_delete_a_corpus_while_it_is_being_queried(make_client, tmp_path, monkeypatch, when):
    import tessera.ask

    c = make_client()
    r = c.post("/v1/corpora", files=[("files", ("ships.txt", b"The ferry leaves the harbour at noon every day.\n"))])
    assert r.status_code == 202, r.text
    cid = r.json()["corpus"]["id"]
    assert wait_job(c, r.json()["job"]["id"])["status"] == "done"
    folder = tmp_path / "uploads" / cid
    assert folder.is_dir()

    real_ask = tessera.ask.ask
    inside, deleted = threading.Event(), threading.Event()

    def gated_ask(*args, **kwargs):  # hold the answer at `when` until the DELETE has been answered
        if when == "before_retrieval":
            inside.set()
            assert deleted.wait(10)
            return real_ask(*args, **kwargs)
        on_token = kwargs["on_token"]

        def hold(piece):
            if not inside.is_set():
                inside.set()
                assert deleted.wait(10)
            on_token(piece)

        return real_ask(*args, **{**kwargs, "on_token": hold})

    monkeypatch.setattr(tessera.ask, "ask", gated_ask)
    result = {}
    asker = threading.Thread(target=lambda: result.setdefault("r", c.post(
        "/v1/ask", json={"question": "when does the ferry leave", "corpus": cid, "k": 1, "max_new_tokens": 6})))
    asker.start()
    assert inside.wait(20), "the ask did not start"
    d = c.delete(f"/v1/corpora/{cid}")
    deleted.set()
    asker.join(30)
    assert not asker.is_alive()
    ans = result["r"]
    assert d.status_code in (204, 409), d.text
    if ans.status_code == 200:  # it answered from the index it had already opened
        assert ans.json()["corpus"] == cid and ans.json()["sources"][0]["doc_id"] == "ships.txt"
    else:
        assert ans.status_code in (404, 409, 410), ans.text
        assert ans.json()["error"]["status"] == ans.status_code
    if d.status_code == 409:  # deletion refused while in use: it must succeed once the answer is done
        assert c.delete(f"/v1/corpora/{cid}").status_code == 204
    assert not folder.exists()
    assert cid not in {x["id"] for x in c.get("/v1/corpora").json()["corpora"]}
    assert_error(c.post("/v1/ask", json={"question": "ferry", "corpus": cid}), 400, "corpus", "unknown_corpus")
    _no_stray_folders(tmp_path / "uploads")
    _healthy(c)
    # the same files again make the same corpus afresh
    again = c.post("/v1/corpora", files=[("files", ("ships.txt", b"The ferry leaves the harbour at noon every day.\n"))])
    assert again.status_code == 202 and again.json()["corpus"]["id"] == cid
    assert wait_job(c, again.json()["job"]["id"])["status"] == "done"
    assert c.post("/v1/ask", json={"question": "ferry", "corpus": cid, "max_new_tokens": 2}).status_code == 200


def test_a_stalled_body_gets_408_and_frees_its_connection(tiny_lm, small_corpus_dir, tmp_path):
    import httpx

    from tessera.serve import ServeConfig, create_app

    app = create_app(ServeConfig(corpora=[str(small_corpus_dir)], encoder=None, upload_dir=str(tmp_path / "uploads"),
                                 max_new_tokens=4, body_timeout_s=1.0), lm=tiny_lm)
    with uvicorn_thread(app, limit_concurrency=256) as (url, port, server, _):
        upload_body, headers = _multipart([("files", b"slow.txt", b"never finished " * 20)])
        slow = [_slow_request(port, "/v1/corpora", headers["content-type"], upload_body[:100], 100_000),
                _slow_request(port, "/v1/ask", "application/json", b'{"question": "tea', 1_000)]
        t = time.monotonic()
        for s in slow:
            with s:
                s.settimeout(10)
                answer = b""
                while b"stalled" not in answer:  # headers and body may come in separate packets
                    part = s.recv(4096)
                    if not part:
                        break
                    answer += part
                assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
                assert b"stalled" in answer
        assert time.monotonic() - t < 8
        _wait_for(lambda: not server.server_state.tasks)
        with httpx.Client(base_url=url, timeout=10) as client:  # a body sent at once is unaffected
            assert client.post("/v1/ask", json={"question": "green tea", "k": 1}).status_code == 200
            assert [x["kind"] for x in client.get("/v1/corpora").json()["corpora"]] == ["config"]
    assert not (tmp_path / "uploads").exists() or not any((tmp_path / "uploads").iterdir())
