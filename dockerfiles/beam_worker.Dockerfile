# Dataflow worker image for `python -m preprocessing --runner DataflowRunner
# --sdk_container_image ...`: Beam's own SDK image (its Python and Beam versions are the ones
# requirements.txt and setup.py pin; tests/test_docker_images.py checks them), with the pinned
# stack and the project's packages installed. The SDK image's entrypoint, /opt/apache/beam/boot,
# is what starts the worker harness: it must stay the entrypoint.
#   docker build -f dockerfiles/beam_worker.Dockerfile -t REGION-docker.pkg.dev/PROJECT/qin/qin-search-beam:TAG .
#   docker push REGION-docker.pkg.dev/PROJECT/qin/qin-search-beam:TAG
FROM apache/beam_python3.11_sdk:2.77.0
WORKDIR /app
ENV TF_USE_LEGACY_KERAS=1 PYTHONUNBUFFERED=1
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY setup.py .
COPY common/ common/
COPY preprocessing/ preprocessing/
COPY trainer/ trainer/
COPY serving/ serving/
COPY pipelines/ pipelines/
# Installed (not only on PYTHONPATH) so the harness imports them whatever its working directory.
RUN pip install --no-cache-dir --no-deps .
ENTRYPOINT ["/opt/apache/beam/boot"]
