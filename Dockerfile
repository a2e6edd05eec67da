# Worker and dashboard image. The tag's torch version must match the torch pin in
# pyproject.toml (PyPI's torch 2.14.1 is built for CUDA 13.0), so `pip install .` keeps the
# base image's CUDA build instead of downloading another one.
FROM pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# Metadata first so the dependency layer is reused when only the code changes.
COPY pyproject.toml README.md ./
COPY nkat_search ./nkat_search
# Same install as the README; a dev checkout uses `pip install -e .` instead.
RUN pip install .

# Datasets and run artifacts live on volumes (see docker-compose.yml).
ENV NKAT_SEARCH_DATA_ROOT=/data
VOLUME ["/data", "/artifacts"]

CMD ["nkat-search", "worker"]
