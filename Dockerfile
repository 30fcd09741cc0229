# One image for the api, the executor and the migration step (compose picks the command).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app

COPY pyproject.toml README.md ./
COPY shared shared
COPY services services
COPY tools tools
COPY migrations migrations
# Installs the dependencies and the project in editable mode: the code runs from /app, where
# migrations/ sits beside it, from any working directory (a plain install would put a second
# copy of the code in site-packages, without migrations/).
# /certs and /tokens belong to the service user: a new named volume mounted there (compose's
# `certs` and `tokens`) starts with this ownership, so the one-shot steps can write into it.
RUN pip install --no-cache-dir -e . && useradd --system --uid 10001 automation \
    && mkdir /certs /tokens && chown automation /certs /tokens
USER automation

EXPOSE 50051
CMD ["python", "-m", "services.api"]
