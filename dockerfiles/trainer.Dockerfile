# GPU image of the pipeline's train step (Vertex AI gives it an NVIDIA T4 by default, see
# TRAIN_ACCELERATOR in pipelines/pipeline.py). TensorFlow's own GPU image brings CUDA, cuDNN and
# a TensorFlow build for them; its version is the one requirements.txt pins, so installing the
# requirements keeps it and adds the rest of the stack (tests/test_docker_images.py checks the
# pins). Build from the repository root and compile the pipeline against it:
#   docker build -f dockerfiles/trainer.Dockerfile -t REGION-docker.pkg.dev/PROJECT/qin/qin-search-trainer:TAG .
#   docker push REGION-docker.pkg.dev/PROJECT/qin/qin-search-trainer:TAG
#   QIN_TRAINER_IMAGE=REGION-docker.pkg.dev/PROJECT/qin/qin-search-trainer:TAG \
#   QIN_PIPELINE_IMAGE=REGION-docker.pkg.dev/PROJECT/qin/qin-search:TAG \
#       python -m pipelines.compile --output qin_pipeline.yaml
FROM tensorflow/tensorflow:2.20.0-gpu
ARG PYTHON_VERSION=3.11
WORKDIR /app
ENV TF_USE_LEGACY_KERAS=1 PYTHONUNBUFFERED=1 PYTHONPATH=/app
# The project supports one Python (setup.py); fail the build if the base image moved on.
RUN python3 -c "import sys; found = '%d.%d' % sys.version_info[:2]; assert found == '${PYTHON_VERSION}', found"
COPY requirements.txt .
RUN python3 -m pip install --no-cache-dir -r requirements.txt
# The GPU build of TensorFlow must survive the install (a CPU wheel replacing it would train on
# the CPU while the T4 idles).
RUN python3 -c "import tensorflow as tf; assert tf.test.is_built_with_cuda(), tf.__version__"
COPY common/ common/
COPY preprocessing/ preprocessing/
COPY trainer/ trainer/
COPY serving/ serving/
COPY pipelines/ pipelines/
