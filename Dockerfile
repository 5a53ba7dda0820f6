# The hybridrag worker image: CPU torch and the package, installed at build time.
#
#   docker build -t hybridrag .
#   docker run --rm -e KAFKA_BOOTSTRAP_SERVERS=broker:9092 hybridrag worker
#
# The entry point is the `hybridrag` command; docker-compose.yml runs the same
# image as the one-shot topics job (`topics create`) and as the workers (`worker`).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    HYBRIDRAG_DATA_DIR=/data \
    HYBRIDRAG_WEB_HOST=0.0.0.0

# The CPU wheel, pinned here as in the Makefile: PyPI's default Linux torch is
# the CUDA build, gigabytes the worker never uses. The constraint file keeps
# the package install below from replacing it.
ARG TORCH_VERSION=2.13.0
RUN pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu \
 && echo "torch==${TORCH_VERSION}" > /etc/torch-constraint.txt

WORKDIR /src
COPY pyproject.toml README.md topics.yaml ./
COPY agents ./agents
COPY models ./models
# non-editable: topics.yaml, the checkpoints and the demo resources travel as package data
RUN pip install -c /etc/torch-constraint.txt . \
 && cd / && rm -rf /src \
 && hybridrag --version && hybridrag topics list >/dev/null

RUN useradd --system --uid 10001 --create-home hybridrag \
 && mkdir -p /data && chown hybridrag /data
USER hybridrag
WORKDIR /data
VOLUME ["/data"]
EXPOSE 6066

ENTRYPOINT ["hybridrag"]
CMD ["worker"]
