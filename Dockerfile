# The image every mmrad node runs: mmrad with its GPU extra (Ray 2.60, vLLM 0.33, torch 2.14
# with CUDA) baked onto NVIDIA's CUDA image, so a node joins the cluster in the time it takes
# to pull the image instead of pip-installing at boot. cluster.yaml runs it, Serve included.
#
#   docker build -t <registry>/mmrad:0.1.0 .      # the tag is pyproject.toml's version
#   docker push <registry>/mmrad:0.1.0
#
# Code changed after the build travels with each job (`ray job submit --working-dir .`);
# configs/cluster/job_env.yaml runs every job on this venv's python (py_executable).
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu22.04
FROM ${CUDA_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    HOME=/home/ray \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/mmrad/venv \
    PATH=/opt/mmrad/venv/bin:$PATH

# Python 3.11 (pyproject's requires-python); rsync, ssh and sudo for Ray's cluster launcher;
# a compiler for the kernels vLLM's attention backends build on first use. Not pinned: the
# base image's distribution gives them, security updates included.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      python3.11 python3.11-venv python3.11-dev build-essential \
      git rsync openssh-client sudo ca-certificates curl libgl1 libglib2.0-0 \
 && rm -rf /var/lib/apt/lists/*

# The launcher works as user `ray` (home /home/ray, passwordless sudo), as in Ray's images.
RUN useradd --create-home --uid 1000 --shell /bin/bash ray \
 && echo "ray ALL=(ALL) NOPASSWD:ALL" > /etc/sudoers.d/ray \
 && mkdir -p /opt/mmrad \
 && chown ray /opt/mmrad
USER ray
RUN python3.11 -m venv "$VIRTUAL_ENV" \
 && pip install --upgrade pip==25.3

WORKDIR /opt/mmrad/src
COPY --chown=ray pyproject.toml README.md ./
COPY --chown=ray mmrad ./mmrad
COPY --chown=ray ray_jobs ./ray_jobs
# every version is pinned in pyproject.toml
# hadolint ignore=DL3013
RUN pip install '.[gpu]'
COPY --chown=ray configs ./configs

WORKDIR /home/ray
