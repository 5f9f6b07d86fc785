"""The smallest ML backend: one fixed box on every task. Copy this file to start your own.

Serve it with the same server as the YOLOv7 backend (from the repository root):

    python -m examples.minimal_backend            # http://127.0.0.1:9090, then connect it in Label Studio

or in your own ``_wsgi.py``: ``app = create_app(MinimalBackend)``. ``predict`` gets Label Studio's tasks and
answers one prediction per task, in task order; ``self.parsed_label_config`` says where the boxes go, as in the
classic label-studio-ml examples.
"""

from yolo_backend.server import LabelStudioMLBase, create_app


class MinimalBackend(LabelStudioMLBase):
    """Predicts a box over the middle of each image, with the config's first label."""

    def setup(self):
        self.model_version = "fixed-box-1"

    def predict(self, tasks, **kwargs):
        from_name, control = next(iter(self.parsed_label_config.items()))
        to_name, label = control["to_name"][0], control["labels"][0]
        box = {"x": 25.0, "y": 25.0, "width": 50.0, "height": 50.0, "rotation": 0, "rectanglelabels": [label]}
        region = {"from_name": from_name, "to_name": to_name, "type": "rectanglelabels", "value": box,
                  "score": 0.5}
        return [{"result": [region], "score": 0.5, "model_version": self.model_version} for _ in tasks]


if __name__ == "__main__":
    create_app(MinimalBackend).run(host="127.0.0.1", port=9090)
