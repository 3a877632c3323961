"""docs/PYTHON.md runs as written: its ```python blocks, in order, in one namespace (a
notebook), with the paths substituted for the tiny trained pipeline's
(tests/pipeline_fixtures.py): the bundle "/models/shapes", the copy
"/models/shapes_copy" and the run folder "/runs/demo"."""

from __future__ import annotations

import re
from pathlib import Path

from parti_jax.decoding import SamplingConfig
from parti_jax.export import export_bundle

pytest_plugins = ["tests.pipeline_fixtures"]

DOC = Path(__file__).resolve().parents[1] / "docs" / "PYTHON.md"


def python_blocks(text: str) -> list[str]:
    """The code of every ```python fenced block, in order."""
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.S | re.M)


def test_python_doc_runs_as_written(tiny_pipeline, tmp_path, monkeypatch, capsys):
    p = tiny_pipeline
    bundle = tmp_path / "shapes"
    export_bundle(bundle, t2i_path=p["t2i"], vqgan_path=p["vqgan"], upsampler_path=p["upsampler"],
                  contrastive_path=p["contrastive"], jax_export=False,
                  sampling_config=SamplingConfig(num_samples=4, top_k=32))  # fmt: skip
    paths = {  # longest first: "/models/shapes_copy" before "/models/shapes"
        "/models/shapes_copy": str(tmp_path / "shapes_copy"),
        "/models/shapes": str(bundle),
        "/runs/demo": p["root"],
    }
    blocks = python_blocks(DOC.read_text())
    assert len(blocks) >= 6, "docs/PYTHON.md lost its examples"
    assert all(k in "".join(blocks) for k in paths)  # the substitutions still apply
    monkeypatch.chdir(tmp_path)  # the examples write best.png and sheet.png here
    namespace: dict = {"__name__": "__python_doc__"}
    for i, block in enumerate(blocks):
        for placeholder, path in paths.items():
            block = block.replace(f'"{placeholder}', f'"{path}')
        exec(compile(block, f"docs/PYTHON.md block {i + 1}", "exec"), namespace)  # noqa: S102
    # What the blocks promise.
    assert (tmp_path / "best.png").is_file() and (tmp_path / "sheet.png").is_file()
    assert (tmp_path / "shapes_copy" / "README.md").is_file()
    assert namespace["arrays"].images.shape[:2] == (3, 8)
    assert namespace["small"].images[0][0].size == (16, 16)
    printed = capsys.readouterr().out
    assert "library_name: parti_jax" in printed and "images that changed:" in printed
