# regfsck in a container, to run beside the registry on the same volume:
#   docker build -t regfsck .
#   docker run --rm -v registry-data:/var/lib/registry regfsck verify /var/lib/registry
# BASE: any Debian-like image with python3 (>= 3.11) and its venv module.
# USER: root by default, like registry:2 (whose files are root's); `--build-arg USER=regfsck`
# bakes in the unprivileged user (uid/gid 10001), or choose at run time with `--user`.
ARG BASE=python:3.12-slim

FROM ${BASE} AS build
# Behind a proxy or a private index: pass pip's own settings, e.g. --build-arg PIP_INDEX_URL=...,
# or a CA bundle mounted into the build (`-v /etc/ssl/certs:/etc/ssl/certs:ro` and
# --build-arg PIP_CERT=/etc/ssl/certs/ca-certificates.crt).
ARG PIP_INDEX_URL
ARG PIP_CERT
COPY pyproject.toml README.md /src/
COPY regfsck /src/regfsck
RUN python3 -m venv /opt/regfsck \
 && /opt/regfsck/bin/pip install --no-cache-dir --disable-pip-version-check /src \
 && /opt/regfsck/bin/regfsck --version

FROM ${BASE}
ARG USER=root
COPY --from=build /opt/regfsck /opt/regfsck
RUN groupadd --system --gid 10001 regfsck \
 && useradd --system --uid 10001 --gid regfsck --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin regfsck
ENV PATH=/opt/regfsck/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER ${USER}
WORKDIR /tmp
VOLUME ["/var/lib/registry"]
ENTRYPOINT ["regfsck"]
CMD ["--help"]
