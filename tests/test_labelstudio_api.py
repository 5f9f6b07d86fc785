"""The Label Studio API through label-studio-sdk (yolo_backend/labelstudio/api.py) keeps the session's key rules:
only LABEL_STUDIO_URL, its keys in order with fallback, PATs exchanged for access tokens; errors say what to do."""

import socket

import pytest

from tests.support import LEGACY, PAT, FakeLabelStudio
from yolo_backend.labelstudio.api import LabelStudioClient
from yolo_backend.labelstudio.client import LabelStudioAPIError, LabelStudioAuthError, LabelStudioSession, \
    ProjectNotFound

TASKS = [{"id": 1, "data": {"image": "/data/upload/1/img1.png"}, "annotations": [{"id": 1, "result": []}]},
         {"id": 2, "data": {"image": "/data/upload/1/img2.png"}, "annotations": []}]


@pytest.mark.parametrize("key", [LEGACY, PAT], ids=["legacy token", "personal access token"])
def test_calls_with_either_kind_of_key(key):
    with FakeLabelStudio(TASKS) as ls:
        client = LabelStudioClient.for_session(LabelStudioSession(ls.url, key))
        assert client.get_project(1)["id"] == 1
        assert [t["id"] for t in client.export_tasks(1)] == [1]
        listed = client.tasks(1, with_annotations=False)
        assert [(t["id"], t["is_labeled"]) for t in listed] == [(1, True), (2, False)]
        client.create_prediction(2, [], 0.5, "v7")
        assert client.set_project_model_version(1, "v7")["model_version"] == "v7"
        assert ls.predictions == [{"task": 2, "result": [], "score": 0.5, "model_version": "v7"}]
        assert ls.refreshes == (1 if key == PAT else 0)


def test_a_revoked_access_token_is_refreshed():
    with FakeLabelStudio(TASKS) as ls:
        client = LabelStudioClient.for_session(LabelStudioSession(ls.url, PAT))
        client.get_project(1)
        ls.generation += 1
        assert client.get_project(1)["id"] == 1 and ls.refreshes == 2


def test_no_api_client_for_a_setup_hostname_alone():
    with FakeLabelStudio(TASKS) as ls:
        session = LabelStudioSession(None, None)
        session.update_from_setup(ls.url, LEGACY)
        assert session.credentials() and LabelStudioClient.for_session(session) is None
        assert LabelStudioClient.for_session(LabelStudioSession(ls.url, None)) is None


def test_falls_back_to_the_setup_token_of_the_same_origin_only():
    with FakeLabelStudio(TASKS) as ls:
        session = LabelStudioSession(ls.url, "f" * 40)              # a wrong configured key
        session.update_from_setup(ls.other_host_url, LEGACY)         # another origin: not trusted
        client = LabelStudioClient.for_session(session)
        with pytest.raises(LabelStudioAuthError, match="refused every API key.*LABEL_STUDIO_API_KEY"):
            client.get_project(1)
        session.update_from_setup(ls.url, LEGACY)                    # LABEL_STUDIO_URL's own origin
        assert client.get_project(1)["id"] == 1
        assert [c.source for c in session.credentials()] == ["/setup", "LABEL_STUDIO_API_KEY"]  # refused last


def test_errors_say_what_to_do():
    with FakeLabelStudio(TASKS) as ls:
        client = LabelStudioClient.for_session(LabelStudioSession(ls.url, LEGACY))
        with pytest.raises(ProjectNotFound, match="has no project 5"):
            client.get_project(5)
        ls.legacy_enabled = False                                    # a JWT-only organisation
        with pytest.raises(LabelStudioAuthError, match="personal access token"):
            client.tasks(1, with_annotations=True)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    client = LabelStudioClient.for_session(LabelStudioSession(closed, LEGACY))
    with pytest.raises(LabelStudioAPIError, match="did not answer.*check LABEL_STUDIO_URL"):
        client.get_project(1)
