"""A GCS emulator for the tests: `gcp-storage-emulator`, in this process, on 127.0.0.1.

    def test_x(gcs):                 # the fixture (tests/conftest.py)
        run = gcs.url("run")         # gs://<bucket>/<test-unique prefix>/run
        ...                          # parti_jax.storage, orbax/TensorStore and subprocesses
                                     # started with gcs.env all reach the emulator

Every client of the project reaches it through environment variables, which
subprocesses inherit: gcsfs (`STORAGE_EMULATOR_HOST`, anonymous token through
fsspec's `FSSPEC_GCS_TOKEN`), TensorStore (`TENSORSTORE_GCS_HTTP_URL`,
`GOOGLE_AUTH_TOKEN_FOR_TESTING`). TensorFlow's own GCS client cannot be pointed at an
emulator: parti_jax never gives it a `gs://` path (parti_jax/storage.py).

The emulator ignores generation preconditions (`ifGenerationMatch`), so the work-dir
lock's create-if-absent is tested on TensorStore's memory kvstore (tests/test_workdir.py).
Its media downloads lack the `x-goog-generation` header that real GCS sends and
TensorStore requires ("Malformed StorageGeneration" on every read of an existing
object: orbax restores, the lock's kind marker); `start_emulator` adds it.
One emulator per test process (xdist worker), one bucket, a fresh prefix per test.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import socket
import uuid

BUCKET = "parti-jax-tests"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class GcsEmulator:
    endpoint: str
    bucket: str
    prefix: str = ""

    @property
    def env(self) -> dict[str, str]:
        """The variables that point every client at the emulator (set in os.environ too)."""
        return {
            "STORAGE_EMULATOR_HOST": self.endpoint,
            "FSSPEC_GCS_TOKEN": "anon",
            "FSSPEC_GS_TOKEN": "anon",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            "EPATH_USE_TF": "false",
            "TENSORSTORE_GCS_HTTP_URL": self.endpoint,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token",
            "GOOGLE_CLOUD_PROJECT": "test-project",
            "NO_GCE_CHECK": "true",
        }

    def url(self, *parts: str) -> str:
        return "/".join([f"gs://{self.bucket}", *(p for p in (self.prefix, *parts) if p)])

    def with_prefix(self, prefix: str) -> GcsEmulator:
        return dataclasses.replace(self, prefix=prefix)

    def objects(self, *parts: str) -> list[str]:
        """Every object name under `url(*parts)`, recursively (relative to it)."""
        import fsspec

        fs = fsspec.filesystem("gs")
        fs.invalidate_cache()
        root = self.url(*parts)[len("gs://") :]
        return sorted(p[len(root) + 1 :] for p in fs.find(root))


def start_emulator() -> tuple[GcsEmulator, object]:
    from gcp_storage_emulator.server import create_server

    _add_generation_headers()
    _exact_multipart_uploads()
    for name in ("gcp_storage_emulator", "gcp_storage_emulator.storage"):
        logging.getLogger(name).setLevel(logging.CRITICAL)  # 404s are expected traffic
    port = _free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    _quiet_disconnects(server)
    emulator = GcsEmulator(f"http://127.0.0.1:{port}", BUCKET)
    os.environ.update(emulator.env)
    return emulator, server


def _add_generation_headers() -> None:
    """Media downloads answer with the object's generation headers, as GCS does."""
    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects

    download = objects.download
    if getattr(download, "adds_generation", False):
        return

    def with_generation(request, response, storage, *args, **kwargs):
        download(request, response, storage, *args, **kwargs)
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except Exception:  # noqa: BLE001 - not found: the answer is a 404 already
            return
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))

    with_generation.adds_generation = True
    objects.download = with_generation  # objects.get(alt=media) calls it by name
    for _, handlers in server.HANDLERS:
        for method, handler in handlers.items():
            if handler is download:
                handlers[method] = with_generation


def _quiet_disconnects(server) -> None:
    """A client that closes its connection early (TensorStore's parallel reads) makes the
    emulator's HTTP server print a BrokenPipe traceback; those are not errors."""
    httpd = server._api._httpd  # an http.server.HTTPServer, one request at a time
    httpd.handle_error = lambda request, client_address: None


def unique_prefix(name: str) -> str:
    """A test's own prefix: its name (a parameter's brackets made '-') and a random tail."""
    return f"{re.sub(r'[^A-Za-z0-9._-]', '-', name)[:40]}-{uuid.uuid4().hex[:8]}"


def _exact_multipart_uploads() -> None:
    """Multipart uploads keep every byte: the emulator's e-mail parser takes the last b"\\r"
    of a body for part of the line break before gcsfs's b"\\n--boundary" (gcsfs's put_file,
    under storage.copy, uploads that way), so 1 file in 256 lost its last byte."""
    import json

    from gcp_storage_emulator import server

    read = server._read_data
    if getattr(read, "exact", False):
        return

    def read_data(request_handler, query):
        content_type = request_handler.headers.get("Content-Type") or ""
        if not content_type.startswith("multipart/related") or "boundary=" not in content_type:
            return read(request_handler, query)
        raw = server._decode_raw_data(server._read_raw_data(request_handler), request_handler)
        boundary = content_type.split("boundary=", 1)[1].split(";")[0].strip().strip('"')
        parts = raw.split(b"--" + boundary.encode())[1:-1]  # between the delimiters
        bodies, types = [], []
        for part in parts:
            newline = b"\r\n" if part.startswith(b"\r\n") else b"\n"
            head, _, body = part[len(newline) :].partition(newline * 2)
            bodies.append(body[: -len(newline)] if body.endswith(newline) else body)
            fields = dict(line.split(b":", 1) for line in head.split(newline) if b":" in line)
            types.append(fields.get(b"Content-Type", b"").strip().decode().split(";")[0])
        return {"meta": json.loads(bodies[0]), "content": bodies[1], "content-type": types[1]}

    read_data.exact = True
    server._read_data = read_data
