# Worker and dashboard image. By default it builds on the CUDA PyTorch image whose torch is the version
# CI tests (torch==2.14.1 in constraints/ci.txt; PyPI's torch 2.14.1 is built for CUDA 13.0), so the
# install below keeps the image's CUDA build instead of downloading another one.
#
# BASE_IMAGE may name any image with Python >= 3.11 whose `pip` installs into its own environment
# (docker compose passes BASE_IMAGE from .env). Without torch there, pip installs PyPI's torch 2.14.1:
# the test suite builds on a local Debian image that way (scripts/docker-images.sh; docs/clusters.md).
ARG BASE_IMAGE=pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# torch and torchvision at CI's versions first, in a layer of their own that a code change leaves
# cached (gigabytes where the base has no torch; nothing to do on the PyTorch image).
COPY constraints/ci.txt ./constraints/ci.txt
RUN pip install -c constraints/ci.txt torch torchvision
# The same install as the README (a dev checkout uses `pip install -e .` instead).
COPY pyproject.toml README.md ./
COPY nkat_search ./nkat_search
RUN pip install -c constraints/ci.txt .

# Datasets and run artifacts live on volumes (see docker-compose.yml): `report` writes retrained
# weights to the artifact store there and the dashboard serves them from it.
ENV NKAT_SEARCH_DATA_ROOT=/data \
    NKAT_SEARCH_ARTIFACTS=/artifacts
VOLUME ["/data", "/artifacts"]

CMD ["nkat-search", "worker"]
