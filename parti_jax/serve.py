"""`parti-jax serve`: a small local web app over a `Pipeline` (aiohttp.web).

    server = Server(Pipeline.from_pretrained("/models/shapes"), ServeConfig())
    web.run_app(server.app(), host="127.0.0.1", port=8000)   # what the CLI does
    with ServerThread(server) as url: ...                     # tests, notebooks

The page (parti_jax/serve_static/) has a prompt box, number of images,
guidance, temperature, seed and reranker; it posts a job, polls its progress
and shows the reranked grid with scores, a PNG download per image and the
session's history of prompts. HTTP API (JSON):

    POST /api/generate   {prompt, num_images, guidance_scale, temperature, seed,
                          rerank, negative_prompt}  -> 202 {id, ...}; 400 {error, field};
                          429 {error} when busy (with Retry-After)
    GET  /api/jobs/<id>  state (queued/running/done/failed), queue position, progress,
                          images [{url, download, rank, score, sample_index}]
    GET  /api/jobs/<id>/<rank>.png[?download=1]
    GET  /api/history    the prompts of this server's session, newest first
    GET  /api/info       limits, defaults, rerankers

Safe by default: it binds 127.0.0.1; prompts are untrusted text, shown with
textContent only, never parsed as HTML (and a Content-Security-Policy allows
only the page's own script); prompt length, images per job and the request
body are capped; a cross-site POST (an Origin other than the page's) is
refused. ONE job samples at a time, in a worker thread (the event loop stays
free for the page, the polls and the busy answers); at most `queue_size` jobs
wait behind it, and past that a job is answered 429 at once. Everything is
kept in memory for the server's lifetime: the history (the last
`history_size` prompts) and the PNGs of the last `keep_results` jobs (older
jobs keep their entry, not their images).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import html
import io
import logging
import math
import secrets
import threading
import time
from collections.abc import Mapping
from importlib import resources
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
STATIC_FILES = {"app.js": "text/javascript", "style.css": "text/css"}
MAX_BODY_BYTES = 64 << 10
GUIDANCE_RANGE = (0.0, 20.0)
TEMPERATURE_RANGE = (0.0, 5.0)
MAX_SEED = 2**31 - 1
FIELDS = ("prompt", "negative_prompt", "num_images", "guidance_scale", "temperature", "seed",
          "rerank")  # fmt: skip
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """The server's limits (the `parti-jax serve` flags of the same names)."""

    max_prompt_chars: int = 500  # longer prompts are refused (400 naming 'prompt')
    max_images: int = 16  # images per job (Parti's 16 draws); more is refused
    queue_size: int = 4  # jobs that may wait behind the running one; more get 429
    keep_results: int = 8  # finished jobs whose PNGs stay in memory
    history_size: int = 100  # prompts listed in the history

    def __post_init__(self):
        for name in ("max_prompt_chars", "max_images", "keep_results", "history_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"--{name}={getattr(self, name)} must be >= 1")
        if int(self.queue_size) < 0:
            raise ValueError(f"--queue_size={self.queue_size} must be >= 0")


class BadRequest(ValueError):
    """A request field that is missing, malformed or out of range."""

    def __init__(self, field: str | None, message: str):
        super().__init__(message)
        self.field = field


@dataclasses.dataclass
class Job:
    """One sampling request and, once done, its PNGs (best first)."""

    id: str
    settings: dict[str, Any]
    created: float
    state: str = "queued"  # queued, running, done, failed
    started: float | None = None
    finished: float | None = None
    rows_done: int = 0
    rows_total: int = 0
    pngs: list[bytes] | None = None
    scores: list[float | None] = dataclasses.field(default_factory=list)
    sample_indices: list[int] = dataclasses.field(default_factory=list)
    size: list[int] | None = None
    error: str | None = None


# ------------------------------------------------------------------ validation


def parse_request(
    fields: Mapping[str, Any], config: ServeConfig, defaults: Mapping[str, Any],
    rerankers: tuple[str, ...],
) -> dict[str, Any]:  # fmt: skip
    """The checked settings of a generate request; BadRequest names the first bad field.

    Fields may be JSON values or form strings; an absent or empty optional field takes
    its default (`defaults`: num_images, guidance_scale, temperature, seed, rerank).
    """
    from parti_jax.data.vocab import text_problem

    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise BadRequest(unknown[0], f"{unknown[0]}: unknown field; expected {list(FIELDS)}")

    def given(name: str) -> Any:
        value = fields.get(name)
        return None if value is None or (isinstance(value, str) and not value.strip()) else value

    def text(name: str, required: bool) -> str:
        value = fields.get(name, "")
        if not isinstance(value, str):
            raise BadRequest(name, f"{name}: expected text")
        value = value.strip()
        if required and not value:
            raise BadRequest(name, f"{name}: empty; type a prompt")
        if len(value) > config.max_prompt_chars:
            raise BadRequest(
                name, f"{name}: {len(value)} characters, over the limit of "
                f"{config.max_prompt_chars} (--max_prompt_chars)",
            )  # fmt: skip
        problem = text_problem(value)
        if problem:
            raise BadRequest(name, f"{name}: {problem}; use UTF-8 text")
        return value

    def number(name: str, kind: type, low: float, high: float) -> Any:
        value = given(name)
        if value is None:
            return defaults[name]
        try:
            if isinstance(value, bool):
                raise ValueError
            parsed = kind(value.strip() if isinstance(value, str) else value)
            if kind is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
        except (TypeError, ValueError):
            what = "an integer" if kind is int else "a number"
            raise BadRequest(name, f"{name}: {str(value)[:40]!r} is not {what}") from None
        if not (math.isfinite(parsed) and low <= parsed <= high):
            raise BadRequest(name, f"{name}: {parsed} is outside [{low:g}, {high:g}]")
        return parsed

    settings = {
        "prompt": text("prompt", True),
        "negative_prompt": text("negative_prompt", False) or None,
        "num_images": number("num_images", int, 1, config.max_images),
        "guidance_scale": number("guidance_scale", float, *GUIDANCE_RANGE),
        "temperature": number("temperature", float, *TEMPERATURE_RANGE),
        "seed": number("seed", int, 0, MAX_SEED),
    }
    if settings["num_images"] > config.max_images:  # (a default above the cap)
        settings["num_images"] = config.max_images
    rerank = given("rerank") or defaults["rerank"]
    if not isinstance(rerank, str) or rerank not in ("none", *rerankers):
        raise BadRequest("rerank", f"rerank: {str(rerank)[:40]!r}; expected one of "
                         f"{['none', *rerankers]}")  # fmt: skip
    settings["rerank"] = rerank
    return settings


# ------------------------------------------------------------------ server


class Server:
    """The web app over one Pipeline: one sampling job at a time, a bounded queue."""

    def __init__(self, pipe: Any, config: ServeConfig | None = None) -> None:
        self.pipe = pipe
        self.config = config or ServeConfig()
        cfg = pipe.sampling_config
        self.rerankers = ("likelihood", "pmi") + (
            ("contrastive",) if getattr(pipe.generator, "contrastive", None) is not None else ()
        )
        self.defaults = {
            "num_images": min(int(cfg.num_samples), self.config.max_images),
            "guidance_scale": 1.2 if cfg.guidance_scale is None else float(cfg.guidance_scale),
            "temperature": float(cfg.temperature),
            "seed": int(cfg.seed),
            "rerank": "contrastive" if "contrastive" in self.rerankers else "likelihood",
        }
        self.jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self._waiting: collections.deque[Job] = collections.deque()
        self._wakeup: asyncio.Event | None = None
        self._running: Job | None = None
        self._seconds_per_row: float | None = None  # measured, for the progress estimate
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sampler")
        self._worker_task: asyncio.Task | None = None
        static = resources.files("parti_jax") / "serve_static"
        self._static = {n: (static / n).read_bytes() for n in ("index.html", *STATIC_FILES)}

    # ------------------------------------------------------------- the app

    def app(self) -> web.Application:
        """The aiohttp application (start it with web.run_app or ServerThread)."""
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._headers])
        app.router.add_get("/", self._index)
        app.router.add_get("/static/{name}", self._static_file)
        app.router.add_post("/api/generate", self._generate)
        app.router.add_get("/api/jobs/{id}", self._job_status)
        app.router.add_get(r"/api/jobs/{id}/{rank:\d+}.png", self._png)
        app.router.add_get("/api/history", self._history)
        app.router.add_get("/api/info", self._info)
        app.on_startup.append(self._start_worker)
        app.on_cleanup.append(self._stop_worker)
        return app

    def warm_up(self) -> float:
        """Compiles the sampler for the page's default settings (one job's worth); seconds."""
        start = time.perf_counter()
        self._sample({**self.defaults, "prompt": "warm-up", "negative_prompt": None}, None)
        return time.perf_counter() - start

    @web.middleware
    async def _headers(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPException as e:
            _secure(e.headers)
            raise
        _secure(response.headers)
        return response

    async def _start_worker(self, app: web.Application) -> None:
        self._wakeup = asyncio.Event()
        self._worker_task = asyncio.get_running_loop().create_task(self._worker())

    async def _stop_worker(self, app: web.Application) -> None:
        if self._worker_task is not None:
            self._worker_task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------- pages

    async def _index(self, request: web.Request) -> web.Response:
        return web.Response(body=self._static["index.html"], content_type="text/html",
                            charset="utf-8")  # fmt: skip

    async def _static_file(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in STATIC_FILES:
            raise web.HTTPNotFound(text="not found")
        return web.Response(body=self._static[name], content_type=STATIC_FILES[name],
                            charset="utf-8")  # fmt: skip

    async def _info(self, request: web.Request) -> web.Response:
        c = self.config
        return web.json_response({
            "limits": {"max_prompt_chars": c.max_prompt_chars, "max_images": c.max_images,
                       "queue_size": c.queue_size, "guidance_scale": GUIDANCE_RANGE,
                       "temperature": TEMPERATURE_RANGE, "seed": [0, MAX_SEED]},
            "defaults": self.defaults,
            "rerankers": ["none", *self.rerankers],
        })  # fmt: skip

    async def _history(self, request: web.Request) -> web.Response:
        entries = [self._summary(j) for j in reversed(self.jobs.values())]
        return web.json_response({"history": entries})

    # ------------------------------------------------------------- jobs

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        wants_html = _is_form(request) and "text/html" in request.headers.get("Accept", "")
        origin = request.headers.get("Origin")
        if origin and origin not in _own_origins(request):
            return _error(403, None, f"cross-site request from {origin!r} refused", wants_html)
        try:
            fields = await _read_fields(request)
            settings = parse_request(fields, self.config, self.defaults, self.rerankers)
        except BadRequest as e:
            return _error(400, e.field, str(e), wants_html)
        except web.HTTPRequestEntityTooLarge:
            return _error(413, None, f"request over {MAX_BODY_BYTES} bytes", wants_html)
        if len(self._waiting) >= self.config.queue_size:
            response = _error(
                429, None, f"busy: {len(self._waiting)} jobs are already waiting to sample "
                f"(the limit, --queue_size); try again in a moment", wants_html,
            )  # fmt: skip
            response.headers["Retry-After"] = "5"
            return response
        job = Job(secrets.token_urlsafe(9), settings, time.time())
        self.jobs[job.id] = job
        self._waiting.append(job)
        self._trim()
        assert self._wakeup is not None
        self._wakeup.set()
        if wants_html:  # a form posted without JavaScript: the page shows the job
            raise web.HTTPSeeOther(f"/#job={job.id}")
        return web.json_response(self._status(job), status=202)

    async def _job_status(self, request: web.Request) -> web.Response:
        job = self.jobs.get(request.match_info["id"])
        if job is None:
            return _error(404, "id", "no such job (jobs live in this server's memory)", False)
        return web.json_response(self._status(job))

    async def _png(self, request: web.Request) -> web.Response:
        job = self.jobs.get(request.match_info["id"])
        rank = int(request.match_info["rank"])
        if job is None or job.pngs is None or rank >= len(job.pngs):
            return _error(404, "id", "no such image (only the last jobs keep theirs)", False)
        headers = {}
        if request.query.get("download"):
            headers["Content-Disposition"] = (
                f'attachment; filename="parti_{job.settings["seed"]}_{rank}.png"'
            )
        return web.Response(body=job.pngs[rank], content_type="image/png", headers=headers)

    async def _worker(self) -> None:
        """Runs queued jobs one at a time in the sampling thread."""
        loop = asyncio.get_running_loop()
        assert self._wakeup is not None
        while True:
            while not self._waiting:
                self._wakeup.clear()
                await self._wakeup.wait()
            job = self._waiting.popleft()
            self._running = job
            try:
                await loop.run_in_executor(self._executor, self._run, job)
            finally:
                self._running = None
                self._trim()

    def _run(self, job: Job) -> None:
        """One job, in the sampling thread: sample, encode PNGs, record the timing."""
        job.state, job.started = "running", time.time()
        try:
            pngs, scores, indices, size = self._sample(job.settings, job)
        except Exception as e:  # noqa: BLE001 - the page gets one line, the log the rest
            log.exception("job %s failed", job.id)
            job.error = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            job.state = "failed"
        else:
            job.pngs, job.scores, job.sample_indices, job.size = pngs, scores, indices, size
            job.state = "done"
            rows = max(job.rows_total, 1)
            per_row = (time.time() - job.started) / rows
            old = self._seconds_per_row
            self._seconds_per_row = per_row if old is None else 0.5 * (old + per_row)
        job.finished = time.time()

    def _sample(self, settings: Mapping[str, Any], job: Job | None) -> tuple:
        """(PNGs, scores, sample indices, [H, W]) of one job's settings."""
        from PIL import Image

        from parti_jax.sampling import to_uint8

        def progress(done: int, total: int) -> None:
            if job is not None:
                job.rows_done, job.rows_total = done, total

        n = settings["num_images"]
        if job is not None:
            job.rows_total = n
        rerank = None if settings["rerank"] == "none" else settings["rerank"]
        out = self.pipe(
            settings["prompt"], num_images=n, guidance_scale=settings["guidance_scale"],
            temperature=settings["temperature"], seed=settings["seed"], rerank=rerank,
            negative_prompt=settings["negative_prompt"], output_type="np",
            batch_size=self.config.max_images, progress=progress,
        )  # fmt: skip
        # One batch shape (max_images rows, padded) for every job: compiled once.
        pngs = []
        for image in out.images[0]:
            buffer = io.BytesIO()
            Image.fromarray(to_uint8(image)).save(buffer, format="PNG")
            pngs.append(buffer.getvalue())
        scores = [None] * n if out.scores is None else [float(s) for s in out.scores[0]]
        size = list(out.images.shape[2:4])
        return pngs, scores, [int(i) for i in out.sample_indices[0]], size

    def _trim(self) -> None:
        """Keeps the PNGs of the last `keep_results` finished jobs and `history_size` entries."""
        finished = [j for j in self.jobs.values() if j.pngs is not None]
        for job in finished[: -self.config.keep_results]:
            job.pngs = None
        while len(self.jobs) > self.config.history_size:
            oldest = next(iter(self.jobs.values()))
            if oldest.state in ("queued", "running"):
                break
            self.jobs.popitem(last=False)

    def _summary(self, job: Job) -> dict[str, Any]:
        return {"id": job.id, "state": job.state, "created": job.created,
                "settings": job.settings, "has_images": job.pngs is not None}  # fmt: skip

    def _status(self, job: Job) -> dict[str, Any]:
        now = time.time()
        status = self._summary(job)
        if job.state == "queued":
            status["position"] = 1 + next(
                (i for i, j in enumerate(self._waiting) if j is job), len(self._waiting)
            )
            status["ahead"] = status["position"] - 1 + (self._running is not None)
        elapsed = (job.finished or now) - job.started if job.started else 0.0
        total = job.rows_total or job.settings["num_images"]
        estimate = None if self._seconds_per_row is None else self._seconds_per_row * total
        status["progress"] = {"rows_done": job.rows_done, "rows_total": total,
                              "elapsed_s": round(elapsed, 2),
                              "estimate_s": None if estimate is None else round(estimate, 2)}  # fmt: skip
        if job.state == "done":
            base = f"/api/jobs/{job.id}"
            status["seconds"] = round(elapsed, 3)
            status["size"] = job.size
            status["images"] = [
                {"rank": r, "score": job.scores[r], "sample_index": job.sample_indices[r],
                 "url": f"{base}/{r}.png", "download": f"{base}/{r}.png?download=1"}
                for r in range(len(job.pngs or []))
            ]  # fmt: skip
        if job.error:
            status["error"] = job.error
        return status


# ------------------------------------------------------------------ helpers


def _secure(headers: Any) -> None:
    """The headers every answer carries: only the page's own script, no sniffing, no cache."""
    headers.setdefault("Content-Security-Policy", CSP)
    headers.setdefault("X-Content-Type-Options", "nosniff")
    headers.setdefault("Referrer-Policy", "no-referrer")
    headers.setdefault("Cache-Control", "no-store")


def _is_form(request: web.Request) -> bool:
    return request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data")


async def _read_fields(request: web.Request) -> dict[str, Any]:
    """The request's fields: a JSON object, or a form."""
    if _is_form(request):
        form = await request.post()
        return {k: v for k, v in form.items() if isinstance(v, str)}
    try:
        body = await request.json()
    except ValueError:
        raise BadRequest(None, "the body is not JSON (or a form); post a JSON object") from None
    if not isinstance(body, dict):
        raise BadRequest(None, "the body must be a JSON object of fields")
    return body


def _own_origins(request: web.Request) -> set[str]:
    host = request.host
    return {f"http://{host}", f"https://{host}"}


def _error(status: int, field: str | None, message: str, as_html: bool) -> web.Response:
    """A JSON error {error, field}, or for a form posted without JavaScript a small page."""
    if not as_html:
        return web.json_response({"error": message, "field": field}, status=status)
    title = {400: "Bad request", 429: "Busy"}.get(status, "Error")
    t, m = html.escape(title), html.escape(message)
    page = (
        f"<!doctype html><meta charset=utf-8><title>parti_jax: {t}</title>"
        f"<link rel=stylesheet href=/static/style.css><main><h1>{t}</h1><p>{m}</p>"
        "<p><a href=/>Back</a></p></main>"
    )
    return web.Response(text=page, status=status, content_type="text/html")


class ServerThread:
    """Runs a Server on its own event loop in a daemon thread (tests, notebooks).

    with ServerThread(server, port=0) as url:   # port 0: a free port
        requests.get(url + "/api/info")
    """

    def __init__(self, server: Server, host: str = "127.0.0.1", port: int = 0) -> None:
        self.server, self.host, self.port = server, host, port
        self.url: str | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="parti-jax-serve")  # fmt: skip
        self._runner: web.AppRunner | None = None

    def start(self) -> str:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=60)
        return self.url

    async def _start(self) -> None:
        self._runner = web.AppRunner(self.server.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://{self.host}:{port}"

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def host_warning(host: str) -> str | None:
    """The warning for binding beyond this machine (None for a loopback host)."""
    if host in LOCAL_HOSTS:
        return None
    return (
        f"serving on {host}: anyone who can reach this port can run sampling jobs and see "
        "the prompts of this session; there is no authentication. Use 127.0.0.1 and an SSH "
        "tunnel unless this network is trusted"
    )
