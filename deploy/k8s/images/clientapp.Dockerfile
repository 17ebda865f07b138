# The ClientApp runner of a site: the official image plus fedseal's dependencies.
# The app code itself arrives with each `flwr run` (the FAB), so a code change
# needs no new image, but a dependency change does.
#   docker build -f deploy/k8s/images/clientapp.Dockerfile -t registry.example.org/fedseal/clientapp:0.1.0 .
FROM flwr/clientapp:1.42.0
WORKDIR /opt/fedseal
COPY pyproject.toml README.md ./
COPY server server
COPY clients clients
COPY strategies strategies
COPY scenarios scenarios
COPY crypto crypto
COPY provenance provenance
COPY privacy privacy
COPY deploy deploy
COPY conf conf
# torch first and pinned to its CPU build: an open range pulls a multi-GB CUDA build.
RUN python -m pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
    && python -m pip install --no-cache-dir .
