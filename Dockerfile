# parti_jax runtime image for GKE (`parti-jax launch gke`) and container-based SLURM
# (pyxis/enroot, apptainer): Python 3.11, the wheel that scripts/build_wheel.sh builds,
# installed with the exact pins of constraints.txt, and the accelerator's jax.
# Build from the repository root (the context is only dist/, see .dockerignore):
#
#   scripts/build_wheel.sh
#   docker build --build-arg ACCELERATOR=tpu -t REGISTRY/parti-jax:0.1.0-tpu .
#   docker build --build-arg ACCELERATOR=cuda -t REGISTRY/parti-jax:0.1.0-cuda .
#   docker build --build-arg ACCELERATOR=cpu -t parti-jax:0.1.0-cpu .
#
# REGISTRY/parti-jax:<version>-<tpu|cuda> is the image `launch gke --registry=REGISTRY`
# uses. CUDA needs no CUDA base image: jax[cuda12] brings CUDA and cuDNN as pip wheels
# and the node supplies only the NVIDIA driver (GKE mounts it into GPU pods).
FROM python:3.11.13-slim-bookworm

# tpu | cuda | cpu: which jax extra (jax[tpu], jax[cuda12], jax) at constraints.txt's pin.
ARG ACCELERATOR=tpu
# parti_jax.__version__; the wheel dist/parti_jax-$VERSION-py3-none-any.whl must exist.
ARG VERSION=0.1.0
# parti_jax extras: 'data' brings TensorFlow, SeqIO and TFDS for the input pipeline.
ARG EXTRAS=data

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV VIRTUAL_ENV=/opt/parti_jax/venv \
    PATH=/opt/parti_jax/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

COPY dist/parti_jax-${VERSION}-py3-none-any.whl dist/constraints.txt /tmp/parti_jax_dist/
# The wheel is pinned by its file name, everything else by constraints.txt (-c).
RUN jax_version="$(sed -n 's/^jax==\([^ ;#]*\).*/\1/p' /tmp/parti_jax_dist/constraints.txt)" \
    && case "${ACCELERATOR}" in \
         tpu) jax="jax[tpu]==${jax_version}" ;; \
         cuda) jax="jax[cuda12]==${jax_version}" ;; \
         cpu) jax="jax==${jax_version}" ;; \
         *) echo "ACCELERATOR=${ACCELERATOR}: use tpu, cuda or cpu" >&2; exit 1 ;; \
       esac \
    && python -m venv "${VIRTUAL_ENV}" \
    && "${VIRTUAL_ENV}/bin/python" -m pip install -c /tmp/parti_jax_dist/constraints.txt \
         "/tmp/parti_jax_dist/parti_jax-${VERSION}-py3-none-any.whl${EXTRAS:+[${EXTRAS}]}" \
         "${jax}" \
    && rm -rf /tmp/parti_jax_dist \
    && python -c 'import jax, parti_jax; print("parti_jax", parti_jax.__version__, "jax", jax.__version__)' \
    && parti-jax --help > /dev/null \
    && groupadd --gid 1000 parti \
    && useradd --create-home --uid 1000 --gid 1000 --shell /bin/bash parti

# A numeric user, so that Kubernetes' runAsNonRoot can check it.
USER 1000:1000
WORKDIR /home/parti
CMD ["parti-jax", "--help"]
