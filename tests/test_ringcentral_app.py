"""docs/ringcentral-app.md: the permissions it tells the admin to give the app are the ones RingCentral's
API reference requires for the operations faxd calls, and it stays within public sources."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from fidelity.spec import spec_path

from faxd.config import RingCentralConfig

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "ringcentral-app.md"
EXT = "/restapi/v1.0/account/{accountId}/extension/{extensionId}"

#: Every RingCentral operation faxd calls (faxd/adapters/rest.py, faxd/core/wsg.py) and the app
#: permission (x-app-permission) the spec gives it; None: no app permission.
CALLS = {
    ("post", "/restapi/oauth/token"): None,
    ("post", "/restapi/oauth/wstoken"): "WebSocket",
    ("post", "/restapi/oauth/revoke"): None,
    ("get", f"{EXT}/message-sync"): "ReadMessages",
    ("get", f"{EXT}/message-store/{{messageId}}"): "ReadMessages",
    ("post", f"{EXT}/fax"): "Faxes",
    ("post", "/restapi/v1.0/subscription"): None,
    ("put", "/restapi/v1.0/subscription/{subscriptionId}"): None,
}


def test_the_permissions_are_the_specs() -> None:
    paths = yaml.load(spec_path().read_text(), Loader=yaml.CSafeLoader)["paths"]
    found = {(method, path): paths[path][method].get("x-app-permission") for method, path in CALLS}
    assert found == CALLS
    table = DOC.read_text().split("## 3.")[0]
    for permission in {p for p in CALLS.values() if p}:
        assert f"| `{permission}`" in table, permission


def test_server_urls_and_links() -> None:
    text = DOC.read_text()
    production = RingCentralConfig.__dataclass_fields__["server"].default
    assert f"`{production}` (the default)" in text
    assert "`https://platform.devtest.ringcentral.com`" in text
    links = re.findall(r"\]\(([^)]+)\)|<(https?://[^>]+)>", text)
    for relative, absolute in links:
        if absolute:
            assert absolute.startswith("https://developers.ringcentral.com/"), absolute
        else:
            assert (DOC.parent / relative).resolve().is_relative_to(ROOT), relative
            assert (DOC.parent / relative).is_file(), relative
    assert "](ringcentral-app.md)" in (ROOT / "docs" / "operations.md").read_text()
