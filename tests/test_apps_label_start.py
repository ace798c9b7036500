"""Starting the MONAI Label app: what it refuses at start, and MONAI Label's own authentication switched on.

The realm is a local HTTP endpoint serving the realm's public key (the document a Keycloak realm serves at its
URL, all MONAI Label reads from it to verify tokens); tokens are RS256 JWTs signed with the matching private
key, with the roles in ``realm_access.roles`` as Keycloak issues them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from tests.test_apps_label_guards import CLASSES, untrained_model
from tests.test_monailabel_app import APP, NETWORK, Server, label_python, write_png  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow

SIGN = r"""
import json, sys, time, base64
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
public = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
def token(name, roles):
    claims = {"preferred_username": name, "realm_access": {"roles": roles}, "exp": int(time.time()) + 3600}
    return jwt.encode(claims, key, algorithm="RS256")
print(json.dumps({"public_key": base64.b64encode(public).decode(),
                  "user": token("ann", ["monailabel-user"]),
                  "admin": token("boss", ["monailabel-admin", "monailabel-annotator", "monailabel-user"])}))
"""


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    return untrained_model(tmp_path_factory.mktemp("start") / "model", NETWORK)


@pytest.fixture(scope="module")
def studies(consep, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("start_studies")
    write_png(folder / "tile.png", consep["images"][120][:128, :128])
    return folder


def test_a_checkpoint_of_another_architecture_stops_the_start(label_python, model_folder, studies, tmp_path):
    other = tmp_path / "model"
    shutil.copytree(model_folder, other)
    (other / "overrides.json").write_text(json.dumps({**NETWORK, "vit_kwargs": {"depth": 6}}))
    server = Server(label_python, studies, other, tmp_path / "work", tmp_path / "server.log", args=[])
    try:
        with pytest.raises(AssertionError, match="server exited"):
            server.wait_ready(timeout=600)
    finally:
        server.stop()
    log = (tmp_path / "server.log").read_text()
    assert "model.pt does not fit the network of the inferring configs" in log
    assert "'depth': 6" in log and "blocks.4." in log  # the settings and the keys of the missing blocks


def test_a_network_address_without_authentication_is_refused(label_python, studies):
    run = subprocess.run([str(label_python), str(APP), "--studies", str(studies), "--host", "0.0.0.0"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode != 0 and "without authentication" in run.stderr


class Realm(BaseHTTPRequestHandler):
    document = b"{}"

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(self.document)

    def log_message(self, *args):
        pass


def test_monai_label_authentication_guards_every_role(label_python, model_folder, studies, tmp_path):
    import requests

    own_studies = tmp_path / "studies"
    shutil.copytree(studies, own_studies, ignore=shutil.ignore_patterns(".*"))

    keys = json.loads(subprocess.run([str(label_python), "-c", SIGN], capture_output=True, text=True, check=True,
                                     timeout=300).stdout)
    Realm.document = json.dumps({"realm": "cellvta", "public_key": keys["public_key"]}).encode()
    realm = HTTPServer(("127.0.0.1", 0), Realm)
    threading.Thread(target=realm.serve_forever, daemon=True).start()
    env = {"MONAI_LABEL_AUTH_ENABLE": "true",
           "MONAI_LABEL_AUTH_REALM_URI": f"http://127.0.0.1:{realm.server_port}/realms/cellvta"}
    server = Server(label_python, own_studies, model_folder, tmp_path / "work", tmp_path / "server.log", args=[],
                    env=env)
    try:
        def get(path, who=None):
            headers = {"Authorization": f"Bearer {keys[who]}"} if who else {}
            return requests.get(f"{server.url}{path}", headers=headers, timeout=120)

        server.wait_ready(headers={"Authorization": f"Bearer {keys['user']}"})
        assert get("/info/").status_code == 401
        assert get("/info/", "user").json()["models"]["cellvta"]["labels"] == {n: i for i, n in enumerate(CLASSES) if i}
        assert get("/model/cellvta", "user").status_code == 403  # weights: admin only
        assert get("/datastore/dataset", "user").status_code == 403  # the datastore's archive: annotators
        weights = get("/model/cellvta", "admin")
        assert weights.status_code == 200 and weights.content == (model_folder / "model.pt").read_bytes()
        assert not (own_studies / ".cellvta_token").exists()  # MONAI Label authenticates; no download token
        assert requests.get(f"{server.url}/info/", headers={"Authorization": "Bearer forged"}, timeout=60
                            ).status_code == 401
    finally:
        server.stop()
        realm.shutdown()
