"""`parti-jax serve`: a local web page that turns prompts into reranked image grids.

    parti-jax serve --bundle /models/shapes                 # http://127.0.0.1:8000
    parti-jax serve --bundle /runs/demo --port 8080         # a demo folder works too
    parti-jax serve --bundle gs://bucket/bundles/shapes --host 0.0.0.0   # warns: no auth

--bundle is anything `parti_jax.Pipeline.from_pretrained` loads: an export
bundle (local or gs://), a run folder with t2i/ and vqgan/ work directories,
or a `parti-jax train` work directory. Limits (defaults): --max_prompt_chars
500, --max_images 16 per job, --queue_size 4 jobs waiting behind the one
sampling (more are answered 429 "busy"), --keep_results 8 jobs' PNGs in
memory. The history of prompts lives in the server's memory and ends with it.
The page and API: parti_jax/serve.py.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from parti_jax.cli import flags

DESCRIPTION = "Serve a local web page for prompts -> reranked image grids."


def _parser() -> argparse.ArgumentParser:
    from parti_jax.serve import ServeConfig

    d = ServeConfig()
    p = argparse.ArgumentParser(prog="parti-jax serve", description=DESCRIPTION)
    p.add_argument("--bundle", required=True,
                   help="Bundle directory or URL (or a run folder / t2i work directory).")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1",
                   help="Address to bind (default 127.0.0.1: this machine only; another "
                   "address is reachable by others and has no authentication).")  # fmt: skip
    p.add_argument("--port", type=int, default=8000, help="Port (default 8000).")
    p.add_argument("--max_prompt_chars", type=int, default=d.max_prompt_chars,
                   help=f"Longest prompt accepted (default {d.max_prompt_chars}).")  # fmt: skip
    p.add_argument("--max_images", type=int, default=d.max_images,
                   help=f"Most images per job (default {d.max_images}).")  # fmt: skip
    p.add_argument("--queue_size", type=int, default=d.queue_size,
                   help=f"Jobs that may wait behind the running one (default {d.queue_size}); "
                   "more are answered 429.")  # fmt: skip
    p.add_argument("--keep_results", type=int, default=d.keep_results,
                   help=f"Finished jobs whose PNGs stay in memory (default {d.keep_results}).")  # fmt: skip
    p.add_argument("--no_warmup", action="store_true",
                   help="Skip compiling the sampler before serving (the first job compiles).")  # fmt: skip
    return p


def main(argv: Sequence[str]) -> int:
    ns = _parser().parse_args(list(argv))
    if not 0 <= ns.port <= 65535:
        raise flags.UsageError(f"--port={ns.port}: expected 0..65535")
    from aiohttp import web

    from parti_jax import serve
    from parti_jax.pipeline import Pipeline

    with flags.usage_errors(ValueError):
        config = serve.ServeConfig(
            max_prompt_chars=ns.max_prompt_chars, max_images=ns.max_images,
            queue_size=ns.queue_size, keep_results=ns.keep_results,
        )  # fmt: skip
    warning = serve.host_warning(ns.host)
    if warning:
        print(f"parti-jax serve: WARNING: {warning}", file=sys.stderr)
    with flags.usage_errors(ValueError, FileNotFoundError):
        pipe = Pipeline.from_pretrained(ns.bundle)
    server = serve.Server(pipe, config)
    if not ns.no_warmup:
        print("parti-jax serve: compiling the sampler ...", flush=True)
        print(f"parti-jax serve: ready in {server.warm_up():.1f} s", flush=True)
    shown = f"[{ns.host}]" if ":" in ns.host else ns.host
    web.run_app(server.app(), host=ns.host, port=ns.port, access_log=None,
                print=lambda _: print(f"parti-jax serve: http://{shown}:{ns.port} "
                                      "(Ctrl-C to stop)", flush=True))  # fmt: skip
    return 0
