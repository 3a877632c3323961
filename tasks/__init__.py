"""SeqIO task and mixture registrations (installed as `parti_jax.tasks`).

Importing this package registers the built-in tasks (`shapes_pixels`,
`coco_captions_pixels`, `parti_prompts`) and provides the factories for the
others (`register_folder_task`, `register_webdataset_task`, `register_parquet_task`,
`register_codes_task`, `register_mixture`).
Registration replaces a task of the same name, so importing or reloading
twice is harmless.
"""

from parti_jax.tasks import (  # noqa: F401
    coco,
    codes,
    folder,
    mixtures,
    parti_prompts,
    shapes,
    webdataset,
)
from parti_jax.tasks.coco import register_coco_task  # noqa: F401
from parti_jax.tasks.codes import register_codes_task  # noqa: F401
from parti_jax.tasks.folder import register_folder_task  # noqa: F401
from parti_jax.tasks.mixtures import register_mixture  # noqa: F401
from parti_jax.tasks.parti_prompts import register_parti_prompts_task  # noqa: F401
from parti_jax.tasks.shapes import register_shapes_task  # noqa: F401
from parti_jax.tasks.webdataset import (  # noqa: F401
    register_parquet_task,
    register_webdataset_task,
)
