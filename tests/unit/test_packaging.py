"""The installed package (``pip install .``, as the image does) carries what the pages
need: the JavaScript client the chat page imports comes from clients/js/src itself,
mapped into the package, not from a copy kept by hand."""

from __future__ import annotations

import re
import tomllib

from chat_gateway.server.app import SDK_PATH, sdk_file
from tests.harness import ROOT


def test_the_package_and_the_image_carry_the_js_client_the_page_imports():
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "chat_gateway.sdk" in conf["packages"]
    source = conf["package-dir"]["chat_gateway.sdk"]
    assert source == "clients/js/src"
    assert {"index.js", "worker.js"} <= set(conf["package-data"]["chat_gateway.sdk"])
    # a checkout serves the client's own file; an installed package, its mapped copy
    assert sdk_file() == ROOT / source / "index.js"
    assert not (ROOT / "src" / "chat_gateway" / "static" / "chat-gateway.js").exists(), (
        "no second copy in static/"
    )

    # the image's build stage has the source to map
    dockerfile = (ROOT / "Dockerfile").read_text()
    build = dockerfile.split("\nFROM ")[1]  # the build stage
    copied = re.findall(r"^COPY\s+(\S+)\s+\S+\s*$", build, re.M)
    assert any(source == c.rstrip("/") or source.startswith(c.rstrip("/") + "/") for c in copied), (
        copied
    )

    # and the page imports it from where it is served
    assert SDK_PATH == "/sdk/chat-gateway.js"
    assert (
        f'from "{SDK_PATH}"' in (ROOT / "src" / "chat_gateway" / "static" / "chat.js").read_text()
    )
    assert (
        'type="module" src="/static/chat.js"'
        in (ROOT / "src" / "chat_gateway" / "static" / "index.html").read_text()
    )


def test_one_import_name_and_every_sub_package_of_the_tree_is_installed():
    """``pip install .`` adds one top-level import name, ``chat_gateway``: the
    packages pyproject lists are its sub-packages, exactly those of src/ (a new
    folder left out of the list would be missing from an installed gateway)."""
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(conf["packages"])
    assert {name.split(".")[0] for name in listed} == {"chat_gateway"}
    src = ROOT / "src"
    in_tree = {
        ".".join(path.relative_to(src).parts)
        for path in src.rglob("*")
        if path.is_dir()
        and path.name != "__pycache__"
        and not path.name.endswith(".egg-info")
        and (any(path.glob("*.py")) or path.name in ("static", "migrations"))
    }
    # static/vendor's files ride with static (package data), sdk is mapped from clients/js
    assert listed - {"chat_gateway.sdk"} == in_tree, listed ^ in_tree
    assert conf["package-dir"][""] == "src"
