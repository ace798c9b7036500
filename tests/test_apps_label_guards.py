"""The MONAI Label app's safe defaults and clear refusals, against the real server on 127.0.0.1.

One server (``python apps/monailabel``, as documented) serves an untrained small CellVTA whose model folder
records its network (``overrides.json``), so it starts without any ``--conf overrides``; the model's quality does
not matter here. The studies folder holds real CoNSeP tiles and a two-level pyramidal TIFF at 0.25 um/px.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from tests.test_monailabel_app import NETWORK, Server, label_python, pyramid, write_png  # noqa: F401

# starting the server (about 75 s on 2 shared cores) is paid by the module's first test
pytestmark = pytest.mark.slow

TILES = {"tile_a": 120, "tile_b": 40}
CLASSES = ["background", "other", "inflammatory", "epithelial", "spindle-shaped"]


def untrained_model(folder: Path, network: dict) -> Path:
    """A model folder (weights of a freshly initialised network, class table, network record)."""
    from cellvta_label.bundle import bundle_parser

    bundle = Path(__file__).resolve().parents[1] / "bundles" / "cellvta"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset.json").write_text(json.dumps({"classes": CLASSES, "tissues": ["colon"], "magnification": 40,
                                                     "samples": []}))
    parser = bundle_parser(bundle, "inferring", {"model_dir": str(folder), **network})
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("network_def", instantiate=True).state_dict(), folder / "model.pt")
    (folder / "overrides.json").write_text(json.dumps(network))
    return folder


@pytest.fixture(scope="module")
def guarded(label_python, consep, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("guarded")
    studies = root / "studies"
    studies.mkdir()
    for name, i in TILES.items():
        write_png(studies / f"{name}.png", consep["images"][i][:128, :128])
    # the README names .jpeg and .tiff too
    assert cv2.imwrite(str(studies / "tile_c.jpeg"), consep["images"][300][:128, :128, ::-1].copy())
    slide = np.concatenate([consep["images"][272], consep["images"][360]], 1)
    pyramid(studies / "slide.tiff", slide, mpp=0.25)
    model = untrained_model(root / "model", NETWORK)
    outside = root / "outside"
    outside.mkdir()
    server = Server(label_python, studies, model, root / "work", root / "server.log", args=[])
    try:
        server.wait_ready()
        server.outside = outside
        server.token = (studies / ".cellvta_token").read_text().strip()
        yield server
    finally:
        server.stop()


def call(server, method: str, path: str, **kwargs):
    import requests

    return requests.request(method, f"{server.url}{path}", timeout=600, **kwargs)


def assert_refused(answer, status: int, *fragments: str) -> None:
    assert answer.status_code == status, (answer.status_code, answer.text)
    detail = answer.json()["detail"]
    for fragment in fragments:
        assert fragment in detail, detail


def test_browsers_may_call_only_from_the_servers_own_origin(guarded):
    preflight = {"Access-Control-Request-Method": "POST"}
    evil = call(guarded, "OPTIONS", "/train/cellvta", headers={"Origin": "http://evil.example", **preflight})
    assert evil.status_code == 400 and "access-control-allow-origin" not in evil.headers
    simple = call(guarded, "GET", "/info/", headers={"Origin": "http://evil.example"})
    assert simple.status_code == 200 and "access-control-allow-origin" not in simple.headers
    own = f"http://127.0.0.1:{guarded.port}"
    ok = call(guarded, "OPTIONS", "/train/cellvta", headers={"Origin": own, **preflight})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == own


def test_ids_are_confined_to_the_datastore(guarded):
    target = guarded.outside / "written"
    relative = f"../{guarded.outside.name}/written"
    png = (guarded.studies / "tile_a.png").read_bytes()
    assert_refused(call(guarded, "PUT", "/datastore/image", params={"image": relative},
                        files={"file": ("x.png", png)}), 400, "not an id of the datastore")
    assert_refused(call(guarded, "PUT", "/datastore/image", params={"image": str(target)},
                        files={"file": ("x.png", png)}), 400, "not an id")
    assert not any(guarded.outside.iterdir())
    # an existing file outside, by absolute and by relative path, is neither read nor deleted
    target.write_bytes(png)
    for image in (str(target), relative, str(guarded.studies / "tile_a.png"), "/etc/passwd"):
        assert_refused(call(guarded, "POST", "/infer/cellvta", params={"image": image, "output": "json"}), 400,
                       "not an id")
        assert_refused(call(guarded, "DELETE", "/datastore/image", params={"id": image}), 400, "not an id")
        assert_refused(call(guarded, "GET", "/datastore/image", params={"image": image}), 400, "not an id")
    label = {"label": ("x.xml", b"<ASAP_Annotations/>")}
    assert_refused(call(guarded, "PUT", "/datastore/label", params={"image": relative}, files=label), 400)
    assert_refused(call(guarded, "PUT", "/datastore/label", params={"image": "tile_a", "tag": "../../x"},
                        files=label), 400, "tag")
    assert_refused(call(guarded, "DELETE", "/datastore/label", params={"id": relative, "tag": "final"}), 400)
    assert target.read_bytes() == png and sorted(p.name for p in guarded.outside.iterdir()) == ["written"]
    # unknown ids: 404 naming them
    assert_refused(call(guarded, "POST", "/infer/cellvta", params={"image": "nope", "output": "json"}), 404,
                   "'nope': not in the datastore")
    assert_refused(call(guarded, "DELETE", "/datastore/label", params={"id": "tile_b", "tag": "final"}), 404)
    assert_refused(call(guarded, "GET", "/datastore/image/info", params={"image": "nope"}), 404)


def test_weights_dataset_and_log_downloads_need_the_token(guarded):
    for path in ("/model/cellvta", "/datastore/dataset", "/logs/"):
        assert_refused(call(guarded, "GET", path), 401, "token")
        assert_refused(call(guarded, "GET", path, headers={"Authorization": "Bearer wrong"}), 401)
    weights = call(guarded, "GET", "/model/cellvta", headers={"Authorization": f"Bearer {guarded.token}"})
    assert weights.status_code == 200 and weights.content == (guarded.model_dir / "model.pt").read_bytes()


def test_every_readme_image_type_is_listed_and_answers_name_no_server_folder(guarded, consep):
    info = call(guarded, "GET", "/info/").json()
    assert info["datastore"]["total"] == 4  # tile_a.png, tile_b.png, tile_c.jpeg, slide.tiff
    assert info["models"]["cellvta"]["labels"] == {name: i for i, name in enumerate(CLASSES) if i}
    polygon = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[5, 5], [30, 5], [30, 30]]]},
               "properties": {"classification": {"name": "Tumour"}}}
    saved = call(guarded, "PUT", "/datastore/label", params={"image": "tile_c"},
                 files={"label": ("l.geojson", json.dumps({"type": "FeatureCollection", "features": [polygon]}))})
    assert saved.status_code == 200, saved.text
    answers = [call(guarded, "GET", "/datastore/", params={"output": output}).text for output in ("all", "train")]
    answers += [call(guarded, "GET", "/datastore/image/info", params={"image": "tile_a"}).text,
                call(guarded, "POST", "/activelearning/random", json={}).text, json.dumps(info)]
    assert json.loads(answers[1]) == [{"image": "tile_c.jpeg", "label": "labels/final/tile_c.geojson"}]
    for text in answers:
        for folder in (guarded.studies, guarded.model_dir, guarded.studies.parent):
            assert str(folder) not in text
    assert call(guarded, "DELETE", "/datastore/label", params={"id": "tile_c", "tag": "final"}).status_code == 200


def test_bad_requests_are_answered_4xx_with_the_reason(guarded):
    def wsi(body, **params):
        return call(guarded, "POST", "/infer/wsi_v2/cellvta", params={"image": "slide", "output": "json", **params},
                    data={"wsi": body if isinstance(body, str) else json.dumps(body)})

    region = {"location": [0, 0], "size": [128, 128], "tile_size": [128, 128], "level": 0}
    assert_refused(wsi("{not json"), 400, "malformed JSON")
    assert_refused(wsi({**region, "level": 5}), 400, "level 5 requested, the slide has levels 0..1")
    assert_refused(wsi({**region, "location": [-64, 0]}), 400, "negative")
    assert_refused(wsi({**region, "location": [500, 0]}), 400, "reaches beyond the slide (512 x 256")
    assert_refused(wsi({**region, "size": [0, 128]}), 400, "must be positive")
    assert_refused(wsi({**region, "tile_size": [0, 0]}), 400, "tile_size")
    assert_refused(wsi({**region, "level": "x"}), 400, "invalid request fields")
    # level 1 is 0.5 um/px, twice the network's resolution
    assert_refused(wsi({**region, "size": [64, 64], "level": 1}), 400, "level 1 is 0.5 um/px",
                   "0.25 um/px", "level 0 has it")
    assert_refused(call(guarded, "POST", "/activelearning/sharpest", json={}), 404, "strategy 'sharpest'")
    assert_refused(call(guarded, "POST", "/infer/segment_spleen", params={"image": "tile_a", "output": "json"}),
                   404, "model 'segment_spleen'")
    assert_refused(call(guarded, "POST", "/activelearning/random",
                        json={"image": "nope", "patch_size": [64, 64]}), 404, "'nope'")
    assert_refused(call(guarded, "POST", "/activelearning/random",
                        json={"image": "tile_a", "patch_size": [0, 64]}), 400, "must be positive")


def test_malformed_labels_are_refused_and_leave_nothing(guarded):
    cases = {
        "broken.xml": (b"<ASAP_Annotations><Annotations>", "not valid XML"),
        "oops.geojson": (json.dumps({"type": "FeatureCollection", "features": "oops"}).encode(),
                         "expected a GeoJSON FeatureCollection"),
        "bad.npz": (b"not a zip", "not a label npz"),
        "nuclei.exe": (b"MZ\x90\x00", "unsupported label format '.exe'"),
        "far.geojson": (json.dumps({"features": [{"geometry": {"type": "Polygon", "coordinates": [
            [[900, 900], [950, 900], [950, 950]]]}, "properties": {"classification": {"name": "other"}}}]}).encode(),
            "lies outside the image of 128 x 128 pixels"),
        "empty.xml": (b"<ASAP_Annotations><Annotations/></ASAP_Annotations>", "no labelled nuclei"),
    }
    import io

    small = io.BytesIO()
    np.savez(small, inst_map=np.zeros((10, 10), np.int32), type_map=np.zeros((10, 10), np.uint8))
    cases["small.npz"] = (small.getvalue(), "differ from the image size (128, 128)")
    for name, (content, reason) in cases.items():
        answer = call(guarded, "PUT", "/datastore/label", params={"image": "tile_a"}, files={"label": (name, content)})
        assert_refused(answer, 400, "label for tile_a", reason)
        assert "/tmp" not in answer.json()["detail"]
    assert not list((guarded.studies / "labels" / "final").iterdir())
    assert call(guarded, "GET", "/datastore/", params={"output": "train"}).json() == []


def test_deleting_a_label_removes_its_file_and_state(guarded, consep):
    from tests.test_monailabel_app import asap_xml, gt_polygons

    i = TILES["tile_b"]
    polygons = gt_polygons(consep["inst_map"][i][:128, :128], consep["type_map"][i][:128, :128], CLASSES)
    saved = call(guarded, "PUT", "/datastore/label", params={"image": "tile_b"},
                 files={"label": ("tile_b.xml", asap_xml(polygons))})
    assert saved.status_code == 200, saved.text
    label_file = guarded.studies / "labels" / "final" / "tile_b.xml"
    assert label_file.is_file()
    assert call(guarded, "GET", "/datastore/", params={"output": "train"}).json() != []
    assert call(guarded, "DELETE", "/datastore/label", params={"id": "tile_b", "tag": "final"}).status_code == 200
    assert not label_file.exists()
    assert call(guarded, "GET", "/datastore/", params={"output": "train"}).json() == []
    assert call(guarded, "GET", "/datastore/", params={"output": "all"}).json()["objects"]["tile_b"]["labels"] == {}
    assert call(guarded, "GET", "/datastore/").json()["completed"] == 0
    assert_refused(call(guarded, "DELETE", "/datastore/label", params={"id": "tile_b", "tag": "final"}), 404)


def test_random_strategy_keeps_answering_after_every_image_was_served(guarded):
    unlabelled = {"tile_a", "tile_b", "tile_c", "slide"}
    picked = []
    for _ in range(3 * len(unlabelled)):
        answer = call(guarded, "POST", "/activelearning/random", json={})
        assert answer.status_code == 200, answer.text
        picked.append(answer.json()["id"])
    assert set(picked) <= unlabelled and len(set(picked)) >= 2


def test_info_answers_while_an_inference_runs(guarded):
    done = threading.Event()
    results = {}

    def infer():
        body = {"location": [0, 0], "size": [256, 128], "tile_size": [128, 128], "level": 0}
        results["infer"] = call(guarded, "POST", "/infer/wsi_v2/cellvta", params={"image": "slide", "output": "json"},
                                data={"wsi": json.dumps(body)})
        done.set()

    worker = threading.Thread(target=infer)
    worker.start()
    time.sleep(1.0)  # the inference has started
    info = call(guarded, "GET", "/info/")
    status = call(guarded, "GET", "/datastore/")
    answered_during = not done.is_set()
    worker.join(600)
    assert info.status_code == 200 and status.status_code == 200
    assert results["infer"].status_code == 200, results["infer"].text
    assert answered_during, "the inference finished before /info answered: make the region larger"
    # the server log reports the inference's progress (each 128-pixel tile of the slide region, with its margin)
    assert "slide.tiff region [0, 0] [128, 128]: " in guarded.log.read_text()
