# xds-server's image, as manifests/kubernetes/30-deployment.yaml runs it (non-root,
# read-only root filesystem). Built by hack/kind-e2e.sh.
FROM python:3.11-slim
WORKDIR /src
COPY pyproject.toml README.md ./
COPY xds_server ./xds_server
RUN pip install --no-cache-dir . && rm -rf /src
RUN useradd --uid 10001 --user-group --no-create-home xds
USER 10001:10001
WORKDIR /
EXPOSE 18000 18001 18002
ENTRYPOINT ["xds-server"]
CMD ["--help"]
