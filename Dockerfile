# The dashboard's charts: Apache ECharts from the npm registry, as package-lock.json pins it.
FROM node:20-slim AS web
WORKDIR /build
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund

# One image for the API and the workers. TORCH_VARIANT=cpu takes PyTorch's CPU-only wheel
# (about 200 MB); TORCH_VARIANT=cuda takes the default wheel, which bundles CUDA (several GB).
FROM python:3.11-slim

ARG TORCH_VARIANT=cpu
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
RUN if [ "$TORCH_VARIANT" = "cpu" ]; then \
        pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0; \
    else \
        pip install torch==2.13.0; \
    fi

COPY pyproject.toml README.md ./
COPY api ./api
# Installed with the api package's static files; the API serves it at /static/vendor/.
COPY --from=web /build/node_modules/echarts/dist/echarts.min.js ./api/static/vendor/
COPY cli ./cli
COPY services ./services
COPY worker ./worker
# /data/archive is owned by the service's user, so a new `archive` volume mounted there is too.
RUN pip install . && useradd --create-home --uid 10001 gradstream \
    && mkdir -p /data/archive && chown gradstream /data/archive
USER gradstream

EXPOSE 8000
CMD ["gradstream", "api", "--host", "0.0.0.0", "--port", "8000"]
