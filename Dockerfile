# Worker and dashboard image. The base image's torch is the version CI tests (torch==2.14.1 in
# constraints/ci.txt; PyPI's torch 2.14.1 is built for CUDA 13.0), so `pip install .` keeps the
# image's CUDA build instead of downloading another one: pyproject.toml only asks for a range.
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

# Datasets and run artifacts live on volumes (see docker-compose.yml): `report` writes retrained
# weights to the artifact store there and the dashboard serves them from it.
ENV NKAT_SEARCH_DATA_ROOT=/data \
    NKAT_SEARCH_ARTIFACTS=/artifacts
VOLUME ["/data", "/artifacts"]

CMD ["nkat-search", "worker"]
