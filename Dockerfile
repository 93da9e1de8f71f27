# NVAE + EVaLP training image: CUDA PyTorch, this project, torchrun as the entry point.
#   docker build -t evalp-nvae .
#   docker run --gpus all --ipc=host -v "$PWD/data:/data" -v "$PWD/runs:/runs" evalp-nvae \
#       --nproc_per_node=8 scripts/train_nvae_evalp.py --vae /runs/mnist/checkpoint.pt --save /runs/mnist-evalp
# See docs/cluster.md for multi-node runs, pre-emption and Slurm/Kubernetes examples.

# Official PyTorch runtime image for the torch release pinned in requirements.txt. CUDA 13.0 needs an
# NVIDIA driver >= 580; on older drivers build from another CUDA variant of the same torch release,
# e.g. --build-arg BASE_IMAGE=pytorch/pytorch:2.14.1-cuda12.8-cudnn9-runtime (see docs/cluster.md).
ARG BASE_IMAGE=pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime
FROM ${BASE_IMAGE}

# UID/GID of the non-root user; match the host user (--build-arg UID=$(id -u)) so bind mounts stay writable.
ARG UID=1000
ARG GID=1000

# TORCH_ELASTIC_SHUTDOWN_TIMEOUT: seconds torchrun gives workers after forwarding SIGTERM before SIGKILL;
# long enough to write a checkpoint, shorter than the orchestrator's grace period (docs/cluster.md).
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TORCH_ELASTIC_SHUTDOWN_TIMEOUT=150 \
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 \
    PYTHONPATH=/workspace/evalp

# A failing command anywhere in a pipeline fails the build step.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

WORKDIR /workspace/evalp

# Dependencies before code, so editing the code does not rebuild this layer.
# torch/torchvision are NOT reinstalled: the base image's CUDA build "2.14.1+cuXXX" satisfies
# torch==2.14.1 (PEP 440 ignores local version labels), so pip keeps it; reinstalling would add
# gigabytes and could swap in a build for another CUDA. The last check fails the build if pip
# replaced torch anyway or it lost its CUDA support.
COPY requirements.txt requirements-nodeps.txt ./
RUN python -m pip install --no-cache-dir -r requirements.txt \
 && python -m pip install --no-cache-dir --no-deps -r requirements-nodeps.txt \
 && python -c "import torch, torchvision; v = torch.__version__.split('+')[0]; assert v == '2.14.1' and torch.version.cuda, torch.__version__"

# Non-root user. Recent Ubuntu bases ship a user with UID 1000 ('ubuntu'); it is replaced.
# /data (inputs) and /runs (checkpoints, logs, samples) are created owned by that user, so named
# volumes mounted there inherit the ownership; so is the project folder (relative --save paths work).
RUN if getent passwd "${UID}" >/dev/null; then userdel "$(getent passwd "${UID}" | cut -d: -f1)"; fi \
 && if ! getent group "${GID}" >/dev/null; then groupadd --gid "${GID}" evalp; fi \
 && useradd --create-home --uid "${UID}" --gid "${GID}" --shell /bin/bash evalp \
 && mkdir -p /data /runs \
 && chown "${UID}:${GID}" /data /runs /workspace/evalp

COPY --chown=${UID}:${GID} . .

VOLUME ["/data", "/runs"]
# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER ${UID}:${GID}

# The entry point hands torchrun arguments to torchrun (first argument starting with '-' or a .py file)
# and runs anything else as given (python, bash, pytest); it forwards SIGTERM and exits 75 on
# pre-emption. The default command prints the stage-2 options.
ENTRYPOINT ["/bin/bash", "/workspace/evalp/docker/entrypoint.sh"]
CMD ["--nproc_per_node=1", "scripts/train_nvae_evalp.py", "--help"]
