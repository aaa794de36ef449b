# The project image used by every step of the Vertex AI / Kubeflow pipeline and by Dataflow
# workers (custom container). Build and push it, then compile the pipeline against it:
#   docker build -t REGION-docker.pkg.dev/PROJECT/qin/qin-search:TAG .
#   docker push REGION-docker.pkg.dev/PROJECT/qin/qin-search:TAG
#   QIN_PIPELINE_IMAGE=REGION-docker.pkg.dev/PROJECT/qin/qin-search:TAG \
#       python -m pipelines.compile --output qin_pipeline.yaml
# For GPU training use a CUDA base image instead (e.g. an NVIDIA CUDA 12 runtime image with
# Python 3.11) and `pip install tensorflow[and-cuda]==2.20.*` in place of tensorflow.
FROM python:3.11-slim
WORKDIR /app
ENV TF_USE_LEGACY_KERAS=1 PYTHONUNBUFFERED=1 PYTHONPATH=/app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY common/ common/
COPY preprocessing/ preprocessing/
COPY trainer/ trainer/
COPY serving/ serving/
COPY pipelines/ pipelines/
