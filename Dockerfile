# One image for every process of the exchange (api, matcher, sweeper, migrate): the command picks the role.
# Multi-stage: uv resolves from the committed uv.lock in a builder; the runtime image holds only the venv + code.

FROM python:3.11-slim-bookworm AS builder
RUN pip install --no-cache-dir "uv>=0.9"
ENV UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_PYTHON_DOWNLOADS=never
WORKDIR /app
# Dependencies first (cached layer), then the project itself.
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-dev --no-install-project
COPY exchange ./exchange
COPY workers ./workers
COPY alembic ./alembic
COPY ops ./ops
COPY gunicorn.conf.py ./
RUN uv sync --frozen --no-dev

FROM python:3.11-slim-bookworm AS runtime
RUN groupadd --system exchange && useradd --system --gid exchange --home-dir /app exchange
WORKDIR /app
COPY --from=builder --chown=exchange:exchange /app /app
ENV PATH="/app/.venv/bin:$PATH" PYTHONUNBUFFERED=1
USER exchange
EXPOSE 8000 9100
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8000/health/live', timeout=2)" || exit 1
ENTRYPOINT ["exchange"]
CMD ["api", "--bind", "0.0.0.0:8000", "--workers", "2"]
