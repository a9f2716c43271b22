# voxlog's own services (gateway, workers, projector); see docker-compose.yml.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VOXLOG_HOME=/data

# flite and espeak-ng: offline speech synthesis (flite the default voice); sox: audio conversion.
RUN apt-get update \
 && apt-get install -y --no-install-recommends flite espeak-ng sox \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY . .
# urllib3-future (caldav's niquests) built apart from urllib3, which its wheel would replace (tools/setup.sh).
RUN URLLIB3_NO_OVERRIDE=1 PIP_NO_BINARY=urllib3-future pip install . \
 && useradd --create-home --uid 10001 voxlog \
 && mkdir -p /data \
 && chown voxlog:voxlog /data

USER voxlog
VOLUME ["/data"]
EXPOSE 8080
ENTRYPOINT ["voxlog"]
CMD ["--help"]
