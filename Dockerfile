# CPU image of the Vertex AI / Kubeflow pipeline's steps other than training (acquire logs,
# Beam preprocessing on the in-process runner or launching a Dataflow job, evaluate, gate,
# export) and of the project's own model server. Training has a GPU image
# (dockerfiles/trainer.Dockerfile) and Dataflow workers need Beam's SDK image
# (dockerfiles/beam_worker.Dockerfile); tests/test_docker_images.py checks all three against
# requirements.txt. Build from the repository root, push, compile the pipeline against it:
#   docker build -t REGION-docker.pkg.dev/PROJECT/qin/qin-search:TAG .
#   docker push REGION-docker.pkg.dev/PROJECT/qin/qin-search:TAG
#   QIN_PIPELINE_IMAGE=REGION-docker.pkg.dev/PROJECT/qin/qin-search:TAG \
#   QIN_TRAINER_IMAGE=REGION-docker.pkg.dev/PROJECT/qin/qin-search-trainer:TAG \
#       python -m pipelines.compile --output qin_pipeline.yaml
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
