# The YOLOv7 Label Studio ML backend.
#
#   docker build -t yolo-backend .                       # CPU (PyTorch's CPU wheel: no CUDA download)
#   docker build -t yolo-backend:cuda \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .   # CUDA (run with --gpus all)
#
#   docker run -p 9090:9090 -v yolo-data:/data yolo-backend
#
# A checkpoint into the volume first, then run with -e MODEL_PATH=/data/weights/best.pt:
#   docker run --rm -v yolo-data:/data -v "$PWD/best.pt":/src/best.pt:ro --entrypoint cp yolo-backend \
#     /src/best.pt /data/weights/best.pt
#
# The default command is `python -m yolo_backend serve`: server + one training worker + an embedded Redis-protocol
# broker in one container. docker-compose.yml runs them as separate services (gunicorn, worker, redis) instead.
FROM python:3.11-slim

# The torch build: PyTorch's CPU index by default; a CUDA index (see above) for GPUs.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app \
    HOST=0.0.0.0 \
    PORT=9090 \
    MODEL_DIR=/data/models \
    IMAGE_CACHE_DIR=/data/image-cache \
    ONNX_CACHE_DIR=/data/onnx-cache

WORKDIR /app

# torch first, from its own index, so requirements.txt finds it installed and never pulls the CUDA build.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
COPY requirements.txt requirements-nodeps.txt ./
# The video tracker without its dependencies: trackers lists opencv-python, a second cv2 beside the headless one.
RUN pip install --no-cache-dir -r requirements.txt \
    && pip install --no-cache-dir --no-deps -r requirements-nodeps.txt

COPY _wsgi.py model_backend.py gunicorn.conf.py YoloToLabelStudio.py ./
COPY yolo_backend ./yolo_backend

# Run as a non-root user; models, caches and the embedded broker's data live in the /data volume. A new named volume
# starts with these folders, so `docker compose cp best.pt server:/data/weights/best.pt` has somewhere to go.
RUN useradd --create-home --uid 10001 --user-group app \
    && mkdir -p /data/models /data/weights /data/image-cache /data/onnx-cache \
    && chown -R app:app /data
USER 10001:10001
VOLUME ["/data"]
EXPOSE 9090

HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '9090'), timeout=4)"]

CMD ["python", "-m", "yolo_backend", "serve", "--host", "0.0.0.0", "--port", "9090"]
